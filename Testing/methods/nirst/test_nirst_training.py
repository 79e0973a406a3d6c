"""Z-Net/Y-Net training on tiny simulated data: split, normalisation, learning, checkpoints, resume."""

import numpy as np
import pytest
import torch

from deepimaging.core.checkpoint import load_checkpoint
from deepimaging.core.errors import InputError
from deepimaging.nirst import WAVELENGTHS_NM, simulate_phantoms
from deepimaging.nirst.data import NirstDataset, Normalisation, normalise_mri, split_indices
from deepimaging.nirst.train import learning_rate, train_network

# Narrow networks keep CPU epochs to ~2 s; the architecture is the same.
TINY_ZNET = {"signal_widths": [32, 16, 16, 8, 8], "signal_stem": 16, "mri_widths": [8, 8, 16, 16, 32],
             "decoder_widths": [32, 16, 16, 8, 8]}
TINY_YNET = {"mri_widths": [8, 16, 16, 32], "signal_widths": [8, 16, 16, 32], "bottleneck_width": 32}


@pytest.fixture(scope="module")
def dataset():
    return simulate_phantoms(200, seed=21, workers=1, element_size_mm=3.0)


@pytest.fixture(autouse=True)
def _threads():
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 threads on a shared 2-core machine stall in OpenMP barriers
    yield
    torch.set_num_threads(old)


def test_split_is_70_20_10_fixed_and_disjoint():
    train, val, test = split_indices(200, seed=3)
    assert (len(train), len(val), len(test)) == (140, 40, 20)
    assert len(set(train) | set(val) | set(test)) == 200
    again = split_indices(200, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip((train, val, test), again))
    assert not np.array_equal(test, split_indices(200, seed=4)[2])
    with pytest.raises(InputError):
        split_indices(2)


def test_normalisation_round_trip_and_scales(dataset):
    train = split_indices(200)[0]
    norm = Normalisation.fit(dataset, train)
    again = Normalisation.from_tensors(norm.tensors())
    assert np.allclose(again.target_scale, norm.target_scale)
    rows = NirstDataset(dataset, train, norm)
    assert rows.signals.shape == (140, 2160) and rows.images.shape == (140, 1, 100, 100)
    assert abs(float(rows.signals.mean())) < 1e-3 and abs(float(rows.signals.std()) - 1.0) < 1e-2
    # Targets: background ~1 per chromophore; physical units come back exactly.
    assert 0.7 < float(rows.targets[:, :, 50, 50].mean()) < 1.5
    back = norm.to_physical(rows.targets[:2])
    assert np.allclose(back, dataset["maps"][train[:2]], rtol=1e-5, atol=1e-4)
    mri = normalise_mri(dataset["mri"][:1])[0]
    assert mri[0, 0] == -1.0 and abs(float(np.median(mri[40:60, 40:60]))) < 0.1


def test_learning_rate_schedule():
    assert learning_rate(0.005, 0.0, "cosine") < 0.001  # warm-up
    assert learning_rate(0.005, 0.02, "cosine") == pytest.approx(0.005)
    assert learning_rate(0.005, 1.0, "cosine") == pytest.approx(0.0, abs=1e-12)
    assert learning_rate(0.005, 0.7, "constant") == 0.005


