"""NIRSTRecon's Logic: MRI-guided NIRST reconstruction on MRML nodes, Qt-free.

The module panel, its self-test, the Python console and the headless tests call this file,
and this file calls the pipeline functions of :mod:`deepimaging.nirst.recon`
(``read_measurements``, ``reconstruct_image``, ``hbt_contrast``, ``simulate_example``) and
the ``deepimaging nirst train`` command; nothing of the physics or the network lives here.
torch and ``deepimaging.nirst`` are imported only inside methods, so the module loads
before torch is installed.
"""

import dataclasses
import logging
import os
import re
import tempfile
import time
from pathlib import Path

import numpy as np

import slicer
from DeepImagingCommonLib import nodes
from DeepImagingCommonLib.process import (BackgroundProcess, deepimagingCommand, deepimagingEnvironment,
                                          parseProgressLine)
from deepimaging.core.errors import CheckpointError, InputError

# Output maps in display order: library key, node name (units in the name), colour node ID.
# All colour nodes are among Slicer's default colour nodes (AddDefaultColorNodes).
OUTPUT_MAPS = (
    ("HbO", "HbO (uM)", "vtkMRMLColorTableNodeRed"),
    ("Hb", "Hb (uM)", "vtkMRMLColorTableNodeBlue"),
    ("water", "Water (%)", "vtkMRMLColorTableNodeCyan"),
    ("HbT", "HbT (uM)", "vtkMRMLColorTableNodeIron"),
    ("StO2", "StO2 (%)", "vtkMRMLColorTableNodeRainbow"),
)
FALLBACK_COLOR_NODE_ID = "vtkMRMLColorTableNodeGrey"
TRUTH_PREFIX = "True "
PHANTOM_MRI_NAME = "NIRST phantom MRI"
PHANTOM_SEGMENTATION_NAME = "NIRST phantom inclusion"
INCLUSION_SEGMENT_NAME = "Inclusion"
DEVICES = ("auto", "cpu", "cuda")
ARCHITECTURES = ("znet", "ynet")
METHODS = ("znet", "znet-paper", "dri")  # deepimaging.nirst.pipeline.METHODS
CALIBRATION_MODES = ("none", "reference", "background")
WINDINGS = ("ccw", "cw")
_EPOCH_PATTERN = re.compile(r"\bepoch\s+(\d+)\s*/\s*(\d+)", re.IGNORECASE)
_PERCENT_PATTERN = re.compile(r"(\d{1,3})%\|")  # a tqdm bar: " 42%|####      | ..."


@dataclasses.dataclass
class ReconstructionResult:
    """What :meth:`NIRSTReconLogic.reconstruct` made: volume nodes by map key, the slice used,
    the HbT contrast inside the chosen segment (None when no segment was given), the method and
    notes for the user (optode ring, calibration, channel mapping, scale warnings)."""

    volumes: dict
    sliceIndex: int
    hbtContrast: float = None
    method: str = "znet"
    notes: list = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class SimulatedPhantom:
    """What :meth:`NIRSTReconLogic.simulatePhantom` made."""

    mriVolume: object
    measurementFile: Path
    measurements: np.ndarray
    truthVolumes: dict
    segmentationNode: object
    segmentId: str


def deviceArgument(device):
    """Panel choice -> the library's ``device=`` (``"auto"`` and empty mean: let it choose)."""
    if device in (None, "", "auto"):
        return None
    if device not in DEVICES:
        raise InputError(f"unknown device '{device}'; choose one of {', '.join(DEVICES)}")
    return device


def optionalPath(path):
    """A path the user set, or None for an empty field (a bound empty path reads as ``"."``)."""
    if path is None or str(path).strip() in ("", "."):
        return None
    return Path(path)


def sliceImage(image, sliceIndex=None):
    """``(Image (1, y, x), index)``: a 2D image as is, or slice ``sliceIndex`` of a 3D one.

    The slice keeps spacing and direction; its origin is the position of voxel (0, 0, k), so
    maps written on it lie exactly on that slice of the volume.  ``None`` picks the middle slice.
    """
    from deepimaging.nirst.recon import extract_slice

    nz = image.shape[0]
    if nz == 1:
        if sliceIndex not in (None, 0):
            raise InputError(f"the MRI is a single slice, so slice index {sliceIndex} does not exist (use 0)")
        return image, 0
    k = nz // 2 if sliceIndex is None else int(sliceIndex)
    if not 0 <= k < nz:
        raise InputError(f"slice index {k} is outside the MRI volume, which has slices 0 to {nz - 1}")
    return extract_slice(image, k), k


