"""The learned (deep Chan-Vese) refinement in LevelSetRefine's Logic, Qt-free.

Three things live here: the checks of the "Method" choice and the checkpoint path, a small cache
of loaded refiners (a checkpoint is read once per path, file time and device, not on every
Apply of the Segment Editor effect), and the conversion of a Slicer markups ROI (a box in RAS,
possibly rotated, under any transforms) into the voxel box ``(z0, y0, x0, z1, y1, x1)`` that
:func:`deepimaging.levelset.deep.refine_learned` takes for its ROI mode.  The maths is the
library's; torch is imported only when a refiner is loaded.
"""

import collections
import threading

import numpy as np
import vtk

import slicer
from DeepImagingCommonLib.inputs import requireCheckpointPath, requireDevice
from deepimaging.core.errors import InputError

METHOD_CLASSIC = "classic"
METHOD_LEARNED = "learned"
METHOD_CHOICES = (METHOD_CLASSIC, METHOD_LEARNED)

# Loaded refiners kept in memory (each is a few MB of weights): the last few checkpoints used.
CACHE_SIZE = 2
_cache = collections.OrderedDict()
_cacheLock = threading.Lock()


def requireMethod(method):
    """"classic" (also for None or "") or "learned"; anything else is an InputError."""
    method = (method or METHOD_CLASSIC).strip().lower()
    if method not in METHOD_CHOICES:
        raise InputError(f"unknown refinement method '{method}': choose one of {', '.join(METHOD_CHOICES)}")
    return method


def requireLearnedCheckpoint(path):
    """The checkpoint path as a ``Path``: InputError when none is chosen, CheckpointError when missing."""
    return requireCheckpointPath(path, "learned refiner")


def _cacheKey(path, device):
    from deepimaging.core.device import select_device

    stat = path.stat()
    return (str(path.resolve()), stat.st_mtime_ns, stat.st_size, str(select_device(device)))


def loadRefiner(path, device=None):
    """The :class:`deepimaging.levelset.deep.LearnedRefiner` of a checkpoint, from the cache when
    the file is unchanged (same path, modification time and size) and the device the same.

    :raises InputError: no checkpoint chosen, or an unknown device name.
    :raises CheckpointError: missing, truncated, corrupt or not a learned level-set checkpoint.
    """
    from deepimaging.levelset.deep import load_refiner

    path = requireLearnedCheckpoint(path)
    device = requireDevice(device)
    key = _cacheKey(path, device)
    with _cacheLock:
        refiner = _cache.get(key)
        if refiner is not None:
            _cache.move_to_end(key)
            return refiner
    refiner = load_refiner(path, device=device)  # raises CheckpointError with the file's name
    with _cacheLock:
        for old in [k for k in _cache if k[0] == key[0] and k[3] == key[3]]:
            del _cache[old]  # an older version of the same file on the same device
        _cache[key] = refiner
        while len(_cache) > CACHE_SIZE:
            _cache.popitem(last=False)
    return refiner


def clearRefinerCache():
    """Forget the loaded refiners (frees their memory)."""
    with _cacheLock:
        _cache.clear()


def cachedRefinerCount():
    with _cacheLock:
        return len(_cache)


def describeRefiner(path):
    """One line about a checkpoint for the panel ("2D learned refiner, 64 px grid, 3 steps, ..."), or ""."""
    try:
        refiner = loadRefiner(path, device="cpu")
    except Exception as error:  # the panel shows why the file cannot be used
        return f"Cannot use this file: {error}" if str(path or "").strip() else ""
    config, metrics = refiner.config, refiner.header.get("metrics", {})
    text = (f"{int(config.dim)}D learned refiner: {int(config.grid)} voxel grid, {int(config.steps)} "
            f"learned Chan-Vese steps")
    if "val_dice_final" in metrics:
        text += f"; validation Dice {float(metrics['val_dice_final']):.3f} (epoch {int(metrics.get('epoch', 0))})"
    return text