def test_training_learns_and_writes_complete_checkpoints(dataset, tmp_path):
    summary = train_network(dataset, arch="znet", out_dir=tmp_path, epochs=5, batch_size=16, lr=0.005,
                            device="cpu", net_config=TINY_ZNET, export=tmp_path / "export.pt")
    losses = [h["val_loss"] for h in summary["history"]]
    assert len(losses) == 5
    assert min(losses[-2:]) < 0.4 * losses[0], losses  # validation loss falls by a clear factor
    best = load_checkpoint(tmp_path / "best.pt", method="nirst-znet")
    config = best.header["config"]
    assert config["wavelengths_nm"] == list(WAVELENGTHS_NM) and config["n_optodes"] == 16
    assert config["net_config"] == TINY_ZNET and config["split_seed"] == 0
    # Geometry keys the reconstructor reads (optode 0 on +x, counter-clockwise: mesh.optode_angles).
    assert {"arch", "n_optodes", "wavelengths_nm", "grid_size", "diameter_mm"} <= set(config)
    assert config["optode_angle_offset_deg"] == 0.0 and config["optode_winding"] == "ccw"
    assert config["distribution"] == "paper" and config["init_from"] is None
    assert best.header["training"]["n_phantoms"] == 200 and best.header["training"]["device"] == "cpu"
    assert best.header["training"]["epochs_run"] == 5 and best.header["training"]["wall_time_s"] > 0
    metrics = best.header["metrics"]
    for name in ("HbO", "Hb", "water"):
        assert np.isfinite(metrics[f"test_mse_{name}"]) and -1 <= metrics[f"test_ssim_{name}"] <= 1
        assert metrics[f"test_data_range_{name}"] > 0
    assert {"normalizer.mean", "normalizer.std", "normalizer.log_reference", "target_scale"} <= set(best.extra_tensors)
    exported = load_checkpoint(tmp_path / "export.pt", method="nirst-znet")
    assert all(v.dtype == torch.float16 for v in exported.state_dict.values() if v.is_floating_point())


def test_fine_tuning_starts_from_the_checkpoint(dataset, tmp_path):
    small = {k: (v if k == "meta" else v[:48]) for k, v in dataset.items()}  # keeps this test short
    first = train_network(small, arch="znet", out_dir=tmp_path / "a", epochs=1, batch_size=32, device="cpu",
                          net_config=TINY_ZNET, export=tmp_path / "a.pt")
    lines = []
    tuned = train_network(small, arch="znet", out_dir=tmp_path / "b", epochs=1, batch_size=32, device="cpu",
                          lr=1e-4, init_from=tmp_path / "a.pt", log=lines.append)
    assert any("initialised from" in line for line in lines)
    header = load_checkpoint(tmp_path / "b" / "best.pt", method="nirst-znet").header
    assert header["config"]["net_config"] == TINY_ZNET and header["config"]["init_from"] == "a.pt"
    # The checkpoint's normalisation is kept, and a small lr starts near the first run's loss.
    assert header["preprocessing"]["target_scale"] == load_checkpoint(tmp_path / "a.pt").header[
        "preprocessing"]["target_scale"]
    assert tuned["history"][0]["val_loss"] < 1.5 * first["history"][0]["val_loss"]


def test_resume_continues_from_last_epoch(dataset, tmp_path):
    first = train_network(dataset, arch="ynet", out_dir=tmp_path, epochs=1, batch_size=32, device="cpu",
                          net_config=TINY_YNET)
    assert len(first["history"]) == 1
    lines = []
    second = train_network(dataset, arch="ynet", out_dir=tmp_path, epochs=2, batch_size=32, device="cpu",
                           net_config=TINY_YNET, log=lines.append)
    assert any("resumed" in line and "epoch 1" in line for line in lines)
    assert [h["epoch"] for h in second["history"]] == [1.0, 2.0]
    assert second["history"][0] == first["history"][0]
    assert load_checkpoint(tmp_path / "last.pt", method="nirst-ynet").training_state["epoch"] == 2


def test_time_budget_stops_cleanly(dataset, tmp_path):
    summary = train_network(dataset, arch="znet", out_dir=tmp_path, epochs=50, batch_size=64, device="cpu",
                            net_config=TINY_ZNET, max_minutes=0.001)
    assert summary["training"]["stopped_by"] == "time budget"
    assert summary["training"]["epochs_run"] == 1 and (tmp_path / "best.pt").is_file()


def test_bad_training_arguments(dataset, tmp_path):
    with pytest.raises(InputError, match="architecture"):
        train_network(dataset, arch="unet", out_dir=tmp_path, epochs=1, device="cpu")
    with pytest.raises(InputError, match="loss"):
        train_network(dataset, loss="hinge", out_dir=tmp_path, epochs=1, device="cpu")
    with pytest.raises(InputError, match="not found"):
        train_network(tmp_path / "missing.npz", out_dir=tmp_path, epochs=1, device="cpu")