def trainingProgress(line):
    """``(fraction, message)`` from a line of the training command's output, else None.

    Understands the ``PROGRESS <fraction> <message>`` lines of DeepImagingCommonLib.process
    and, as fallbacks, ``epoch i/n`` in log lines and tqdm bars (``42%|###   |``).
    """
    parsed = parseProgressLine(line)
    if parsed is not None:
        return parsed
    match = _EPOCH_PATTERN.search(line)
    if match and int(match.group(2)) > 0:
        return min(1.0, int(match.group(1)) / int(match.group(2))), line.strip()
    match = _PERCENT_PATTERN.search(line)
    if match:
        return min(1.0, int(match.group(1)) / 100.0), line[:match.start()].strip(" :")
    return None


class NIRSTReconLogic:
    """Reconstructs HbO, Hb, water, HbT and StO2 maps on an MRI's geometry; usable without the GUI.

    ``lastResult`` keeps the latest :class:`ReconstructionResult` and ``lastPhantom`` the latest
    :class:`SimulatedPhantom` for the caller to show or reuse.
    """

    def __init__(self):
        self.lastResult = None
        self.lastPhantom = None
        self._reconstructor = None
        self._reconstructorKey = None

    # -- reconstruction ------------------------------------------------------------------------
    def readMeasurements(self, measurements):
        """A file path (CSV, TXT, NPZ or NPY; see :func:`deepimaging.nirst.recon.read_measurements`)
        or an array -> flat float array; count and values are checked when reconstructing."""
        if measurements is None or (isinstance(measurements, (str, os.PathLike)) and optionalPath(measurements) is None):
            raise InputError("no measurement file selected: choose a CSV or NPZ file of boundary amplitudes, "
                             "or simulate a phantom first")
        if isinstance(measurements, (str, os.PathLike)):
            from deepimaging.nirst.recon import read_measurements

            path = Path(measurements)
            if not path.is_file():
                raise InputError(f"measurement file not found: {path}")
            return np.asarray(read_measurements(path), dtype=float)
        return np.asarray(measurements, dtype=float)

    def reconstruct(self, measurements, mriVolumeNode, sliceIndex=None, checkpoint=None, device=None,
                    segmentationNode=None, segmentId=None, method="znet", calibration=None, geometry=None,
                    diskCentreRAS=None, driElementSize=2.5, driIterations=6, progress=None, cancel=None):
        """Reconstruct the maps and add them as new volume nodes; return a :class:`ReconstructionResult`.

        :param measurements: measurement file path or array of the boundary amplitudes (2160 for
            16 optodes, 504 for 8).
        :param mriVolumeNode: scalar volume, a single slice or a 3D volume (then ``sliceIndex``
            picks the slice, middle by default; outputs are single-slice volumes at its position).
        :param checkpoint: Z-Net/Y-Net checkpoint file for ``method="znet"``; None or empty = the
            shipped Z-Net (robust training).
        :param device: ``"auto"``/None, ``"cpu"`` or ``"cuda"``.
        :param segmentationNode, segmentId: optional segment for the HbT contrast.
        :param method: ``"znet"`` (the network), ``"znet-paper"`` (the shipped Z-Net trained on the
            paper-style distribution, which leans on MRI intensity) or ``"dri"`` (model-based, seconds).
        :param calibration: None or a ``deepimaging.nirst.calibration.Calibration`` (see :meth:`calibration`).
        :param geometry: None (the network's ring for Z-Net, the default ring for DRI) or a dict with
            ``diameter_mm``, ``angle_offset_deg``, ``winding`` (the optode count comes from the data).
        :param diskCentreRAS: disk centre in the volume's RAS coordinates; None = the slice centre.
        :param progress, cancel: ``progress(fraction, message)`` and a ``CancelToken`` (DRI checks it
            every iteration and raises ``Cancelled``).
        :raises InputError, CheckpointError: bad measurements, MRI, segment, calibration or
            checkpoint; no node is added then.
        """
        import warnings

        from deepimaging.nirst.pipeline import reconstruct
        from deepimaging.nirst.recon import hbt_contrast

        if method not in METHODS:
            raise InputError(f"unknown method '{method}'; choose one of {', '.join(METHODS)}")
        if optionalPath(checkpoint) is not None and method == "znet-paper":
            raise InputError("a checkpoint file picks the network for method 'znet'; 'znet-paper' is the shipped one")
        startTime = time.time()
        values = self.readMeasurements(measurements)
        mri = nodes.imageFromVolumeNode(mriVolumeNode)
        mri.require_finite(f"MRI volume '{mriVolumeNode.GetName()}'")
        mriSlice, index = sliceImage(mri, sliceIndex)
        inclusionMask = None
        if segmentationNode is not None or segmentId:
            inclusionMask = self._segmentMaskOnSlice(segmentationNode, segmentId, mriVolumeNode, index)
        reconstructor = self.reconstructor(optionalPath(checkpoint), device, method) if method != "dri" else None
        centre = None
        if diskCentreRAS is not None:
            r, a, s = (float(v) for v in diskCentreRAS)
            centre = (-r, -a, s)  # RAS -> LPS
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            output = reconstruct(values, mriSlice, method=method, reconstructor=reconstructor,
                                 calibration=calibration, disk_centre_lps=centre, dri_element_size_mm=driElementSize,
                                 dri_iterations=driIterations, progress=progress, cancel=cancel, **(geometry or {}))
        notes = list(output.notes) + [str(w.message) for w in caught]
        for w in caught:
            logging.warning(str(w.message))
        contrast = None
        if inclusionMask is not None:
            contrast = float(hbt_contrast(np.asarray(output.maps["HbT"].array)[0], inclusionMask))
        volumes = self._addMapVolumes(output.maps, "", mriVolumeNode)
        self.lastResult = ReconstructionResult(volumes, index, contrast, method, notes)
        model = reconstructor.path if reconstructor is not None else "DRI"
        logging.info(f"NIRST reconstruction of slice {index} of '{mriVolumeNode.GetName()}' with "
                     f"{model} took {time.time() - startTime:.2f} s"
                     + (f"; HbT contrast {contrast:.3f}" if contrast is not None else "") + "; " + "; ".join(notes))
        return self.lastResult

    def panelOptions(self, parameters):
        """The :meth:`reconstruct` keywords for the panel's method, ring, disk centre and calibration.

        ``parameters`` has the module's parameter-node fields (``method``, ``ringDiameter``,
        ``optodeOffset``, ``winding``, ``diskCentre``, ``inputVolume``, ``calibrationMode``,
        ``referenceFile``, ``mediumHbO``, ``mediumHb``, ``mediumWater``, ``perOptodeCoupling``).
        """
        medium = (parameters.mediumHbO, parameters.mediumHb, parameters.mediumWater)
        return {
            "method": parameters.method,
            "geometry": {"diameter_mm": float(parameters.ringDiameter),
                         "angle_offset_deg": float(parameters.optodeOffset), "winding": parameters.winding},
            "diskCentreRAS": self.diskCentreFromPointList(parameters.diskCentre, parameters.inputVolume),
            "calibration": self.calibration(parameters.calibrationMode, parameters.referenceFile, medium,
                                            parameters.perOptodeCoupling),
        }

    @staticmethod
    def diskCentreFromPointList(pointListNode, volumeNode=None):
        """First point of a point list (the ring centre) in the volume's own RAS, or None.

        The point's world position is taken back through the volume's parent transform, so
        :meth:`reconstruct` gets it in the coordinates of the volume's geometry.
        """
        if pointListNode is None or pointListNode.GetNumberOfControlPoints() < 1:
            return None
        world = [0.0, 0.0, 0.0]
        pointListNode.GetNthControlPointPositionWorld(0, world)
        transformNode = volumeNode.GetParentTransformNode() if volumeNode is not None else None
        if transformNode is None:
            return world
        import vtk

        worldToVolume = vtk.vtkGeneralTransform()
        transformNode.GetTransformFromWorld(worldToVolume)
        return list(worldToVolume.TransformPoint(world))

    def calibration(self, mode="none", reference=None, medium=(14.0, 7.0, 40.0), perOptodeCoupling=False):
        """A ``Calibration`` for :meth:`reconstruct` from the panel's fields, or None for ``"none"``.

        :param mode: ``"none"``; ``"reference"``: ``reference`` (file path or array) is a homogeneous
            phantom measured with the same system and ``medium`` its HbO uM, Hb uM, water %;
            ``"background"``: ``medium`` is the data's known background (no reference file).
        :param perOptodeCoupling: with ``"background"``, also fit per-optode coupling factors.
        """
        from deepimaging.nirst.calibration import Calibration, Medium

        if mode not in CALIBRATION_MODES:
            raise InputError(f"unknown calibration '{mode}'; choose one of {', '.join(CALIBRATION_MODES)}")
        if mode == "none":
            return None
        chromophores = Medium(tuple(float(v) for v in medium))
        if mode == "background":
            return Calibration(chromophores, per_optode=bool(perOptodeCoupling))
        if reference is None or (isinstance(reference, (str, os.PathLike)) and optionalPath(reference) is None):
            raise InputError("calibration with a reference needs the reference measurement file (a homogeneous "
                             "phantom measured with the same system, same layout as the measurements)")
        return Calibration(chromophores, reference=self.readMeasurements(reference))

    def reconstructor(self, checkpoint=None, device=None, network="znet"):
        """The loaded network for ``checkpoint`` (None = the shipped ``network``: ``"znet"`` or
        ``"znet-paper"``), reused while the file is unchanged."""
        from deepimaging.nirst.recon import load_reconstructor, shipped_checkpoint

        path = optionalPath(checkpoint)
        resolved = (path or shipped_checkpoint(network)).resolve()
        if path is not None and not resolved.is_file():
            raise CheckpointError(f"checkpoint not found: {path}")
        key = (str(resolved), resolved.stat().st_mtime if resolved.is_file() else None, deviceArgument(device))
        if self._reconstructorKey != key:
            self._reconstructor = load_reconstructor(path or network, device=deviceArgument(device))
            self._reconstructorKey = key
        return self._reconstructor

    def hbtContrast(self, hbtVolumeNode, segmentationNode, segmentId):
        """HbT inclusion/background contrast of an HbT map inside a segment (a float)."""
        from deepimaging.nirst.recon import hbt_contrast

        hbt = nodes.imageFromVolumeNode(hbtVolumeNode)
        hbt.require_finite(f"HbT map '{hbtVolumeNode.GetName()}'")
        if hbt.shape[0] != 1:
            raise InputError(f"'{hbtVolumeNode.GetName()}' has {hbt.shape[0]} slices; choose a reconstructed "
                             "HbT map (one slice)")
        mask = nodes.segmentMask(segmentationNode, segmentId, hbtVolumeNode)
        self._requireMaskOnSlice(mask[0], segmentationNode, segmentId, hbtVolumeNode.GetName())
        return float(hbt_contrast(hbt.array[0], mask[0]))

    def _segmentMaskOnSlice(self, segmentationNode, segmentId, mriVolumeNode, index):
        mask = nodes.segmentMask(segmentationNode, segmentId, mriVolumeNode)[index]
        self._requireMaskOnSlice(mask, segmentationNode, segmentId, f"slice {index} of '{mriVolumeNode.GetName()}'")
        return mask

    @staticmethod
    def _requireMaskOnSlice(mask, segmentationNode, segmentId, where):
        name = nodes.segmentName(segmentationNode, segmentId)
        if not mask.any():
            raise InputError(f"segment '{name}' does not cover any pixel of {where}: draw the inclusion on "
                             "that slice first")

    def _addMapVolumes(self, maps, prefix, inputNode=None):
        """New volume nodes ``prefix + name`` (unique) with colour maps, placed like ``inputNode``
        (same parent transform and study); all or none are added."""
        volumes = {}
        try:
            for key, name, colorNodeId in OUTPUT_MAPS:
                image = maps[key].with_array(np.asarray(maps[key].array, dtype=np.float32))
                volumes[key] = nodes.volumeNodeFromImage(image, prefix + name)
                nodes.placeLikeInput(volumes[key], inputNode)
                self.setMapDisplay(volumes[key], colorNodeId)
        except Exception:
            for volumeNode in volumes.values():
                slicer.mrmlScene.RemoveNode(volumeNode)
            raise
        return volumes

    @staticmethod
    def setMapDisplay(volumeNode, colorNodeId):
        """Colour map (Grey if ``colorNodeId`` is not in the scene) and window/level = data range."""
        volumeNode.CreateDefaultDisplayNodes()
        displayNode = volumeNode.GetDisplayNode()
        if slicer.mrmlScene.GetNodeByID(colorNodeId) is None:
            logging.warning(f"colour node {colorNodeId} not in the scene; using {FALLBACK_COLOR_NODE_ID}")
            colorNodeId = FALLBACK_COLOR_NODE_ID
        displayNode.SetAndObserveColorNodeID(colorNodeId)
        array = slicer.util.arrayFromVolume(volumeNode)
        low, high = float(np.min(array)), float(np.max(array))
        if high <= low:
            high = low + 1.0
        displayNode.AutoWindowLevelOff()
        displayNode.SetWindowLevelMinMax(low, high)

    # -- simulated phantom ---------------------------------------------------------------------
    def simulatePhantom(self, seed=0, loadTruth=True, directory=None):
        """Simulate one paper-style phantom: MRI volume node, measurement CSV, inclusion segment.

        The CSV goes to ``directory`` (a new temporary folder by default) so Reconstruct can
        read it like a user's file; with ``loadTruth`` the true maps are added as volumes
        "True HbO (uM)", ... too.  Returns a :class:`SimulatedPhantom`.
        """
        from deepimaging.nirst.recon import simulate_example, write_measurements

        startTime = time.time()
        measurements, mri, truth = simulate_example(seed=int(seed))
        folder = Path(directory) if directory is not None else Path(tempfile.mkdtemp(prefix="NIRSTRecon-"))
        folder.mkdir(parents=True, exist_ok=True)
        measurementFile = write_measurements(folder / f"nirst_phantom_seed{int(seed)}.csv", measurements)
        mriVolume = nodes.volumeNodeFromImage(mri.with_array(np.asarray(mri.array, np.float32)), PHANTOM_MRI_NAME)
        inclusion = np.asarray(truth.pop("inclusion_mask"), dtype=bool)
        truthImages = {key: mri.with_array(np.asarray(value, np.float32)) for key, value in truth.items()}
        truthVolumes = self._addMapVolumes(truthImages, TRUTH_PREFIX) if loadTruth else {}
        segmentationNode = slicer.mrmlScene.AddNewNodeByClass(
            "vtkMRMLSegmentationNode", nodes.uniqueNodeName(PHANTOM_SEGMENTATION_NAME))
        segmentationNode.CreateDefaultDisplayNodes()
        segmentId = nodes.writeMaskToSegment(inclusion, segmentationNode, mriVolume, name=INCLUSION_SEGMENT_NAME,
                                             color=(0.95, 0.8, 0.2))
        self.lastPhantom = SimulatedPhantom(mriVolume, measurementFile, np.asarray(measurements, dtype=float),
                                            truthVolumes, segmentationNode, segmentId)
        logging.info(f"Simulated NIRST phantom (seed {seed}) in {time.time() - startTime:.2f} s; "
                     f"measurements in {measurementFile}")
        return self.lastPhantom

    # -- training in a background process ------------------------------------------------------
    @staticmethod
    def trainingCommand(dataDirectory, outputDirectory, epochs=50, device="auto", architecture="znet",
                        extraArguments=()):
        """The ``deepimaging nirst train`` command line, run with Slicer's Python."""
        data, output = optionalPath(dataDirectory), optionalPath(outputDirectory)
        if data is None or not data.is_dir():
            raise InputError(f"training data folder not found: {dataDirectory or '(none selected)'}; "
                             "simulate one with 'deepimaging nirst simulate'")
        if output is None:
            raise InputError("no output folder for the trained checkpoint selected")
        if architecture not in ARCHITECTURES:
            raise InputError(f"unknown architecture '{architecture}'; choose one of {', '.join(ARCHITECTURES)}")
        if int(epochs) < 1:
            raise InputError(f"the number of epochs must be at least 1, got {epochs}")
        command = deepimagingCommand("nirst", "train", "--data", str(data), "--arch", architecture,
                                     "--epochs", str(int(epochs)), "--out", str(output))
        chosen = deviceArgument(device)
        if chosen is not None:
            command += ["--device", chosen]
        return command + [str(argument) for argument in extraArguments]

    def startTraining(self, dataDirectory, outputDirectory, epochs=50, device="auto", architecture="znet",
                      extraArguments=()):
        """Start training in a child process and return its started :class:`BackgroundProcess`.

        Poll it for output lines (:func:`trainingProgress` reads progress from them) and call
        ``cancel()`` to kill the whole process tree.
        """
        command = self.trainingCommand(dataDirectory, outputDirectory, epochs, device, architecture, extraArguments)
        Path(command[command.index("--out") + 1]).mkdir(parents=True, exist_ok=True)
        # The same child environment as every deepimaging CLI child: the package on the path,
        # unbuffered UTF-8 output and PROGRESS lines instead of tqdm bars (tqdm is not in
        # Slicer's Python).
        environment = deepimagingEnvironment()
        if deviceArgument(device) == "cpu":
            environment["CUDA_VISIBLE_DEVICES"] = "-1"
        logging.info("Starting NIRST training: " + " ".join(command))
        return BackgroundProcess(command, env=environment).start()

    @staticmethod
    def trainedCheckpoint(outputDirectory):
        """The checkpoint a finished training wrote into ``outputDirectory`` (newest .pt), or None."""
        folder = optionalPath(outputDirectory)
        if folder is None or not folder.is_dir():
            return None
        candidates = sorted(folder.glob("*.pt"), key=lambda p: (p.name != "best.pt", -p.stat().st_mtime))
        return candidates[0] if candidates else None

