"""Reconstruction API (what the Slicer module calls): shapes, units, geometry, files and bad input."""

import numpy as np
import pytest
import torch

from deepimaging.core.checkpoint import make_header, save_checkpoint
from deepimaging.core.errors import CheckpointError, InputError
from deepimaging.core.image import Image
from deepimaging.nirst import recon
from deepimaging.nirst.data import Normalisation
from deepimaging.nirst.recon import (OUTPUT_NAMES, extract_slice, hbt_contrast, load_reconstructor, read_measurements,
                                     write_measurements,
                                     reconstruct_image, simulate_example)
from deepimaging.nirst.train import build_network
from deepimaging.nirst.znet import MeasurementNormalizer

TINY = {"signal_widths": [16, 8, 8, 8, 8], "signal_stem": 8, "mri_widths": [4, 4, 8, 8, 16],
        "decoder_widths": [16, 8, 8, 8, 8]}
WAVELENGTHS = [661, 735, 785, 808, 826, 852, 903, 912, 948]


def _checkpoint(path, method="nirst-znet", wavelengths=WAVELENGTHS, n_optodes=16):
    """A tiny randomly initialised Z-Net checkpoint with fitted normalisation."""
    torch.manual_seed(0)
    model = build_network("znet", n_optodes, len(wavelengths), TINY)
    n_meas = len(wavelengths) * n_optodes * (n_optodes - 1)
    amplitudes = torch.exp(torch.randn(8, n_meas, dtype=torch.float64) - 8.0)
    normalizer = MeasurementNormalizer(n_optodes, len(wavelengths)).fit(amplitudes, amplitudes.mean(0))
    norm = Normalisation(normalizer, np.array([14.0, 7.0, 40.0]))
    config = {"arch": "znet", "net_config": TINY, "n_optodes": n_optodes, "n_wavelengths": len(wavelengths),
              "wavelengths_nm": list(wavelengths), "grid_size": 100, "diameter_mm": 82.0, "split_seed": 0}
    save_checkpoint(path, model.state_dict(), make_header(method, config), norm.tensors())
    return path


@pytest.fixture(scope="module")
def example():
    return simulate_example(seed=3)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return _checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pt")


def test_simulate_example(example):
    measurements, mri, truth = example
    assert measurements.shape == (2160,) and np.all(measurements > 0)
    assert mri.shape == (1, 100, 100) and mri.spacing[:2] == (0.82, 0.82)
    assert set(OUTPUT_NAMES) <= set(truth) and truth["inclusion_mask"].dtype == bool
    assert np.allclose(truth["HbT"], truth["HbO"] + truth["Hb"])
    inside = truth["inclusion_mask"]
    assert truth["HbT"][inside].mean() > truth["HbT"][~inside & (truth["HbT"] > 0)].mean()


def test_reconstruct_shapes_units_and_derived_maps(checkpoint, example):
    measurements, mri, _ = example
    rec = load_reconstructor(checkpoint, device="cpu")
    maps = rec.reconstruct(measurements, mri.array[0])
    assert list(maps) == list(OUTPUT_NAMES)
    for name, values in maps.items():
        assert values.shape == (100, 100) and values.dtype == np.float32 and np.all(np.isfinite(values))
    assert np.allclose(maps["HbT"], maps["HbO"] + maps["Hb"])
    assert np.all((maps["StO2"] >= 0) & (maps["StO2"] <= 100))
    assert maps["HbO"][0, 0] == 0 and np.all(maps["water"] >= 0)  # zero outside the disk, clipped at 0
    # Units: the output layer's scale is target_scale, so a random net sits near tens of uM / %.
    assert 0 < np.abs(maps["water"][50, 50]) < 1000


def test_reconstruct_image_identity_grid_matches_array_api(checkpoint, example):
    measurements, mri, _ = example
    rec = load_reconstructor(checkpoint, device="cpu")
    images = reconstruct_image(measurements, mri, reconstructor=rec)
    direct = rec.reconstruct(measurements, mri.array[0])
    for name in OUTPUT_NAMES:
        assert images[name].same_grid(mri)
        assert np.allclose(images[name].array[0], direct[name], atol=1e-4)


def test_reconstruct_image_maps_back_onto_other_grids(checkpoint, example):
    measurements, mri, _ = example
    rec = load_reconstructor(checkpoint, device="cpu")
    direct = rec.reconstruct(measurements, mri.array[0])
    # The same plane sampled at 0.41 mm (2x finer, 200 x 200 + margin), shifted origin (flipped and
    # rotated direction matrices: test_nirst_geometry.py).
    fine = np.kron(mri.array[0], np.ones((2, 2)))
    fine = np.pad(fine, ((10, 10), (6, 6)))
    image = Image(fine[None], (0.41, 0.41, 2.0), (5.0, -3.0, 12.0))
    seen = recon.resample_mri(image)
    x = (np.arange(100) + 0.5) * 0.82 - 41.0
    inner = np.hypot(*np.meshgrid(x, x)) < 40.5  # the outermost pixels take the nearest fine pixel inside
    assert np.allclose(seen[inner], mri.array[0][inner], atol=1e-3)  # the network sees the same MRI
    assert np.allclose(seen, mri.array[0], rtol=0.05, atol=1e-3)
    out = reconstruct_image(measurements, image, reconstructor=rec)
    assert out["HbO"].same_grid(image) and out["HbO"].shape == (1, 220, 212)
    # Fine pixel (j, i) sits at network-grid (row, col) = ((j - 109.5) / 2 + 49.5, (i - 105.5) / 2 + 49.5).
    for j, i in ((109, 105), (60, 150), (170, 80)):
        row, col = (j - 109.5) / 2 + 49.5, (i - 105.5) / 2 + 49.5
        r0, c0 = int(np.floor(row)), int(np.floor(col))
        fr, fc = row - r0, col - c0
        block = direct["water"][r0:r0 + 2, c0:c0 + 2]
        expected = ((1 - fr) * (1 - fc) * block[0, 0] + (1 - fr) * fc * block[0, 1]
                    + fr * (1 - fc) * block[1, 0] + fr * fc * block[1, 1])
        assert out["water"].array[0, j, i] == pytest.approx(expected, rel=1e-4, abs=1e-4)
    assert out["HbT"].array[0, 0, 0] == 0.0  # outside the disk


