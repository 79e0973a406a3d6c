"""NIRSTRecon Logic on real MRML nodes: phantom, 2D and 3D MRI, HbT contrast, bad input, training."""

import os
import time
from pathlib import Path

import numpy as np
import pytest

import slicer
import vtk
from DeepImagingCommonLib import nodes
from DeepImagingCommonLib.process import parseProgressLine
from deepimaging.core.errors import CheckpointError, InputError
from deepimaging.core.image import Image
from NIRSTReconLib import OUTPUT_MAPS, NIRSTReconLogic, sliceImage, trainingProgress

REPO = Path(__file__).resolve().parents[2]
MAP_NAMES = ["HbO (uM)", "Hb (uM)", "Water (%)", "HbT (uM)", "StO2 (%)"]
# A Z-Net small enough to build and run in well under a second on a CPU.
TINY_NET = {"signal_stem": 16, "signal_widths": [32, 16, 8, 8, 8], "mri_widths": [4, 4, 8, 8, 16],
            "decoder_widths": [16, 8, 8, 8, 8]}


def save_tiny_checkpoint(path, dataset, wavelengths=None, method=None):
    """A randomly initialised tiny Z-Net with the header and normaliser ``load_reconstructor`` reads.

    The last layer is scaled down and biased to 1 so the maps are near the training means
    (positive), which the contrast needs; the network is otherwise untrained.
    """
    import torch
    from deepimaging.core.checkpoint import make_header, save_checkpoint
    from deepimaging.nirst.data import Normalisation
    from deepimaging.nirst.optics import WAVELENGTHS_NM
    from deepimaging.nirst.train import METHODS, build_network

    torch.manual_seed(0)
    model = build_network("znet", 16, 9, TINY_NET)
    with torch.no_grad():
        model.head[-1].weight.mul_(0.05)
        model.head[-1].bias.fill_(1.0)
    normalisation = Normalisation.fit(dataset, np.arange(len(dataset["measurements"])))
    config = {"arch": "znet", "net_config": TINY_NET, "n_optodes": 16, "n_wavelengths": 9,
              "wavelengths_nm": list(wavelengths or WAVELENGTHS_NM), "grid_size": 100, "diameter_mm": 82.0}
    header = make_header(method or METHODS["znet"], config)
    return save_checkpoint(path, model.state_dict(), header, normalisation.tensors())


@pytest.fixture(scope="module")
def tiny_dataset():
    from deepimaging.nirst import simulate_phantoms

    return simulate_phantoms(4, seed=7, workers=1)


@pytest.fixture(scope="module")
def tiny_checkpoint(tiny_dataset, tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("nirst") / "tiny_znet.pt", tiny_dataset)


@pytest.fixture
def phantom(headless_slicer, tmp_path):
    return NIRSTReconLogic().simulatePhantom(seed=3, loadTruth=True, directory=tmp_path)


def volume_count():
    return slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")


def test_output_colour_maps_are_default_colour_nodes(headless_slicer):
    for _, _, color_id in OUTPUT_MAPS:
        assert slicer.mrmlScene.GetNodeByID(color_id) is not None, color_id


def test_simulated_phantom_gives_mri_measurement_file_truth_and_inclusion(phantom, tmp_path):
    from deepimaging.nirst.recon import read_measurements

    assert phantom.measurementFile.parent == tmp_path and phantom.measurementFile.suffix == ".csv"
    np.testing.assert_array_equal(read_measurements(phantom.measurementFile), phantom.measurements)
    assert phantom.measurements.shape == (2160,) and np.all(phantom.measurements > 0)
    assert phantom.mriVolume.GetName() == "NIRST phantom MRI"
    assert slicer.util.arrayFromVolume(phantom.mriVolume).shape == (1, 100, 100)
    assert [phantom.truthVolumes[key].GetName() for key, _, _ in OUTPUT_MAPS] == ["True " + n for n in MAP_NAMES]
    segment = phantom.segmentationNode.GetSegmentation().GetSegment(phantom.segmentId)
    assert segment.GetName() == "Inclusion"
    assert nodes.segmentMask(phantom.segmentationNode, phantom.segmentId, phantom.mriVolume).sum() > 50

    before = volume_count()
    NIRSTReconLogic().simulatePhantom(seed=4, loadTruth=False, directory=tmp_path)
    assert volume_count() == before + 1  # only the MRI


