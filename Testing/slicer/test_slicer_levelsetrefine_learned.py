"""LevelSetRefine's learned method on real MRML nodes: refine with a checkpoint (2D single-slice
volumes and 3D volumes), the refiner cache, box-prompted segmentation from a markups ROI, clear
errors, and training from scene pairs in a background ``deepimaging levelset train`` child."""

import csv
import sys
import time

import numpy as np
import pytest

import slicer
from DeepImagingCommonLib import nodes, process
from deepimaging.core.errors import CheckpointError, InputError
from deepimaging.core.imageio import read_image
from deepimaging.core.progress import CancelToken, Cancelled
from LevelSetRefineLib import (LevelSetRefineLogic, TrainingJob, TrainingStatus, checkDataFolder,
                               clearRefinerCache, describePairs, describeRefiner, exportTrainingData, learned,
                               pairsFromSegmentations, parseTrainingLine, refineImageMask, roiVoxelBox,
                               trainingCommand)

# A refiner small enough to train in seconds on one CPU thread (the library's defaults are 4-8x larger).
TINY = {2: dict(grid=32, widths=(8, 16), features=8), 3: dict(grid=16, widths=(8, 16), features=8)}
TINY_CLI = ["--widths", "8", "16", "--features", "8", "--steps-per-epoch", "2", "--batch-size", "2", "--threads", "1"]


def dice(a, b):
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    return 2.0 * np.logical_and(a, b).sum() / max(1, a.sum() + b.sum())


def segment_names(segmentation_node):
    segmentation = segmentation_node.GetSegmentation()
    return [segmentation.GetSegment(i).GetName() for i in segmentation.GetSegmentIDs()]


@pytest.fixture(scope="module")
def refiners(tmp_path_factory):
    """Tiny 2D and 3D refiners trained on the library's synthetic cases, and unseen test cases."""
    from deepimaging.levelset.deep import train_refiner, write_synthetic_refine_dataset

    root = tmp_path_factory.mktemp("learned-refiners")
    start = time.perf_counter()
    checkpoints, tests = {}, {}
    for dim, cases, epochs in ((2, 8, 4), (3, 6, 3)):
        data = write_synthetic_refine_dataset(root / f"data{dim}", n=cases, dim=dim, seed=0)
        checkpoints[dim] = train_refiner(data, root / f"run{dim}", dim=dim, epochs=epochs, device="cpu",
                                         steps_per_epoch=6, batch_size=4, val_items=4, **TINY[dim])
        tests[dim] = write_synthetic_refine_dataset(root / f"test{dim}", n=2, dim=dim, seed=500)
    seconds = time.perf_counter() - start
    assert seconds < 40, f"training the tiny refiners took {seconds:.1f} s"
    return checkpoints, tests


def load_case(folder, index=0):
    """(image, truth, coarse) of the index-th case of a synthetic folder."""
    path = sorted((folder / "images").iterdir())[index]
    image = read_image(path)
    return image, read_image(folder / "masks" / path.name).array > 0, read_image(folder / "coarse" / path.name).array > 0


def case_nodes_from(folder, index=0):
    """A synthetic case as a volume node and a segmentation with the coarse segment "Object"."""
    image, truth, coarse = load_case(folder, index)
    volume = nodes.volumeNodeFromImage(image, "Case")
    segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Case segmentation")
    segmentation.CreateDefaultDisplayNodes()
    segment_id = nodes.writeMaskToSegment(coarse, segmentation, volume, name="Object", color=(0.9, 0.3, 0.2))
    return volume, segmentation, segment_id, truth, coarse


