"""GLSSegment's Logic: segment 2D B-scans with a GLS checkpoint, add keypoints, start training, Qt-free.

The module panel, its self-test, the Python console and the headless tests call this file.
Inference runs in this process through one pipeline function,
:func:`deepimaging.gls.infer.predict_image`, with a ``CancelToken`` checked between B-scans;
training (minutes to hours) runs in a child process, see :mod:`.training`.  torch and
``deepimaging.gls`` are imported inside the methods, so the module loads before torch is
installed.

Input: a scalar volume that is one B-scan (one slice) or a stack of B-scans along k (the rule
of :func:`deepimaging.gls.data.bscans_from_volume`).  Output: a new segmentation node with one
segment "foreground" on the volume's grid, and a new point list with the predicted keypoints
(RAS), both placed like the input (same parent transform and study).

Keypoint names (:func:`keypointNames`): a checkpoint whose header has ``keypoint_names`` (a
list of K strings) names its points after them; otherwise the header's ``keypoint_rule``
names them ("left tail", "right tail" for the iris-tails rule, see :data:`RULE_KEYPOINT_NAMES`);
otherwise point k is "K<k+1>".  A B-scan stack adds the slice index, " s<index>" (from 0),
so "left tail s3" is the left tail in slice 3; a single B-scan has no suffix.  Each control
point's description holds the heatmap peak value ("score 0.93").
"""

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import slicer
from DeepImagingCommonLib import nodes
from DeepImagingCommonLib.dependencies import installedTorchVersion, requireModuleDependencies
from DeepImagingCommonLib.inputs import DEVICE_CHOICES, isPathSet, requireCheckpointPath, requireDevice  # noqa: F401
from deepimaging.core.errors import DeepImagingError, InputError
from deepimaging.core.progress import check_cancel, report, sub_progress

from . import export, training

ARCHITECTURE_CHOICES = ("gls", "global", "unet", "unetpp", "cenet")
KEYPOINT_ARCHITECTURES = ("gls", "global")  # those with a keypoint (heatmap) head
FOREGROUND_SEGMENT_NAME = "foreground"
FOREGROUND_COLOR = (0.93, 0.6, 0.16)
KEYPOINT_COLOR = (0.2, 0.85, 1.0)
# LPS (the library's physical space) -> RAS (Slicer's): x and y change sign.
LPS_TO_RAS = np.array([-1.0, -1.0, 1.0])


def requireThreshold(threshold):
    """The probability threshold as a float strictly between 0 and 1."""
    try:
        value = float(threshold)
    except (TypeError, ValueError):
        value = math.nan
    if not 0.0 < value < 1.0:
        raise InputError(f"the probability threshold must lie between 0 and 1 (exclusive), got {threshold}")
    return value


def requireModelPath(path):
    """The checkpoint path as a ``Path``; an unset or missing file gives a clear error."""
    return requireCheckpointPath(path, "GLS")


def bscanImage(volumeNode):
    """A scalar volume node as an :class:`Image` of one B-scan or a stack of B-scans along k.

    Vector (RGB) volumes, volumes with NaN voxels and 3-D volumes that are not a B-scan stack
    (slices too small, or too many of them: the rule of
    :func:`deepimaging.gls.data.bscans_from_volume`) are refused with the library's message,
    prefixed with the volume's name.  A single slice is always a B-scan (whether it is large
    enough for a model is the model's check).
    """
    from deepimaging.gls.data import bscans_from_volume

    try:
        image = nodes.imageFromVolumeNode(volumeNode)
    except InputError as error:
        if volumeNode is not None and "components per voxel" in str(error):
            raise InputError(f"{error} (a B-scan saved as a colour picture loads as such a volume: convert it to "
                             "grey with the 'Vector to Scalar Volume' module)") from error
        raise
    name = volumeNode.GetName()
    image.require_finite(f"volume '{name}'")
    if image.shape[0] > 1:
        try:
            bscans_from_volume(image)  # the library's rule of what a B-scan stack is
        except InputError as error:
            raise InputError(f"volume '{name}': {error}") from error
    return image


# Names of the keypoints each rule of deepimaging.gls.keypoints derives from masks (what a
# checkpoint trained on derived keypoints predicts), for headers without "keypoint_names".
RULE_KEYPOINT_NAMES = {
    "iris-tails": ("left tail", "right tail"),
    "extremes-x": ("left end", "right end"),
    "lv-apex": ("LV apex",),
}