def assert_maps(result, reference_image):
    assert list(result.volumes) == [key for key, _, _ in OUTPUT_MAPS]
    assert [result.volumes[key].GetName() for key, _, _ in OUTPUT_MAPS] == MAP_NAMES
    for key, _, color_id in OUTPUT_MAPS:
        node = result.volumes[key]
        image = nodes.imageFromVolumeNode(node)
        assert image.shape == reference_image.shape
        reference_image.require_same_grid(image, what=f"{key} map", of="MRI")
        assert np.all(np.isfinite(image.array))
        display = node.GetDisplayNode()
        assert display.GetColorNodeID() == color_id
        assert display.GetAutoWindowLevel() == 0
        assert display.GetWindowLevelMin() == pytest.approx(float(image.array.min()), abs=1e-4)
        assert display.GetWindowLevelMax() == pytest.approx(
            max(float(image.array.max()), float(image.array.min()) + 1.0), abs=1e-4)
    arrays = {key: slicer.util.arrayFromVolume(node) for key, node in result.volumes.items()}
    np.testing.assert_allclose(arrays["HbT"], arrays["HbO"] + arrays["Hb"], rtol=1e-5, atol=1e-5)


def test_reconstruct_2d_phantom_adds_five_maps_on_the_mri_geometry(phantom, tiny_checkpoint):
    from deepimaging.nirst.recon import hbt_contrast

    logic = NIRSTReconLogic()
    before = volume_count()
    result = logic.reconstruct(phantom.measurementFile, phantom.mriVolume, checkpoint=tiny_checkpoint,
                               device="cpu", segmentationNode=phantom.segmentationNode, segmentId=phantom.segmentId)
    assert volume_count() == before + 5 and result.sliceIndex == 0 and logic.lastResult is result
    assert_maps(result, nodes.imageFromVolumeNode(phantom.mriVolume))
    hbt = slicer.util.arrayFromVolume(result.volumes["HbT"])[0]
    assert hbt.max() > 0
    mask = nodes.segmentMask(phantom.segmentationNode, phantom.segmentId, phantom.mriVolume)[0]
    assert result.hbtContrast == pytest.approx(hbt_contrast(hbt, mask))
    assert logic.hbtContrast(result.volumes["HbT"], phantom.segmentationNode, phantom.segmentId) == \
        pytest.approx(result.hbtContrast)

    # An array works as well as the file, and nothing is overwritten: names become unique.
    hbo_before = slicer.util.arrayFromVolume(result.volumes["HbO"]).copy()
    again = logic.reconstruct(phantom.measurements, phantom.mriVolume, checkpoint=tiny_checkpoint, device="cpu")
    assert again.hbtContrast is None
    assert again.volumes["HbO"].GetName() == "HbO (uM)_1" and result.volumes["HbO"].GetName() == "HbO (uM)"
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(result.volumes["HbO"]), hbo_before)
    np.testing.assert_allclose(slicer.util.arrayFromVolume(again.volumes["HbO"]), hbo_before, rtol=1e-5, atol=1e-5)


def test_empty_checkpoint_means_the_shipped_znet(phantom, tiny_checkpoint, tmp_path, monkeypatch):
    from deepimaging.nirst import recon

    monkeypatch.setattr(recon, "DEFAULT_CHECKPOINT", tmp_path / "not_installed.pt")
    before = volume_count()
    with pytest.raises(CheckpointError, match="shipped Z-Net checkpoint is not installed"):
        NIRSTReconLogic().reconstruct(phantom.measurementFile, phantom.mriVolume, checkpoint="")
    assert volume_count() == before
    monkeypatch.setattr(recon, "DEFAULT_CHECKPOINT", Path(tiny_checkpoint))
    for empty in (None, "", Path("")):
        result = NIRSTReconLogic().reconstruct(phantom.measurementFile, phantom.mriVolume, checkpoint=empty)
        assert len(result.volumes) == 5