@pytest.mark.parametrize("index", [0, 1])
def test_learned_refinement_of_a_single_slice_adds_a_better_segment(headless_slicer, refiners, index):
    checkpoints, tests = refiners
    volume, segmentation, segment_id, truth, coarse = case_nodes_from(tests[2], index)
    assert volume.GetImageData().GetDimensions()[2] == 1  # a 2D image in Slicer: one slice
    progress = []
    logic = LevelSetRefineLogic()
    new_id = logic.refine(volume, segmentation, segment_id, method="learned", checkpoint=checkpoints[2],
                          device="cpu", progress=lambda fraction, message: progress.append(fraction))
    assert segment_names(segmentation) == ["Object", "Object (refined)"]
    refined = nodes.segmentMask(segmentation, new_id, volume)
    assert refined.shape == truth.shape and refined.any()
    np.testing.assert_array_equal(nodes.segmentMask(segmentation, segment_id, volume), coarse)
    # The tiny model already beats a badly corrupted coarse segment (case 1) and keeps a good one (case 0).
    before, after = dice(coarse, truth), dice(refined, truth)
    assert after > 0.8 and after > before - 0.05, (before, after)
    assert logic.lastResult.converged and logic.lastResult.iterations > 0
    assert progress[0] == 0.0 and progress[-1] == 1.0 and progress == sorted(progress)


def test_learned_refinement_of_a_volume_replaces_in_place(headless_slicer, refiners):
    checkpoints, tests = refiners
    volume, segmentation, segment_id, truth, coarse = case_nodes_from(tests[3], 1)
    out_id = LevelSetRefineLogic().refine(volume, segmentation, segment_id, replace=True, method="learned",
                                          checkpoint=str(checkpoints[3]), device="cpu")
    assert out_id == segment_id and segment_names(segmentation) == ["Object"]
    refined = nodes.segmentMask(segmentation, out_id, volume)
    assert refined.shape == truth.shape == (48, 48, 48)
    # A 3-epoch 3D model only needs to land on the object here; the quality check is the 2D one.
    assert dice(refined, truth) > 0.5, dice(refined, truth)


def test_loaded_refiners_are_cached_per_file_and_device(refiners, tmp_path):
    checkpoints, _ = refiners
    clearRefinerCache()
    first = learned.loadRefiner(checkpoints[2], "cpu")
    assert learned.loadRefiner(str(checkpoints[2]), "cpu") is first
    copy = tmp_path / "copy.pt"
    copy.write_bytes(checkpoints[2].read_bytes())
    assert learned.loadRefiner(copy, "cpu") is not first
    assert learned.cachedRefinerCount() == 2
    copy.write_bytes(checkpoints[3].read_bytes())  # a newer file at the same path is read again
    assert learned.loadRefiner(copy, "cpu").config.dim == 3
    assert learned.cachedRefinerCount() == 2
    assert describeRefiner(checkpoints[2]).startswith("2D learned refiner: 32 voxel grid")
    assert describeRefiner("") == ""
    assert "checkpoint not found" in describeRefiner(tmp_path / "none.pt")


def _assert_learned_fails(error, match, volume, segmentation, segment_id, **options):
    before = segmentation.GetSegmentation().GetNumberOfSegments()
    with pytest.raises(error, match=match):
        LevelSetRefineLogic().refine(volume, segmentation, segment_id, method="learned", device="cpu", **options)
    assert segmentation.GetSegmentation().GetNumberOfSegments() == before


