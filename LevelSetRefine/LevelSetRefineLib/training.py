"""Training a learned refiner from Slicer: ``deepimaging levelset train`` in a child process.

Training takes minutes to hours, so it never runs in Slicer's process: :class:`TrainingJob` (a
``DeepImagingCommonLib.jobs.CommandJob``: output read on a thread, polled from the GUI's timer,
Cancel kills the whole process tree) starts the CLI and turns its ``PROGRESS <fraction>
<message>`` lines (the child environment asks for them) into a :class:`TrainingStatus`.
Scene pairs are exported first (:mod:`.export`) into a temporary folder that the job removes
when it ends.  Qt-free.
"""

from pathlib import Path

from DeepImagingCommonLib import process
from DeepImagingCommonLib.dependencies import requireModuleDependencies
from DeepImagingCommonLib.inputs import isPathSet, requireDevice
from DeepImagingCommonLib.jobs import ProgressCommandJob, ProgressStatus, parseProgressStatusLine
from deepimaging.core.errors import InputError

from . import export

ERROR_PREFIX = process.ERROR_PREFIX
WROTE_PREFIX = "wrote "  # the CLI's closing line: "wrote RUN/best.pt"


def requireDimension(dim):
    """2 or 3 (also from "2D" / "3D"); anything else is an InputError."""
    text = str(dim).strip().upper().rstrip("D")
    if text not in ("2", "3"):
        raise InputError(f"the learned refiner is 2D or 3D, got {dim!r}")
    return int(text)


def trainingCommand(dataFolder, outputFolder, dim=2, epochs=30, device=None, extraArguments=()):
    """The ``deepimaging levelset train`` command line, run with Slicer's Python (PythonSlicer).

    ``extraArguments`` go to the CLI as they are (e.g. ``["--grid", "32", "--steps-per-epoch", "8"]``).
    """
    dim = requireDimension(dim)
    if int(epochs) < 1:
        raise InputError(f"the number of epochs must be at least 1, got {epochs}")
    command = process.deepimagingCommand("levelset", "train", "--data", Path(dataFolder), "--out", Path(outputFolder),
                                         "--dim", dim, "--epochs", int(epochs))
    if device:
        command += ["--device", str(device)]
    return command + [str(argument) for argument in extraArguments]


TrainingStatus = ProgressStatus


def parseTrainingLine(line, status):
    """Update ``status`` from one output line of ``deepimaging levelset train``; True if it was a progress line."""
    return parseProgressStatusLine(line, status, (WROTE_PREFIX,))


class TrainingJob(ProgressCommandJob):
    """One ``deepimaging levelset train`` child; the caller polls it (GUI timer) or waits (scripts, tests)."""

    name = "LevelSetRefine"
    summaryPrefixes = (WROTE_PREFIX,)



def startTraining(outputFolder, dataFolder=None, pairs=None, dim=2, epochs=30, device="auto", progress=None,
                  extraArguments=()):
    """Export (for scene pairs), then start the training child; returns the running :class:`TrainingJob`.

    See ``LevelSetRefineLogic.startTraining``.  Nothing is left behind when the start fails.
    """
    if (dataFolder is None) == (pairs is None):
        raise InputError("train from either a data folder or volume + segmentation pairs, not both")
    requireModuleDependencies("LevelSetRefine")  # the training child runs on the same Python
    if not isPathSet(outputFolder):
        raise InputError("no output folder selected for the trained refiner")
    deviceName = requireDevice(device)
    dim = requireDimension(dim)
    outputFolder = Path(str(outputFolder)).expanduser()
    cleanup = None
    if pairs is not None:
        cleanup = export.temporaryFolder()
        try:
            data = export.exportTrainingData(pairs, cleanup / "data", dim=dim, progress=progress).folder
        except Exception:
            export.removeFolder(cleanup)
            raise
    else:
        data = export.checkDataFolder(dataFolder)
    try:
        command = trainingCommand(data, outputFolder, dim, epochs, deviceName, extraArguments)
        job = TrainingJob(command, outputFolder, cleanupFolder=cleanup, cpuOnly=deviceName == "cpu")
    except Exception:
        export.removeFolder(cleanup)
        raise
    return job.start()