def refineLearned(image, mask, checkpoint, roi=None, device=None, progress=None, cancel=None):
    """``refine_learned`` with a cached refiner; ``mask=None`` with ``roi`` is the ROI mode."""
    from deepimaging.levelset.deep import refine_learned

    refiner = loadRefiner(checkpoint, device)
    return refine_learned(image, mask, refiner, roi=roi, progress=progress, cancel=cancel)


# -- markups ROI -> voxel box ----------------------------------------------------------------------
def roiCornersRAS(roiNode):
    """The 8 corners of a markups ROI in its node's (untransformed) RAS coordinates, (8, 3)."""
    bounds = [0.0] * 6
    roiNode.GetObjectBounds(bounds)
    objectToNode = slicer.util.arrayFromVTKMatrix(roiNode.GetObjectToNodeMatrix())
    corners = np.array([[x, y, z, 1.0] for x in bounds[0:2] for y in bounds[2:4] for z in bounds[4:6]])
    return (corners @ objectToNode.T)[:, :3]


def roiVoxelBox(roiNode, volumeNode):
    """The ROI's box on the volume's voxel grid as ``(z0, y0, x0, z1, y1, x1)``, ends exclusive.

    The ROI's 8 corners go through the transforms between the ROI and the volume (parent
    transforms of either, linear or not) and the volume's RAS-to-IJK matrix; the box holds every
    voxel whose centre lies in the corners' bounding box (for a box thinner than a voxel, the voxel
    nearest to its middle), clipped to the volume.
    A rotated ROI therefore gives the axis-aligned voxel box around it.  On a single-slice volume
    (a 2D image) the box always covers that slice, wherever the ROI sits across it.

    :raises InputError: no ROI, an ROI without a box, or a box outside the volume.
    """
    if roiNode is None:
        raise InputError("no ROI selected: place a markups ROI (box) around the object first")
    if not roiNode.IsA("vtkMRMLMarkupsROINode"):
        raise InputError(f"'{roiNode.GetName()}' is a {roiNode.GetClassName()}, not a markups ROI")
    if roiNode.GetNumberOfControlPoints() < 1:
        raise InputError(f"ROI '{roiNode.GetName()}' is not placed yet")
    size = list(roiNode.GetSize())
    if min(size) < 0:
        raise InputError(f"ROI '{roiNode.GetName()}' has a negative size {tuple(size)}")
    corners = roiCornersRAS(roiNode)
    toVolume = vtk.vtkGeneralTransform()
    slicer.vtkMRMLTransformNode.GetTransformBetweenNodes(
        roiNode.GetParentTransformNode(), volumeNode.GetParentTransformNode(), toVolume)
    corners = np.array([toVolume.TransformPoint(*point) for point in corners])
    rasToIJK = vtk.vtkMatrix4x4()
    volumeNode.GetRASToIJKMatrix(rasToIJK)
    rasToIJK = slicer.util.arrayFromVTKMatrix(rasToIJK)
    ijk = (np.c_[corners, np.ones(len(corners))] @ rasToIJK.T)[:, :3]
    dims = np.array(volumeNode.GetImageData().GetDimensions())  # (i, j, k)
    lowest, highest = ijk.min(axis=0), ijk.max(axis=0)
    low = np.ceil(lowest - 1e-6)  # voxel centres inside the box, edges included
    high = np.floor(highest + 1e-6) + 1
    thin = high <= low  # a box thinner than a voxel: the voxel nearest to its middle
    low[thin] = np.floor((lowest[thin] + highest[thin]) / 2 + 0.5)
    high[thin] = low[thin] + 1
    low = np.maximum(low, 0).astype(int)
    high = np.minimum(high, dims).astype(int)
    if dims[2] == 1:  # a single slice (2D image): a box drawn on it need not be exactly in its plane
        low[2], high[2] = 0, 1
    if np.any(high <= low):
        raise InputError(f"ROI '{roiNode.GetName()}' lies outside volume '{volumeNode.GetName()}': move the box onto "
                         "the object in this volume")
    return (int(low[2]), int(low[1]), int(low[0]), int(high[2]), int(high[1]), int(high[0]))
