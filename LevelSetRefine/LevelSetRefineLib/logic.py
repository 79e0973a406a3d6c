"""LevelSetRefine's Logic: refine a segment with level sets, classic or learned, Qt-free.

The module panel, the Segment Editor effect, the module self-test, the Python console and
the headless tests all call this file, and this file calls the library's pipeline functions:
:func:`deepimaging.levelset.refine_mask` (method "classic", Chan-Vese) or
:func:`deepimaging.levelset.deep.refine_learned` (method "learned", a trained deep Chan-Vese
checkpoint; see :mod:`.learned`).  Nothing of the maths lives here.  :meth:`LevelSetRefineLogic.segmentInBox`
is the learned refiner's ROI mode (a markups ROI, no mask); training runs in a child process
(:mod:`.training`).  torch is imported only when a refinement runs, so the module loads before
torch is installed.
"""

import dataclasses
import logging
import time

import numpy as np

import slicer
from DeepImagingCommonLib import nodes
from deepimaging.core.errors import InputError
from deepimaging.core.progress import report, sub_progress

from . import learned
from .learned import METHOD_CLASSIC, METHOD_LEARNED, requireMethod

REFINED_SUFFIX = " (refined)"
BOX_SEGMENT_COLOR = (0.35, 0.75, 0.35)

# Panel defaults, mirrored from deepimaging.levelset.refine_defaults() (a test keeps them
# equal) so the parameter node can be built before torch is installed.
DEFAULT_MU = 0.05
DEFAULT_ITERATIONS = 300