def test_learned_errors_are_clear_and_add_nothing(headless_slicer, refiners, tmp_path):
    checkpoints, tests = refiners
    volume, segmentation, segment_id, _, _ = case_nodes_from(tests[2])
    cases = (volume, segmentation, segment_id)
    _assert_learned_fails(InputError, "no model selected: choose a learned refiner checkpoint", *cases)
    _assert_learned_fails(InputError, "no model selected", *cases, checkpoint="")
    _assert_learned_fails(CheckpointError, "checkpoint not found", *cases, checkpoint=tmp_path / "missing.pt")
    broken = tmp_path / "broken.pt"
    broken.write_bytes(checkpoints[2].read_bytes()[:200])
    _assert_learned_fails(CheckpointError, "broken.pt", *cases, checkpoint=broken)
    _assert_learned_fails(InputError, "this model is 3D but the image is a 2D slice; use a 2D model", *cases,
                          checkpoint=checkpoints[3])
    _assert_learned_fails(InputError, "takes no level-set parameters \\(mu\\)", *cases, checkpoint=checkpoints[2],
                          mu=0.2)
    with pytest.raises(InputError, match="unknown refinement method 'deep'"):
        LevelSetRefineLogic().refine(*cases, method="deep")
    volume3, segmentation3, segment_id3, _, _ = case_nodes_from(tests[3])
    _assert_learned_fails(InputError, "this model is 2D but the image is a 3D volume of 48 slices", volume3,
                          segmentation3, segment_id3, checkpoint=checkpoints[2])
    empty_id = segmentation.GetSegmentation().AddEmptySegment("", "Empty")
    _assert_learned_fails(InputError, "segment 'Empty' is empty", volume, segmentation, empty_id,
                          checkpoint=checkpoints[2])
    with pytest.raises(InputError, match="empty"):
        refineImageMask(nodes.imageFromVolumeNode(volume), np.zeros((1, 96, 96), bool), method="learned",
                        checkpoint=checkpoints[2])
    token = CancelToken()
    token.cancel()
    with pytest.raises(Cancelled):
        LevelSetRefineLogic().refine(*cases, method="learned", checkpoint=checkpoints[2], cancel=token)
    assert segment_names(segmentation) == ["Object", "Empty"]


# -- box-prompted segmentation (ROI mode) ----------------------------------------------------------
def add_roi(volume, box_zyx, name="Box", margin_voxels=0.0):
    """A markups ROI covering the voxel box (z0, y0, x0, z1, y1, x1) of ``volume`` (axis-aligned)."""
    z0, y0, x0, z1, y1, x1 = box_zyx
    ijk_to_ras = nodes.ijkToRASArray(volume)
    low, high = np.array([x0, y0, z0], float) - 0.5, np.array([x1, y1, z1], float) - 0.5
    corners = np.array([[x, y, z, 1.0] for x in (low[0], high[0]) for y in (low[1], high[1]) for z in (low[2], high[2])])
    ras = (corners @ ijk_to_ras.T)[:, :3]
    roi = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode", name)
    roi.SetCenter(*((ras.min(0) + ras.max(0)) / 2))
    roi.SetSize(*(ras.max(0) - ras.min(0) + 2 * margin_voxels))
    return roi


def truth_box(truth):
    zs, ys, xs = np.nonzero(truth)
    return (int(zs.min()), int(ys.min()), int(xs.min()), int(zs.max()) + 1, int(ys.max()) + 1, int(xs.max()) + 1)


def test_roi_voxel_box_follows_transforms_and_rotation(headless_slicer):
    from deepimaging.core.image import Image

    volume = nodes.volumeNodeFromImage(Image(np.zeros((10, 40, 50), np.float32), (1.0, 1.0, 2.0)), "Grid")
    roi = add_roi(volume, (2, 5, 10, 6, 25, 30))
    assert roiVoxelBox(roi, volume) == (2, 5, 10, 6, 25, 30)
    shift = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    matrix = np.eye(4)
    matrix[:3, 3] = (0.0, 0.0, 4.0)  # 2 slices up in RAS (S)
    shift.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(matrix))
    roi.SetAndObserveTransformNodeID(shift.GetID())
    assert roiVoxelBox(roi, volume) == (4, 5, 10, 8, 25, 30)
    volume.SetAndObserveTransformNodeID(shift.GetID())  # both moved alike: the same voxels again
    assert roiVoxelBox(roi, volume) == (2, 5, 10, 6, 25, 30)
    volume.SetAndObserveTransformNodeID(None)
    roi.SetAndObserveTransformNodeID(None)
    # rotated by 90 degrees about S: a 20 x 10 box becomes 10 x 20 around the same centre
    rotated = add_roi(volume, (2, 10, 10, 6, 20, 30), "Rotated")
    rotation = np.eye(4)
    rotation[:3, :3] = [[0, -1, 0], [1, 0, 0], [0, 0, 1]]
    rotation[:3, 3] = rotated.GetCenter()
    rotated.SetAndObserveObjectToNodeMatrix(slicer.util.vtkMatrixFromArray(rotation))
    z0, y0, x0, z1, y1, x1 = roiVoxelBox(rotated, volume)
    assert (z0, z1) == (2, 6) and (y1 - y0, x1 - x0) == (20, 10)
    # clipped to the volume, and refused when it misses it
    big = add_roi(volume, (-5, -5, -5, 50, 50, 80), "Big")
    assert roiVoxelBox(big, volume) == (0, 0, 0, 10, 40, 50)
    outside = add_roi(volume, (2, 5, 60, 6, 25, 70), "Outside")
    with pytest.raises(InputError, match="ROI 'Outside' lies outside volume 'Grid'"):
        roiVoxelBox(outside, volume)
    with pytest.raises(InputError, match="no ROI selected"):
        roiVoxelBox(None, volume)
    unplaced = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "Unplaced")
    with pytest.raises(InputError, match="not placed yet"):
        roiVoxelBox(unplaced, volume)
    # on a single slice the box covers the slice wherever the ROI sits across it
    single = nodes.volumeNodeFromImage(Image(np.zeros((1, 40, 50), np.float32)), "Slice")
    assert roiVoxelBox(add_roi(single, (3, 5, 10, 4, 25, 30), "Above"), single) == (0, 5, 10, 1, 25, 30)


