"""Run a long job (training, large inference) in a child process without freezing Slicer.

Same design as MONAIAuto3DSeg's background process: ``subprocess.Popen`` with stdout and
stderr merged, a reader thread that only puts lines into a ``queue.Queue``, and the GUI
thread draining that queue from a timer (``qt.QTimer`` in the Widget).  No Qt here, and no
Qt call ever happens on the reader thread.  Cancelling kills the whole process tree:
``proc.kill()`` alone would stop a launcher (``PythonSlicer``) and leave the real Python
child running.

Children report progress by printing lines ``PROGRESS <fraction> <message>``
(:func:`progressLine` writes them, :func:`parseProgressLine` reads them).
"""

import enum
import os
import queue
import shutil
import subprocess
import sys
import threading
from pathlib import Path

PROGRESS_PREFIX = "PROGRESS "


class ProcessState(enum.Enum):
    NOT_STARTED = "not started"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


def pythonExecutable():
    """``PythonSlicer`` inside Slicer (its environment has Slicer's packages), else this Python."""
    return shutil.which("PythonSlicer") or sys.executable


def deepimagingEnvironment():
    """Environment for ``deepimaging`` CLI children: the package importable, unbuffered UTF-8 output.

    Inside Slicer the package sits next to the scripted modules, which PythonSlicer does not
    put on its path by itself.
    """
    import deepimaging

    root = str(Path(deepimaging.__file__).resolve().parents[1])
    paths = [root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    # DEEPIMAGING_PROGRESS=lines: the CLI prints "PROGRESS <fraction> <message>" lines
    # (see parseProgressLine) instead of drawing tqdm bars.
    return {"PYTHONPATH": os.pathsep.join(dict.fromkeys(paths)), "PYTHONUNBUFFERED": "1", "PYTHONIOENCODING": "utf-8",
            "DEEPIMAGING_PROGRESS": "lines"}


def deepimagingCommand(*args):
    """``PythonSlicer -m deepimaging -v <args>`` (this Python outside Slicer)."""
    return [pythonExecutable(), "-m", "deepimaging", "-v"] + [str(a) for a in args]


def progressLine(fraction, message=""):
    """The line a child prints to report progress (``fraction`` in [0, 1])."""
    return f"{PROGRESS_PREFIX}{min(1.0, max(0.0, float(fraction))):.4f} {message}".rstrip()


def parseProgressLine(line):
    """``(fraction, message)`` for a progress line, ``None`` for any other output."""
    if not line.startswith(PROGRESS_PREFIX):
        return None
    parts = line[len(PROGRESS_PREFIX):].split(" ", 1)
    try:
        fraction = float(parts[0])
    except ValueError:
        return None
    return min(1.0, max(0.0, fraction)), (parts[1] if len(parts) > 1 else "")


class BackgroundProcess:
    """One child process whose output is collected on a thread and polled by the caller."""

    def __init__(self, args, env=None, cwd=None):
        self.args = [str(a) for a in args]
        self.env = env
        self.cwd = cwd
        self.state = ProcessState.NOT_STARTED
        self.returncode = None
        self._proc = None
        self._lines = queue.Queue()
        self._reader = None
        self._cancelRequested = False

    def start(self):
        environment = None
        if self.env is not None:
            environment = os.environ.copy()
            environment.update(self.env)
        kwargs = {}
        if os.name == "nt":
            startupInfo = subprocess.STARTUPINFO()
            startupInfo.dwFlags |= subprocess.STARTF_USESHOWWINDOW  # hide the console window
            kwargs["startupinfo"] = startupInfo
        # errors="replace": a non-UTF-8 console must not kill the reader with UnicodeDecodeError.
        self._proc = subprocess.Popen(
            self.args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            text=True, encoding="utf-8", errors="replace", bufsize=1, env=environment, cwd=self.cwd, **kwargs)
        self.state = ProcessState.RUNNING
        self._reader = threading.Thread(target=self._readOutput, name="DeepImagingProcessReader", daemon=True)
        self._reader.start()
        return self

    def _readOutput(self):
        for line in self._proc.stdout:
            self._lines.put(line.rstrip("\r\n"))
        self._proc.stdout.close()

    @property
    def running(self):
        return self.state == ProcessState.RUNNING

    @property
    def pid(self):
        return self._proc.pid if self._proc is not None else None

    def poll(self):
        """Output lines received since the last call; updates :attr:`state` when the child ended."""
        lines = self._drain()
        if self.running and self._proc.poll() is not None:
            self._reader.join(timeout=5)  # collect output written just before exiting
            lines += self._drain()
            self.returncode = self._proc.returncode
            if self._cancelRequested:
                self.state = ProcessState.CANCELLED
            else:
                self.state = ProcessState.SUCCEEDED if self.returncode == 0 else ProcessState.FAILED
        return lines

    def _drain(self):
        lines = []
        while True:
            try:
                lines.append(self._lines.get_nowait())
            except queue.Empty:
                return lines

    def wait(self, timeout=None):
        """Block until the child ends (for scripts and tests); returns all remaining output."""
        if self._proc is not None:
            self._proc.wait(timeout=timeout)
        return self.poll()

    def cancel(self):
        """Kill the child and all its descendants; :meth:`poll` then reports CANCELLED."""
        if not self.running:
            return
        self._cancelRequested = True
        killProcessTree(self._proc)


def killProcessTree(proc):
    """Kill ``proc`` and its descendants (psutil when available, else only ``proc``)."""
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        try:
            parent = psutil.Process(proc.pid)
            children = parent.children(recursive=True)
        except psutil.NoSuchProcess:
            children = []
        for child in children:
            try:
                child.kill()
            except psutil.NoSuchProcess:
                pass
    if proc.poll() is None:
        proc.kill()
    proc.wait()
