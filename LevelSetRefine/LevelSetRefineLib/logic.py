"""LevelSetRefine's Logic: refine a segment with Chan-Vese level sets, Qt-free.

The module panel, the Segment Editor effect, the module self-test, the Python console and
the headless tests all call this file, and this file calls one pipeline function,
:func:`deepimaging.levelset.refine_mask`; nothing of the maths lives here.  torch is
imported only when a refinement runs, so the module loads before torch is installed.
"""

import dataclasses
import logging
import time

import numpy as np

from DeepImagingCommonLib import nodes
from deepimaging.core.errors import InputError
from deepimaging.core.progress import report, sub_progress

REFINED_SUFFIX = " (refined)"

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


def refineImageMask(image, mask, progress=None, cancel=None, device=None, **params):
    """Refine a bool (z, y, x) mask on ``image``; returns the library's ``RefineResult``."""
    from deepimaging.levelset import refine_mask

    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        raise InputError("the segment to refine is empty: draw or threshold it first, then refine")
    return refine_mask(image, mask, chanVeseParams(**params), device=device, progress=progress, cancel=cancel)


def refineOrientedLabelmap(sourceImageData, labelmapImageData, progress=None, cancel=None, **params):
    """Segment Editor path: refine a labelmap on the (aligned) source image.

    Both inputs are ``vtkOrientedImageData``; the labelmap is resampled onto the source's
    grid first.  Returns a 0/1 ``vtkOrientedImageData`` on the source's grid and extent,
    ready for ``modifySelectedSegmentByLabelmap``.
    """
    if sourceImageData is None:
        raise InputError("no source volume selected in the Segment Editor")
    if labelmapImageData is None or labelmapImageData.GetPointData().GetScalars() is None:
        raise InputError("the selected segment is empty: draw or threshold it first, then refine")
    image = nodes.imageFromOrientedImageData(sourceImageData)
    image.require_finite("source volume")
    labelmap = nodes.resampleOrientedImage(labelmapImageData, sourceImageData)
    mask = nodes.imageFromOrientedImageData(labelmap).array > 0
    result = refineImageMask(image, mask, progress=progress, cancel=cancel, **params)
    return nodes.orientedImageDataFromMask(result.mask, sourceImageData)


class LevelSetRefineLogic:
    """Refines segments of segmentation nodes; usable without the GUI.

    ``lastResult`` keeps the library's result of the latest run (iterations, convergence)
    for the caller to show.
    """

    def __init__(self):
        self.lastResult = None

    def refine(self, volumeNode, segmentationNode, segmentId, replace=False, progress=None, cancel=None, **params):
        """Refine segment ``segmentId`` on ``volumeNode``'s voxels; return the result's segment ID.

        :param replace: overwrite the segment; by default the result goes into a new segment
            "<name> (refined)" with a similar colour and the original is left untouched.
        :param progress: optional ``(fraction, message)`` callback.
        :param cancel: optional ``deepimaging.core.progress.CancelToken``.
        :param params: ``ChanVeseParams`` fields (mu, lambda1, lambda2, dt, eps,
            max_iterations, tolerance, ...) and optionally ``device``.
        :raises InputError: no or empty segment, unknown segment ID, vector/4-D volume,
            NaN or infinite voxels, unknown parameter.  Nothing is written then.
        """
        startTime = time.time()
        device = params.pop("device", None)
        report(progress, 0.0, "Reading volume and segment")
        nodes.requireSegment(segmentationNode, segmentId)
        image = nodes.imageFromVolumeNode(volumeNode)
        image.require_finite(f"volume '{volumeNode.GetName()}'")
        name = nodes.segmentName(segmentationNode, segmentId)
        mask = nodes.segmentMask(segmentationNode, segmentId, volumeNode)
        if not mask.any():
            raise InputError(f"segment '{name}' is empty on the grid of '{volumeNode.GetName()}': "
                             "draw or threshold it first, then refine")
        logging.info(f"Refining segment '{name}' ({int(mask.sum())} voxels) on '{volumeNode.GetName()}'")
        result = refineImageMask(image, mask, progress=sub_progress(progress, 0.05, 0.95), cancel=cancel,
                                 device=device, **params)
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
        logging.info(f"Level-set refinement of '{name}' finished in {time.time() - startTime:.2f} s: "
                     f"{result.iterations} iterations, converged={result.converged}, "
                     f"{int(np.count_nonzero(result.mask))} voxels")
        return outputId