def test_reconstructor_is_reused_until_the_checkpoint_changes(tiny_checkpoint, tiny_dataset, tmp_path):
    logic = NIRSTReconLogic()
    checkpoint = save_tiny_checkpoint(tmp_path / "mine.pt", tiny_dataset)
    first = logic.reconstructor(checkpoint, "cpu")
    assert logic.reconstructor(str(checkpoint), "cpu") is first
    assert logic.reconstructor(tiny_checkpoint, "cpu") is not first
    stat = checkpoint.stat()
    os.utime(checkpoint, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert logic.reconstructor(checkpoint, "cpu") is not first


def make_3d_mri(phantom, direction, slice_index=3, slices=5):
    """The phantom MRI as slice ``slice_index`` of an oblique 3D volume; other slices differ."""
    plane = slicer.util.arrayFromVolume(phantom.mriVolume)[0]
    rng = np.random.default_rng(0)
    stack = np.stack([plane if k == slice_index else np.flip(plane, axis=k % 2) * 0.7 + rng.normal(0, 2, plane.shape)
                      for k in range(slices)]).astype(np.float32)
    image = Image(stack, (0.82, 0.82, 3.0), (12.0, -40.0, 7.0), direction)
    return nodes.volumeNodeFromImage(image, "MRI 3D"), image


def test_3d_mri_uses_the_chosen_slice_and_keeps_its_geometry(phantom, tiny_checkpoint, oblique):
    volume, image = make_3d_mri(phantom, oblique, slice_index=3)
    logic = NIRSTReconLogic()
    result = logic.reconstruct(phantom.measurements, volume, sliceIndex=3, checkpoint=tiny_checkpoint, device="cpu")
    assert result.sliceIndex == 3
    expected, _ = sliceImage(image, 3)
    assert_maps(result, expected)
    # Voxel (i, j, 0) of a map is voxel (i, j, 3) of the MRI in RAS.
    map_ijk_to_ras = nodes.ijkToRASArray(result.volumes["HbT"])
    mri_ijk_to_ras = nodes.ijkToRASArray(volume)
    for i, j in ((0, 0), (99, 0), (17, 63)):
        np.testing.assert_allclose(map_ijk_to_ras @ [i, j, 0, 1], mri_ijk_to_ras @ [i, j, 3, 1], atol=1e-4)
    # Same values as reconstructing that slice on its own (as a 2D volume).
    single = nodes.volumeNodeFromImage(expected, "MRI slice 3")
    alone = logic.reconstruct(phantom.measurements, single, checkpoint=tiny_checkpoint, device="cpu")
    for key in result.volumes:
        np.testing.assert_allclose(slicer.util.arrayFromVolume(result.volumes[key]),
                                   slicer.util.arrayFromVolume(alone.volumes[key]), rtol=1e-5, atol=1e-5)
    middle = logic.reconstruct(phantom.measurements, volume, checkpoint=tiny_checkpoint, device="cpu")
    assert middle.sliceIndex == 2


def test_slice_image_offsets_the_origin_along_the_slice_axis(oblique):
    image = Image(np.arange(4 * 6 * 5, dtype=np.float32).reshape(4, 6, 5), (0.5, 0.7, 2.5), (3.0, -2.0, 1.0), oblique)
    plane, index = sliceImage(image, 2)
    assert index == 2 and plane.shape == (1, 6, 5)
    np.testing.assert_array_equal(plane.array[0], image.array[2])
    np.testing.assert_allclose(plane.ijk_to_lps() @ [4, 5, 0, 1], image.ijk_to_lps() @ [4, 5, 2, 1])
    assert sliceImage(image)[1] == 2
    with pytest.raises(InputError, match="slices 0 to 3"):
        sliceImage(image, 4)
    flat = Image(np.ones((1, 6, 5)), (1, 1, 1))
    assert sliceImage(flat)[0] is flat and sliceImage(flat, 0)[1] == 0
    with pytest.raises(InputError, match="single slice"):
        sliceImage(flat, 1)


def test_hbt_contrast_inside_the_inclusion_segment(phantom, tiny_checkpoint, oblique):
    from deepimaging.nirst.recon import hbt_contrast, simulate_example

    logic = NIRSTReconLogic()
    truth_hbt = phantom.truthVolumes["HbT"]
    contrast = logic.hbtContrast(truth_hbt, phantom.segmentationNode, phantom.segmentId)
    _, _, truth = simulate_example(seed=3)
    assert contrast == pytest.approx(hbt_contrast(truth["HbT"], truth["inclusion_mask"]), rel=1e-5)
    assert contrast > 1.2  # inclusions hold 1.25-2.5x the background HbO and Hb

    segmentation = phantom.segmentationNode.GetSegmentation()
    empty_id = segmentation.AddEmptySegment("", "Empty")
    with pytest.raises(InputError, match="'Empty' does not cover any pixel"):
        logic.hbtContrast(truth_hbt, phantom.segmentationNode, empty_id)
    with pytest.raises(InputError, match="no segment with ID 'Nope'"):
        logic.hbtContrast(truth_hbt, phantom.segmentationNode, "Nope")
    volume, _ = make_3d_mri(phantom, oblique)
    with pytest.raises(InputError, match="5 slices"):
        logic.hbtContrast(volume, phantom.segmentationNode, phantom.segmentId)

    # A segment drawn on slice 3 of a 3D MRI gives a contrast for slice 3 only.
    mask = np.zeros((5, 100, 100), bool)
    mask[3] = nodes.segmentMask(phantom.segmentationNode, phantom.segmentId, phantom.mriVolume)[0]
    segmentation_3d = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "3D segments")
    segment_3d = nodes.writeMaskToSegment(mask, segmentation_3d, volume, name="Lesion")
    result = logic.reconstruct(phantom.measurements, volume, sliceIndex=3, checkpoint=tiny_checkpoint,
                               segmentationNode=segmentation_3d, segmentId=segment_3d)
    assert np.isfinite(result.hbtContrast) and result.hbtContrast > 0
    before = volume_count()
    with pytest.raises(InputError, match="'Lesion' does not cover any pixel of slice 1"):
        logic.reconstruct(phantom.measurements, volume, sliceIndex=1, checkpoint=tiny_checkpoint,
                          segmentationNode=segmentation_3d, segmentId=segment_3d)
    assert volume_count() == before