@pytest.mark.parametrize("index", [0, 1])
def test_segment_in_box_adds_a_new_segmentation_with_the_object(headless_slicer, refiners, index):
    checkpoints, tests = refiners
    image, truth, _ = load_case(tests[2], index)
    volume = nodes.volumeNodeFromImage(image, "Slice")
    box = truth_box(truth)
    roi = add_roi(volume, box, "Lesion")
    before = slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")
    logic = LevelSetRefineLogic()
    segment_id = logic.segmentInBox(volume, roi, checkpoints[2], device="cpu")
    segmentation = logic.lastSegmentationNode
    assert slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == before + 1
    assert segmentation.GetName() == "Slice segmentation" and segment_names(segmentation) == ["Lesion"]
    mask = nodes.segmentMask(segmentation, segment_id, volume)
    assert mask.any() and dice(mask, truth) > 0.6, dice(mask, truth)
    zs, ys, xs = np.nonzero(mask)
    z0, y0, x0, z1, y1, x1 = box
    assert y0 <= ys.mean() < y1 and x0 <= xs.mean() < x1  # the object found is the one in the box
    # a second box goes into the same segmentation when it is given
    second = logic.segmentInBox(volume, roi, checkpoints[2], segmentationNode=segmentation, name="Again",
                                device="cpu")
    assert segment_names(segmentation) == ["Lesion", "Again"] and second != segment_id


def test_segment_in_box_errors_add_nothing(headless_slicer, refiners, tmp_path):
    checkpoints, tests = refiners
    image, truth, _ = load_case(tests[3])
    volume = nodes.volumeNodeFromImage(image, "Volume")
    roi = add_roi(volume, truth_box(truth))
    count = slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")
    logic = LevelSetRefineLogic()
    for error, match, args in ((InputError, "no model selected", (volume, roi, "")),
                               (CheckpointError, "checkpoint not found", (volume, roi, tmp_path / "none.pt")),
                               (InputError, "this model is 2D but the image is a 3D volume", (volume, roi, checkpoints[2])),
                               (InputError, "no ROI selected", (volume, None, checkpoints[3])),
                               (InputError, "no input volume", (None, roi, checkpoints[3]))):
        with pytest.raises(error, match=match):
            logic.segmentInBox(*args, device="cpu")
    assert slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == count
    segment_id = logic.segmentInBox(volume, roi, checkpoints[3], device="cpu")  # 3D ROI mode works
    assert nodes.segmentMask(logic.lastSegmentationNode, segment_id, volume).any()


