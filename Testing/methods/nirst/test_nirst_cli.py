"""``deepimaging nirst simulate | train | evaluate | reconstruct`` and the demo step, end to end on tiny data."""

import contextlib
import io
import json
from types import SimpleNamespace

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
    """A folder in which `nirst simulate` (2 shards) and `nirst train` have run, with their output.

    Every test of this file uses it, so each also runs alone (-k) or on another xdist worker.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 threads on a shared 2-core machine stall in OpenMP barriers
    folder = tmp_path_factory.mktemp("cli")
    shards = folder / "shards"
    outputs = []
    for k in range(2):
        with contextlib.redirect_stdout(io.StringIO()) as text:
            code = main(["nirst", "simulate", "--n", "40", "--seed", "4", "--shard", f"{k}/2", "--workers", "1",
                         "--element-size", "3", "--out", str(shards)])
        outputs.append((code, text.getvalue()))
    with contextlib.redirect_stdout(io.StringIO()) as text:
        code = main(["nirst", "train", "--data", str(shards), "--arch", "znet", "--epochs", "2", "--batch-size", "8",
                     "--device", "cpu", "--out", str(folder / "run"), "--net-config", TINY,
                     "--export", str(folder / "znet.pt")])
    outputs.append((code, text.getvalue()))
    yield SimpleNamespace(path=folder, outputs=outputs)
    torch.set_num_threads(threads)


def test_simulate_shards_then_train(workspace):
    (sim0, out0), (sim1, out1), (train, out) = workspace.outputs
    assert sim0 == sim1 == 0 and "phantoms/s" in out0 and "phantoms/s" in out1
    data = load_dataset(workspace.path / "shards")
    assert len(data["measurements"]) == 40 and data["meta"]["shards"] == [[0, 20], [20, 40]]
    assert train == 0
    assert "epoch 1/2" in out and "epoch 2/2" in out and "val" in out and "test: HbO MSE" in out
    assert (workspace.path / "run" / "best.pt").is_file() and (workspace.path / "znet.pt").is_file()


def test_evaluate_networks_only(workspace, capsys):
    out_dir = workspace.path / "eval"
    assert main(["nirst", "evaluate", "--data", str(workspace.path / "shards"), "--znet", str(workspace.path / "znet.pt"),
                 "--n-dri", "0", "--device", "cpu", "--out", str(out_dir)]) == 0
    assert "| Z-Net |" in capsys.readouterr().out
    assert (out_dir / "results.md").is_file() and (out_dir / "nirst_comparison_16optodes.png").is_file()


def test_reconstruct_writes_maps_on_the_mri_grid(workspace, capsys):
    measurements, mri, truth = simulate_example(seed=2)
    np.savetxt(workspace.path / "measurements.csv", measurements)
    write_image(mri, workspace.path / "mri.nrrd")
    write_image(mri.with_array(truth["inclusion_mask"][None].astype(np.uint8)), workspace.path / "mask.nrrd")
    out_dir = workspace.path / "maps"
    assert main(["nirst", "reconstruct", "--measurements", str(workspace.path / "measurements.csv"),
                 "--mri", str(workspace.path / "mri.nrrd"), "--checkpoint", str(workspace.path / "znet.pt"),
                 "--out-dir", str(out_dir), "--format", "nii.gz", "--device", "cpu",
                 "--inclusion-mask", str(workspace.path / "mask.nrrd")]) == 0
    out = capsys.readouterr().out
    assert "HbT contrast" in out
    for name in ("HbO_uM", "Hb_uM", "water_pct", "HbT_uM", "StO2_pct"):
        image = read_image(out_dir / f"{name}.nii.gz")
        assert image.same_grid(mri)


def test_reconstruct_errors_are_reported(workspace, capsys):
    _, mri, _ = simulate_example(seed=2)
    write_image(mri, workspace.path / "mri_for_errors.nrrd")
    np.savetxt(workspace.path / "short.csv", np.ones(100))
    code = main(["nirst", "reconstruct", "--measurements", str(workspace.path / "short.csv"),
                 "--mri", str(workspace.path / "mri_for_errors.nrrd"), "--checkpoint", str(workspace.path / "znet.pt"),
                 "--out-dir", str(workspace.path / "never"), "--device", "cpu"])
    assert code == 2 and "expected 2160" in capsys.readouterr().err


def test_demo_skips_without_the_shipped_checkpoint_and_runs_with_one(workspace, monkeypatch):
    monkeypatch.setattr(recon, "DEFAULT_CHECKPOINT", workspace.path / "absent.pt")
    monkeypatch.setattr("deepimaging.nirst.demo.DEFAULT_CHECKPOINT", workspace.path / "absent.pt")
    lines = run_demo(workspace.path / "demo-missing", device="cpu")
    assert len(lines) == 1 and "not found" in lines[0] and "skipped" in lines[0]
    lines = run_demo(workspace.path / "demo", device="cpu", checkpoint=workspace.path / "znet.pt")
    assert any("HbT contrast" in line for line in lines) and any(line.startswith("water:") for line in lines)
    assert (workspace.path / "demo" / "nirst_reconstruction.png").is_file()
    assert (workspace.path / "demo" / "nirst_HbT_uM.nrrd").is_file()
