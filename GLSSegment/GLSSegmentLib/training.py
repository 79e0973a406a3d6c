"""Training from Slicer: ``deepimaging gls train`` in a child process, polled by the panel.

Training takes minutes to hours, so it never runs in Slicer's process: :class:`TrainingJob`
starts the CLI with ``DeepImagingCommonLib.process`` (output read on a thread, polled from
the GUI's timer, Cancel kills the whole process tree) and turns its ``PROGRESS <fraction>
<message>`` lines (the child environment asks for them) into a :class:`TrainingStatus`.
Qt-free, like the rest of GLSSegmentLib.
"""

import collections
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from DeepImagingCommonLib import process
from deepimaging.core.errors import InputError

from .export import removeFolder

ERROR_PREFIX = "deepimaging: error:"


def trainingCommand(dataFolder, outputFolder, architecture="gls", epochs=100, keypoints=2, device=None,
                    extraArguments=()):
    """The ``deepimaging gls train`` command line, run with Slicer's Python (PythonSlicer).

    ``extraArguments`` go to the CLI as they are (e.g. ``["--size", "128", "128"]``).
    """
    from .logic import ARCHITECTURE_CHOICES

    if architecture not in ARCHITECTURE_CHOICES:
        raise InputError(f"unknown architecture '{architecture}'; choose one of {', '.join(ARCHITECTURE_CHOICES)}")
    if int(epochs) < 1:
        raise InputError(f"the number of epochs must be at least 1, got {epochs}")
    if int(keypoints) < 1:
        raise InputError(f"the number of keypoints must be at least 1, got {keypoints}")
    command = process.deepimagingCommand("gls", "train", "--data", Path(dataFolder), "--out", Path(outputFolder),
                                         "--arch", architecture, "--epochs", int(epochs), "--keypoints",
                                         int(keypoints))
    if device:
        command += ["--device", str(device)]
    return command + [str(argument) for argument in extraArguments]


@dataclass
class TrainingStatus:
    """What the panel shows about a running job."""

    stage: str = "starting"
    fraction: float = 0.0
    message: str = ""
    summary: str = ""  # the CLI's closing "trained ... in ... s; last validation Dice ..." line
    error: str = ""

    def text(self):
        if self.stage == "done":
            return self.summary or "Done" + (f": {self.message}" if self.message else "")
        if self.stage in ("failed", "cancelled"):
            return self.stage.capitalize()
        return self.message or "Starting the training process"


def parseTrainingLine(line, status):
    """Update ``status`` from one output line of ``deepimaging gls train``; True if it was a progress line."""
    parsed = process.parseProgressLine(line)
    if parsed is not None:
        status.stage = "training"
        status.fraction, message = parsed
        if message:
            status.message = message
        return True
    if ERROR_PREFIX in line:
        status.error = line.split(ERROR_PREFIX, 1)[1].strip()
    elif line.startswith("trained "):
        status.summary = line.strip()
    return False


class TrainingJob:
    """One ``deepimaging gls train`` child; the caller polls it (GUI timer) or waits (scripts, tests)."""

    def __init__(self, command, outputFolder, env=None, cleanupFolder=None, cpuOnly=False):
        self.command = [str(a) for a in command]
        self.outputFolder = Path(outputFolder)
        self.env = process.deepimagingEnvironment() if env is None else dict(env)
        if cpuOnly:
            self.env["CUDA_VISIBLE_DEVICES"] = "-1"  # the child never touches the GPU
        self.cleanupFolder = cleanupFolder
        self.state = process.ProcessState.NOT_STARTED
        self.status = TrainingStatus()
        self.output = collections.deque(maxlen=2000)
        self._process = None
        self._cancelRequested = False

    @property
    def running(self):
        return self.state == process.ProcessState.RUNNING

    @property
    def bestCheckpoint(self):
        """``best.pt`` in the output folder, once training has written it."""
        path = self.outputFolder / "best.pt"
        return path if path.is_file() else None

    def start(self):
        """Start the child; returns the job.  A child that cannot start ends the job as FAILED."""
        self.state = process.ProcessState.RUNNING
        try:
            self.outputFolder.mkdir(parents=True, exist_ok=True)
            logging.info("GLSSegment training: " + " ".join(self.command))
            self._process = process.BackgroundProcess(self.command, env=self.env).start()
        except Exception:
            self._finish(process.ProcessState.FAILED)
            raise
        return self

    def poll(self):
        """New log lines (progress lines left out) since the last call; finishes the job when the child ended."""
        if not self.running:
            return []
        shown = []
        for line in self._process.poll():
            self.output.append(line)
            if not parseTrainingLine(line, self.status) and line.strip():
                shown.append(line.rstrip())
        state = self._process.state
        if state == process.ProcessState.SUCCEEDED and not self._cancelRequested:
            self._finish(process.ProcessState.SUCCEEDED)
        elif state in (process.ProcessState.FAILED, process.ProcessState.CANCELLED, process.ProcessState.SUCCEEDED):
            failed = state == process.ProcessState.FAILED and not self._cancelRequested
            self._finish(process.ProcessState.FAILED if failed else process.ProcessState.CANCELLED)
        return shown

    def cancel(self):
        """Kill the child and all it started; :meth:`poll` then reports CANCELLED."""
        if self.running:
            self._cancelRequested = True
            self._process.cancel()

    def wait(self, timeout=None, interval=0.05):
        """Poll until the job ends (scripts and tests); returns the log lines."""
        deadline = None if timeout is None else time.time() + timeout
        lines = []
        while self.running and (deadline is None or time.time() < deadline):
            lines += self.poll()
            time.sleep(interval)
        return lines

    def _finish(self, state):
        self.state = state
        if state == process.ProcessState.SUCCEEDED:
            self.status.stage, self.status.fraction = "done", 1.0
        else:
            self.status.stage = "failed" if state == process.ProcessState.FAILED else "cancelled"
        removeFolder(self.cleanupFolder)
        self.cleanupFolder = None

    def errorMessage(self):
        """Why the job failed: the CLI's error line, else the last lines of its output."""
        if self.status.error:
            return self.status.error
        tail = [line for line in self.output if line.strip() and process.parseProgressLine(line) is None][-8:]
        code = self._process.returncode if self._process is not None else None
        return "\n".join(tail) or f"training stopped with exit code {code}"