# -- training from the scene -----------------------------------------------------------------------
@pytest.fixture
def scene_pairs(headless_slicer, refiners):
    """Two single-slice cases: one with truth + coarse segments, one with the truth only."""
    _, tests = refiners
    pairs, truths = [], []
    for index in range(2):
        image, truth, coarse = load_case(tests[2], index)
        volume = nodes.volumeNodeFromImage(image, f"Slice {index}")
        segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"Truth {index}")
        segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
        nodes.writeMaskToSegment(truth, segmentation, volume, name="object")
        if index == 0:
            nodes.writeMaskToSegment(coarse, segmentation, volume, name="rough")
        pairs.append(segmentation)
        truths.append(truth)
    return pairsFromSegmentations(pairs), truths


def test_export_writes_the_folder_layout(scene_pairs, tmp_path):
    pairs, truths = scene_pairs
    assert [len(pair) for pair in pairs] == [4, 3]
    assert describePairs([pairs[0][1], pairs[1][1]]) == (
        "Truth 0 \u2190 Slice 0 (truth 'object', coarse 'rough')\n"
        "Truth 1 \u2190 Slice 1 (truth 'object', coarse drawn at random)")
    nodes_before = slicer.mrmlScene.GetNumberOfNodes()
    data = exportTrainingData(pairs, tmp_path / "data", dim=2)
    assert slicer.mrmlScene.GetNumberOfNodes() == nodes_before, "temporary nodes must be removed"
    assert data.names == ["case000", "case001"]
    assert sorted(p.name for p in (data.folder / "coarse").iterdir()) == ["case000.nrrd"]
    written = read_image(data.folder / "masks" / "case001.nrrd")
    np.testing.assert_array_equal(written.array > 0, truths[1])
    np.testing.assert_allclose(written.ijk_to_lps(), nodes.imageFromVolumeNode(pairs[1][0]).ijk_to_lps(), atol=1e-6)
    with open(data.folder / "sources.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["name"], r["truth"], r["coarse"]) for r in rows] == [("case000", "object", "rough"),
                                                                  ("case001", "object", "")]
    assert checkDataFolder(data.folder) == data.folder
    with pytest.raises(InputError, match="already holds files"):
        exportTrainingData(pairs, tmp_path / "data")
    with pytest.raises(InputError, match="'Slice 0' is a single slice: train a 2D refiner"):
        exportTrainingData(pairs, tmp_path / "three", dim=3)
    assert not (tmp_path / "three").exists()


def test_export_splits_a_stack_into_slices_for_a_2d_refiner(headless_slicer, tmp_path):
    from deepimaging.core.image import Image

    rng = np.random.default_rng(0)
    truth = np.zeros((3, 32, 32), bool)
    truth[0, 8:20, 8:20] = truth[2, 10:24, 6:18] = True
    image = Image((truth * 100.0 + rng.normal(0, 10, truth.shape)).astype(np.float32), (0.5, 0.5, 3.0),
                  (1.0, 2.0, 3.0))
    volume = nodes.volumeNodeFromImage(image, "Stack")
    segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Stack truth")
    segment_id = nodes.writeMaskToSegment(truth, segmentation, volume, name="object")
    data = exportTrainingData([(volume, segmentation, segment_id)], tmp_path / "data", dim=2)
    assert data.names == ["case000_s000", "case000_s002"] and data.skippedSlices == [("Stack", 1)]
    second = read_image(data.folder / "images" / "case000_s002.nrrd")
    np.testing.assert_array_equal(second.array, image.array[2:3])
    np.testing.assert_allclose(second.origin, (1.0, 2.0, 3.0 + 2 * 3.0), atol=1e-6)
    assert exportTrainingData([(volume, segmentation, segment_id)], tmp_path / "3d", dim=3).names == ["case000"]