def keypointNames(header, count):
    """``count`` keypoint names for a checkpoint header.

    The header's ``keypoint_names`` when it lists ``count`` of them; else the names of its
    ``keypoint_rule`` (e.g. "left tail", "right tail" for "iris-tails") when that rule gives
    ``count`` points; else K1, K2, ...
    """
    header = header or {}
    names = header.get("keypoint_names")
    if isinstance(names, (list, tuple)) and len(names) == count and all(str(n).strip() for n in names):
        return [str(n).strip() for n in names]
    byRule = RULE_KEYPOINT_NAMES.get(str(header.get("keypoint_rule") or ""))
    if byRule is not None and len(byRule) == count:
        return list(byRule)
    return [f"K{k + 1}" for k in range(count)]


def keypointLabel(name, sliceIndex, sliceCount):
    """The control point label: the keypoint's name, plus " s<slice>" in a B-scan stack."""
    return name if sliceCount == 1 else f"{name} s{sliceIndex}"


@dataclass
class ModelInfo:
    """What a GLS checkpoint says about itself (from its header)."""

    path: Path
    architecture: str
    keypoints: int  # K of the keypoint head (0: no keypoint head)
    keypointNames: list
    inputSize: tuple  # (H, W) the network sees, or () when the header does not say
    cropSize: tuple  # (h, w) of GLS's local crops on the network grid, or ()
    stageReached: int = 3  # GLS training stage the weights reached (3: fused output)
    metrics: dict = field(default_factory=dict)

    def summary(self):
        text = f"architecture '{self.architecture}'"
        if self.keypoints:
            text += f"; {self.keypoints} keypoint(s) ({', '.join(self.keypointNames)})"
        else:
            text += "; no keypoints"
        if self.inputSize:
            text += f"; input {self.inputSize[1]}x{self.inputSize[0]}"
        if self.cropSize:
            text += f"; crops {self.cropSize[1]}x{self.cropSize[0]}"
        if self.architecture == "gls" and self.stageReached < 3:
            text += f"; training stopped in stage {self.stageReached}: segments with the global branch"
        dice = next((self.metrics[k] for k in ("dice", "val_dice", "dice_mean") if k in self.metrics), None)
        if isinstance(dice, (int, float)):
            text += f"; validation Dice {dice:.3f}"
            if isinstance(self.metrics.get("epoch"), (int, float)):
                text += f" (epoch {int(self.metrics['epoch'])})"
        return text


def _pair(value):
    try:
        values = tuple(int(v) for v in value)
    except (TypeError, ValueError):
        return ()
    return values if len(values) == 2 else ()


def modelInfoFromHeader(path, header):
    """:class:`ModelInfo` from a GLS checkpoint header (the format ``deepimaging gls train`` writes)."""
    header = dict(header or {})
    config = dict(header.get("config") or {})
    preprocessing = dict(header.get("preprocessing") or {})
    architecture = str(header.get("arch") or "?")
    count = 0
    if architecture in KEYPOINT_ARCHITECTURES:
        try:
            count = int(config.get("keypoints", 0) or 0)
        except (TypeError, ValueError):
            count = 0
    try:
        stage = int(header.get("stage_reached", 3))
    except (TypeError, ValueError):
        stage = 3
    metrics = {k: v for k, v in dict(header.get("metrics") or {}).items() if isinstance(v, (int, float, str))}
    return ModelInfo(Path(path), architecture, count, keypointNames(header, count) if count else [],
                     _pair(preprocessing.get("size")),
                     _pair(config.get("crop_size")) if architecture == "gls" else (), stage, metrics)


def readModelInfo(path):
    """Read a checkpoint's header; another method's checkpoint or a broken file is a CheckpointError."""
    from deepimaging.core.checkpoint import load_checkpoint

    path = requireModelPath(path)
    return modelInfoFromHeader(path, load_checkpoint(path, method="gls").header)


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


@dataclass
class GLSOutputs:
    """What :meth:`GLSSegmentLogic.segment` added: the segmentation, the keypoints (or None) and the prediction."""

    segmentationNode: object
    keypointsNode: object  # vtkMRMLMarkupsFiducialNode, None when the model predicts no keypoints
    prediction: object  # deepimaging.gls.infer.GLSPrediction
    modelInfo: ModelInfo
    seconds: float

    @property
    def keypointCount(self):
        return 0 if self.keypointsNode is None else self.keypointsNode.GetNumberOfControlPoints()


