"""Training data for the learned refiner from Slicer: scene pairs -> the library's folder layout.

Layout written by :func:`exportTrainingData` (what ``deepimaging levelset train --data`` reads)::

    FOLDER/images/NAME.nrrd    the image, float32, with its geometry (LPS, as every NRRD)
    FOLDER/masks/NAME.nrrd     the true segment on the same grid, uint8 0/1
    FOLDER/coarse/NAME.nrrd    optional: a rough segment to learn to refine (else the library
                               draws corruptions of the truth)
    FOLDER/sources.csv         NAME, volume, segmentation, truth segment, coarse segment, slice

A pair is ``(volumeNode, segmentationNode, truthSegmentId)`` or ``(..., coarseSegmentId)``;
the segments are sampled on the volume's grid.  For a 2D refiner (``dim=2``) every slice of a
volume with foreground becomes one case (slices without it are left out); for a 3D refiner each
volume is one case and single-slice volumes are refused.  Qt-free.
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
    """A folder in the learned refiner's layout, ready for ``deepimaging levelset train --data``."""

    folder: Path
    names: list  # exported cases (file stems), in order
    skippedSlices: list = field(default_factory=list)  # ("volume name", slice index) without foreground


referenceVolume = nodes.referenceVolume


def pairsFromSegmentations(segmentationNodes):
    """Training pairs from segmentations: each with the volume it was drawn on, its first segment
    as the truth and its second one, if any, as the coarse segment to refine."""
    pairs = []
    for segmentationNode in segmentationNodes:
        volumeNode = nodes.requireReferenceVolume(segmentationNode)
        segmentIds = list(segmentationNode.GetSegmentation().GetSegmentIDs())
        if not 1 <= len(segmentIds) <= 2:
            raise InputError(f"segmentation '{segmentationNode.GetName()}' has {len(segmentIds)} segments; give it "
                             "the true segment first and optionally a coarse one second")
        pairs.append((volumeNode, segmentationNode) + tuple(segmentIds))
    return pairs


def describePairs(segmentationNodes):
    """One line per segmentation: "segmentation <- volume (truth 'A', coarse 'B')", or why it cannot be used."""
    lines = []
    for segmentationNode in segmentationNodes:
        volumeNode = referenceVolume(segmentationNode)
        volumeName = volumeNode.GetName() if volumeNode else "(no source volume: cannot be used)"
        segmentation = segmentationNode.GetSegmentation()
        names = [segmentation.GetSegment(i).GetName() for i in segmentation.GetSegmentIDs()]
        if len(names) == 1:
            what = f"truth '{names[0]}', coarse drawn at random"
        elif len(names) == 2:
            what = f"truth '{names[0]}', coarse '{names[1]}'"
        else:
            what = f"{len(names)} segments: cannot be used, keep the truth and optionally a coarse one"
        lines.append(f"{segmentationNode.GetName()} \u2190 {volumeName} ({what})")
    return "\n".join(lines)


def _checkPair(pair):
    if len(pair) not in (3, 4):
        raise InputError("a training pair is (volume, segmentation, truth segment ID[, coarse segment ID])")
    volumeNode, segmentationNode, truthId = pair[:3]
    coarseId = pair[3] if len(pair) == 4 else None
    if volumeNode is None:
        raise InputError("a training pair has no volume")
    if segmentationNode is None:
        raise InputError(f"no segmentation paired with volume '{volumeNode.GetName()}'")
    nodes.requireSegment(segmentationNode, truthId)
    if coarseId:
        nodes.requireSegment(segmentationNode, coarseId)
    image = nodes.imageFromVolumeNode(volumeNode)
    image.require_finite(f"volume '{volumeNode.GetName()}'")
    return volumeNode, segmentationNode, truthId, coarseId or None, image


def _sliceImage(image, k):
    """Slice ``k`` of an image as a one-slice image with its own origin."""
    origin = np.asarray(image.origin) + image.direction[:, 2] * image.spacing[2] * k
    return image.__class__(image.array[k:k + 1], image.spacing, tuple(origin), image.direction)


