"""ROGSegment's Logic: segment a volume with a ROG checkpoint, and start training, Qt-free.

The module panel, its self-test, the Python console and the headless tests call this file.
Inference runs in this process through one pipeline function,
:func:`deepimaging.rog.infer.predict_volume`, with a ``CancelToken`` checked between patch
batches; training (minutes to hours) runs in child processes, see :mod:`.training`.
torch and ``deepimaging.rog`` are imported inside the methods, so the module loads before
torch is installed.
"""

import colorsys
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import slicer
from DeepImagingCommonLib import nodes
from DeepImagingCommonLib.dependencies import installedTorchVersion, requireModuleDependencies
from DeepImagingCommonLib.inputs import DEVICE_CHOICES, isPathSet, requireCheckpointPath, requireDevice  # noqa: F401
from deepimaging.core.errors import CheckpointError, DeepImagingError, InputError
from deepimaging.core.progress import check_cancel, report, sub_progress
from deepimaging.core.segfile import DEFAULT_COLORS

from . import export, training

MODALITY_CHOICES = ("CT", "MR", "other")


def segmentColor(index):
    """Distinct segment colours: the CLI's ``.seg.nrrd`` palette, then golden-angle hues."""
    if index < len(DEFAULT_COLORS):
        return DEFAULT_COLORS[index]
    hue = (0.11 + 0.618034 * index) % 1.0
    return colorsys.hsv_to_rgb(hue, 0.65, 0.9)


def requireModelPath(path):
    """The checkpoint path as a ``Path``; an unset or missing file gives a clear error."""
    return requireCheckpointPath(path, "ROG")


def volumeImage(volumeNode):
    """A scalar 3-D volume node as an :class:`Image`; 2-D, vector and 4-D volumes are rejected."""
    image = nodes.imageFromVolumeNode(volumeNode)
    if 1 in image.shape:
        raise InputError(
            f"volume '{volumeNode.GetName()}' is 2-D (size {image.shape[::-1]} x, y, z); "
            "ROG segments 3-D volumes")
    image.require_finite(f"volume '{volumeNode.GetName()}'")
    return image


@dataclass
class ModelInfo:
    """What a ROG checkpoint says about itself (from its header)."""

    path: Path
    name: str
    labels: dict  # {label value: name}, background included
    channels: list
    targetSpacing: tuple  # (z, y, x) mm
    patchSize: tuple
    metrics: dict = field(default_factory=dict)

    @property
    def foregroundLabels(self):
        """``[(value, name)]`` of the labels a segmentation gets, in value order."""
        return [(value, name) for value, name in sorted(self.labels.items()) if value != 0]

    def summary(self):
        names = ", ".join(name for _, name in self.foregroundLabels)
        spacing = " x ".join(f"{s:g}" for s in self.targetSpacing[::-1])
        text = (f"'{self.name}': {len(self.foregroundLabels)} label(s) ({names}); input "
                f"{', '.join(self.channels)}; spacing {spacing} mm; patch {'x'.join(map(str, self.patchSize))}")
        if "dice_mean" in self.metrics:
            text += f"; validation Dice {self.metrics['dice_mean']:.3f}"
            if "epoch" in self.metrics:
                text += f" (epoch {int(self.metrics['epoch'])})"
        return text


def modelInfoFromHeader(path, header):
    """:class:`ModelInfo` from a loaded ROG checkpoint header."""
    from deepimaging.rog.plan import Plan

    try:
        plan = Plan.from_dict(header["preprocessing"])
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{path}: the ROG checkpoint has no usable plan ({error})") from error
    return ModelInfo(Path(path), plan.name, {lb.value: lb.name for lb in plan.labels}, [c.name for c in plan.channels],
                     tuple(plan.target_spacing_zyx), tuple(plan.patch_size), dict(header.get("metrics", {})))


def readModelInfo(path):
    """Read a checkpoint's header; another method's checkpoint or a broken file is a CheckpointError."""
    from deepimaging.core.checkpoint import load_checkpoint

    path = requireModelPath(path)
    return modelInfoFromHeader(path, load_checkpoint(path, method="rog").header)


def modelDescription(path):
    """One line about a checkpoint for the panel: its summary, or why it cannot be used."""
    if not isPathSet(path):
        return ""
    if installedTorchVersion() is None:
        return "Model details are shown once PyTorch is installed (on first Apply)."
    try:
        return readModelInfo(path).summary()
    except (DeepImagingError, OSError) as error:
        return f"Not usable: {error}"


