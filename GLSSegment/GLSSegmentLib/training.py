"""Training from Slicer: ``deepimaging gls train`` in a child process, polled by the panel.

Training takes minutes to hours, so it never runs in Slicer's process: :class:`TrainingJob`
(a ``DeepImagingCommonLib.jobs.CommandJob``: output read on a thread, polled from the GUI's
timer, Cancel kills the whole process tree) starts the CLI and turns its ``PROGRESS <fraction>
<message>`` lines (the child environment asks for them) into a :class:`TrainingStatus`.
Qt-free, like the rest of GLSSegmentLib.
"""

from pathlib import Path

from DeepImagingCommonLib import process
from DeepImagingCommonLib.jobs import ProgressCommandJob, ProgressStatus, parseProgressStatusLine
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


TrainingStatus = ProgressStatus


def parseTrainingLine(line, status):
    """Update ``status`` from one output line of ``deepimaging gls train``; True if it was a progress line."""
    return parseProgressStatusLine(line, status, ("trained ",))


class TrainingJob(ProgressCommandJob):
    """One ``deepimaging gls train`` child; the caller polls it (GUI timer) or waits (scripts, tests)."""

    name = "GLSSegment"
    summaryPrefixes = ("trained ",)