def test_read_measurements_csv_and_npz_round_trip(tmp_path, example):
    measurements = example[0]
    np.savetxt(tmp_path / "column.csv", measurements)
    np.savetxt(tmp_path / "table.csv", measurements.reshape(144, 15), delimiter=",", header="d1,d2", comments="")
    np.savetxt(tmp_path / "row.txt", measurements[None])
    np.savez(tmp_path / "data.npz", amplitudes=measurements.reshape(9, 16, 15))
    write_measurements(tmp_path / "written.csv", measurements)
    assert len((tmp_path / "written.csv").read_text().splitlines()) == 1 + 144  # header + 9 x 16 rows
    with pytest.raises(InputError, match="expected 2160"):
        write_measurements(tmp_path / "short.csv", measurements[:100])
    for name in ("column.csv", "table.csv", "row.txt", "data.npz", "written.csv"):
        assert np.allclose(read_measurements(tmp_path / name), measurements, rtol=1e-12), name
    np.savez(tmp_path / "other.npz", values=measurements)
    with pytest.raises(InputError, match="amplitudes"):
        read_measurements(tmp_path / "other.npz")
    (tmp_path / "bad.csv").write_text("1.0\n2.0\nabc\n")
    with pytest.raises(InputError, match="not a number"):
        read_measurements(tmp_path / "bad.csv")
    with pytest.raises(InputError, match="not found"):
        read_measurements(tmp_path / "missing.csv")
    with pytest.raises(InputError, match=".csv"):
        read_measurements(tmp_path / "data.xlsx")


def test_bad_measurements_and_mri(checkpoint, example):
    measurements, mri, _ = example
    rec = load_reconstructor(checkpoint, device="cpu")
    with pytest.raises(InputError, match="expected 2160 .* got 2159"):
        rec.reconstruct(measurements[:-1], mri.array[0])
    negative = measurements.copy()
    negative[7] = -1.0
    with pytest.raises(InputError, match="zero or negative .* index 7"):
        rec.reconstruct(negative, mri.array[0])
    with pytest.raises(InputError, match="2D"):
        rec.reconstruct(measurements, mri.array)  # (1, 100, 100) is not a 2D array
    with pytest.raises(InputError, match="100x100"):
        rec.reconstruct(measurements, np.ones((64, 64)))
    volume = Image(np.ones((5, 100, 100)), (0.82, 0.82, 1.0))
    with pytest.raises(InputError, match="single slice"):
        reconstruct_image(measurements, volume, reconstructor=rec)
    small = Image(np.ones((1, 40, 40)), (0.82, 0.82, 1.0))
    with pytest.raises(InputError, match="does not fit"):
        reconstruct_image(measurements, small, reconstructor=rec)
    assert extract_slice(volume, 2).shape == (1, 100, 100)


def test_bad_checkpoints(tmp_path, checkpoint, monkeypatch):
    with pytest.raises(CheckpointError, match="trained at wavelengths"):
        load_reconstructor(_checkpoint(tmp_path / "wl.pt", wavelengths=WAVELENGTHS[:8]))
    eight = load_reconstructor(_checkpoint(tmp_path / "eight.pt", n_optodes=8))
    with pytest.raises(InputError, match="expected 504"):
        eight.check_measurements(np.ones(2160))
    with pytest.raises(CheckpointError, match="trained with 8 optodes"):
        load_reconstructor(tmp_path / "eight.pt", n_optodes=16)
    with pytest.raises(CheckpointError, match="levelset"):
        load_reconstructor(_checkpoint(tmp_path / "other.pt", method="levelset-deep"))
    monkeypatch.setattr(recon, "DEFAULT_CHECKPOINT", tmp_path / "weights" / "znet_default.pt")
    with pytest.raises(CheckpointError, match="shipped Z-Net checkpoint is not installed"):
        load_reconstructor()


def test_hbt_contrast():
    hbt = np.zeros((10, 10))
    hbt[2:8, 2:8] = 20.0
    hbt[4:6, 4:6] = 30.0
    inside = np.zeros((10, 10), bool)
    inside[4:6, 4:6] = True
    assert hbt_contrast(hbt, inside) == pytest.approx(1.5)
    with pytest.raises(InputError):
        hbt_contrast(hbt, np.zeros((10, 10), bool))
    with pytest.raises(InputError):
        hbt_contrast(hbt, np.ones((5, 5), bool))


def test_two_shipped_networks_robust_by_default():
    assert recon.shipped_checkpoint() == recon.DEFAULT_CHECKPOINT
    assert recon.shipped_checkpoint("znet-paper") == recon.PAPER_CHECKPOINT
    with pytest.raises(InputError, match="unknown shipped network"):
        recon.shipped_checkpoint("unet")
    default, paper = load_reconstructor(None, "cpu"), load_reconstructor("znet-paper", "cpu")
    assert default.path == recon.DEFAULT_CHECKPOINT and paper.path == recon.PAPER_CHECKPOINT
    assert default.header["config"]["distribution"] == "robust"
    assert paper.header["config"].get("distribution", "paper") == "paper"
    assert default.geometry == paper.geometry  # same ring: the CLI and panel switch freely
