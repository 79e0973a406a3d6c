"""Training from Slicer: ``deepimaging rog plan`` + ``train`` in child processes, polled by the panel.

Training takes minutes to hours, so it never runs in Slicer's process: :class:`TrainingJob`
starts the CLI verbs one after the other with ``DeepImagingCommonLib.process`` (output read
on a thread, polled from the GUI's timer, Cancel kills the process tree) and turns their
output into a :class:`TrainingStatus` (epoch, loss, validation Dice, ETA).  The CLI is run
with ``-v`` so every finished epoch logs one ``INFO epoch i/n <metric value>...`` line; its
tqdm bar supplies the fraction done.  Qt-free, like the rest of ROGSegmentLib.
"""

import collections
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path

from DeepImagingCommonLib import process
from deepimaging.core.errors import InputError

from .export import removeFolder

# Share of the progress bar per step; "training" also covers the CLI's own data loading.
STAGE_RANGES = {"planning": (0.0, 0.05), "training": (0.05, 1.0)}

PERCENT = re.compile(r"(\d{1,3})%\|")
EPOCH_DONE = re.compile(r"INFO epoch (\d+)/(\d+) (.*)$")
EPOCH_RUNNING = re.compile(r"epoch (\d+)/(\d+) loss (\S+)")
ETA = re.compile(r"ETA (\d+(?::\d{2}){1,2})")
METRIC = re.compile(r"([A-Za-z_][\w-]*) (-?(?:\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|nan|inf))(?=\s|$)")
ERROR_PREFIX = "deepimaging: error:"


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


class TrainingJob:
    """Runs the steps of :func:`trainingSteps` one after the other; the caller polls it."""

    def __init__(self, steps, outputFolder, env=None, cleanupFolder=None):
        self.steps = list(steps)
        self.outputFolder = Path(outputFolder)
        self.env = childEnvironment() if env is None else env
        self.cleanupFolder = cleanupFolder
        self.state = process.ProcessState.NOT_STARTED
        self.status = TrainingStatus()
        self.output = collections.deque(maxlen=2000)
        self._index = -1
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
        logging.info(f"ROGSegment {stage}: {' '.join(args)}")
        self._process = process.BackgroundProcess(args, env=self.env).start()

    def _stageRange(self):
        stage = self.steps[self._index][0]
        if len(self.steps) == 1:
            return (0.0, 1.0)
        return STAGE_RANGES.get(stage, (0.0, 1.0))

    def poll(self):
        """New log lines since the last call; advances to the next step or finishes."""
        if not self.running:
            return []
        shown = []
        for line in self._process.poll():
            self.output.append(line)
            parseTrainingLine(line, self.status, self._stageRange())
            text = logText(line)
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
        """Kill the running child (and its children); :meth:`poll` then reports CANCELLED."""
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
        tail = [line for line in self.output if line.strip() and not PERCENT.search(line)][-8:]
        return "\n".join(tail) or f"{self.status.stage} stopped with exit code {self._process.returncode}"
