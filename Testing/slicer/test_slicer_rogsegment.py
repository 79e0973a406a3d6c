"""ROGSegment Logic on real MRML nodes: inference into a new segmentation, training export, training jobs, bad input."""

import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import vtk

import slicer
from DeepImagingCommonLib import nodes, process
from deepimaging.core.errors import CheckpointError, InputError
from deepimaging.core.imageio import read_image
from deepimaging.core.progress import CancelToken, Cancelled
from deepimaging.core.checkpoint import make_header, save_checkpoint
from rogcases import LABELS, save_rog, tiny_plan
from ROGSegmentLib import (ROGSegmentLogic, TrainingStatus, exportTrainingData, modelDescription,
                           pairsFromSegmentations, parseTrainingLine, prepareDataFolder, readModelInfo, trainingSteps)
from ROGSegmentLib.training import TrainingJob

REPO = Path(__file__).resolve().parents[2]
@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """ROG's small depthwise 3-D convolutions run fastest single-threaded on a small, shared CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_rog(tmp_path_factory.mktemp("rog") / "best.pt", tiny_plan())


def segment_names(segmentation_node):
    segmentation = segmentation_node.GetSegmentation()
    return [segmentation.GetSegment(i).GetName() for i in segmentation.GetSegmentIDs()]


def segmentation_count():
    return slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")


# -- inference ----------------------------------------------------------------------------------
def test_segment_adds_a_new_segmentation_with_the_checkpoints_labels(case_nodes, checkpoint):
    from deepimaging.rog.infer import predict_volume

    progress = []
    before = segmentation_count()
    node = ROGSegmentLogic().segment(case_nodes.volume, checkpoint, device="cpu",
                                     progress=lambda fraction, message: progress.append(fraction))
    assert segmentation_count() == before + 1 and node is not case_nodes.segmentation
    assert segment_names(node) == ["liver", "liver tumour"]
    colors = [node.GetSegmentation().GetSegment(i).GetColor() for i in node.GetSegmentation().GetSegmentIDs()]
    assert len({tuple(np.round(c, 3)) for c in colors}) == 2
    assert progress[0] == 0.0 and progress[-1] == 1.0 and progress == sorted(progress)

    # geometry: the segmentation's reference is the input volume and its labelmaps sit on its grid
    assert node.GetNodeReference(node.GetReferenceImageGeometryReferenceRole()) is case_nodes.volume
    reference = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    reference.SetReferenceImageGeometryParameterFromVolumeNode(case_nodes.volume)
    key = slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName()
    assert node.GetSegmentation().GetConversionParameter(key) == reference.GetSegmentation().GetConversionParameter(key)
    labelmap = slicer.vtkOrientedImageData()
    node.GetBinaryLabelmapRepresentation(node.GetSegmentation().GetSegmentIDs()[0], labelmap)
    world = slicer.util.arrayFromVTKMatrix(_image_to_world(labelmap))
    np.testing.assert_allclose(world, nodes.ijkToRASArray(case_nodes.volume), atol=1e-6)

    # voxels: exactly the library's labels on the volume's grid
    labels, _ = predict_volume(case_nodes.image, checkpoint, device="cpu")
    for value, segment_id in zip((1, 2), node.GetSegmentation().GetSegmentIDs()):
        np.testing.assert_array_equal(nodes.segmentMask(node, segment_id, case_nodes.volume), labels.array == value)


def _image_to_world(oriented_image):
    matrix = vtk.vtkMatrix4x4()
    oriented_image.GetImageToWorldMatrix(matrix)
    return matrix


def test_model_info_reads_the_header(checkpoint, tmp_path):
    info = readModelInfo(checkpoint)
    assert info.foregroundLabels == [(1, "liver"), (2, "liver tumour")]
    assert info.channels == ["CT"] and info.patchSize == (16, 32, 32)
    assert "liver, liver tumour" in info.summary() and "Dice 0.500 (epoch 3)" in info.summary()
    assert modelDescription(checkpoint) == info.summary() and modelDescription(".") == ""
    other = save_checkpoint(tmp_path / "other.pt", {"w": torch.zeros(1)}, make_header("gls", {}))
    assert modelDescription(other).startswith("Not usable: ") and "'gls'" in modelDescription(other)


def _assert_segment_fails(error, match, volume, model, **kwargs):
    nodes_before = slicer.mrmlScene.GetNumberOfNodes()
    with pytest.raises(error, match=match):
        ROGSegmentLogic().segment(volume, model, **{"device": "cpu", **kwargs})
    assert slicer.mrmlScene.GetNumberOfNodes() == nodes_before, "a failed run must not add nodes"


def test_bad_input_gives_clear_errors_and_no_new_nodes(case_nodes, checkpoint, tmp_path):
    ras = nodes.ijkToRASArray(case_nodes.volume)
    flat = slicer.util.addVolumeFromArray(np.zeros((1, 36, 36), np.float32), ras, "One slice")
    _assert_segment_fails(InputError, "'One slice' is 2-D", flat, checkpoint)
    four_d = slicer.util.addVolumeFromArray(np.zeros((20, 36, 36, 3), np.float32), ras, "Time series",
                                            "vtkMRMLVectorVolumeNode")
    _assert_segment_fails(InputError, "3 components per voxel", four_d, checkpoint)
    _assert_segment_fails(InputError, "no input volume", None, checkpoint)

    other = tmp_path / "levelset.pt"
    save_checkpoint(other, {"w": torch.zeros(1)}, make_header("levelset", {}))
    _assert_segment_fails(CheckpointError, "method 'levelset', but a 'rog' checkpoint is needed", case_nodes.volume, other)
    _assert_segment_fails(CheckpointError, "checkpoint not found", case_nodes.volume, tmp_path / "missing.pt")
    _assert_segment_fails(InputError, "no model selected", case_nodes.volume, "")
    broken = tmp_path / "broken.pt"
    broken.write_bytes(checkpoint.read_bytes()[:5000])
    _assert_segment_fails(CheckpointError, "truncated, corrupt", case_nodes.volume, broken)
    two_channels = save_rog(tmp_path / "two.pt", tiny_plan(channels=2))
    _assert_segment_fails(InputError, "needs 2 input volumes", case_nodes.volume, two_channels)
    _assert_segment_fails(InputError, "unknown device 'tpu'", case_nodes.volume, checkpoint, device="tpu")


def test_cancel_adds_no_node(case_nodes, checkpoint):
    token = CancelToken()
    token.cancel()
    before = slicer.mrmlScene.GetNumberOfNodes()
    with pytest.raises(Cancelled):
        ROGSegmentLogic().segment(case_nodes.volume, checkpoint, device="cpu", cancel=token)
    assert slicer.mrmlScene.GetNumberOfNodes() == before


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
def scene_pairs(case_nodes, oblique):
    """Two volumes on different oblique grids; segment names in different orders, one overlap."""
    from deepimaging.core.image import Image

    rng = np.random.default_rng(1)
    second = Image(rng.normal(50, 10, (16, 30, 28)).astype(np.float32), (1.1, 1.0, 2.0), (5.0, -8.0, 2.0), oblique.T)
    volume_b = nodes.volumeNodeFromImage(second, "Second volume")
    spleen = np.zeros(second.shape, bool)
    spleen[2:6, 3:9, 4:10] = True
    liver = np.zeros(second.shape, bool)
    liver[8:14, 10:25, 8:20] = True
    seg_a = add_segmentation(case_nodes.volume, [("liver", case_nodes.truth), ("liver tumour", case_nodes.rough)], "A")
    seg_b = add_segmentation(volume_b, [("spleen", spleen), ("liver", liver)], "B")
    return [(case_nodes.volume, seg_a), (volume_b, seg_b)], [case_nodes.image, second], [case_nodes, spleen, liver]


def test_export_keeps_label_values_consistent_and_geometry(scene_pairs, tmp_path):
    from deepimaging.rog.plan import plan_dataset

    segmentations = [seg for _, seg in scene_pairs[0]]
    pairs = pairsFromSegmentations(segmentations)
    assert pairs == scene_pairs[0]
    nodes_before = slicer.mrmlScene.GetNumberOfNodes()
    data = exportTrainingData(pairs, tmp_path / "data", modality="CT")
    assert slicer.mrmlScene.GetNumberOfNodes() == nodes_before, "temporary nodes must be removed"
    meta = json.loads((data.folder / "dataset.json").read_text())
    assert meta["labels"] == {"0": "background", "1": "liver", "2": "liver tumour", "3": "spleen"}
    assert meta["modality"] == {"0": "CT"} and meta["numTraining"] == 2
    images = [read_image(data.folder / entry["image"]) for entry in meta["training"]]
    labels = [read_image(data.folder / entry["label"]) for entry in meta["training"]]
    for original, image, label in zip(scene_pairs[1], images, labels):
        for written in (image, label):
            assert written.shape == original.shape
            np.testing.assert_allclose(written.spacing, original.spacing, rtol=1e-6)
            np.testing.assert_allclose(written.origin, original.origin, atol=1e-4)
            np.testing.assert_allclose(written.direction, original.direction, atol=1e-6)
        np.testing.assert_array_equal(image.array, original.array)

    case_a, spleen, liver = scene_pairs[2]
    np.testing.assert_array_equal(labels[0].array == 2, case_a.rough)  # the later segment wins the overlap
    np.testing.assert_array_equal(labels[0].array == 1, case_a.truth & ~case_a.rough)
    np.testing.assert_array_equal(labels[1].array == 3, spleen)
    np.testing.assert_array_equal(labels[1].array == 1, liver)

    plan = plan_dataset(data.folder)  # the planner accepts it: every value is declared
    assert [(lb.value, lb.name, lb.kind) for lb in plan.labels] == [
        (0, "background", "background"), (1, "liver", "organ"), (2, "liver tumour", "lesion"), (3, "spleen", "organ")]


def test_export_bad_input(case_nodes, scene_pairs, tmp_path):
    with pytest.raises(InputError, match="no volume \\+ segmentation pairs"):
        exportTrainingData([], tmp_path / "none")
    unlinked = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Unlinked")
    with pytest.raises(InputError, match="'Unlinked' is not linked to a volume"):
        pairsFromSegmentations([unlinked])
    empty = add_segmentation(case_nodes.volume, [("liver", None)], "Empty")
    with pytest.raises(InputError, match="'Empty' has no voxels inside volume 'Ball volume'"):
        exportTrainingData(scene_pairs[0] + [(case_nodes.volume, empty)], tmp_path / "failed")
    assert not (tmp_path / "failed").exists(), "a failed export leaves no half-written folder"
    flat = slicer.util.addVolumeFromArray(np.zeros((1, 8, 8), np.float32), np.eye(4), "Flat")
    with pytest.raises(InputError, match="'Flat' is 2-D"):
        exportTrainingData([(flat, scene_pairs[0][0][1])], tmp_path / "flat")
    exportTrainingData(scene_pairs[0][:1], tmp_path / "once")
    with pytest.raises(InputError, match="already holds a dataset"):
        exportTrainingData(scene_pairs[0][:1], tmp_path / "once")


def test_images_and_labels_folder_gets_a_dataset_json(tmp_path, synthetic_case):
    from deepimaging.core.imageio import write_image
    from deepimaging.rog.plan import read_msd_dataset

    root = tmp_path / "folder"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    label = synthetic_case.image.with_array(synthetic_case.truth.astype(np.uint8))
    for image_name, label_name in (("a.nii.gz", "a.nii.gz"), ("b_0000.nrrd", "b.nrrd")):
        write_image(synthetic_case.image, root / "images" / image_name)
        write_image(label, root / "labels" / label_name)
    data, cleanup = prepareDataFolder(root, modality="MR")
    try:
        spec = read_msd_dataset(data.folder)
        assert [(c[0][0].name, c[1].name) for c in spec.cases] == [("a.nii.gz", "a.nii.gz"), ("b_0000.nrrd", "b.nrrd")]
        assert all(c[1].is_file() for c in spec.cases) and spec.modalities == ["MR"] and spec.label_names == {}
    finally:
        shutil.rmtree(cleanup)
    write_image(synthetic_case.image, root / "images" / "c.nii.gz")
    with pytest.raises(InputError, match="no label map .* named like image\\(s\\) c.nii.gz"):
        prepareDataFolder(root)
    with pytest.raises(InputError, match="neither an MSD dataset"):
        prepareDataFolder(root / "images")
    (root / "dataset.json").write_text(json.dumps({"labels": {"0": "background"}, "training": []}))
    with pytest.raises(InputError, match="lists no training cases"):
        prepareDataFolder(root)
    with pytest.raises(InputError, match="not found"):
        prepareDataFolder(tmp_path / "nowhere")


# -- training jobs ------------------------------------------------------------------------------
# Output of ``deepimaging -v rog train`` (2 epochs): tqdm redraws (split at "\r") with the
# TrainingRun messages, and one logged "INFO epoch" line per finished epoch.
TRAIN_OUTPUT = [
    "training ROG:   0%|          | 00:00<? ",
    "training ROG:  32%|\u2588\u2588\u2588\u258e      | 00:13<00:28 , dataset ready",
    "training ROG:  55%|\u2588\u2588\u2588\u2588\u2588\u258c    | 00:28<00:24 , epoch 1/2 loss 2.2109 ETA 0:38"
    "INFO epoch 1/2 train_loss 2.074 val_loss 1.823 val_loss_avg 1.823 lr 0.001 dice_mean 0.1885 "
    "dice_liver 0.3329 dice_kidney 0.04417",
    "training ROG:  78%|\u2588\u2588\u2588\u2588\u2588\u2588\u2588\u258a  | 00:44<00:13 , epoch 2/2 train_loss 2.074 "
    "val_loss 1.823 val_loss_avg 1.823 lr 0.001 dice_mean 0.1885 ETA 0:30",
    "training ROG: 100%|\u2588\u2588\u2588\u2588\u2588\u2588\u2588\u2588\u2588\u2588| 00:59<00:00 , epoch 2/2 loss 1.8078 "
    "ETA 0:14INFO epoch 2/2 train_loss 1.797 val_loss 1.721 val_loss_avg 1.772 lr 0.001 dice_mean 0.2319 "
    "dice_liver 0.4062 dice_kidney 0.05755",
    "trained 2 epoch(s) in 65.7 s; last validation Dice: liver 0.406 kidney 0.058; best mean Dice 0.232",
]


def test_training_output_is_parsed_into_epoch_loss_dice_and_eta():
    from ROGSegmentLib.training import logText

    status = TrainingStatus(stage="training")
    assert status.text() == "Preparing the training cases"
    parseTrainingLine(TRAIN_OUTPUT[1], status, (0.05, 1.0))
    assert status.fraction == pytest.approx(0.05 + 0.95 * 0.32) and status.epochs == 0
    parseTrainingLine(TRAIN_OUTPUT[2], status, (0.05, 1.0))
    assert (status.currentEpoch, status.epoch, status.epochs) == (1, 1, 2)
    assert status.loss == pytest.approx(2.2109) and status.eta == "0:38"
    assert status.dice == pytest.approx(0.1885) and status.bestDice == pytest.approx(0.1885)
    for line in TRAIN_OUTPUT[3:]:
        parseTrainingLine(line, status, (0.05, 1.0))
    assert status.epoch == 2 and status.dice == pytest.approx(0.2319) and status.bestDice == pytest.approx(0.2319)
    assert status.fraction == pytest.approx(1.0) and status.message.startswith("trained 2 epoch(s)")
    assert status.text() == "Epoch 2/2, loss 1.8078, validation Dice 0.232 (best 0.232), ETA 0:14"
    worse = TRAIN_OUTPUT[4].replace("dice_mean 0.2319", "dice_mean 0.1")
    parseTrainingLine(worse, status)
    assert status.dice == pytest.approx(0.1) and status.bestDice == pytest.approx(0.2319)
    parseTrainingLine("deepimaging: error: the dataset is empty", status)
    assert status.error == "the dataset is empty"

    assert [logText(line) for line in TRAIN_OUTPUT[:2]] == [None, None]
    assert logText(TRAIN_OUTPUT[2]).startswith("epoch 1/2 train_loss 2.074")
    assert logText(TRAIN_OUTPUT[-1]) == TRAIN_OUTPUT[-1]


def test_training_steps_plan_then_train_or_resume(tmp_path):
    steps = trainingSteps(tmp_path / "data", tmp_path / "out", 5, 10, "cpu")
    assert [stage for stage, _ in steps] == ["planning", "training"]
    plan_args, train_args = steps[0][1], steps[1][1]
    assert plan_args[:4] == [sys.executable, "-m", "deepimaging", "-v"]
    assert plan_args[4:] == ["rog", "plan", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "out" / "plan.json")]
    assert train_args[train_args.index("--epochs") + 1] == "5" and train_args[-2:] == ["--device", "cpu"]
    assert train_args[train_args.index("--plan") + 1] == str(tmp_path / "out" / "plan.json")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "last.pt").write_bytes(b"")
    resumed = trainingSteps(tmp_path / "data", tmp_path / "out", 5, 10)
    assert [stage for stage, _ in resumed] == ["training"] and "--plan" not in resumed[0][1]
    with pytest.raises(InputError, match="at least 1"):
        trainingSteps(tmp_path / "data", tmp_path / "out", 0, 10)


def _child(code):
    return [sys.executable, "-c", code]


def test_training_job_runs_its_steps_and_reports_progress(tmp_path):
    out, scratch = tmp_path / "out", tmp_path / "scratch"
    scratch.mkdir()
    train = ("import pathlib, sys\n"
             f"lines = {TRAIN_OUTPUT!r}\n"
             "for line in lines[:-1]: sys.stderr.write(line + '\\r'); sys.stderr.flush()\n"
             f"pathlib.Path({str(out / 'best.pt')!r}).write_bytes(b'weights')\n"
             "print(); print(lines[-1])\n")
    job = TrainingJob([("planning", _child("print('plan for 2 case(s): ...')")), ("training", _child(train))],
                      out, cleanupFolder=scratch)
    assert job.start() is job and job.running
    log = job.wait(timeout=60)
    assert job.state == process.ProcessState.SUCCEEDED, job.errorMessage()
    assert job.status.stage == "done" and job.status.fraction == 1.0
    assert job.status.epoch == 2 and job.status.bestDice == pytest.approx(0.2319)
    assert job.bestCheckpoint == out / "best.pt" and not scratch.exists()
    assert log[0] == "plan for 2 case(s): ..." and any(line.startswith("epoch 2/2 train_loss") for line in log)
    assert not any("%|" in line for line in log)


def test_training_job_failure_and_cancel(tmp_path):
    marker = tmp_path / "second-step-ran"
    failing = TrainingJob([("planning", _child("import sys; print('deepimaging: error: no label maps', "
                                               "file=sys.stderr); sys.exit(2)")),
                           ("training", _child(f"open({str(marker)!r}, 'w')"))], tmp_path / "out")
    failing.start().wait(timeout=60)
    assert failing.state == process.ProcessState.FAILED and failing.errorMessage() == "no label maps"
    assert not marker.exists() and failing.bestCheckpoint is None

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    slow = TrainingJob([("training", _child("import time; print('started', flush=True); time.sleep(60)"))],
                       tmp_path / "out", cleanupFolder=scratch).start()
    deadline = time.time() + 30
    while slow.running and "started" not in slow.output and time.time() < deadline:
        slow.poll()
        time.sleep(0.02)
    slow.cancel()
    slow.wait(timeout=20)
    assert slow.state == process.ProcessState.CANCELLED and slow.status.stage == "cancelled"
    assert not scratch.exists()


def test_plan_and_train_with_the_real_cli_then_segment_with_the_result(scene_pairs, tmp_path):
    """Scene pairs -> export -> ``deepimaging rog plan`` / ``train`` children -> best.pt -> a new segmentation."""
    from deepimaging.rog.plan import Plan
    from deepimaging.rog.synthetic import cpu_friendly

    data = exportTrainingData(scene_pairs[0], tmp_path / "data", modality="CT")
    model_folder = tmp_path / "model"
    steps = trainingSteps(data.folder, model_folder, 1, 1, "cpu")
    planning = TrainingJob(steps[:1], model_folder).start()
    planning.wait(timeout=120)
    assert planning.state == process.ProcessState.SUCCEEDED, planning.errorMessage()
    assert planning.status.message.startswith("plan for 2 case(s)")
    plan_file = model_folder / "plan.json"
    plan = Plan.from_dict(json.loads(plan_file.read_text()))
    assert [label.name for label in plan.labels] == ["background", "liver", "liver tumour", "spleen"]

    # Same training command, on a plan small enough for a shared 2-core test machine.
    plan_file.write_text(json.dumps(cpu_friendly(plan, (16, 32, 32)).to_dict()))
    stage, args = steps[1]
    training = TrainingJob([(stage, args + ["--threads", "1", "--no-augment"])], model_folder).start()
    log = training.wait(timeout=180)
    assert training.state == process.ProcessState.SUCCEEDED, training.errorMessage()
    assert training.status.epoch == 1 and training.status.dice is not None
    assert any(line.startswith("epoch 1/1 train_loss") for line in log)

    node = ROGSegmentLogic().segment(scene_pairs[0][1][0], training.bestCheckpoint, device="cpu")
    assert segment_names(node) == ["liver", "liver tumour", "spleen"]


def test_cli_errors_reach_the_panel(scene_pairs, tmp_path):
    """A label value the dataset does not declare: the planner's message becomes the job's error."""
    data = exportTrainingData(scene_pairs[0], tmp_path / "data")
    meta = json.loads((data.folder / "dataset.json").read_text())
    del meta["labels"]["3"]
    (data.folder / "dataset.json").write_text(json.dumps(meta))
    job = TrainingJob(trainingSteps(data.folder, tmp_path / "model", 1, 1), tmp_path / "model").start()
    job.wait(timeout=120)
    assert job.state == process.ProcessState.FAILED
    assert "label value(s) [3] occur in the label maps but are not declared" in job.errorMessage()
    assert job.bestCheckpoint is None


def test_module_lib_imports_without_torch(run_without_torch):
    """The module must load in Slicer before torch is installed (torch comes on first Apply)."""
    code = ("import sys\n"
            "import ROGSegmentLib\n"
            "assert ROGSegmentLib.segmentColor(9) != ROGSegmentLib.segmentColor(1)\n"
            "assert 'torch' not in sys.modules\n")
    result = run_without_torch("ROGSegment", code)
    assert result.returncode == 0, result.stderr


def test_segmentation_follows_the_volume_parent_transform(case_nodes, checkpoint):
    transform = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    case_nodes.volume.SetAndObserveTransformNodeID(transform.GetID())
    node = ROGSegmentLogic().segment(case_nodes.volume, checkpoint, device="cpu")
    assert node.GetTransformNodeID() == transform.GetID()
