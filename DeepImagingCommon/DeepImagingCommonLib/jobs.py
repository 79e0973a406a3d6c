"""Background jobs made of ``deepimaging`` CLI steps run one after the other in child processes.

Every module that trains from Slicer (ROGSegment: plan + train; GLSSegment and LevelSetRefine:
train) runs the CLI in a child process so the GUI stays responsive, polls it from a timer,
shows progress and lets Cancel kill the whole process tree.  :class:`CommandJob` is that
machinery once; a module subclasses it and supplies what differs: its status object
(:meth:`CommandJob.newStatus`), how one output line updates it (:meth:`CommandJob.parseLine`)
and the share of the progress bar each step gets (``stageRanges``).  Qt-free.
"""

import collections
import logging
import shutil
import time
from pathlib import Path

from . import process


def removeFolder(folder):
    """Delete a scratch folder (exported training data); missing folders are fine."""
    if folder:
        shutil.rmtree(str(folder), ignore_errors=True)


class JobStatus:
    """The minimum a job status has; modules use dataclasses with more fields."""

    def __init__(self):
        self.stage = "starting"
        self.fraction = 0.0
        self.message = ""
        self.error = ""


class CommandJob:
    """Runs ``steps`` = ``[(stage, argv), ...]`` one after the other; the caller polls it (GUI
    timer) or waits (scripts, tests).  The job ends SUCCEEDED when the last step does, FAILED
    when a step fails (its error line in ``status.error``), CANCELLED after :meth:`cancel`."""

    name = "deepimaging"  # shown in the log line of each started step
    stageRanges = {}  # stage -> (low, high) share of the progress bar when there are several steps

    def __init__(self, steps, outputFolder, env=None, cleanupFolder=None, cpuOnly=False):
        self.steps = [(stage, [str(a) for a in argv]) for stage, argv in steps]
        if not self.steps:
            raise ValueError("a job needs at least one step")
        self.outputFolder = Path(outputFolder)
        self.env = process.deepimagingEnvironment() if env is None else dict(env)
        if cpuOnly:
            self.env["CUDA_VISIBLE_DEVICES"] = "-1"  # the child never touches the GPU
        self.cleanupFolder = cleanupFolder
        self.state = process.ProcessState.NOT_STARTED
        self.status = self.newStatus()
        self.output = collections.deque(maxlen=2000)
        self._index = -1
        self._process = None
        self._cancelRequested = False

    # -- what a module overrides ----------------------------------------------------------------
    def newStatus(self):
        return JobStatus()

    def parseLine(self, line, stageRange):
        """Update ``self.status`` from one output line; return the text to log, or None to hide it."""
        parsed = process.parseProgressLine(line)
        if parsed is not None:
            low, high = stageRange
            self.status.fraction = low + (high - low) * parsed[0]
            if parsed[1]:
                self.status.message = parsed[1]
            return None
        if process.ERROR_PREFIX in line:
            self.status.error = line.split(process.ERROR_PREFIX, 1)[1].strip()
        return line.rstrip() if line.strip() else None

    def isNoise(self, line):
        """True for output lines left out of :meth:`errorMessage` (progress redraws)."""
        return process.parseProgressLine(line) is not None

    # -- the machinery --------------------------------------------------------------------------
    @property
    def running(self):
        return self.state == process.ProcessState.RUNNING

    @property
    def bestCheckpoint(self):
        """``best.pt`` in the output folder, once training has written it."""
        path = self.outputFolder / "best.pt"
        return path if path.is_file() else None

    def start(self):
        """Start the first step; returns the job.  A step that cannot start ends the job as FAILED."""
        self.state = process.ProcessState.RUNNING
        try:
            self.outputFolder.mkdir(parents=True, exist_ok=True)
            self._startStep(0)
        except Exception:
            self._finish(process.ProcessState.FAILED)
            raise
        return self

    def _startStep(self, index):
        self._index = index
        stage, args = self.steps[index]
        self.status.stage = stage
        logging.info(f"{self.name} {stage}: {' '.join(args)}")
        self._process = process.BackgroundProcess(args, env=self.env).start()

    def _stageRange(self):
        if len(self.steps) == 1:
            return (0.0, 1.0)
        return self.stageRanges.get(self.steps[self._index][0], (0.0, 1.0))

    def poll(self):
        """New log lines since the last call; advances to the next step or finishes the job."""
        if not self.running:
            return []
        shown = []
        for line in self._process.poll():
            self.output.append(line)
            text = self.parseLine(line, self._stageRange())
            if text:
                shown.append(text)
        state = self._process.state
        if state == process.ProcessState.SUCCEEDED and not self._cancelRequested:
            if self._index + 1 < len(self.steps):
                try:
                    self._startStep(self._index + 1)
                except OSError as error:
                    self.status.error = f"could not start {self.steps[self._index + 1][0]}: {error}"
                    self._finish(process.ProcessState.FAILED)
            else:
                self._finish(process.ProcessState.SUCCEEDED)
        elif state in (process.ProcessState.FAILED, process.ProcessState.CANCELLED, process.ProcessState.SUCCEEDED):
            failed = state == process.ProcessState.FAILED and not self._cancelRequested
            self._finish(process.ProcessState.FAILED if failed else process.ProcessState.CANCELLED)
        return shown

    def cancel(self):
        """Kill the running child (and all it started); :meth:`poll` then reports CANCELLED."""
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
        tail = [line for line in self.output if line.strip() and not self.isNoise(line)][-8:]
        code = self._process.returncode if self._process is not None else None
        return "\n".join(tail) or f"{self.status.stage} stopped with exit code {code}"


class ProgressStatus:
    """Status of a one-child job that reports ``PROGRESS <fraction> <message>`` lines."""

    def __init__(self, stage="starting", fraction=0.0, message="", summary="", error=""):
        self.stage = stage
        self.fraction = fraction
        self.message = message
        self.summary = summary  # the CLI's closing line (e.g. "trained ... in ... s; ...")
        self.error = error

    def text(self):
        if self.stage == "done":
            return self.summary or "Done" + (f": {self.message}" if self.message else "")
        if self.stage in ("failed", "cancelled"):
            return self.stage.capitalize()
        return self.message or "Starting the training process"


def parseProgressStatusLine(line, status, summaryPrefixes=("trained ",)):
    """Update a :class:`ProgressStatus` from one output line; True if it was a progress line."""
    parsed = process.parseProgressLine(line)
    if parsed is not None:
        status.stage = "training"
        status.fraction, message = parsed
        if message:
            status.message = message
        return True
    if process.ERROR_PREFIX in line:
        status.error = line.split(process.ERROR_PREFIX, 1)[1].strip()
    elif line.startswith(tuple(summaryPrefixes)):
        status.summary = line.strip()
    return False


class ProgressCommandJob(CommandJob):
    """One CLI child (``command``) whose progress arrives as PROGRESS lines (the child environment
    asks for them); the line starting with one of ``summaryPrefixes`` is kept as the summary."""

    summaryPrefixes = ("trained ",)

    def __init__(self, command, outputFolder, env=None, cleanupFolder=None, cpuOnly=False):
        super().__init__([("training", command)], outputFolder, env=env, cleanupFolder=cleanupFolder,
                         cpuOnly=cpuOnly)

    @property
    def command(self):
        return self.steps[0][1]

    def newStatus(self):
        return ProgressStatus()

    def parseLine(self, line, stageRange):
        if parseProgressStatusLine(line, self.status, self.summaryPrefixes) or not line.strip():
            return None
        return line.rstrip()
