"""Training from Slicer: ``deepimaging gls train`` in a child process, polled by the panel.

Training takes minutes to hours, so it never runs in Slicer's process: :class:`TrainingJob`
(a ``DeepImagingCommonLib.jobs.CommandJob``: output read on a thread, polled from the GUI's
timer, Cancel kills the whole process tree) starts the CLI and turns its ``PROGRESS <fraction>
<message>`` lines (the child environment asks for them) into a :class:`TrainingStatus`.
Qt-free, like the rest of GLSSegmentLib.
"""

from dataclasses import dataclass
from pathlib import Path

from DeepImagingCommonLib import process
from DeepImagingCommonLib.jobs import CommandJob
from deepimaging.core.errors import InputError

ERROR_PREFIX = process.ERROR_PREFIX


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



class TrainingJob(CommandJob):
    """One ``deepimaging gls train`` child; the caller polls it (GUI timer) or waits (scripts, tests)."""

    name = "GLSSegment"

    def __init__(self, command, outputFolder, env=None, cleanupFolder=None, cpuOnly=False):
        super().__init__([("training", command)], outputFolder, env=env, cleanupFolder=cleanupFolder,
                         cpuOnly=cpuOnly)

    @property
    def command(self):
        return self.steps[0][1]

    def newStatus(self):
        return TrainingStatus()

    def parseLine(self, line, stageRange):
        if parseTrainingLine(line, self.status) or not line.strip():
            return None
        return line.rstrip()