class ROGSegmentLogic:
    """Segments volumes with ROG checkpoints and starts training jobs; usable without the GUI.

    After :meth:`segment`, ``lastModelInfo`` and ``lastSeconds`` describe the run.
    """

    def __init__(self):
        self.lastModelInfo = None
        self.lastSeconds = None

    def segment(self, volumeNode, modelPath, device="auto", progress=None, cancel=None, postprocess=True,
                outputName=None):
        """Segment ``volumeNode`` into a new segmentation node and return it.

        Segments are named and ordered as the checkpoint's labels (empty ones included, so
        every label the model knows is listed), coloured distinctly, on the volume's grid.

        :param device: "auto" (CUDA > MPS > CPU), "cpu", "cuda" or "cuda:N".
        :param progress: optional ``(fraction, message)`` callback.
        :param cancel: optional ``deepimaging.core.progress.CancelToken``, checked between patches.
        :raises InputError: no, 2-D, 4-D/vector or NaN volume; model for several input channels.
        :raises CheckpointError: missing, broken or non-ROG checkpoint.
        :raises DependencyError: monai is not installed (the panel's Apply installs it).
            No node is added when anything fails or is cancelled.
        """
        startTime = time.time()
        report(progress, 0.0, "Reading volume")
        image = volumeImage(volumeNode)
        deviceName = requireDevice(device)
        path = requireModelPath(modelPath)
        report(progress, 0.02, "Loading model")
        requireModuleDependencies("ROGSegment")  # monai: a clear message from the console, not an ImportError
        from deepimaging.rog.infer import load_rog, predict_volume

        rog = load_rog(path, device="cpu")
        info = modelInfoFromHeader(path, rog.header)
        if len(rog.plan.channels) != 1:
            raise InputError(
                f"model '{info.name}' needs {len(rog.plan.channels)} input volumes ({', '.join(info.channels)}); "
                "this module feeds it one volume")
        check_cancel(cancel)
        logging.info(f"Segmenting '{volumeNode.GetName()}' {image.shape[::-1]} with {path}")
        try:
            labels, _ = predict_volume(image, rog, device=deviceName, postprocess=postprocess,
                                       progress=sub_progress(progress, 0.05, 0.9), cancel=cancel)
        finally:
            self._releaseGpuMemory()
        check_cancel(cancel)
        report(progress, 0.9, "Writing segments")
        name = outputName or f"{volumeNode.GetName()} {info.name} segmentation"
        segmentationNode = self.createSegmentation(labels.array, info.foregroundLabels, volumeNode, name)
        self.lastModelInfo, self.lastSeconds = info, time.time() - startTime
        report(progress, 1.0, "Done")
        logging.info(f"ROG segmentation of '{volumeNode.GetName()}' finished in {self.lastSeconds:.1f} s")
        return segmentationNode

    @staticmethod
    def createSegmentation(labelArray, labels, volumeNode, name):
        """A new segmentation node with one segment per ``(value, name)`` of ``labels``.

        ``labelArray`` holds label values on the volume's (z, y, x) grid.  The node is removed
        again if writing fails, so no half-made node is left in the scene.
        """
        labelArray = np.asarray(labelArray)
        shape = tuple(reversed(volumeNode.GetImageData().GetDimensions()))
        if labelArray.shape != shape:
            raise InputError(f"label map shape {labelArray.shape} differs from volume shape {shape} (z, y, x)")
        segmentationNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", nodes.uniqueNodeName(name))
        try:
            segmentationNode.CreateDefaultDisplayNodes()
            segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
            for index, (value, segmentName) in enumerate(labels):
                nodes.writeMaskToSegment(labelArray == value, segmentationNode, volumeNode, name=segmentName,
                                         color=segmentColor(index))
            nodes.placeLikeInput(segmentationNode, volumeNode)
        except Exception:
            slicer.mrmlScene.RemoveNode(segmentationNode)
            raise
        return segmentationNode

    @staticmethod
    def _releaseGpuMemory():
        """Hand cached CUDA memory back, so Slicer does not keep it after inference."""
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # -- training -------------------------------------------------------------------------------
    def exportTrainingData(self, pairs, folder, modality="CT", name="Slicer scene", progress=None):
        """Write ``[(volumeNode, segmentationNode)]`` as an MSD dataset folder; see :mod:`.export`."""
        return export.exportTrainingData(pairs, folder, modality=modality, name=name, progress=progress)

    def startTraining(self, outputFolder, dataFolder=None, pairs=None, modality="CT", epochs=100,
                      stepsPerEpoch=250, device="auto", progress=None):
        """Plan and train in child processes; returns the running :class:`.training.TrainingJob`.

        Give ``dataFolder`` (MSD layout, or images + labels subfolders) or ``pairs`` of scene
        nodes, which are exported to a temporary MSD folder first (removed when the job ends).
        ``outputFolder`` receives plan.json, best.pt, last.pt and training_log.csv; when it
        already holds last.pt, training resumes from it.
        """
        if (dataFolder is None) == (pairs is None):
            raise InputError("train from either a data folder or volume + segmentation pairs, not both")
        requireModuleDependencies("ROGSegment")  # the training child runs on the same Python
        if not isPathSet(outputFolder):
            raise InputError("no output folder selected for the trained model")
        deviceName = requireDevice(device)
        outputFolder = Path(str(outputFolder)).expanduser()
        if pairs is not None:
            temporary = export.temporaryFolder()
            try:
                data = self.exportTrainingData(pairs, temporary / "dataset", modality=modality, progress=progress)
            except Exception:
                export.removeFolder(temporary)
                raise
            cleanup = temporary
        else:
            data, cleanup = export.prepareDataFolder(dataFolder, modality)
        steps = training.trainingSteps(data.folder, outputFolder, epochs, stepsPerEpoch, deviceName)
        job = training.TrainingJob(steps, outputFolder, cleanupFolder=cleanup)
        return job.start()

    # -- robustness -----------------------------------------------------------------------------
    # Room for the adversarial robustness benchmark (AutoAttack-3D, deepimaging.robustness): the
    # panel keeps a disabled "Robustness" section for it; it evaluates a checkpoint checked by
    # requireModelPath() on a volume read by volumeImage(), like segment() does.
