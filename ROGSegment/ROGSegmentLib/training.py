"""Training from Slicer: ``deepimaging rog plan`` + ``train`` in child processes, polled by the panel.

Training takes minutes to hours, so it never runs in Slicer's process: :class:`TrainingJob`
(a ``DeepImagingCommonLib.jobs.CommandJob``: output read on a thread, polled from the GUI's
timer, Cancel kills the process tree) starts the CLI verbs one after the other and turns their
output into a :class:`TrainingStatus` (epoch, loss, validation Dice, ETA).  The CLI is run
with ``-v`` so every finished epoch logs one ``INFO epoch i/n <metric value>...`` line; its
tqdm bar supplies the fraction done.  Qt-free, like the rest of ROGSegmentLib.
"""

import re
from dataclasses import dataclass
from pathlib import Path

from DeepImagingCommonLib import process
from DeepImagingCommonLib.jobs import CommandJob
from deepimaging.core.errors import InputError

# Share of the progress bar per step; "training" also covers the CLI's own data loading.
STAGE_RANGES = {"planning": (0.0, 0.05), "training": (0.05, 1.0)}

PERCENT = re.compile(r"(\d{1,3})%\|")
EPOCH_DONE = re.compile(r"INFO epoch (\d+)/(\d+) (.*)$")
EPOCH_RUNNING = re.compile(r"epoch (\d+)/(\d+) loss (\S+)")
ETA = re.compile(r"ETA (\d+(?::\d{2}){1,2})")
METRIC = re.compile(r"([A-Za-z_][\w-]*) (-?(?:\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|nan|inf))(?=\s|$)")
ERROR_PREFIX = process.ERROR_PREFIX


childEnvironment = process.deepimagingEnvironment
deepimagingCommand = process.deepimagingCommand


def trainingSteps(dataFolder, outputFolder, epochs, stepsPerEpoch, device=None):
    """``[(stage, argv)]``: plan (unless resuming from ``last.pt``), then train."""
    outputFolder = Path(outputFolder)
    if int(epochs) < 1 or int(stepsPerEpoch) < 1:
        raise InputError(f"epochs and steps per epoch must be at least 1, got {epochs} and {stepsPerEpoch}")
    resume = (outputFolder / "last.pt").is_file()
    steps = []
    train = ["rog", "train", "--data", dataFolder, "--out", outputFolder, "--epochs", int(epochs),
             "--steps-per-epoch", int(stepsPerEpoch)]
    if not resume:
        steps.append(("planning", deepimagingCommand("rog", "plan", "--data", dataFolder,
                                                      "--out", outputFolder / "plan.json")))
        train += ["--plan", outputFolder / "plan.json"]
    if device:
        train += ["--device", device]
    steps.append(("training", deepimagingCommand(*train)))
    return steps


@dataclass
class TrainingStatus:
    """What the panel shows about a running job."""

    stage: str = "starting"
    fraction: float = 0.0
    currentEpoch: int = 0  # the epoch being trained
    epoch: int = 0  # epochs completed
    epochs: int = 0
    loss: float = None  # running mean training loss of the current epoch
    dice: float = None  # mean validation Dice of the last completed epoch
    bestDice: float = None
    eta: str = ""
    message: str = ""
    error: str = ""

    def text(self):
        if self.stage == "planning":
            return "Planning: reading the training cases"
        if not self.epochs:
            return "Preparing the training cases" if self.stage == "training" else self.stage.capitalize()
        parts = [f"Epoch {max(self.currentEpoch, min(self.epoch + 1, self.epochs))}/{self.epochs}"]
        if self.loss is not None:
            parts.append(f"loss {self.loss:.4f}")
        if self.dice is not None:
            parts.append(f"validation Dice {self.dice:.3f} (best {self.bestDice:.3f})")
        if self.eta:
            parts.append(f"ETA {self.eta}")
        return ", ".join(parts)


def _number(text):
    try:
        return float(text)
    except ValueError:
        return None


def parseTrainingLine(line, status, stageRange=(0.0, 1.0)):
    """Update ``status`` from one output line of ``deepimaging -v rog plan|train``."""
    low, high = stageRange
    parsed = process.parseProgressLine(line)
    percents = PERCENT.findall(line)
    if parsed is not None:
        status.fraction = low + (high - low) * parsed[0]
    elif percents:
        status.fraction = low + (high - low) * min(100, int(percents[-1])) / 100.0
    running = EPOCH_RUNNING.findall(line)
    if running:
        epoch, epochs, loss = running[-1]
        status.currentEpoch, status.epochs, status.loss = int(epoch), int(epochs), _number(loss)
    done = EPOCH_DONE.search(line)
    if done:
        status.epoch, status.epochs = int(done.group(1)), int(done.group(2))
        metrics = {key: _number(value) for key, value in METRIC.findall(done.group(3))}
        if metrics.get("dice_mean") is not None:
            status.dice = metrics["dice_mean"]
            status.bestDice = status.dice if status.bestDice is None else max(status.bestDice, status.dice)
    eta = ETA.findall(line)
    if eta:
        status.eta = eta[-1]
    if ERROR_PREFIX in line:
        status.error = line.split(ERROR_PREFIX, 1)[1].strip()
    elif line.startswith(("plan for ", "trained ")):
        status.message = line.strip()


def logText(line):
    """The part of an output line worth keeping in the panel's log (tqdm redraws are dropped)."""
    done = EPOCH_DONE.search(line)
    if done:
        return line[done.start() + len("INFO "):].strip()
    if ERROR_PREFIX in line:
        return line[line.index(ERROR_PREFIX):].strip()
    if PERCENT.search(line) or not line.strip():
        return None
    return line.rstrip()


class TrainingJob(CommandJob):
    """Runs the steps of :func:`trainingSteps` one after the other; the caller polls it."""

    name = "ROGSegment"
    stageRanges = STAGE_RANGES

    def __init__(self, steps, outputFolder, env=None, cleanupFolder=None):
        super().__init__(steps, outputFolder, env=childEnvironment() if env is None else env,
                         cleanupFolder=cleanupFolder)

    def newStatus(self):
        return TrainingStatus()

    def parseLine(self, line, stageRange):
        parseTrainingLine(line, self.status, stageRange)
        return logText(line)

    def isNoise(self, line):
        return bool(PERCENT.search(line))
