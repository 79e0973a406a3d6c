"""Run a long job (training, large inference) in a child process without freezing Slicer.

Same design as MONAIAuto3DSeg's background process: ``subprocess.Popen`` with stdout and
stderr merged, a reader thread that only puts lines into a ``queue.Queue``, and the GUI
thread draining that queue from a timer (``qt.QTimer`` in the Widget).  No Qt here, and no
Qt call ever happens on the reader thread.  Nothing called from the GUI thread blocks:
:meth:`BackgroundProcess.poll` and :meth:`BackgroundProcess.cancel` return at once (only
:meth:`BackgroundProcess.wait`, meant for scripts and tests, waits).

Process groups, and why
-----------------------
Inside Slicer the child command is ``PythonSlicer``, a launcher that sets up the
environment and runs the real Python as *its* child.  ``proc.kill()`` would stop only the
launcher and leave the real worker (a grandchild) running, still holding the output pipe.
psutil, which could walk the tree, is not part of Slicer's Python, so the tree is killed
with the operating system's own means instead:

* POSIX: the child starts in a new session (``start_new_session=True``), so it leads a new
  process group that its descendants inherit; cancelling sends ``SIGKILL`` to the whole
  group (``os.killpg``).
* Windows: the child starts with ``CREATE_NEW_PROCESS_GROUP`` and cancelling runs
  ``taskkill /T /F /PID <pid>`` (hidden window, on a helper thread), which kills the tree.

When psutil happens to be importable, descendants it finds are killed as well (they may
have left the group), but nothing depends on it.

A child may also exit while something it started still holds the output pipe open, so the
reader thread never sees end-of-file.  ``poll()`` then keeps the job RUNNING for
:data:`OUTPUT_GRACE_SECONDS` (measured between calls, never by sleeping), then kills what
is left of the child's process group and, shortly after, reports the final state.  On
Linux the exited child is not reaped until then (``waitid(..., WNOWAIT)``): the zombie
keeps its pid, and so the group id, from being reused by an unrelated process meanwhile.

Children report progress by printing lines ``PROGRESS <fraction> <message>``
(:func:`progressLine` writes them, :func:`parseProgressLine` reads them).
"""

import enum
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

PROGRESS_PREFIX = "PROGRESS "

#: Seconds the output pipe may stay open after the child exited before what is left of its
#: process group (orphans still holding the pipe) is killed.
OUTPUT_GRACE_SECONDS = 2.0
#: Seconds to wait, after killing those leftovers, for the reader to collect buffered output.
LEFTOVER_OUTPUT_SECONDS = 1.0

# Linux can tell that a child exited without reaping it (see the module docstring).
_PEEK_EXIT = sys.platform.startswith("linux") and hasattr(os, "waitid") and hasattr(os, "WNOWAIT")


