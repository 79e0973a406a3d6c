"""Training data for ROG from Slicer: scene pairs -> an MSD folder, or a folder on disk checked and described.

Segments are matched by name over all pairs, so each name gets one label value in every
label map, and every label map is written on its own volume's grid through storage nodes
(Slicer converts RAS to the files' LPS).  Qt-free, like the rest of ROGSegmentLib.
"""

import json
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import vtk

import slicer
from DeepImagingCommonLib import jobs, nodes
from deepimaging.core.errors import InputError
from deepimaging.core.progress import report

IMAGE_FOLDERS = (("imagesTr", "labelsTr"), ("images", "labels"))
IMAGE_ENDINGS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
EXPORT_DESCRIPTION = "Volume + segmentation pairs exported from 3D Slicer by ROGSegment"


@dataclass
class TrainingData:
    """An MSD-layout folder (dataset.json, imagesTr/, labelsTr/) ready for ``--data``."""

    folder: Path
    labelNames: dict  # {label value: name}; empty when the files carry no names
    cases: list


referenceVolume = nodes.referenceVolume


def pairsFromSegmentations(segmentationNodes):
    """``[(volumeNode, segmentationNode)]``, each segmentation with the volume it was drawn on."""
    pairs = []
    for segmentationNode in segmentationNodes:
        volumeNode = nodes.requireReferenceVolume(segmentationNode)
        pairs.append((volumeNode, segmentationNode))
    return pairs


def describePairs(segmentationNodes):
    """One line per segmentation: "segmentation <- volume", or why it cannot be used."""
    lines = []
    for segmentationNode in segmentationNodes:
        volumeNode = referenceVolume(segmentationNode)
        volumeName = volumeNode.GetName() if volumeNode else "(no source volume: cannot be used)"
        lines.append(f"{segmentationNode.GetName()} \u2190 {volumeName}")
    return "\n".join(lines)


def _segments(segmentationNode):
    segmentation = segmentationNode.GetSegmentation()
    return [(segmentId, segmentation.GetSegment(segmentId).GetName().strip())
            for segmentId in segmentation.GetSegmentIDs()]


def labelValues(pairs):
    """``{segment name: label value}``: one value per distinct name over all pairs, 1, 2, ... by first use."""
    values = {}
    for _, segmentationNode in pairs:
        for _, name in _segments(segmentationNode):
            values.setdefault(name, len(values) + 1)
    return values


def labelArray(volumeNode, segmentationNode, values):
    """The segmentation as label values on the volume's (z, y, x) grid (later segments win overlaps).

    One export of all segments through the Segmentations logic (which also applies transforms),
    then segment index -> label value of its name; the temporary nodes are removed again.
    """
    segments = _segments(segmentationNode)
    segmentIds = vtk.vtkStringArray()
    for segmentId, _ in segments:
        segmentIds.InsertNextValue(segmentId)
    labelNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__ROGSegment_export__")
    try:
        if not slicer.modules.segmentations.logic().ExportSegmentsToLabelmapNode(
                segmentationNode, segmentIds, labelNode, volumeNode):
            raise InputError(f"could not sample segmentation '{segmentationNode.GetName()}' on volume "
                             f"'{volumeNode.GetName()}'")
        indices = slicer.util.arrayFromVolume(labelNode)
    finally:
        removeWithDisplayNodes(labelNode)
    lookup = np.array([0] + [values[name] for _, name in segments], np.uint8 if len(values) < 256 else np.uint16)
    return lookup[indices]


def removeWithDisplayNodes(node):
    """Remove a temporary volume node with the display node and colour table made for it."""
    displayNode = node.GetDisplayNode()
    if displayNode is not None:
        colorNode = displayNode.GetColorNode()
        if colorNode is not None and not colorNode.GetSingletonTag():  # keep Slicer's default tables
            slicer.mrmlScene.RemoveNode(colorNode)
        slicer.mrmlScene.RemoveNode(displayNode)
    slicer.mrmlScene.RemoveNode(node)


def writeVolumeNode(volumeNode, path):
    """Write a volume node to ``path`` through a storage node (RAS -> file LPS done by Slicer)."""
    storageNode = slicer.vtkMRMLVolumeArchetypeStorageNode()  # kept out of the scene: nothing to clean up
    storageNode.SetFileName(str(path))
    storageNode.SetUseCompression(True)
    if not storageNode.WriteData(volumeNode):
        raise InputError(f"could not write '{volumeNode.GetName()}' to {path}")


def writeLabelMap(labels, volumeNode, path):
    """Write label values on ``volumeNode``'s grid as a label map file (through a node outside the scene)."""
    labelNode = slicer.vtkMRMLLabelMapVolumeNode()
    labelNode.SetName(f"{volumeNode.GetName()} labels")
    labelNode.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(nodes.ijkToRASArray(volumeNode)))
    slicer.util.updateVolumeFromArray(labelNode, np.ascontiguousarray(labels))
    writeVolumeNode(labelNode, path)