def keypointsRAS(keypointsLPS):
    """(S, K, 3) LPS millimetres -> the same points in RAS (x and y change sign); NaN stays NaN."""
    points = np.asarray(keypointsLPS, dtype=float)
    if points.ndim != 3 or points.shape[-1] != 3:
        raise InputError(f"keypoints must be (slices, K, 3) LPS points, got shape {points.shape}")
    return points * LPS_TO_RAS


class GLSSegmentLogic:
    """Segments B-scans with GLS checkpoints and starts training jobs; usable without the GUI.

    After :meth:`segment`, ``lastOutputs`` holds its :class:`GLSOutputs`.
    """

    def __init__(self):
        self.lastOutputs = None

    def segment(self, volumeNode, modelPath, device="auto", threshold=0.5, progress=None, cancel=None,
                outputName=None):
        """Segment ``volumeNode`` (a B-scan or a stack of them) into new nodes; returns :class:`GLSOutputs`.

        Adds a segmentation node with the segment "foreground" on the volume's grid, and a
        point list with the predicted keypoints in RAS (none for a model without a keypoint
        head); both get the input's parent transform and study.

        :param device: "auto" (CUDA > MPS > CPU), "cpu", "cuda" or "cuda:N".
        :param threshold: probability above which a pixel is foreground (0 < threshold < 1).
        :param progress: optional ``(fraction, message)`` callback.
        :param cancel: optional ``deepimaging.core.progress.CancelToken``.
        :raises InputError: no, vector (RGB) or NaN volume; a 3-D volume that is not a B-scan
            stack; B-scans too small for the model; a bad threshold or device.
        :raises CheckpointError: missing, broken or non-GLS checkpoint.
        :raises DependencyError: monai is not installed (the panel's Apply installs it).
            No node is added when anything fails or is cancelled.
        """
        startTime = time.time()
        report(progress, 0.0, "Reading volume")
        image = bscanImage(volumeNode)
        deviceName = requireDevice(device)
        threshold = requireThreshold(threshold)
        path = requireModelPath(modelPath)
        report(progress, 0.02, "Loading model")
        requireModuleDependencies("GLSSegment")  # monai: a clear message from the console, not an ImportError
        from deepimaging.gls.infer import load_gls, predict_image

        model = load_gls(path, device="cpu")  # predict_image moves it to the chosen device
        info = modelInfoFromHeader(path, model.header)
        check_cancel(cancel)
        logging.info(f"GLS segmentation of '{volumeNode.GetName()}' {image.shape[::-1]} with {path}")
        try:
            prediction = predict_image(image, model, device=deviceName, threshold=threshold,
                                       progress=sub_progress(progress, 0.05, 0.9), cancel=cancel)
        finally:
            self._releaseGpuMemory()
        check_cancel(cancel)
        report(progress, 0.9, "Writing segment and keypoints")
        baseName = outputName or f"{volumeNode.GetName()} GLS"
        outputs = self.createOutputs(prediction, info, volumeNode, baseName)
        outputs.seconds = time.time() - startTime
        self.lastOutputs = outputs
        report(progress, 1.0, "Done")
        logging.info(f"GLS segmentation of '{volumeNode.GetName()}' finished in {outputs.seconds:.1f} s "
                     f"({outputs.keypointCount} keypoint(s))")
        return outputs

    def createOutputs(self, prediction, info, volumeNode, baseName):
        """The segmentation and keypoint nodes of a prediction; on failure neither stays in the scene."""
        mask = np.asarray(prediction.mask.array if hasattr(prediction.mask, "array") else prediction.mask)
        added = []
        try:
            segmentationNode = self.createSegmentation(mask, volumeNode, f"{baseName} segmentation")
            added.append(segmentationNode)
            keypointsNode = self.createKeypoints(prediction.keypoints_lps, info.keypointNames, volumeNode,
                                                 f"{baseName} keypoints",
                                                 getattr(prediction, "keypoint_scores", None))
            if keypointsNode is not None:
                added.append(keypointsNode)
        except Exception:
            for node in added:
                removeNode(node)
            raise
        return GLSOutputs(segmentationNode, keypointsNode, prediction, info, 0.0)

    @staticmethod
    def createSegmentation(mask, volumeNode, name):
        """A new segmentation node with one segment "foreground" from a (z, y, x) 0/1 mask on the volume's grid."""
        mask = np.asarray(mask)
        shape = tuple(reversed(volumeNode.GetImageData().GetDimensions()))
        if mask.shape != shape:
            raise InputError(f"mask shape {mask.shape} differs from volume shape {shape} (z, y, x)")
        segmentationNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", nodes.uniqueNodeName(name))
        try:
            segmentationNode.CreateDefaultDisplayNodes()
            segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
            nodes.writeMaskToSegment(mask > 0, segmentationNode, volumeNode, name=FOREGROUND_SEGMENT_NAME,
                                     color=FOREGROUND_COLOR)
            nodes.placeLikeInput(segmentationNode, volumeNode)
        except Exception:
            removeNode(segmentationNode)
            raise
        return segmentationNode

    @staticmethod
    def createKeypoints(keypointsLPS, names, volumeNode, name, scores=None):
        """A new point list with the finite keypoints (S, K, 3 LPS) in RAS; None when there are none.

        Points are added slice by slice, keypoint by keypoint, labelled by :func:`keypointLabel`;
        ``scores`` (S, K), the heatmap peaks, go into the descriptions.
        """
        if keypointsLPS is None:
            return None
        points = keypointsRAS(keypointsLPS)
        sliceCount, count = points.shape[:2]
        scores = None if scores is None else np.asarray(scores, dtype=float).reshape(sliceCount, count)
        finite = np.all(np.isfinite(points), axis=-1)
        if count == 0 or not finite.any():
            return None
        names = list(names) if len(names) == count else [f"K{k + 1}" for k in range(count)]
        markupsNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", nodes.uniqueNodeName(name))
        try:
            markupsNode.CreateDefaultDisplayNodes()
            displayNode = markupsNode.GetDisplayNode()
            if displayNode is not None:
                displayNode.SetSelectedColor(*KEYPOINT_COLOR)
            wasModifying = markupsNode.StartModify()
            try:
                for s in range(sliceCount):
                    for k in range(count):
                        if not finite[s, k]:
                            continue
                        index = markupsNode.AddControlPoint([float(v) for v in points[s, k]],
                                                            keypointLabel(names[k], s, sliceCount))
                        if scores is not None and np.isfinite(scores[s, k]):
                            markupsNode.SetNthControlPointDescription(index, f"score {float(scores[s, k]):.3f}")
            finally:
                markupsNode.EndModify(wasModifying)
            nodes.placeLikeInput(markupsNode, volumeNode)
        except Exception:
            removeNode(markupsNode)
            raise
        return markupsNode

    @staticmethod
    def _releaseGpuMemory():
        """Hand cached CUDA memory back, so Slicer does not keep it after inference."""
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # -- training -------------------------------------------------------------------------------
    def exportTrainingData(self, pairs, folder, progress=None):
        """Write ``[(volumeNode, segmentationNode)]`` in GLS's folder layout; see :mod:`.export`."""
        return export.exportTrainingData(pairs, folder, progress=progress)

    def startTraining(self, outputFolder, dataFolder=None, pairs=None, architecture="gls", epochs=100,
                      keypoints=2, device="auto", progress=None, extraArguments=()):
        """Train in a child process; returns the running :class:`.training.TrainingJob`.

        Give ``dataFolder`` (``images/``, ``masks/``, optional ``keypoints.csv``) or ``pairs``
        of scene nodes, which are exported to a temporary folder first (removed when the job
        ends).  ``outputFolder`` receives best.pt, last.pt and training_log.csv; when it already
        holds last.pt of the same settings, training resumes from it.  ``extraArguments`` go to
        ``deepimaging gls train`` as they are (``--size H W``, ``--crop-size``, ``--lr``, ...).
        """
        if (dataFolder is None) == (pairs is None):
            raise InputError("train from either a data folder or volume + segmentation pairs, not both")
        requireModuleDependencies("GLSSegment")  # the training child runs on the same Python
        if not isPathSet(outputFolder):
            raise InputError("no output folder selected for the trained model")
        deviceName = requireDevice(device)
        if architecture == "gls":
            from deepimaging.gls.train import stage_epochs

            stage_epochs(int(epochs))  # the library's rule: three stages need at least 3 epochs
        outputFolder = Path(str(outputFolder)).expanduser()
        cleanup = None
        if pairs is not None:
            cleanup = export.temporaryFolder()
            try:
                data = self.exportTrainingData(pairs, cleanup / "data", progress=progress).folder
            except Exception:
                export.removeFolder(cleanup)
                raise
        else:
            data = export.checkDataFolder(dataFolder)
        try:
            command = training.trainingCommand(data, outputFolder, architecture, epochs, keypoints, deviceName,
                                               extraArguments)
            job = training.TrainingJob(command, outputFolder, cleanupFolder=cleanup,
                                       cpuOnly=deviceName == "cpu")
        except Exception:
            export.removeFolder(cleanup)
            raise
        return job.start()


removeNode = nodes.removeNode