def test_training_command_and_progress_lines(tmp_path):
    command = trainingCommand(tmp_path / "data", tmp_path / "out", "3D", 5, "cpu", ["--grid", "16"])
    assert command[:4] == [sys.executable, "-m", "deepimaging", "-v"]
    assert command[4:] == ["levelset", "train", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "out"),
                           "--dim", "3", "--epochs", "5", "--device", "cpu", "--grid", "16"]
    assert "--device" not in trainingCommand(tmp_path, tmp_path, 2, 1, None)
    with pytest.raises(InputError, match="2D or 3D"):
        trainingCommand(tmp_path, tmp_path, 4, 1)
    with pytest.raises(InputError, match="at least 1"):
        trainingCommand(tmp_path, tmp_path, 2, 0)
    status = TrainingStatus()
    assert status.text() == "Starting the training process"
    assert parseTrainingLine("PROGRESS 0.2500 training the learned refiner: epoch 1/4 loss 0.3 ETA 0:12", status)
    assert status.fraction == 0.25 and status.text().endswith("epoch 1/4 loss 0.3 ETA 0:12")
    parseTrainingLine("deepimaging: error: no images found", status)
    assert status.error == "no images found"
    parseTrainingLine("wrote /runs/a/best.pt", status)
    status.stage = "done"
    assert status.text() == "wrote /runs/a/best.pt"


def _child(code):
    return [sys.executable, "-c", code]


def test_training_job_cancel_kills_the_child_and_removes_the_export(tmp_path):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    slow = TrainingJob(_child("import time; print('PROGRESS 0.1000 epoch 1/9', flush=True); "
                              "print('started', flush=True); time.sleep(60)"), tmp_path / "slow",
                       cleanupFolder=scratch).start()
    deadline = time.time() + 30
    while slow.running and "started" not in slow.output and time.time() < deadline:
        slow.poll()
        time.sleep(0.02)
    assert slow.status.fraction == pytest.approx(0.1) and slow.status.text() == "epoch 1/9"
    slow.cancel()
    slow.wait(timeout=20)
    assert slow.state == process.ProcessState.CANCELLED and slow.status.text() == "Cancelled"
    assert not scratch.exists() and slow.bestCheckpoint is None


def test_train_from_scene_pairs_with_the_real_cli_then_refine(scene_pairs, tmp_path):
    """Scene pairs -> export -> ``deepimaging levelset train`` child (1 tiny epoch) -> best.pt -> learned refine."""
    pairs, _ = scene_pairs
    logic = LevelSetRefineLogic()
    job = logic.startTraining(tmp_path / "model", pairs=pairs, dim=2, epochs=1, device="cpu",
                              extraArguments=["--grid", "32"] + TINY_CLI)
    assert job.env["CUDA_VISIBLE_DEVICES"] == "-1" and job.env["DEEPIMAGING_PROGRESS"] == "lines"
    exported = job.cleanupFolder
    assert exported is not None and (exported / "data" / "coarse" / "case000.nrrd").is_file()
    log = job.wait(timeout=180)
    assert job.state == process.ProcessState.SUCCEEDED, job.errorMessage() + "\n" + "\n".join(log)
    assert job.status.fraction == 1.0 and job.bestCheckpoint == tmp_path / "model" / "best.pt"
    assert any(process.parseProgressLine(line) for line in job.output), "the child reports PROGRESS lines"
    assert job.status.text().startswith("wrote ") and job.status.text().endswith("best.pt")
    assert not exported.exists(), "the exported temporary folder is removed when the job ends"
    volume, segmentation = pairs[0][:2]
    new_id = logic.refine(volume, segmentation, pairs[0][2], method="learned", checkpoint=job.bestCheckpoint,
                          device="cpu")
    assert nodes.segmentMask(segmentation, new_id, volume).shape == (1, 96, 96)