def _cases(image, truth, coarse, dim):
    """``[(slice index or None, image, truth, coarse)]`` of one pair, and the skipped slice indices."""
    if dim == 3:
        return [(None, image, truth, coarse)], []
    cases, skipped = [], []
    for k in range(image.shape[0]):
        if not truth[k].any():
            skipped.append(k)
            continue
        cases.append((k if image.shape[0] > 1 else None, _sliceImage(image, k), truth[k:k + 1],
                      None if coarse is None else coarse[k:k + 1]))
    return cases, skipped


def exportTrainingData(pairs, folder, dim=2, progress=None):
    """Write ``[(volumeNode, segmentationNode, truthSegmentId[, coarseSegmentId])]`` in the layout above.

    The folder may exist but must not hold images or masks yet.  It is removed again (or
    emptied of what was written, when it existed before) if the export fails.
    """
    from deepimaging.core.imageio import write_image

    dim = int(dim)
    if dim not in (2, 3):
        raise InputError(f"the refiner is 2D or 3D, got dim={dim}")
    pairs = list(pairs)
    if not pairs:
        raise InputError("no volume + segmentation pairs to train on: check at least one segmentation")
    checked = [_checkPair(pair) for pair in pairs]
    for volumeNode, _, _, _, image in checked:
        if dim == 3 and image.shape[0] == 1:
            raise InputError(f"volume '{volumeNode.GetName()}' is a single slice: train a 2D refiner on it, "
                             "or use volumes for a 3D one")
    folder = Path(folder)
    for sub in ("images", "masks", "coarse"):
        if (folder / sub).is_dir() and any((folder / sub).iterdir()):
            raise InputError(f"{folder / sub} already holds files; export into a new or empty folder")
    created = not folder.exists()
    written, skipped, sources = [], [], []
    try:
        for sub in ("images", "masks", "coarse"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        for index, (volumeNode, segmentationNode, truthId, coarseId, image) in enumerate(checked):
            report(progress, index / len(checked), f"Exporting '{volumeNode.GetName()}'")
            truth = nodes.segmentMask(segmentationNode, truthId, volumeNode)
            if not truth.any():
                raise InputError(
                    f"segment '{nodes.segmentName(segmentationNode, truthId)}' of '{segmentationNode.GetName()}' "
                    f"has no foreground inside volume '{volumeNode.GetName()}': draw it first, or leave this pair out")
            coarse = None if coarseId is None else nodes.segmentMask(segmentationNode, coarseId, volumeNode)
            cases, skippedSlices = _cases(image, truth, coarse, dim)
            skipped += [(volumeNode.GetName(), k) for k in skippedSlices]
            for k, caseImage, caseTruth, caseCoarse in cases:
                name = f"case{index:03d}" if k is None else f"case{index:03d}_s{k:03d}"
                files = [("images", caseImage.with_array(caseImage.array.astype(np.float32))),
                         ("masks", caseImage.with_array(caseTruth.astype(np.uint8)))]
                if caseCoarse is not None:
                    files.append(("coarse", caseImage.with_array(caseCoarse.astype(np.uint8))))
                for sub, fileImage in files:
                    path = folder / sub / (name + IMAGE_SUFFIX)
                    written.append(path)
                    write_image(fileImage, path)
                sources.append((name, volumeNode.GetName(), segmentationNode.GetName(),
                                nodes.segmentName(segmentationNode, truthId),
                                "" if coarseId is None else nodes.segmentName(segmentationNode, coarseId),
                                "" if k is None else k))
        with open(folder / "sources.csv", "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(("name", "volume", "segmentation", "truth", "coarse", "slice"))
            writer.writerows(sources)
    except Exception:
        if created:
            removeFolder(folder)
        else:
            for path in written:
                path.unlink(missing_ok=True)
        raise
    report(progress, 1.0, "Exported")
    return TrainingData(folder, [row[0] for row in sources], skipped)


def checkDataFolder(folder):
    """A training folder on disk as a ``Path``, after a quick check of its layout (the full check
    is the library's, in the training process)."""
    return requireTrainingFolder(folder, "the learned refiner trains from DIR/images/NAME.nrrd|.nii.gz|.png, "
                                         "DIR/masks/NAME.* (the truth) and optionally DIR/coarse/NAME.* (rough "
                                         "segments to refine)")


def temporaryFolder():
    return Path(tempfile.mkdtemp(prefix="LevelSetRefine-"))


removeFolder = jobs.removeFolder