def test_bad_input_gives_clear_errors_and_no_new_nodes(phantom, tiny_checkpoint, tiny_dataset, tmp_path, oblique):
    logic = NIRSTReconLogic()
    good, mri = phantom.measurements, phantom.mriVolume

    def fails(error, match, measurements=good, volume=mri, **kwargs):
        kwargs.setdefault("checkpoint", tiny_checkpoint)
        before = volume_count()
        with pytest.raises(error, match=match):
            logic.reconstruct(measurements, volume, **kwargs)
        assert volume_count() == before

    fails(InputError, "expected 2160 measurements .*got 2000", good[:2000])
    short_file = tmp_path / "short.csv"
    np.savetxt(short_file, good[:2000])
    fails(InputError, "expected 2160 measurements .*got 2000", short_file)
    negative = good.copy()
    negative[[7, 99]] = [0.0, -1.0]
    fails(InputError, "2 amplitude\\(s\\) are zero or negative \\(first at index 7\\)", negative)
    with_nan = good.copy()
    with_nan[3] = np.nan
    fails(InputError, "NaN or infinite", with_nan)
    fails(InputError, "measurement file not found", tmp_path / "missing.csv")
    fails(InputError, "no measurement file selected", "")
    unknown_format = tmp_path / "data.xyz"
    unknown_format.write_text("1")
    fails(InputError, "cannot read measurements from data.xyz", unknown_format)

    vector = slicer.util.addVolumeFromArray(np.ones((1, 100, 100, 3), np.float32), nodes.ijkToRASArray(mri),
                                            "RGB MRI", "vtkMRMLVectorVolumeNode")
    fails(InputError, "3 components per voxel", volume=vector)
    fails(InputError, "no input volume selected", volume=None)
    line = nodes.volumeNodeFromImage(Image(np.ones((6, 1, 100), np.float32), (0.82, 0.82, 0.82)), "Line MRI")
    fails(InputError, "too small", volume=line, sliceIndex=2)
    small_fov = nodes.volumeNodeFromImage(Image(np.ones((1, 100, 100), np.float32), (0.2, 0.2, 1.0)), "Small MRI")
    fails(InputError, "82 mm imaging disk does not fit", volume=small_fov)
    volume_3d, _ = make_3d_mri(phantom, oblique)
    fails(InputError, "slice index 7 is outside the MRI volume, which has slices 0 to 4", volume=volume_3d, sliceIndex=7)
    fails(InputError, "single slice", sliceIndex=1)

    fails(CheckpointError, "checkpoint not found", checkpoint=tmp_path / "missing.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    fails(CheckpointError, "truncated, corrupt or not a deepimaging checkpoint", checkpoint=garbage)
    other_wavelengths = save_tiny_checkpoint(tmp_path / "wl.pt", tiny_dataset,
                                             wavelengths=[660, 735, 785, 808, 826, 852, 903, 912, 948])
    fails(CheckpointError, "trained at wavelengths \\[660, ", checkpoint=other_wavelengths)
    other_method = save_tiny_checkpoint(tmp_path / "method.pt", tiny_dataset, method="levelset-deep")
    fails(CheckpointError, "'levelset-deep' checkpoint; NIRST reconstruction needs", checkpoint=other_method)
    fails(InputError, "unknown device 'tpu'", device="tpu")
    fails(InputError, "'znet-paper' is the shipped one", method="znet-paper")
    fails(InputError, "no segment of .* selected", segmentationNode=phantom.segmentationNode, segmentId="")


def test_training_command_and_progress_lines(tmp_path):
    command = NIRSTReconLogic.trainingCommand(tmp_path, tmp_path / "out", epochs=3, device="cpu", architecture="ynet")
    assert command[1:] == ["-m", "deepimaging", "-v", "nirst", "train", "--data", str(tmp_path), "--arch", "ynet",
                           "--epochs", "3", "--out", str(tmp_path / "out"), "--device", "cpu"]
    assert "--device" not in NIRSTReconLogic.trainingCommand(tmp_path, tmp_path / "out", device="auto")
    with pytest.raises(InputError, match="training data folder not found"):
        NIRSTReconLogic.trainingCommand(tmp_path / "none", tmp_path)
    with pytest.raises(InputError, match="no output folder"):
        NIRSTReconLogic.trainingCommand(tmp_path, "")
    with pytest.raises(InputError, match="unknown architecture 'unet'"):
        NIRSTReconLogic.trainingCommand(tmp_path, tmp_path, architecture="unet")
    with pytest.raises(InputError, match="at least 1"):
        NIRSTReconLogic.trainingCommand(tmp_path, tmp_path, epochs=0)
    assert trainingProgress("PROGRESS 0.2500 epoch 5/20") == (0.25, "epoch 5/20")
    assert trainingProgress("epoch 3/12  train 0.1 val 0.2") == (0.25, "epoch 3/12  train 0.1 val 0.2")
    assert trainingProgress("train:  42%|####      | 420/1000 [00:02<00:03]") == (0.42, "train")
    assert trainingProgress("loading data") is None
    assert NIRSTReconLogic.trainedCheckpoint(tmp_path) is None


def write_training_data(dataset, folder):
    from deepimaging.nirst import save_dataset

    save_dataset(Path(folder) / "shard_0.npz", dataset)
    return Path(folder)


def test_training_runs_in_a_background_process(tiny_dataset, tmp_path, headless_slicer, phantom):
    data = write_training_data(tiny_dataset, tmp_path / "data")
    process = NIRSTReconLogic().startTraining(data, tmp_path / "out", epochs=1, device="cpu")
    lines = process.wait(timeout=300)
    assert process.state.value == "succeeded", "\n".join(lines)
    # PROGRESS lines, not tqdm bars: the child runs with DEEPIMAGING_PROGRESS=lines (tqdm is
    # not in Slicer's Python).
    assert any(parseProgressLine(line) is not None for line in lines), "\n".join(lines)
    checkpoint = NIRSTReconLogic.trainedCheckpoint(tmp_path / "out")
    assert checkpoint == tmp_path / "out" / "best.pt"
    result = NIRSTReconLogic().reconstruct(phantom.measurements, phantom.mriVolume, checkpoint=checkpoint, device="cpu")
    assert len(result.volumes) == 5


def test_cancel_kills_the_training_process(tiny_dataset, tmp_path):
    data = write_training_data(tiny_dataset, tmp_path / "data")
    process = NIRSTReconLogic().startTraining(data, tmp_path / "out", epochs=500, device="cpu")
    lines, deadline = [], time.monotonic() + 120
    while not lines and process.running and time.monotonic() < deadline:  # wait until it has started work
        lines += process.poll()
        time.sleep(0.1)
    assert process.running, "\n".join(lines)
    pid = process.pid
    process.cancel()
    process.wait(timeout=30)
    assert process.state.value == "cancelled"
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_module_lib_imports_without_torch(run_without_torch):
    """The module must load in Slicer before torch is installed (torch comes on first Apply)."""
    code = ("import sys\n"
            "import NIRSTReconLib\n"
            "from NIRSTReconLib import NIRSTReconLogic, sliceImage, trainingProgress\n"
            "NIRSTReconLogic()\n"
            "assert 'torch' not in sys.modules and 'deepimaging.nirst' not in sys.modules\n")
    result = run_without_torch("NIRSTRecon", code)
    assert result.returncode == 0, result.stderr


def test_maps_follow_the_mri_parent_transform(phantom, tiny_checkpoint):
    """A transformed MRI: the maps share its transform, so they overlay it where it is shown."""
    transform = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    matrix = vtk.vtkMatrix4x4()
    matrix.SetElement(0, 3, 12.5)
    transform.SetMatrixTransformToParent(matrix)
    phantom.mriVolume.SetAndObserveTransformNodeID(transform.GetID())
    result = NIRSTReconLogic().reconstruct(phantom.measurementFile, phantom.mriVolume, checkpoint=tiny_checkpoint,
                                           device="cpu")
    assert {v.GetTransformNodeID() for v in result.volumes.values()} == {transform.GetID()}


DRI_FAST = {"method": "dri", "driElementSize": 5.0, "driIterations": 2}


def test_dri_reports_progress_and_can_be_cancelled(phantom):
    from deepimaging.core.progress import CancelToken, Cancelled

    logic = NIRSTReconLogic()
    seen = []
    before = volume_count()
    result = logic.reconstruct(phantom.measurementFile, phantom.mriVolume, progress=lambda f, m: seen.append((f, m)),
                               segmentationNode=phantom.segmentationNode, segmentId=phantom.segmentId, **DRI_FAST)
    assert volume_count() == before + 5 and result.method == "dri"
    assert_maps(result, nodes.imageFromVolumeNode(phantom.mriVolume))
    assert any("DRI iteration" in message for _, message in seen) and seen[-1][0] == 1.0
    assert [f for f, _ in seen] == sorted(f for f, _ in seen)
    assert result.hbtContrast > 1.1  # DRI is model-based: no network needed to see the inclusion
    token = CancelToken()

    def cancel_at_first_iteration(fraction, message):
        if "DRI iteration" in message:
            token.cancel()

    with pytest.raises(Cancelled):
        logic.reconstruct(phantom.measurements, phantom.mriVolume, progress=cancel_at_first_iteration, cancel=token,
                          **DRI_FAST)
    assert volume_count() == before + 5


def test_calibration_with_a_reference_file(phantom, tiny_checkpoint, tmp_path):
    from deepimaging.nirst.calibration import homogeneous_amplitudes
    from deepimaging.nirst.recon import write_measurements

    logic = NIRSTReconLogic()
    plain = logic.reconstruct(phantom.measurements, phantom.mriVolume, checkpoint=tiny_checkpoint, device="cpu")
    before = volume_count()
    with pytest.raises(InputError, match="not on the model's absolute scale.*Calibration > Reference"):
        logic.reconstruct(phantom.measurements * 1000, phantom.mriVolume, checkpoint=tiny_checkpoint)
    assert volume_count() == before
    reference = write_measurements(tmp_path / "reference.csv", homogeneous_amplitudes() * 1000)
    with pytest.raises(InputError, match="needs the reference measurement file"):
        logic.calibration("reference", "")
    calibration = logic.calibration("reference", str(reference), (14.0, 7.0, 40.0))
    result = logic.reconstruct(phantom.measurements * 1000, phantom.mriVolume, checkpoint=tiny_checkpoint,
                               device="cpu", calibration=calibration)
    assert any("reference phantom" in note for note in result.notes)
    for key in ("HbO", "water"):
        np.testing.assert_allclose(slicer.util.arrayFromVolume(result.volumes[key]),
                                   slicer.util.arrayFromVolume(plain.volumes[key]), rtol=1e-4, atol=1e-4)
    background = logic.calibration("background", medium=(14.0, 7.0, 40.0), perOptodeCoupling=True)
    dri = logic.reconstruct(phantom.measurements * 1000, phantom.mriVolume, calibration=background, **DRI_FAST)
    assert any("per-optode" in note for note in dri.notes) and dri.hbtContrast is None
    assert logic.calibration("none") is None
    with pytest.raises(InputError, match="unknown calibration"):
        logic.calibration("magic")


def test_flipped_mri_node_gives_the_same_maps(phantom, tiny_checkpoint):
    """The same MRI stored with a flipped i axis (direction and origin adjusted): same physical maps."""
    logic = NIRSTReconLogic()
    image = nodes.imageFromVolumeNode(phantom.mriVolume)
    direction = image.direction.copy()
    direction[:, 0] *= -1
    origin = np.asarray(image.origin) + image.direction[:, 0] * image.spacing[0] * (image.shape[2] - 1)
    flipped = nodes.volumeNodeFromImage(Image(image.array[:, :, ::-1].copy(), image.spacing, tuple(origin), direction),
                                        "Flipped MRI")
    plain = logic.reconstruct(phantom.measurements, phantom.mriVolume, checkpoint=tiny_checkpoint, device="cpu")
    other = logic.reconstruct(phantom.measurements, flipped, checkpoint=tiny_checkpoint, device="cpu",
                              segmentationNode=phantom.segmentationNode, segmentId=phantom.segmentId)
    for key in ("HbT", "water"):
        np.testing.assert_allclose(slicer.util.arrayFromVolume(other.volumes[key])[:, :, ::-1],
                                   slicer.util.arrayFromVolume(plain.volumes[key]), rtol=1e-4, atol=1e-4)
    # A disk centre in RAS and an optode ring that Z-Net cannot take.
    ras = nodes.ijkToRASArray(phantom.mriVolume) @ [49.5, 49.5, 0, 1]
    centred = logic.reconstruct(phantom.measurements, phantom.mriVolume, checkpoint=tiny_checkpoint, device="cpu",
                                diskCentreRAS=ras[:3])
    np.testing.assert_allclose(slicer.util.arrayFromVolume(centred.volumes["HbT"]),
                               slicer.util.arrayFromVolume(plain.volumes["HbT"]), atol=1e-5)
    with pytest.raises(InputError, match="90 mm ring.*use --method dri"):
        logic.reconstruct(phantom.measurements, phantom.mriVolume, checkpoint=tiny_checkpoint,
                          geometry={"diameter_mm": 90.0, "angle_offset_deg": 0.0, "winding": "ccw"})
    with pytest.raises(InputError, match="unknown method 'fem'"):
        logic.reconstruct(phantom.measurements, phantom.mriVolume, method="fem")


def test_disk_centre_from_a_point_list(phantom):
    points = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "Ring centre")
    assert NIRSTReconLogic.diskCentreFromPointList(None, phantom.mriVolume) is None
    assert NIRSTReconLogic.diskCentreFromPointList(points, phantom.mriVolume) is None
    points.AddControlPoint(vtk.vtkVector3d(1.0, 2.0, 0.0))
    np.testing.assert_allclose(NIRSTReconLogic.diskCentreFromPointList(points, phantom.mriVolume), [1, 2, 0])
    transform = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    matrix = vtk.vtkMatrix4x4()
    matrix.SetElement(0, 3, 10.0)
    transform.SetMatrixTransformToParent(matrix)
    phantom.mriVolume.SetAndObserveTransformNodeID(transform.GetID())
    # The volume is shown 10 mm to the right: the same world point is 10 mm left in its own RAS.
    np.testing.assert_allclose(NIRSTReconLogic.diskCentreFromPointList(points, phantom.mriVolume), [-9, 2, 0])


