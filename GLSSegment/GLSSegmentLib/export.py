"""Training data for GLS from Slicer: scene pairs -> GLS's folder layout, or a folder on disk checked.

Layout written by :func:`exportTrainingData` (what ``deepimaging gls train --data`` reads)::

    FOLDER/images/NAME.nrrd    one B-scan each, float32, with its geometry (LPS, as every NRRD)
    FOLDER/masks/NAME.nrrd     the segment on the same grid, uint8 0/1
    FOLDER/sources.csv         NAME, volume, segmentation, slice: where each B-scan came from

No ``keypoints.csv`` is written: the library derives the keypoints from the masks
(:func:`deepimaging.gls.keypoints.keypoints_from_mask`).  Each pair is a volume (one B-scan
or a stack of B-scans along k) and a segmentation with exactly one segment, sampled on the
volume's grid (the Segmentations logic applies any transform between them).  A stack is
split into its B-scans; slices where the segment is empty are left out (an unannotated
slice of a stack is not a "nothing here" example), and a pair with no foreground at all is
an error naming it.  Qt-free, like the rest of GLSSegmentLib.
"""

import csv
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from DeepImagingCommonLib import jobs, nodes
from DeepImagingCommonLib.inputs import requireTrainingFolder
from deepimaging.core.errors import InputError
from deepimaging.core.progress import report

IMAGE_SUFFIX = ".nrrd"


@dataclass
class TrainingData:
    """A folder in GLS's layout, ready for ``deepimaging gls train --data``."""

    folder: Path
    names: list  # exported B-scans (file stems), in order
    skippedSlices: list = field(default_factory=list)  # ("volume name", slice index) without foreground


referenceVolume = nodes.referenceVolume


def pairsFromSegmentations(segmentationNodes):
    """``[(volumeNode, segmentationNode)]``, each segmentation with the volume it was drawn on."""
    pairs = []
    for segmentationNode in segmentationNodes:
        volumeNode = nodes.requireReferenceVolume(segmentationNode)
        pairs.append((volumeNode, segmentationNode))
    return pairs


def describePairs(segmentationNodes):
    """One line per segmentation: "segmentation <- volume (segment)", or why it cannot be used."""
    lines = []
    for segmentationNode in segmentationNodes:
        volumeNode = referenceVolume(segmentationNode)
        volumeName = volumeNode.GetName() if volumeNode else "(no source volume: cannot be used)"
        segmentation = segmentationNode.GetSegmentation()
        count = segmentation.GetNumberOfSegments()
        if count == 1:
            what = segmentation.GetNthSegment(0).GetName()
        else:
            what = f"{count} segments: cannot be used, keep one"
        lines.append(f"{segmentationNode.GetName()} \u2190 {volumeName} ({what})")
    return "\n".join(lines)


def foregroundSegmentId(segmentationNode):
    """The ID of the one segment of a training segmentation; none or several is an InputError."""
    if segmentationNode is None:
        raise InputError("no segmentation given")
    segmentation = segmentationNode.GetSegmentation()
    segmentIds = list(segmentation.GetSegmentIDs())
    if len(segmentIds) != 1:
        names = ", ".join(f"'{segmentation.GetSegment(i).GetName()}'" for i in segmentIds)
        raise InputError(
            f"segmentation '{segmentationNode.GetName()}' has {len(segmentIds)} segments"
            + (f" ({names})" if names else "")
            + "; GLS learns one foreground: give it exactly one segment")
    return segmentIds[0]


def _stem(index, sliceIndex, sliceCount):
    return f"case{index:03d}" if sliceCount == 1 else f"case{index:03d}_s{sliceIndex:03d}"


def exportTrainingData(pairs, folder, progress=None):
    """Write ``[(volumeNode, segmentationNode)]`` in GLS's folder layout and return it.

    The folder may exist but must not hold images or masks yet.  It is removed again (or
    emptied of what was written, when it existed before) if the export fails.
    """
    from deepimaging.core.imageio import write_image
    from deepimaging.gls.data import bscans_from_volume

    from .logic import bscanImage

    pairs = list(pairs)
    if not pairs:
        raise InputError("no volume + segmentation pairs to train on: check at least one segmentation")
    checked = []
    for volumeNode, segmentationNode in pairs:
        if volumeNode is None:
            raise InputError("a training pair has no volume")
        if segmentationNode is None:
            raise InputError(f"no segmentation paired with volume '{volumeNode.GetName()}'")
        checked.append((volumeNode, segmentationNode, bscanImage(volumeNode), foregroundSegmentId(segmentationNode)))
    folder = Path(folder)
    for sub in ("images", "masks"):
        if (folder / sub).is_dir() and any((folder / sub).iterdir()):
            raise InputError(f"{folder / sub} already holds files; export into a new or empty folder")
    created = not folder.exists()
    names, skipped, sources = [], [], []
    try:
        (folder / "images").mkdir(parents=True, exist_ok=True)
        (folder / "masks").mkdir(exist_ok=True)
        for index, (volumeNode, segmentationNode, image, segmentId) in enumerate(checked):
            report(progress, index / len(checked), f"Exporting '{volumeNode.GetName()}'")
            mask = nodes.segmentMask(segmentationNode, segmentId, volumeNode)
            if not mask.any():
                raise InputError(
                    f"segmentation '{segmentationNode.GetName()}' (segment "
                    f"'{nodes.segmentName(segmentationNode, segmentId)}') has no foreground inside volume "
                    f"'{volumeNode.GetName()}': draw the structure first, or leave this pair out")
            slices = bscans_from_volume(image)
            for k, bscan in enumerate(slices):
                if not mask[k].any():
                    skipped.append((volumeNode.GetName(), k))
                    continue
                name = _stem(index, k, len(slices))
                write_image(bscan.with_array(bscan.array.astype(np.float32)), folder / "images" / (name + IMAGE_SUFFIX))
                write_image(bscan.with_array(mask[k:k + 1].astype(np.uint8)), folder / "masks" / (name + IMAGE_SUFFIX))
                names.append(name)
                sources.append((name, volumeNode.GetName(), segmentationNode.GetName(), k))
        with open(folder / "sources.csv", "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(("name", "volume", "segmentation", "slice"))
            writer.writerows(sources)
    except Exception:
        if created:
            removeFolder(folder)
        else:
            for name in names:
                for sub in ("images", "masks"):
                    (folder / sub / (name + IMAGE_SUFFIX)).unlink(missing_ok=True)
        raise
    report(progress, 1.0, "Exported")
    return TrainingData(folder, names, skipped)


def checkDataFolder(folder):
    """A training folder on disk as a ``Path``, after a quick check of its layout (the full check
    is the library's, in the training process)."""
    return requireTrainingFolder(folder, "GLS trains from DIR/images/NAME.png|.nrrd|.nii.gz, DIR/masks/NAME.* "
                                         "(0/1 or 0/255) and optionally DIR/keypoints.csv (name,k,x,y)")


def temporaryFolder():
    return Path(tempfile.mkdtemp(prefix="GLSSegment-"))


removeFolder = jobs.removeFolder
