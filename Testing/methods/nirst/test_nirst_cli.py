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


@pytest.fixture(scope="module")
def example_files(workspace):
    """A simulated example as files: 16- and 8-optode measurements, x1000 data, a reference, MRI, mask."""
    from deepimaging.nirst.calibration import homogeneous_amplitudes
    from deepimaging.nirst.forward import measurement_subset

    folder = workspace.path / "example"
    folder.mkdir(exist_ok=True)
    measurements, mri, truth = simulate_example(seed=6)
    recon.write_measurements(folder / "m16.csv", measurements)
    recon.write_measurements(folder / "m8.csv", measurements[measurement_subset(16, range(0, 16, 2))], n_optodes=8)
    recon.write_measurements(folder / "x1000.csv", measurements * 1000)
    recon.write_measurements(folder / "reference.csv", homogeneous_amplitudes() * 1000)
    write_image(mri, folder / "mri.nrrd")
    write_image(mri.with_array(truth["inclusion_mask"][None].astype(np.uint8)), folder / "mask.nrrd")
    return SimpleNamespace(path=folder, mri=mri, checkpoint=str(workspace.path / "znet.pt"))


def run_reconstruct(files, measurements, out, *extra):
    return main(["nirst", "reconstruct", "--measurements", str(files.path / measurements),
                 "--mri", str(files.path / "mri.nrrd"), "--out-dir", str(files.path / out), "--device", "cpu",
                 "--checkpoint", files.checkpoint, *extra])


def test_reconstruct_with_dri(example_files, capsys):
    assert run_reconstruct(example_files, "m16.csv", "dri", "--method", "dri", "--dri-element-size", "5",
                           "--dri-iterations", "2", "--inclusion-mask", str(example_files.path / "mask.nrrd")) == 0
    out = capsys.readouterr().out
    assert "reconstructed with DRI" in out and "optodes: 82 mm ring, 16 optodes" in out
    contrast = float(out.split("HbT contrast inside / outside the mask:")[1].split()[0])
    assert contrast > 1.1  # inclusions hold 1.25-2.5x the background HbT
    hbt = read_image(example_files.path / "dri" / "HbT_uM.nrrd")
    assert hbt.same_grid(example_files.mri) and hbt.array.max() > 0


def test_reconstruct_an_8_optode_file(example_files, capsys):
    assert run_reconstruct(example_files, "m8.csv", "z8") == 0
    assert "8 optodes on a 16-optode network" in capsys.readouterr().out
    assert read_image(example_files.path / "z8" / "water_pct.nrrd").same_grid(example_files.mri)
    assert run_reconstruct(example_files, "m8.csv", "d8", "--method", "dri", "--dri-element-size", "5",
                           "--dri-iterations", "1") == 0
    assert "optodes: 82 mm ring, 8 optodes" in capsys.readouterr().out  # an 8-optode mesh, nothing interpolated
    assert read_image(example_files.path / "d8" / "HbO_uM.nrrd").array.max() > 0


def test_reconstruct_calibration_flags(example_files, capsys):
    assert run_reconstruct(example_files, "x1000.csv", "never") == 2
    err = capsys.readouterr().err
    assert "not on the model's absolute scale" in err and "--reference FILE" in err
    assert run_reconstruct(example_files, "m16.csv", "plain") == 0
    assert run_reconstruct(example_files, "x1000.csv", "calibrated", "--reference",
                           str(example_files.path / "reference.csv"), "--reference-medium", "14", "7", "40") == 0
    assert "reference phantom" in capsys.readouterr().out
    for name in ("HbO_uM", "water_pct"):
        np.testing.assert_allclose(read_image(example_files.path / "calibrated" / f"{name}.nrrd").array,
                                   read_image(example_files.path / "plain" / f"{name}.nrrd").array,
                                   rtol=1e-4, atol=1e-4)
    assert run_reconstruct(example_files, "x1000.csv", "background", "--background", "14", "7", "40",
                           "--per-optode-coupling") == 0
    assert run_reconstruct(example_files, "x1000.csv", "bad", "--reference",
                           str(example_files.path / "reference.csv")) == 2
    assert "--reference needs the phantom's properties" in capsys.readouterr().err
    assert run_reconstruct(example_files, "m16.csv", "wide", "--diameter", "90") == 2
    assert "use --method dri" in capsys.readouterr().err


def test_reconstruct_with_the_paper_trained_znet(example_files, capsys):
    assert main(["nirst", "reconstruct", "--measurements", str(example_files.path / "m16.csv"),
                 "--mri", str(example_files.path / "mri.nrrd"), "--out-dir", str(example_files.path / "paper"),
                 "--device", "cpu", "--method", "znet-paper"]) == 0
    assert f"reconstructed with nirst-znet ({recon.PAPER_CHECKPOINT.name})" in capsys.readouterr().out
    assert read_image(example_files.path / "paper" / "HbO_uM.nrrd").same_grid(example_files.mri)
    assert run_reconstruct(example_files, "m16.csv", "never", "--method", "znet-paper") == 2
    assert "--method znet-paper is the shipped one" in capsys.readouterr().err