def test_start_training_bad_input(scene_pairs, tmp_path, monkeypatch):
    import LevelSetRefineLib.export

    pairs, _ = scene_pairs
    scratch = tmp_path / "scratch"
    monkeypatch.setattr(LevelSetRefineLib.export, "temporaryFolder", lambda: scratch.mkdir() or scratch)
    logic = LevelSetRefineLogic()
    with pytest.raises(InputError, match="not both"):
        logic.startTraining(tmp_path / "out", dataFolder=tmp_path, pairs=pairs)
    with pytest.raises(InputError, match="no output folder"):
        logic.startTraining("", pairs=pairs)
    with pytest.raises(InputError, match="training data folder not found"):
        logic.startTraining(tmp_path / "out", dataFolder=tmp_path / "nowhere")
    with pytest.raises(InputError, match="has no masks/ folder"):
        (tmp_path / "images-only" / "images").mkdir(parents=True)
        logic.startTraining(tmp_path / "out", dataFolder=tmp_path / "images-only")
    with pytest.raises(InputError, match="unknown device 'tpu'"):
        logic.startTraining(tmp_path / "out", pairs=pairs, device="tpu")
    with pytest.raises(InputError, match="single slice"):
        logic.startTraining(tmp_path / "out", pairs=pairs, dim=3)
    assert not scratch.exists(), "a failed start leaves no exported folder behind"
    pairs[1][1].GetSegmentation().AddEmptySegment("", "second")
    pairs[1][1].GetSegmentation().AddEmptySegment("", "third")
    with pytest.raises(InputError, match="'Truth 1' has 3 segments"):
        pairsFromSegmentations([pairs[1][1]])
    assert not (tmp_path / "out").exists()


def test_training_from_a_folder_reports_cli_errors(headless_slicer, tmp_path):
    from deepimaging.levelset.deep import write_synthetic_refine_dataset

    data = write_synthetic_refine_dataset(tmp_path / "data", n=2, dim=2, seed=0)
    next((data / "masks").iterdir()).unlink()
    job = LevelSetRefineLogic().startTraining(tmp_path / "model", dataFolder=data, dim=2, epochs=1, device="cpu",
                                              extraArguments=["--grid", "32"] + TINY_CLI)
    job.wait(timeout=120)
    assert job.state == process.ProcessState.FAILED
    assert "have no mask in" in job.errorMessage() and job.bestCheckpoint is None


def test_module_lib_imports_without_torch(run_without_torch):
    code = ("import sys\n"
            "import LevelSetRefineLib\n"
            "from LevelSetRefineLib import training, export, learned\n"
            "assert learned.requireMethod('') == 'classic'\n"
            "assert 'torch' not in sys.modules\n"
            "print('ok')\n")
    result = run_without_torch("LevelSetRefine", code)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_learned_path_needs_only_what_slicer_ships_plus_torch(run_without_torch, refiners):
    """The learned refiner imports only numpy, scipy, SimpleITK and torch, as LevelSetRefine's
    empty on-demand list (DeepImagingCommonLib.dependencies.MODULE_REQUIREMENTS) promises."""
    checkpoints, tests = refiners
    code = ("import sys\n"
            "BLOCKED = ('skimage', 'monai', 'slicerio', 'tqdm', 'matplotlib', 'sklearn', 'pandas', 'psutil', 'numba')\n"
            "class Block:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] in BLOCKED:\n"
            "            raise ModuleNotFoundError(f'No module named {name!r} (not shipped with Slicer)')\n"
            "sys.meta_path.insert(0, Block())\n"
            "from pathlib import Path\n"
            "from deepimaging.core.imageio import read_image\n"
            "from LevelSetRefineLib import refineImageMask\n"
            f"folder = Path({str(tests[2])!r})\n"
            "name = sorted((folder / 'images').iterdir())[0].name\n"
            "image = read_image(folder / 'images' / name)\n"
            "coarse = read_image(folder / 'coarse' / name).array > 0\n"
            f"result = refineImageMask(image, coarse, method='learned', checkpoint={str(checkpoints[2])!r}, "
            "device='cpu')\n"
            "assert result.mask.any()\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('scipy', 'SimpleITK'))[:1])\n")
    result = run_without_torch("LevelSetRefine", code, block_torch=False)
    assert result.returncode == 0, result.stderr


def test_module_self_test_checks_run_headless(headless_slicer):
    """LevelSetRefineTest (run in Slicer's Self Tests) calls these checks; they must pass here too."""
    import unittest

    from LevelSetRefineLib import selftest

    class SelfTest(unittest.TestCase):
        def runTest(self):
            pass

        def delayDisplay(self, message):
            pass

    test = SelfTest()
    for check in (selftest.checkImprovesDice, selftest.checkBadInput, selftest.checkLearnedAndBox):
        slicer.mrmlScene.Clear()
        check(test, LevelSetRefineLogic)
