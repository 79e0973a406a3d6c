"""``deepimaging nirst simulate | train | evaluate | reconstruct`` and the demo step, end to end on tiny data."""

import json

import numpy as np
import pytest
import torch

from deepimaging.cli import main
from deepimaging.core.imageio import read_image, write_image
from deepimaging.nirst import load_dataset, recon
from deepimaging.nirst.demo import run_demo
from deepimaging.nirst.recon import simulate_example

TINY = json.dumps({"signal_widths": [16, 8, 8, 8, 8], "signal_stem": 8, "mri_widths": [4, 4, 8, 8, 16],
                   "decoder_widths": [16, 8, 8, 8, 8]})


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 threads on a shared 2-core machine stall in OpenMP barriers
    yield tmp_path_factory.mktemp("cli")
    torch.set_num_threads(threads)


def test_simulate_shards_then_train(workspace, capsys):
    shards = workspace / "shards"
    for k in range(2):
        assert main(["nirst", "simulate", "--n", "40", "--seed", "4", "--shard", f"{k}/2", "--workers", "1",
                     "--element-size", "3", "--out", str(shards)]) == 0
        assert "phantoms/s" in capsys.readouterr().out
    data = load_dataset(shards)
    assert len(data["measurements"]) == 40 and data["meta"]["shards"] == [[0, 20], [20, 40]]
    assert main(["nirst", "train", "--data", str(shards), "--arch", "znet", "--epochs", "2", "--batch-size", "8",
                 "--device", "cpu", "--out", str(workspace / "run"), "--net-config", TINY,
                 "--export", str(workspace / "znet.pt")]) == 0
    out = capsys.readouterr().out
    assert "epoch 1/2" in out and "epoch 2/2" in out and "val" in out and "test: HbO MSE" in out
    assert (workspace / "run" / "best.pt").is_file() and (workspace / "znet.pt").is_file()


def test_evaluate_networks_only(workspace, capsys):
    out_dir = workspace / "eval"
    assert main(["nirst", "evaluate", "--data", str(workspace / "shards"), "--znet", str(workspace / "znet.pt"),
                 "--n-dri", "0", "--device", "cpu", "--out", str(out_dir)]) == 0
    assert "| Z-Net |" in capsys.readouterr().out
    assert (out_dir / "results.md").is_file() and (out_dir / "nirst_comparison_16optodes.png").is_file()


def test_reconstruct_writes_maps_on_the_mri_grid(workspace, capsys):
    measurements, mri, truth = simulate_example(seed=2)
    np.savetxt(workspace / "measurements.csv", measurements)
    write_image(mri, workspace / "mri.nrrd")
    write_image(mri.with_array(truth["inclusion_mask"][None].astype(np.uint8)), workspace / "mask.nrrd")
    out_dir = workspace / "maps"
    assert main(["nirst", "reconstruct", "--measurements", str(workspace / "measurements.csv"),
                 "--mri", str(workspace / "mri.nrrd"), "--checkpoint", str(workspace / "znet.pt"),
                 "--out-dir", str(out_dir), "--format", "nii.gz", "--device", "cpu",
                 "--inclusion-mask", str(workspace / "mask.nrrd")]) == 0
    out = capsys.readouterr().out
    assert "HbT contrast" in out
    for name in ("HbO_uM", "Hb_uM", "water_pct", "HbT_uM", "StO2_pct"):
        image = read_image(out_dir / f"{name}.nii.gz")
        assert image.same_grid(mri)


def test_reconstruct_errors_are_reported(workspace, capsys):
    np.savetxt(workspace / "short.csv", np.ones(100))
    code = main(["nirst", "reconstruct", "--measurements", str(workspace / "short.csv"),
                 "--mri", str(workspace / "mri.nrrd"), "--checkpoint", str(workspace / "znet.pt"),
                 "--out-dir", str(workspace / "never"), "--device", "cpu"])
    assert code == 2 and "expected 2160" in capsys.readouterr().err


def test_demo_skips_without_the_shipped_checkpoint_and_runs_with_one(workspace, monkeypatch):
    monkeypatch.setattr(recon, "DEFAULT_CHECKPOINT", workspace / "absent.pt")
    monkeypatch.setattr("deepimaging.nirst.demo.DEFAULT_CHECKPOINT", workspace / "absent.pt")
    lines = run_demo(workspace / "demo-missing", device="cpu")
    assert len(lines) == 1 and "not found" in lines[0] and "skipped" in lines[0]
    lines = run_demo(workspace / "demo", device="cpu", checkpoint=workspace / "znet.pt")
    assert any("HbT contrast" in line for line in lines) and any(line.startswith("water:") for line in lines)
    assert (workspace / "demo" / "nirst_reconstruction.png").is_file()
    assert (workspace / "demo" / "nirst_HbT_uM.nrrd").is_file()
