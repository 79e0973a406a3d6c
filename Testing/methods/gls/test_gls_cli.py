"""``deepimaging gls train | predict | compare`` on a tiny dataset, and their error exits."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from deepimaging.cli import main
from deepimaging.core.checkpoint import load_checkpoint
from deepimaging.core.image import Image
from deepimaging.core.imageio import write_image
from deepimaging.core.segfile import read_segmentation
from deepimaging.gls.synthetic import make_bscan, write_synthetic_dataset

TINY = ["--size", "64", "64", "--crop-size", "32", "--widths", "4", "8", "16", "32", "64", "--device", "cpu",
        "--threads", "1"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_synthetic_dataset(tmp_path_factory.mktemp("gls_cli") / "data", n=6, size=(64, 64))


@pytest.fixture(scope="module")
def run_dir(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("gls_run")
    assert main(["gls", "train", "--data", str(data_dir), "--out", str(out), "--epochs", "3",
                 "--steps-per-epoch", "1", *TINY]) == 0
    return out


def test_train_writes_a_checkpoint_and_progress_lines(run_dir, data_dir, tmp_path, capsys, monkeypatch):
    header = load_checkpoint(run_dir / "best.pt", method="gls").header
    assert header["arch"] == "gls" and header["stage_reached"] == 3 and header["config"]["crop_size"] == [32, 32]
    assert (run_dir / "last.pt").is_file() and (run_dir / "training_log.csv").is_file()
    monkeypatch.setenv("DEEPIMAGING_PROGRESS", "lines")
    out = tmp_path / "unet"
    assert main(["gls", "train", "--data", str(data_dir), "--out", str(out), "--arch", "unet", "--epochs", "1",
                 "--steps-per-epoch", "1", "--no-augment", *TINY]) == 0
    printed = capsys.readouterr().out
    assert "PROGRESS 1.0000 training unet: epoch 1/1 done" in printed and "trained unet for 1 epoch(s)" in printed
    assert load_checkpoint(out / "best.pt").header["training"]["augmentation"] is None


def test_predict_2d_and_stack_with_keypoints_json(run_dir, data_dir, tmp_path, capsys):
    out, kp = tmp_path / "pred.seg.nrrd", tmp_path / "kp.json"
    png = data_dir / "images" / "bscan_00000.png"
    assert main(["gls", "predict", "--model", str(run_dir / "best.pt"), "--image", str(png), "--out", str(out),
                 "--keypoints-out", str(kp), "--device", "cpu"]) == 0
    seg = read_segmentation(out)
    assert seg.names() == ["foreground"] and seg.geometry.shape == (1, 64, 64)
    doc = json.loads(kp.read_text())
    assert doc["model"]["arch"] == "gls" and doc["slices"] == 1 and len(doc["keypoints"]) == 2
    assert set(doc["keypoints"][0]) >= {"slice", "k", "x_px", "y_px", "position_lps"}
    first = doc["keypoints"][0]
    assert first["position_lps"] == pytest.approx([first["x_px"], first["y_px"], 0.0])  # PNG: unit spacing
    # a 3-slice B-scan stack with a geometry: slices along z, positions in LPS mm
    stack = Image(np.stack([make_bscan(s, (64, 64)).image for s in (7, 8, 9)]), (0.1, 0.2, 2.0), (5.0, 6.0, 7.0))
    write_image(stack, tmp_path / "stack.nrrd")
    assert main(["gls", "predict", "--model", str(run_dir / "best.pt"), "--image", str(tmp_path / "stack.nrrd"),
                 "--out", str(out), "--keypoints-out", str(kp), "--device", "cpu"]) == 0
    seg = read_segmentation(out)
    assert seg.geometry.shape == (3, 64, 64) and seg.geometry.spacing == pytest.approx((0.1, 0.2, 2.0))
    doc = json.loads(kp.read_text())
    assert doc["slices"] == 3 and [(r["slice"], r["k"]) for r in doc["keypoints"]] == [(s, k) for s in range(3)
                                                                                       for k in range(2)]
    last = doc["keypoints"][-1]
    assert last["position_lps"] == pytest.approx([5.0 + 0.1 * last["x_px"], 6.0 + 0.2 * last["y_px"], 7.0 + 2 * 2.0])
    assert "wrote" in capsys.readouterr().out


def test_compare_two_archs(data_dir, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["gls", "compare", "--data", str(data_dir), "--out", str(out), "--archs", "unet", "gls",
                 "--epochs", "3", "--steps-per-epoch", "1", "--test-fraction", "0.34", *TINY]) == 0
    summary = json.loads((out / "comparison.json").read_text())
    assert list(summary["archs"]) == ["unet", "gls"] and len(summary["test_names"]) == 2
    for arch, row in summary["archs"].items():
        assert set(row) >= {"dice", "iou", "boundary_f1", "keypoint_error_px", "train_seconds", "parameters"}
        assert row["optimizer_steps"] == 3
    assert summary["archs"]["unet"]["keypoint_error_px"] is None
    assert summary["archs"]["gls"]["keypoint_error_px"] is not None
    assert isinstance(summary["agrees"], bool) and summary["compared"] == ["gls", "unet"]
    report = (out / "comparison.md").read_text()
    assert "| U-Net |" in report and "—" in report and summary["statement"] in report
    assert (out / "comparison.png").read_bytes()[:4] == b"\x89PNG"
    assert "comparison.json" in capsys.readouterr().out


def test_bad_input_exits_2_and_writes_nothing(run_dir, data_dir, tmp_path, capsys):
    out = tmp_path / "x.seg.nrrd"
    small = tmp_path / "small.nrrd"
    write_image(Image(np.random.rand(1, 20, 20).astype(np.float32)), small)
    assert main(["gls", "predict", "--model", str(run_dir / "best.pt"), "--image", str(small), "--out", str(out)]) == 2
    assert "smaller than this GLS model's 32x32 local crop" in capsys.readouterr().err and not out.exists()
    nan = tmp_path / "nan.nrrd"
    write_image(Image(np.full((1, 64, 64), np.nan, np.float32)), nan)
    assert main(["gls", "predict", "--model", str(run_dir / "best.pt"), "--image", str(nan), "--out", str(out)]) == 2
    assert "NaN" in capsys.readouterr().err and not out.exists()
    volume = tmp_path / "ct.nrrd"
    write_image(Image(np.zeros((600, 40, 40), np.float32)), volume)
    assert main(["gls", "predict", "--model", str(run_dir / "best.pt"), "--image", str(volume), "--out", str(out)]) == 2
    assert "B-scan series" in capsys.readouterr().err and not out.exists()
    empty = tmp_path / "empty"
    for sub in ("images", "masks"):
        (empty / sub).mkdir(parents=True)
    for name in ("a", "b"):
        sitk.WriteImage(sitk.GetImageFromArray(np.full((64, 64), 90, np.uint8)), str(empty / "images" / f"{name}.png"))
        sitk.WriteImage(sitk.GetImageFromArray(np.zeros((64, 64), np.uint8)), str(empty / "masks" / f"{name}.png"))
    with pytest.warns(RuntimeWarning):
        code = main(["gls", "train", "--data", str(empty), "--out", str(tmp_path / "run"), "--epochs", "3", *TINY])
    assert code == 2 and "masks are empty" in capsys.readouterr().err and not (tmp_path / "run").exists()
    assert main(["gls", "train", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "run")]) == 2
    assert main(["gls", "compare", "--data", str(data_dir), "--out", str(tmp_path / "c"), "--archs", "cenet",
                 "--size", "48", "48"]) == 2
    assert "multiple of 32" in capsys.readouterr().err and not (tmp_path / "c").exists()