def exportTrainingData(pairs, folder, modality="CT", name="Slicer scene", progress=None):
    """Write ``[(volumeNode, segmentationNode)]`` as an MSD dataset folder and return it.

    Segments are matched by name over all pairs, so "liver" has the same label value in
    every label map; each label map is sampled on its volume's grid (geometry kept).  A
    pair whose segmentation has no voxels in the volume is an error.  The folder is removed
    again if the export fails.
    """
    from .logic import volumeImage

    pairs = list(pairs)
    if not pairs:
        raise InputError("no volume + segmentation pairs to train on: check at least one segmentation")
    for volumeNode, segmentationNode in pairs:
        volumeImage(volumeNode)
        if segmentationNode is None:
            raise InputError(f"no segmentation paired with volume '{volumeNode.GetName()}'")
        if segmentationNode.GetSegmentation().GetNumberOfSegments() == 0:
            raise InputError(f"segmentation '{segmentationNode.GetName()}' has no segments")
    values = labelValues(pairs)
    folder = Path(folder)
    if (folder / "dataset.json").exists():
        raise InputError(f"{folder} already holds a dataset (dataset.json); export into a new folder")
    created = not folder.exists()
    training = []
    try:
        (folder / "imagesTr").mkdir(parents=True, exist_ok=True)
        (folder / "labelsTr").mkdir(exist_ok=True)
        for index, (volumeNode, segmentationNode) in enumerate(pairs):
            report(progress, index / len(pairs), f"Exporting '{volumeNode.GetName()}'")
            labels = labelArray(volumeNode, segmentationNode, values)
            if not labels.any():
                raise InputError(f"segmentation '{segmentationNode.GetName()}' has no voxels inside volume "
                                 f"'{volumeNode.GetName()}'")
            case = f"case_{index:03d}"
            writeVolumeNode(volumeNode, folder / "imagesTr" / f"{case}.nii.gz")
            writeLabelMap(labels, volumeNode, folder / "labelsTr" / f"{case}.nii.gz")
            training.append({"image": f"./imagesTr/{case}.nii.gz", "label": f"./labelsTr/{case}.nii.gz",
                             "volume": volumeNode.GetName(), "segmentation": segmentationNode.GetName()})
        labelNames = {0: "background", **{value: segmentName for segmentName, value in values.items()}}
        writeDatasetJson(folder, name, modality, labelNames, training, EXPORT_DESCRIPTION)
    except Exception:
        if created:
            removeFolder(folder)
        raise
    report(progress, 1.0, "Exported")
    return TrainingData(folder, labelNames, [entry["image"] for entry in training])


def writeDatasetJson(folder, name, modality, labelNames, training, description):
    meta = {"name": name, "description": description, "modality": {"0": modality},
            "labels": {str(value): labelName for value, labelName in sorted(labelNames.items())},
            "numTraining": len(training), "training": training}
    (Path(folder) / "dataset.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")


# -- training folders on disk -------------------------------------------------------------------
def _caseName(path):
    lower = path.name.lower()
    ending = next((e for e in IMAGE_ENDINGS if lower.endswith(e)), None)
    return path.name[: -len(ending)] if ending else None


def imageLabelPairs(folder):
    """``[(image, label)]`` from ``images/`` + ``labels/`` (or ``imagesTr/`` + ``labelsTr/``), matched by file name.

    Image files may carry nnU-Net's channel suffix ``_0000``.
    """
    folder = Path(folder)
    for imagesName, labelsName in IMAGE_FOLDERS:
        imagesFolder, labelsFolder = folder / imagesName, folder / labelsName
        if imagesFolder.is_dir() and labelsFolder.is_dir():
            break
    else:
        raise InputError(f"{folder} is neither an MSD dataset (dataset.json, imagesTr/, labelsTr/) nor a folder "
                         "with images/ and labels/ subfolders of matching file names")
    labels = {_caseName(f): f for f in sorted(labelsFolder.iterdir()) if f.is_file() and _caseName(f)}
    pairs, unmatched = [], []
    for image in sorted(imagesFolder.iterdir()):
        case = _caseName(image) if image.is_file() else None
        if case is None:
            continue
        if re.search(r"_(?!0000)\d{4}$", case):
            raise InputError(f"{image.name} is a second input channel; describe multi-channel data in a dataset.json")
        label = labels.get(case) or labels.get(re.sub(r"_0000$", "", case))
        if label is None:
            unmatched.append(image.name)
        else:
            pairs.append((image, label))
    if unmatched:
        raise InputError(f"no label map in {labelsFolder} named like image(s) {', '.join(unmatched[:5])}")
    if not pairs:
        raise InputError(f"no images ({', '.join(IMAGE_ENDINGS)}) in {imagesFolder}")
    return pairs


def prepareDataFolder(folder, modality="CT"):
    """``(TrainingData, folder to remove afterwards or None)`` for a training folder on disk.

    An MSD/nnU-Net folder is used as it is; images + labels subfolders get a dataset.json
    (absolute paths, label names left to the planner) in a temporary folder.
    """
    if folder is None or str(folder).strip() in ("", "."):  # what an empty path widget gives
        raise InputError("no training data folder selected")
    folder = Path(str(folder)).expanduser()
    if not folder.is_dir():
        raise InputError(f"training data folder not found: {folder}")
    if (folder / "dataset.json").is_file():
        from deepimaging.rog.plan import read_msd_dataset

        spec = read_msd_dataset(folder)
        if not spec.cases:
            raise InputError(f"{folder / 'dataset.json'} lists no training cases")
        return TrainingData(folder, spec.label_names, [str(label) for _, label in spec.cases]), None
    pairs = imageLabelPairs(folder)
    temporary = temporaryFolder()
    training = [{"image": str(image.resolve()), "label": str(label.resolve())} for image, label in pairs]
    writeDatasetJson(temporary, folder.name, modality, {}, training, f"Images and labels of {folder}")
    return TrainingData(temporary, {}, [entry["image"] for entry in training]), temporary


def temporaryFolder():
    return Path(tempfile.mkdtemp(prefix="ROGSegment-"))


removeFolder = jobs.removeFolder