ERROR_PREFIX = "deepimaging: error:"  # how the CLI starts the line of a failure it explains


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
    """One child process (and whatever it starts) whose output is collected on a thread and
    polled by the caller."""

    def __init__(self, args, env=None, cwd=None):
        self.args = [str(a) for a in args]
        self.env = env
        self.cwd = cwd
        self.state = ProcessState.NOT_STARTED
        self.returncode = None
        self._proc = None
        self._groupId = None  # POSIX: the child's process group (its own pid)
        self._lines = queue.Queue()
        self._reader = None
        self._cancelRequested = False
        self._exitSeenAt = None  # time.monotonic() when poll() first saw the child exited
        self._leftoversKilledAt = None

    def start(self):
        environment = None
        if self.env is not None:
            environment = os.environ.copy()
            environment.update(self.env)
        if os.name == "nt":
            kwargs = {"startupinfo": _hiddenWindow(), "creationflags": subprocess.CREATE_NEW_PROCESS_GROUP}
        else:
            kwargs = {"start_new_session": True}  # the child leads a new process group
        # errors="replace": a non-UTF-8 console must not kill the reader with UnicodeDecodeError.
        self._proc = subprocess.Popen(
            self.args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            text=True, encoding="utf-8", errors="replace", bufsize=1, env=environment, cwd=self.cwd, **kwargs)
        if os.name != "nt":
            self._groupId = self._proc.pid
        self.state = ProcessState.RUNNING
        self._reader = threading.Thread(target=self._readOutput, name="DeepImagingProcessReader", daemon=True)
        self._reader.start()
        return self

    def _readOutput(self):
        try:
            for line in self._proc.stdout:
                self._lines.put(line.rstrip("\r\n"))
        except (OSError, ValueError):
            pass  # the pipe went away under us: nothing more to read
        finally:
            try:
                self._proc.stdout.close()
            except OSError:
                pass

    @property
    def running(self):
        return self.state == ProcessState.RUNNING

    @property
    def pid(self):
        return self._proc.pid if self._proc is not None else None

    def poll(self):
        """Output lines received since the last call; updates :attr:`state` when the job ended.

        Never blocks.  The job stays RUNNING after the child exited until its output pipe is
        closed, or until :data:`OUTPUT_GRACE_SECONDS` later the leftovers of its process group
        that still hold the pipe are killed (see the module docstring).
        """
        lines = self._drain()
        if not self.running:
            return lines
        now = time.monotonic()
        if self._exitSeenAt is None:
            if not self._childExited():
                return lines
            self._exitSeenAt = now
        if self._reader.is_alive():
            if self._leftoversKilledAt is None:
                if now - self._exitSeenAt < OUTPUT_GRACE_SECONDS:
                    return lines
                self._killLeftovers()
                self._leftoversKilledAt = now
                return lines
            if now - self._leftoversKilledAt < LEFTOVER_OUTPUT_SECONDS:
                return lines
            # Still open: something outside the group holds the pipe; stop waiting for it
            # (the daemon reader keeps queueing what it may still read for later polls).
        return lines + self._finish()

    def _childExited(self):
        """Whether the child has exited; on Linux without reaping it (its pid stays reserved)."""
        if self._proc.returncode is not None:
            return True
        if _PEEK_EXIT:
            try:
                return os.waitid(os.P_PID, self._proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
            except ChildProcessError:
                pass  # reaped elsewhere; Popen.poll() sorts it out
            except OSError:
                pass
        return self._proc.poll() is not None

    def _killLeftovers(self):
        """Kill what is left of the child's process group after the child itself exited."""
        if self._groupId is not None:
            _killGroup(self._groupId)
        # Windows: taskkill /T cannot find the tree of an exited process; orphans outside
        # the tree can only be left to themselves (the reader thread is a daemon).

    def _finish(self):
        """Reap the exited child, set the final state; returns the output not yet drained."""
        try:
            self.returncode = self._proc.wait(timeout=5)  # it has exited: returns at once
        except subprocess.TimeoutExpired:  # cannot happen after an exit was seen; stay safe
            self.returncode = self._proc.returncode if self._proc.returncode is not None else -1
        if self._cancelRequested:
            self.state = ProcessState.CANCELLED
        else:
            self.state = ProcessState.SUCCEEDED if self.returncode == 0 else ProcessState.FAILED
        return self._drain()

    def _drain(self):
        lines = []
        while True:
            try:
                lines.append(self._lines.get_nowait())
            except queue.Empty:
                return lines

    def wait(self, timeout=None):
        """Block until the job ends (for scripts and tests); returns all remaining output.

        Raises ``subprocess.TimeoutExpired`` when the child is still running after ``timeout``
        seconds.  After the child exited it waits at most :data:`OUTPUT_GRACE_SECONDS` plus
        :data:`LEFTOVER_OUTPUT_SECONDS` for the output pipe, killing leftovers in between.
        """
        if self._proc is None or not self.running:
            return self.poll()
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._childExited():
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(self.args, timeout)
            time.sleep(0.02)
        if self._exitSeenAt is None:
            self._exitSeenAt = time.monotonic()
        self._reader.join(timeout=OUTPUT_GRACE_SECONDS)
        if self._reader.is_alive():
            self._killLeftovers()
            self._leftoversKilledAt = time.monotonic()
            self._reader.join(timeout=LEFTOVER_OUTPUT_SECONDS)
        lines = self._drain()
        if self.running:
            lines += self._finish()
        return lines

    def cancel(self):
        """Kill the child and all its descendants without waiting; :meth:`poll` then reports
        CANCELLED once the child is seen dead."""
        if not self.running:
            return
        self._cancelRequested = True
        if os.name == "nt":  # taskkill takes a moment: not on the GUI thread
            threading.Thread(target=_killTree, args=(self._proc, None, False), name="DeepImagingProcessKiller",
                             daemon=True).start()
        else:
            _killTree(self._proc, self._groupId, False)


def killProcessTree(proc):
    """Kill ``proc`` and its descendants, then reap ``proc``.

    POSIX: the whole process group when ``proc`` leads its own group (``start_new_session``);
    Windows: ``taskkill /T /F``; plus the descendants psutil finds when it is installed.
    """
    groupId = None
    if os.name != "nt" and proc.returncode is None:
        try:
            pgid = os.getpgid(proc.pid)
        except OSError:
            pgid = None
        if pgid == proc.pid and pgid != os.getpgrp():  # never our own group
            groupId = pgid
    _killTree(proc, groupId, True)


def _killTree(proc, groupId, wait):
    """Kill ``proc``, its process group ``groupId`` (POSIX, may be None) and, when psutil is
    installed, the descendants it finds; ``wait``: also reap ``proc``."""
    descendants = _psutilDescendants(proc)  # first: once the parent is dead they are orphans
    if os.name == "nt":
        if proc.returncode is None:
            _taskkill(proc.pid)
    elif groupId is not None:
        _killGroup(groupId)
    for descendant in descendants:
        try:
            descendant.kill()  # psutil checks the pid still names the same process
        except Exception:  # psutil.Error (NoSuchProcess, AccessDenied)
            pass
    if proc.returncode is None:
        try:
            if os.name == "nt":
                proc.kill()
            else:
                os.kill(proc.pid, signal.SIGKILL)  # not reaped yet, so the pid is still ours
        except OSError:  # already dead
            pass
    if wait:
        proc.wait()


def _psutilDescendants(proc):
    """Descendants of a still-running ``proc`` as psutil processes; [] without psutil."""
    if proc.returncode is not None:  # reaped: its pid may already name another process
        return []
    try:
        import psutil
    except ImportError:
        return []
    try:
        return psutil.Process(proc.pid).children(recursive=True)
    except Exception:  # psutil.Error: gone already, or not ours to inspect
        return []


def _killGroup(groupId):
    try:
        os.killpg(groupId, signal.SIGKILL)
    except OSError:  # ProcessLookupError: nobody left; PermissionError: a member is not ours
        pass


def _hiddenWindow():
    startupInfo = subprocess.STARTUPINFO()
    startupInfo.dwFlags |= subprocess.STARTF_USESHOWWINDOW  # wShowWindow 0: SW_HIDE
    return startupInfo


def _taskkill(pid):
    """``taskkill /T /F /PID pid`` without a console window; errors (already gone) are ignored."""
    try:
        subprocess.run(["taskkill", "/T", "/F", "/PID", str(pid)], stdin=subprocess.DEVNULL,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, startupinfo=_hiddenWindow(),
                       creationflags=getattr(subprocess, "CREATE_NO_WINDOW", 0), timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        pass
