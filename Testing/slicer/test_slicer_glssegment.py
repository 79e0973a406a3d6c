"""GLSSegment Logic on real MRML nodes: B-scans and stacks into a new segmentation + keypoint list,
cancel, bad input, training export of scene pairs, training jobs (the real ``deepimaging gls train``)."""

import csv
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import vtk

import slicer
from DeepImagingCommonLib import nodes, process
from deepimaging.core.checkpoint import make_header, save_checkpoint
from deepimaging.core.errors import CheckpointError, InputError
from deepimaging.core.image import Image
from deepimaging.core.progress import CancelToken, Cancelled
from GLSSegmentLib import (GLSSegmentLogic, TrainingJob, TrainingStatus, checkDataFolder, describePairs,
                           exportTrainingData, keypointNames, modelDescription, pairsFromSegmentations,
                           parseTrainingLine, readModelInfo, trainingCommand)
from GLSSegmentLib.selftest import bscanVolume, randomCheckpoint

REPO = Path(__file__).resolve().parents[2]
LPS_TO_RAS = np.array([-1.0, -1.0, 1.0])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A small, randomly initialised GLS (64 x 64 network grid, 32 x 32 crops) as training writes it."""
    return randomCheckpoint(tmp_path_factory.mktemp("gls"))


def segment_names(segmentation_node):
    segmentation = segmentation_node.GetSegmentation()
    return [segmentation.GetSegment(i).GetName() for i in segmentation.GetSegmentIDs()]


def control_points(markups_node):
    """``[(label, RAS position, description)]`` of a point list."""
    points = []
    for index in range(markups_node.GetNumberOfControlPoints()):
        position = [0.0, 0.0, 0.0]
        markups_node.GetNthControlPointPosition(index, position)
        points.append((markups_node.GetNthControlPointLabel(index), np.array(position),
                       markups_node.GetNthControlPointDescription(index)))
    return points


def oblique_bscan(slices=1, seed=0):
    """Synthetic B-scans on a rotated grid with non-unit spacing and a shifted origin."""
    from deepimaging.gls.synthetic import make_bscan

    angle = np.deg2rad(20.0)
    direction = np.array([[np.cos(angle), -np.sin(angle), 0.0], [np.sin(angle), np.cos(angle), 0.0], [0.0, 0.0, 1.0]])
    scans = [make_bscan(seed + s, (96, 128)) for s in range(slices)]
    image = Image(np.stack([s.image for s in scans]), (0.03, 0.02, 0.4), (-4.0, 2.5, 10.0), direction)
    return nodes.volumeNodeFromImage(image, "OCT B-scan"), image, np.stack([s.mask for s in scans])


# -- inference ----------------------------------------------------------------------------------
def test_a_bscan_gives_a_foreground_segment_and_keypoints_in_ras(headless_slicer, checkpoint):
    from deepimaging.gls.infer import predict_image

    volume, image, _ = oblique_bscan()
    transform = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "Probe")
    volume.SetAndObserveTransformNodeID(transform.GetID())
    # A random network's probabilities sit in a narrow band: threshold at their median, so about
    # half of the pixels are foreground and the voxel comparison below means something.
    threshold = float(np.median(predict_image(image, checkpoint, device="cpu").probabilities))
    expected = predict_image(image, checkpoint, device="cpu", threshold=threshold)
    assert 0.2 < expected.mask.array.mean() < 0.8
    progress = []
    before = slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")
    outputs = GLSSegmentLogic().segment(volume, checkpoint, device="cpu", threshold=threshold,
                                        progress=lambda fraction, message: progress.append(fraction))
    assert slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == before + 1
    assert progress[0] == 0.0 and progress[-1] == 1.0 and progress == sorted(progress)

    # the segmentation: one segment "foreground", on the volume's grid, under the input's transform
    node = outputs.segmentationNode
    assert node.GetName() == "OCT B-scan GLS segmentation" and segment_names(node) == ["foreground"]
    assert node.GetNodeReference(node.GetReferenceImageGeometryReferenceRole()) is volume
    assert node.GetTransformNodeID() == transform.GetID()
    segment_id = node.GetSegmentation().GetSegmentIDs()[0]
    labelmap = slicer.vtkOrientedImageData()
    node.GetBinaryLabelmapRepresentation(segment_id, labelmap)
    matrix = vtk.vtkMatrix4x4()
    labelmap.GetImageToWorldMatrix(matrix)
    np.testing.assert_allclose(slicer.util.arrayFromVTKMatrix(matrix), nodes.ijkToRASArray(volume), atol=1e-6)
    mask = nodes.segmentMask(node, segment_id, volume)
    np.testing.assert_array_equal(mask, expected.mask.array > 0)

    # the keypoints: the library's LPS positions in RAS, named after the keypoint rule
    markups = outputs.keypointsNode
    assert markups.IsA("vtkMRMLMarkupsFiducialNode") and markups.GetName() == "OCT B-scan GLS keypoints"
    assert markups.GetTransformNodeID() == transform.GetID()
    points = control_points(markups)
    assert [label for label, _, _ in points] == ["left tail", "right tail"]
    for (label, position, description), lps, score in zip(points, expected.keypoints_lps[0],
                                                          expected.keypoint_scores[0]):
        np.testing.assert_allclose(position, lps * LPS_TO_RAS, atol=1e-6)
        assert description == f"score {score:.3f}"
    # ... and each lies in the B-scan's plane, at the pixel the library found
    ijk = np.linalg.solve(nodes.ijkToRASArray(volume), np.append(points[0][1], 1.0))[:3]
    np.testing.assert_allclose(ijk, [*expected.keypoints_px[0, 0], 0.0], atol=1e-6)
    assert outputs.keypointCount == 2 and outputs.modelInfo.architecture == "gls"


def test_a_stack_of_three_bscans(headless_slicer, checkpoint):
    from deepimaging.gls.infer import predict_image

    volume, image, _ = oblique_bscan(slices=3)
    threshold = float(np.median(predict_image(image, checkpoint, device="cpu").probabilities))
    outputs = GLSSegmentLogic().segment(volume, checkpoint, device="cpu", threshold=threshold, outputName="Stack")
    expected = predict_image(image, checkpoint, device="cpu", threshold=threshold)
    assert all(0.1 < expected.mask.array[s].mean() < 0.9 for s in range(3))
    node = outputs.segmentationNode
    assert node.GetName() == "Stack segmentation" and outputs.keypointsNode.GetName() == "Stack keypoints"
    mask = nodes.segmentMask(node, node.GetSegmentation().GetSegmentIDs()[0], volume)
    assert mask.shape == (3, 96, 128)
    np.testing.assert_array_equal(mask, expected.mask.array > 0)
    points = control_points(outputs.keypointsNode)
    assert [label for label, _, _ in points] == [f"{name} s{s}" for s in range(3) for name in ("left tail", "right tail")]
    np.testing.assert_allclose(np.array([p for _, p, _ in points]), expected.keypoints_lps.reshape(-1, 3) * LPS_TO_RAS,
                               atol=1e-6)
    # each slice's points lie in that slice's plane (k = s)
    ras_to_ijk = np.linalg.inv(nodes.ijkToRASArray(volume))
    k = [(ras_to_ijk @ np.append(p, 1.0))[2] for _, p, _ in points]
    np.testing.assert_allclose(k, [0, 0, 1, 1, 2, 2], atol=1e-6)


def test_a_model_without_keypoint_head_adds_no_point_list(headless_slicer, tmp_path):
    volume, _, _ = oblique_bscan()
    unet = randomCheckpoint(tmp_path, architecture="unet")
    markups_before = slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLMarkupsFiducialNode")
    outputs = GLSSegmentLogic().segment(volume, unet, device="cpu")
    assert outputs.keypointsNode is None and outputs.keypointCount == 0
    assert segment_names(outputs.segmentationNode) == ["foreground"]
    assert slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLMarkupsFiducialNode") == markups_before
    assert "architecture 'unet'; no keypoints" in modelDescription(unet)


def test_model_info_and_keypoint_names(checkpoint, tmp_path):
    info = readModelInfo(checkpoint)
    assert (info.architecture, info.keypoints, info.keypointNames) == ("gls", 2, ["left tail", "right tail"])
    assert info.inputSize == (64, 64) and info.cropSize == (32, 32)
    assert modelDescription(checkpoint) == info.summary() and modelDescription("") == ""
    assert info.summary().startswith("architecture 'gls'; 2 keypoint(s) (left tail, right tail); input 64x64")
    other = save_checkpoint(tmp_path / "rog.pt", {"w": torch.zeros(1)}, make_header("rog", {}))
    assert modelDescription(other).startswith("Not usable: ") and "'rog'" in modelDescription(other)
    assert keypointNames({"keypoint_names": ["nasal", "temporal"]}, 2) == ["nasal", "temporal"]
    assert keypointNames({"keypoint_rule": "lv-apex"}, 1) == ["LV apex"]
    assert keypointNames({"keypoint_rule": "iris-tails"}, 3) == ["K1", "K2", "K3"]
    assert keypointNames({}, 2) == ["K1", "K2"]


def test_cancel_adds_no_node(headless_slicer, checkpoint):
    volume, _, _ = oblique_bscan(slices=3)
    before = slicer.mrmlScene.GetNumberOfNodes()
    token = CancelToken()
    token.cancel()
    with pytest.raises(Cancelled):
        GLSSegmentLogic().segment(volume, checkpoint, device="cpu", cancel=token)
    assert slicer.mrmlScene.GetNumberOfNodes() == before

    token = CancelToken()

    def cancel_in_the_second_slice(fraction, message):
        if message.startswith("slice 2/"):
            token.cancel()

    with pytest.raises(Cancelled):
        GLSSegmentLogic().segment(volume, checkpoint, device="cpu", cancel=token, progress=cancel_in_the_second_slice)
    assert slicer.mrmlScene.GetNumberOfNodes() == before


def test_a_failure_while_adding_the_outputs_leaves_no_node(headless_slicer, checkpoint, monkeypatch):
    volume, _, _ = oblique_bscan()
    before = slicer.mrmlScene.GetNumberOfNodes()
    assert slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLLabelMapVolumeDisplayNode") == 0

    def broken(*args, **kwargs):
        raise RuntimeError("markups went wrong")

    monkeypatch.setattr(GLSSegmentLogic, "createKeypoints", staticmethod(broken))
    with pytest.raises(RuntimeError, match="markups went wrong"):
        GLSSegmentLogic().segment(volume, checkpoint, device="cpu")
    # slicer.util.updateSegmentBinaryLabelmapFromArray (under nodes.writeMaskToSegment) removes its
    # temporary label map but, without Slicer's GUI, leaves that label map's display node behind.
    leftovers = slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLLabelMapVolumeDisplayNode")
    assert slicer.mrmlScene.GetNumberOfNodes() - leftovers == before, \
        "the segmentation added first must be removed again, with its display node"
    assert slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 0


def _assert_segment_fails(error, match, volume, model, **kwargs):
    nodes_before = slicer.mrmlScene.GetNumberOfNodes()
    with pytest.raises(error, match=match):
        GLSSegmentLogic().segment(volume, model, **{"device": "cpu", **kwargs})
    assert slicer.mrmlScene.GetNumberOfNodes() == nodes_before, "a failed run must not add nodes"


def test_bad_input_gives_clear_errors_and_no_new_nodes(headless_slicer, checkpoint, tmp_path):
    volume, image, _ = oblique_bscan()
    ras = nodes.ijkToRASArray(volume)
    # a 3-D volume that is not a stack of B-scans: the library's rule, passed on with the volume's name
    ct = slicer.util.addVolumeFromArray(np.zeros((40, 24, 24), np.float32), ras, "Small CT")
    _assert_segment_fails(InputError, "volume 'Small CT': each slice of this volume is 24x24 pixels.*"
                          "does not look like a stack of B-scans", ct, checkpoint)
    many = slicer.util.addVolumeFromArray(np.zeros((600, 32, 32), np.uint8), ras, "Big CT")
    _assert_segment_fails(InputError, "volume 'Big CT': the volume has 600 slices", many, checkpoint)
    # a B-scan smaller than the model's local crop
    large_crop = randomCheckpoint(tmp_path, cropSize=48, name="crop48.pt")
    small = slicer.util.addVolumeFromArray(np.random.default_rng(0).random((1, 40, 44)).astype(np.float32), ras,
                                           "Small B-scan")
    _assert_segment_fails(InputError, "44x40 pixels .* smaller than this GLS model's 48x48 local crop", small,
                          large_crop)
    # RGB / vector volumes
    rgb = slicer.util.addVolumeFromArray(np.zeros((1, 64, 64, 3), np.uint8), ras, "Colour photo",
                                         "vtkMRMLVectorVolumeNode")
    _assert_segment_fails(InputError, "'Colour photo' has 3 components per voxel.*'Vector to Scalar Volume'", rgb,
                          checkpoint)
    _assert_segment_fails(InputError, "no input volume", None, checkpoint)
    broken_voxels = image.array.copy()
    broken_voxels[0, 5, 5] = np.nan
    nan_volume = slicer.util.addVolumeFromArray(broken_voxels, ras, "NaN B-scan")
    _assert_segment_fails(InputError, "volume 'NaN B-scan' has 1 NaN", nan_volume, checkpoint)
    # checkpoints: missing, unset, corrupt, another method's
    _assert_segment_fails(CheckpointError, "checkpoint not found", volume, tmp_path / "missing.pt")
    _assert_segment_fails(InputError, "no model selected", volume, "")
    broken = tmp_path / "broken.pt"
    broken.write_bytes(Path(checkpoint).read_bytes()[:3000])
    _assert_segment_fails(CheckpointError, "truncated, corrupt", volume, broken)
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint")
    _assert_segment_fails(CheckpointError, "truncated, corrupt or not a deepimaging checkpoint", volume, text)
    rog = save_checkpoint(tmp_path / "rog.pt", {"w": torch.zeros(1)}, make_header("rog", {}))
    _assert_segment_fails(CheckpointError, "method 'rog', but a 'gls' checkpoint is needed", volume, rog)
    # options
    _assert_segment_fails(InputError, "unknown device 'tpu'", volume, checkpoint, device="tpu")
    _assert_segment_fails(InputError, "threshold must lie between 0 and 1", volume, checkpoint, threshold=1.5)


# -- training data from the scene ---------------------------------------------------------------
def add_segmentation(volume, segments, name="Segmentation"):
    """A segmentation drawn on ``volume`` (its reference geometry) with ``[(name, mask)]`` segments."""
    node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    node.CreateDefaultDisplayNodes()
    node.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    for segment_name, mask in segments:
        if mask is None:
            node.GetSegmentation().AddEmptySegment("", segment_name)
        else:
            nodes.writeMaskToSegment(mask, node, volume, name=segment_name)
    return node


@pytest.fixture
def scene_pairs(headless_slicer):
    """A single B-scan and a 3-slice stack (middle slice not annotated), each with a one-segment segmentation."""
    single, single_masks, _ = bscanVolume("Single B-scan", seed=3)
    stack, stack_masks, _ = bscanVolume("B-scan stack", slices=3, seed=10, spacing=(0.025, 0.015, 0.3),
                                        origin=(1.0, -2.0, 4.0))
    stack_masks = stack_masks.copy()
    stack_masks[1] = 0
    seg_single = add_segmentation(single, [("iris", single_masks)], "Single iris")
    seg_stack = add_segmentation(stack, [("iris", stack_masks)], "Stack iris")
    return [(single, seg_single), (stack, seg_stack)], [single_masks, stack_masks]


def test_export_writes_the_folder_layout_with_geometry(scene_pairs, tmp_path):
    from deepimaging.core.imageio import read_image
    from deepimaging.gls.data import load_folder
    from deepimaging.gls.keypoints import keypoints_from_mask

    pairs, masks = scene_pairs
    assert pairsFromSegmentations([seg for _, seg in pairs]) == pairs
    assert describePairs([pairs[0][1]]) == "Single iris \u2190 Single B-scan (iris)"
    nodes_before = slicer.mrmlScene.GetNumberOfNodes()
    data = exportTrainingData(pairs, tmp_path / "data")
    assert slicer.mrmlScene.GetNumberOfNodes() == nodes_before, "temporary nodes must be removed"
    assert data.names == ["case000", "case001_s000", "case001_s002"]
    assert data.skippedSlices == [("B-scan stack", 1)]
    assert sorted(p.name for p in (data.folder / "images").iterdir()) == [n + ".nrrd" for n in data.names]
    assert sorted(p.name for p in (data.folder / "masks").iterdir()) == [n + ".nrrd" for n in data.names]
    assert not (data.folder / "keypoints.csv").exists(), "keypoints are derived by the library"
    with open(data.folder / "sources.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["name"], r["volume"], r["segmentation"], r["slice"]) for r in rows] == [
        ("case000", "Single B-scan", "Single iris", "0"), ("case001_s000", "B-scan stack", "Stack iris", "0"),
        ("case001_s002", "B-scan stack", "Stack iris", "2")]

    # each B-scan keeps its volume's voxels and geometry (slice 2 of the stack: origin moved 2 slices)
    stack_image = nodes.imageFromVolumeNode(pairs[1][0])
    written = read_image(data.folder / "images" / "case001_s002.nrrd")
    mask_file = read_image(data.folder / "masks" / "case001_s002.nrrd")
    np.testing.assert_array_equal(written.array, stack_image.array[2:3])
    assert mask_file.array.dtype == np.uint8 and set(np.unique(mask_file.array)) <= {0, 1}
    for image in (written, mask_file):
        np.testing.assert_allclose(image.spacing, (0.025, 0.015, 0.3), rtol=1e-6)
        np.testing.assert_allclose(image.origin, (1.0, -2.0, 4.0 + 2 * 0.3), atol=1e-6)

    # the library reads it back: masks as drawn, keypoints derived from them
    samples = load_folder(data.folder, keypoints=2)
    assert [s.name for s in samples] == data.names
    np.testing.assert_array_equal(samples[0].mask, masks[0][0])
    np.testing.assert_array_equal(samples[2].mask, masks[1][2])
    np.testing.assert_allclose(samples[2].keypoints, keypoints_from_mask(masks[1][2], 2))
    assert checkDataFolder(data.folder) == data.folder


def test_export_bad_input(scene_pairs, tmp_path):
    pairs, masks = scene_pairs
    single = pairs[0][0]
    with pytest.raises(InputError, match="no volume \\+ segmentation pairs"):
        exportTrainingData([], tmp_path / "none")
    unlinked = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Unlinked")
    with pytest.raises(InputError, match="'Unlinked' is not linked to a volume"):
        pairsFromSegmentations([unlinked])
    empty = add_segmentation(single, [("iris", np.zeros_like(masks[0]))], "Empty iris")
    with pytest.raises(InputError, match="'Empty iris' \\(segment 'iris'\\) has no foreground inside volume "
                                         "'Single B-scan'"):
        exportTrainingData(pairs + [(single, empty)], tmp_path / "failed")
    assert not (tmp_path / "failed").exists(), "a failed export leaves no half-written folder"
    two = add_segmentation(single, [("iris", masks[0]), ("cornea", None)], "Two segments")
    with pytest.raises(InputError, match="'Two segments' has 2 segments \\('iris', 'cornea'\\).*exactly one"):
        exportTrainingData([(single, two)], tmp_path / "two")
    assert "2 segments: cannot be used" in describePairs([two])
    rgb = slicer.util.addVolumeFromArray(np.zeros((1, 96, 128, 3), np.uint8), nodes.ijkToRASArray(single), "RGB",
                                         "vtkMRMLVectorVolumeNode")
    with pytest.raises(InputError, match="'RGB' has 3 components per voxel"):
        exportTrainingData([(rgb, pairs[0][1])], tmp_path / "rgb")
    exportTrainingData(pairs[:1], tmp_path / "once")
    with pytest.raises(InputError, match="already holds files"):
        exportTrainingData(pairs[:1], tmp_path / "once")
    with pytest.raises(InputError, match="has no masks/ folder"):
        (tmp_path / "images-only" / "images").mkdir(parents=True)
        checkDataFolder(tmp_path / "images-only")
    with pytest.raises(InputError, match="not found"):
        checkDataFolder(tmp_path / "nowhere")


# -- training jobs ------------------------------------------------------------------------------
def test_training_command_and_progress_lines(tmp_path):
    command = trainingCommand(tmp_path / "data", tmp_path / "out", "unetpp", 3, 2, "cpu")
    assert command[:4] == [sys.executable, "-m", "deepimaging", "-v"]
    assert command[4:] == ["gls", "train", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "out"),
                           "--arch", "unetpp", "--epochs", "3", "--keypoints", "2", "--device", "cpu"]
    assert "--device" not in trainingCommand(tmp_path, tmp_path, "gls", 1, 2, None)
    with pytest.raises(InputError, match="unknown architecture 'vnet'"):
        trainingCommand(tmp_path, tmp_path, "vnet", 1, 2)
    with pytest.raises(InputError, match="at least 1"):
        trainingCommand(tmp_path, tmp_path, "gls", 0, 2)

    status = TrainingStatus()
    assert status.text() == "Starting the training process"
    assert parseTrainingLine("PROGRESS 0.2500 training GLS: epoch 1/4 stage 1 loss 0.6931 ETA 0:12", status)
    assert status.fraction == 0.25 and status.text() == "training GLS: epoch 1/4 stage 1 loss 0.6931 ETA 0:12"
    assert not parseTrainingLine("INFO epoch 1/4 train_loss 0.69", status)
    parseTrainingLine("deepimaging: error: no images/ folder", status)
    assert status.error == "no images/ folder"
    parseTrainingLine("trained gls for 3 epoch(s) x 1 step(s) in 8.1 s, stage 3; last validation Dice 0.007", status)
    status.stage = "done"
    assert status.text() == "trained gls for 3 epoch(s) x 1 step(s) in 8.1 s, stage 3; last validation Dice 0.007"


def _child(code):
    return [sys.executable, "-c", code]


def test_training_job_reports_progress_and_cancel_kills_it(tmp_path):
    out, scratch = tmp_path / "out", tmp_path / "scratch"
    scratch.mkdir()
    code = ("import pathlib\n"
            "print('PROGRESS 0.5000 epoch 1/2', flush=True)\n"
            "print('INFO epoch 1/2 val_dice 0.5', flush=True)\n"
            f"pathlib.Path({str(out / 'best.pt')!r}).write_bytes(b'weights')\n"
            "print('PROGRESS 1.0000 epoch 2/2 done', flush=True)\n")
    job = TrainingJob(_child(code), out, cleanupFolder=scratch).start()
    log = job.wait(timeout=60)
    assert job.state == process.ProcessState.SUCCEEDED, job.errorMessage()
    assert log == ["INFO epoch 1/2 val_dice 0.5"] and job.status.fraction == 1.0
    assert job.bestCheckpoint == out / "best.pt" and not scratch.exists()

    failing = TrainingJob(_child("import sys; print('deepimaging: error: no masks/ folder', file=sys.stderr); "
                                 "sys.exit(2)"), tmp_path / "failed").start()
    failing.wait(timeout=60)
    assert failing.state == process.ProcessState.FAILED and failing.errorMessage() == "no masks/ folder"

    scratch.mkdir()
    slow = TrainingJob(_child("import time; print('started', flush=True); time.sleep(60)"), tmp_path / "slow",
                       cleanupFolder=scratch).start()
    deadline = time.time() + 30
    while slow.running and "started" not in slow.output and time.time() < deadline:
        slow.poll()
        time.sleep(0.02)
    slow.cancel()
    slow.wait(timeout=20)
    assert slow.state == process.ProcessState.CANCELLED and slow.status.text() == "Cancelled"
    assert not scratch.exists()


def test_train_from_scene_pairs_with_the_real_cli_then_segment(scene_pairs, tmp_path):
    """Scene pairs -> export -> ``deepimaging gls train`` child (1 epoch) -> best.pt -> new nodes.

    One epoch: arch "global" (GLS's global branch with its keypoint head); "gls" needs three.
    """
    pairs, _ = scene_pairs
    # Four B-scans (one copy of the single B-scan, so validation keeps a sample).
    extra, extra_masks, _ = bscanVolume("Another B-scan", seed=5)
    pairs = pairs + [(extra, add_segmentation(extra, [("iris", extra_masks)], "Another iris"))]
    logic = GLSSegmentLogic()
    small = ["--size", "64", "64", "--widths", "4", "8", "16", "32", "64", "--threads", "2"]
    job = logic.startTraining(tmp_path / "model", pairs=pairs, architecture="global", epochs=1, keypoints=2,
                              device="cpu", extraArguments=small)
    assert job.env["CUDA_VISIBLE_DEVICES"] == "-1" and job.env["DEEPIMAGING_PROGRESS"] == "lines"
    exported = job.cleanupFolder
    assert exported is not None and (exported / "data" / "images").is_dir()
    log = job.wait(timeout=300)
    assert job.state == process.ProcessState.SUCCEEDED, job.errorMessage() + "\n" + "\n".join(log)
    assert job.status.fraction == 1.0 and job.bestCheckpoint == tmp_path / "model" / "best.pt"
    assert any(process.parseProgressLine(line) for line in job.output), "the child reports PROGRESS lines"
    assert job.status.text().startswith("trained global for 1 epoch(s)"), job.status.text()
    assert not exported.exists(), "the exported temporary folder is removed when the job ends"
    outputs = logic.segment(pairs[0][0], job.bestCheckpoint, device="cpu")
    assert segment_names(outputs.segmentationNode) == ["foreground"]
    assert [label for label, _, _ in control_points(outputs.keypointsNode)] == ["left tail", "right tail"]


def test_cli_errors_reach_the_panel(tmp_path):
    """A folder whose images lack masks: the library's message becomes the job's error."""
    from deepimaging.gls.synthetic import write_synthetic_dataset

    data = write_synthetic_dataset(tmp_path / "data", n=2, size=(64, 64), fmt="nrrd")
    next((data / "masks").iterdir()).unlink()
    job = GLSSegmentLogic().startTraining(tmp_path / "model", dataFolder=data, architecture="unet", epochs=1,
                                          device="cpu", extraArguments=["--size", "64", "64"])
    job.wait(timeout=120)
    assert job.state == process.ProcessState.FAILED
    assert "no mask in" in job.errorMessage() and job.bestCheckpoint is None


def test_start_training_bad_input(scene_pairs, tmp_path, monkeypatch):
    import GLSSegmentLib.export

    pairs, _ = scene_pairs
    scratch = tmp_path / "scratch"
    monkeypatch.setattr(GLSSegmentLib.export, "temporaryFolder", lambda: scratch.mkdir() or scratch)
    logic = GLSSegmentLogic()
    with pytest.raises(InputError, match="not both"):
        logic.startTraining(tmp_path / "out", dataFolder=tmp_path, pairs=pairs)
    with pytest.raises(InputError, match="no output folder"):
        logic.startTraining("", pairs=pairs)
    with pytest.raises(InputError, match="training data folder not found"):
        logic.startTraining(tmp_path / "out", dataFolder=tmp_path / "nowhere")
    with pytest.raises(InputError, match="unknown architecture 'vnet'"):
        logic.startTraining(tmp_path / "out", pairs=pairs, architecture="vnet")
    with pytest.raises(InputError, match="three stages and needs at least 3 epochs, got 2"):
        logic.startTraining(tmp_path / "out", pairs=pairs, architecture="gls", epochs=2)
    assert not scratch.exists(), "a failed start leaves no exported folder behind"
    with pytest.raises(InputError, match="'Stack iris' has 2 segments"):
        pairs[1][1].GetSegmentation().AddEmptySegment("", "cornea")
        logic.startTraining(tmp_path / "out", pairs=pairs)
    assert not scratch.exists() and not (tmp_path / "out").exists()


def test_module_lib_imports_without_torch(run_without_torch):
    """The module must load in Slicer before torch is installed (torch comes on first Apply)."""
    code = ("import GLSSegmentLib\n"
            "assert GLSSegmentLib.keypointLabel('left tail', 2, 3) == 'left tail s2'\n"
            "assert GLSSegmentLib.modelDescription('') == ''\n"
            "import sys\n"
            "assert 'torch' not in sys.modules\n"
            "print('ok')\n")
    result = run_without_torch("GLSSegment", code)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