def test_panel_options_for_dri_with_background_calibration(phantom):
    """What the panel passes to reconstruct (its fields as the parameter node holds them)."""
    from types import SimpleNamespace

    logic = NIRSTReconLogic()
    panel = SimpleNamespace(method="dri", ringDiameter=82.0, optodeOffset=0.0, winding="ccw", diskCentre=None,
                            inputVolume=phantom.mriVolume, calibrationMode="background", referenceFile="",
                            mediumHbO=14.0, mediumHb=7.0, mediumWater=40.0, perOptodeCoupling=False)
    options = logic.panelOptions(panel)
    assert options["method"] == "dri" and options["diskCentreRAS"] is None
    assert options["geometry"] == {"diameter_mm": 82.0, "angle_offset_deg": 0.0, "winding": "ccw"}
    assert options["calibration"].reference is None and options["calibration"].medium.chromophores == (14, 7, 40)
    result = logic.reconstruct(phantom.measurements * 1000, phantom.mriVolume, driElementSize=5.0, driIterations=1,
                               **options)
    assert result.method == "dri" and any("known background" in note for note in result.notes)
    panel.calibrationMode = "reference"
    with pytest.raises(InputError, match="needs the reference measurement file"):
        logic.panelOptions(panel)


def test_panel_notes_warn_when_mri_and_optics_disagree(headless_slicer):
    """A lesion only the MRI or only the optics show: the result's notes say to check with DRI.

    The paper-trained Z-Net invents the MRI-only lesion and misses the optics-only one; the
    default (robust-trained) one gets the standard case right without a warning."""
    from deepimaging.nirst.robustness_eval import robustness_cases, simulate_cases

    logic = NIRSTReconLogic()
    for name, method, warned in (("standard", "znet", False), ("optics_only", "znet-paper", True),
                                 ("mri_only", "znet-paper", True)):
        case = robustness_cases((name,))[0]
        amplitudes = simulate_cases([case])[0]
        mri = nodes.volumeNodeFromImage(Image(case["mri"][np.newaxis], (0.82, 0.82, 1.0)), f"MRI {name}")
        result = logic.reconstruct(amplitudes, mri, device="cpu", method=method)
        assert result.method == method
        assert any("may disagree" in note and "DRI" in note for note in result.notes) == warned, result.notes