def chanVeseParams(**params):
    """``refine_defaults()`` with the given fields replaced, naming any unknown field."""
    from deepimaging.levelset import ChanVeseParams, refine_defaults

    known = {field.name for field in dataclasses.fields(ChanVeseParams)}
    unknown = sorted(set(params) - known)
    if unknown:
        raise InputError(f"unknown level-set parameter(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return dataclasses.replace(refine_defaults(), **params)


def refineImageMask(image, mask, progress=None, cancel=None, device=None, method=METHOD_CLASSIC, checkpoint=None,
                    **params):
    """Refine a bool (z, y, x) mask on ``image``; returns the library's ``RefineResult``.

    ``method="classic"`` (default): Chan-Vese with ``params`` (``ChanVeseParams`` fields).
    ``method="learned"``: the deep Chan-Vese checkpoint ``checkpoint`` (loaded once and cached);
    it takes no level-set parameters.  A 2D checkpoint refines single-slice volumes only and a
    3D one volumes only (InputError otherwise).
    """
    method = requireMethod(method)
    mask = np.asarray(mask, dtype=bool)
    if method == METHOD_LEARNED:
        if params:
            raise InputError(f"the learned refinement takes no level-set parameters ({', '.join(sorted(params))}); "
                             "they belong to the classic method")
        learned.requireLearnedCheckpoint(checkpoint)  # before anything else: the commonest mistake
    if not mask.any():
        raise InputError("the segment to refine is empty: draw or threshold it first, then refine")
    if method == METHOD_LEARNED:
        return learned.refineLearned(image, mask, checkpoint, device=device, progress=progress, cancel=cancel)
    from deepimaging.levelset import refine_mask

    return refine_mask(image, mask, chanVeseParams(**params), device=device, progress=progress, cancel=cancel)


def refineOrientedLabelmap(sourceImageData, labelmapImageData, progress=None, cancel=None, method=METHOD_CLASSIC,
                           checkpoint=None, **params):
    """Segment Editor path: refine a labelmap on the (aligned) source image.

    Both inputs are ``vtkOrientedImageData``; the labelmap is resampled onto the source's
    grid first.  Returns a 0/1 ``vtkOrientedImageData`` on the source's grid and extent,
    ready for ``modifySelectedSegmentByLabelmap``.  ``method`` and ``checkpoint`` as in
    :func:`refineImageMask`.
    """
    if sourceImageData is None:
        raise InputError("no source volume selected in the Segment Editor")
    if labelmapImageData is None or labelmapImageData.GetPointData().GetScalars() is None:
        raise InputError("the selected segment is empty: draw or threshold it first, then refine")
    image = nodes.imageFromOrientedImageData(sourceImageData)
    image.require_finite("source volume")
    labelmap = nodes.resampleOrientedImage(labelmapImageData, sourceImageData)
    mask = nodes.imageFromOrientedImageData(labelmap).array > 0
    result = refineImageMask(image, mask, progress=progress, cancel=cancel, method=method, checkpoint=checkpoint,
                             **params)
    return nodes.orientedImageDataFromMask(result.mask, sourceImageData)


class LevelSetRefineLogic:
    """Refines segments of segmentation nodes; usable without the GUI.

    ``lastResult`` keeps the library's result of the latest run (iterations, convergence)
    for the caller to show; after :meth:`segmentInBox`, ``lastSegmentationNode`` is the
    segmentation written into.  Training: :meth:`startTraining` (see :mod:`.training`).
    """

    def __init__(self):
        self.lastResult = None
        self.lastSegmentationNode = None

    def refine(self, volumeNode, segmentationNode, segmentId, replace=False, progress=None, cancel=None,
               method=METHOD_CLASSIC, checkpoint=None, **params):
        """Refine segment ``segmentId`` on ``volumeNode``'s voxels; return the result's segment ID.

        :param replace: overwrite the segment; by default the result goes into a new segment
            "<name> (refined)" with a similar colour and the original is left untouched.
        :param progress: optional ``(fraction, message)`` callback.
        :param cancel: optional ``deepimaging.core.progress.CancelToken``.
        :param method: "classic" (Chan-Vese, default) or "learned" (needs ``checkpoint``).
        :param checkpoint: learned refiner checkpoint (``RUN/best.pt`` of ``deepimaging levelset
            train`` or of :meth:`startTraining`); loaded once and cached per file and device.
        :param params: ``ChanVeseParams`` fields (mu, lambda1, lambda2, dt, eps,
            max_iterations, tolerance, ...; classic only) and optionally ``device``.
        :raises InputError: no or empty segment, unknown segment ID, vector/4-D volume,
            NaN or infinite voxels, unknown parameter or method, no checkpoint chosen, a 2D
            checkpoint on a volume or a 3D one on a single slice.
        :raises CheckpointError: a missing, broken or non-level-set checkpoint.  Nothing is
            written when anything fails.
        """
        startTime = time.time()
        device = params.pop("device", None)
        method = requireMethod(method)
        if method == METHOD_LEARNED:
            learned.requireLearnedCheckpoint(checkpoint)
        report(progress, 0.0, "Reading volume and segment")
        nodes.requireSegment(segmentationNode, segmentId)
        image = nodes.imageFromVolumeNode(volumeNode)
        image.require_finite(f"volume '{volumeNode.GetName()}'")
        name = nodes.segmentName(segmentationNode, segmentId)
        mask = nodes.segmentMask(segmentationNode, segmentId, volumeNode)
        if not mask.any():
            raise InputError(f"segment '{name}' is empty on the grid of '{volumeNode.GetName()}': "
                             "draw or threshold it first, then refine")
        logging.info(f"Refining segment '{name}' ({int(mask.sum())} voxels) on '{volumeNode.GetName()}' ({method})")
        result = refineImageMask(image, mask, progress=sub_progress(progress, 0.05, 0.95), cancel=cancel,
                                 device=device, method=method, checkpoint=checkpoint, **params)
        self.lastResult = result
        report(progress, 0.95, "Writing segment")
        if replace:
            outputId = nodes.writeMaskToSegment(result.mask, segmentationNode, volumeNode, segmentId=segmentId)
        else:
            segment = segmentationNode.GetSegmentation().GetSegment(segmentId)
            outputId = nodes.writeMaskToSegment(
                result.mask, segmentationNode, volumeNode, name=name + REFINED_SUFFIX,
                color=nodes.similarColor(segment.GetColor()))
        report(progress, 1.0, "Done")
        logging.info(f"Level-set refinement ({method}) of '{name}' finished in {time.time() - startTime:.2f} s: "
                     f"{result.iterations} iterations, converged={result.converged}, "
                     f"{int(np.count_nonzero(result.mask))} voxels")
        return outputId

    def segmentInBox(self, volumeNode, roiNode, checkpoint, segmentationNode=None, name=None, device=None,
                     progress=None, cancel=None):
        """Box-prompted segmentation: the learned refiner's ROI mode; returns the new segment's ID.

        The markups ROI ``roiNode`` (RAS, may be rotated or transformed) becomes a voxel box on
        ``volumeNode`` (:func:`.learned.roiVoxelBox`); the refiner predicts the object in it from
        the image crop alone (no mask).  The result goes into a new segment ``name`` (default:
        the ROI's name) of ``segmentationNode``, or of a new segmentation node
        "<volume> segmentation" placed like the volume when none is given;
        ``lastSegmentationNode`` is the node written into.

        :raises InputError: no volume/ROI, a box outside the volume, no checkpoint chosen, a
            2D checkpoint on a volume or the reverse.
        :raises CheckpointError: a missing or broken checkpoint.
        :raises DeepImagingError: nothing found in the box.  Nothing is added when anything fails.
        """
        startTime = time.time()
        learned.requireLearnedCheckpoint(checkpoint)
        report(progress, 0.0, "Reading volume and box")
        image = nodes.imageFromVolumeNode(volumeNode)
        image.require_finite(f"volume '{volumeNode.GetName()}'")
        box = learned.roiVoxelBox(roiNode, volumeNode)
        logging.info(f"Segmenting in box {box} (z0, y0, x0, z1, y1, x1) of '{volumeNode.GetName()}' "
                     f"from ROI '{roiNode.GetName()}'")
        result = learned.refineLearned(image, None, checkpoint, roi=box, device=device,
                                       progress=sub_progress(progress, 0.05, 0.95), cancel=cancel)
        self.lastResult = result
        report(progress, 0.95, "Writing segment")
        created = segmentationNode is None
        if created:
            segmentationNode = slicer.mrmlScene.AddNewNodeByClass(
                "vtkMRMLSegmentationNode", nodes.uniqueNodeName(f"{volumeNode.GetName()} segmentation"))
        try:
            if created:
                segmentationNode.CreateDefaultDisplayNodes()
                segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
                nodes.placeLikeInput(segmentationNode, volumeNode)
            segmentId = nodes.writeMaskToSegment(result.mask, segmentationNode, volumeNode,
                                                 name=name or roiNode.GetName() or "Segment in box",
                                                 color=BOX_SEGMENT_COLOR)
        except Exception:
            if created:
                removeNode(segmentationNode)
            raise
        self.lastSegmentationNode = segmentationNode
        report(progress, 1.0, "Done")
        logging.info(f"Segment in box finished in {time.time() - startTime:.2f} s: "
                     f"{int(np.count_nonzero(result.mask))} voxels")
        return segmentId

    # -- training -------------------------------------------------------------------------------
    def exportTrainingData(self, pairs, folder, dim=2, progress=None):
        """Write scene pairs in the learned refiner's folder layout; see :mod:`.export`."""
        from . import export

        return export.exportTrainingData(pairs, folder, dim=dim, progress=progress)

    def startTraining(self, outputFolder, dataFolder=None, pairs=None, dim=2, epochs=30, device="auto",
                      progress=None, extraArguments=()):
        """Train a learned refiner in a child process; returns the running :class:`.training.TrainingJob`.

        Give ``dataFolder`` (``images/``, ``masks/``, optional ``coarse/``) or ``pairs``
        ``[(volumeNode, segmentationNode, truthSegmentId[, coarseSegmentId])]`` of scene
        nodes, which are exported to a temporary folder first (removed when the job ends).
        ``outputFolder`` receives best.pt and last.pt (a run with the same settings resumes
        from last.pt).  ``extraArguments`` go to ``deepimaging levelset train`` as they are
        (``--grid 32``, ``--steps-per-epoch 8``, ``--widths 8 16``, ...).
        """
        from . import training

        return training.startTraining(outputFolder, dataFolder=dataFolder, pairs=pairs, dim=dim, epochs=epochs,
                                      device=device, progress=progress, extraArguments=extraArguments)


removeNode = nodes.removeNode
