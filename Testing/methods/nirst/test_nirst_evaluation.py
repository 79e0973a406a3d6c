"""Evaluation metrics on known inputs, and the DRI / Y-Net / Z-Net comparison end to end."""

import json
import math

import numpy as np
import pytest
import torch

from deepimaging.nirst import simulate_phantoms
from deepimaging.nirst.evaluate import evaluate, fill_missing_optodes, markdown_table, network_maps
from deepimaging.nirst.forward import measurement_subset
from deepimaging.nirst.metrics import (default_disk, hbt_contrast_of, inclusion_errors, inclusion_masks, map_metrics,
                                       truth_data_range)
from deepimaging.nirst.train import train_network

DISK = default_disk(100)
TINY_ZNET = {"signal_widths": [16, 8, 8, 8, 8], "signal_stem": 8, "mri_widths": [4, 4, 8, 8, 16],
             "decoder_widths": [16, 8, 8, 8, 8]}
TINY_YNET = {"mri_widths": [4, 8, 8, 16], "signal_widths": [4, 8, 8, 16], "bottleneck_width": 16}


def _maps(n=3, seed=0):
    rng = np.random.default_rng(seed)
    maps = np.zeros((n, 3, 100, 100), np.float32)
    maps[:, :, DISK] = rng.uniform(5, 50, size=(n, 3, 1))
    maps[:, :, 40:60, 40:60] *= 2.0
    return maps


def test_identical_maps_are_perfect():
    truth = _maps()
    metrics = map_metrics(truth, truth, truth_data_range(truth, DISK), DISK)
    for name in ("HbO", "Hb", "water"):
        assert np.all(metrics[name]["mse"] == 0)
        assert np.all(np.isinf(metrics[name]["psnr"]))
        assert np.allclose(metrics[name]["ssim"], 1.0)


def test_data_range_and_psnr_follow_the_stated_definition():
    truth = _maps()
    data_range = truth_data_range(truth, DISK)
    for c in range(3):
        inside = truth[:, c][:, DISK]
        assert data_range[c] == pytest.approx(inside.max() - inside.min())  # over the whole set, disk only
    pred = truth + np.where(DISK, 0.5, 0.0).astype(np.float32)  # +0.5 everywhere in the disk, nothing outside
    metrics = map_metrics(pred, truth, data_range, DISK)
    for c, name in enumerate(("HbO", "Hb", "water")):
        assert np.allclose(metrics[name]["mse"], 0.25)
        assert np.allclose(metrics[name]["psnr"], 10 * math.log10(data_range[c] ** 2 / 0.25), atol=1e-6)
        assert np.all(metrics[name]["ssim"] < 1.0)
    worse = map_metrics(truth + np.where(DISK, 5.0, 0.0), truth, data_range, DISK)
    assert np.all(worse["HbO"]["psnr"] < metrics["HbO"]["psnr"])


def test_inclusion_errors_and_contrast():
    centres = np.array([[[0.0, 0.0], [np.nan, np.nan]]])
    diameters = np.array([[20.0, np.nan]])
    masks = inclusion_masks(centres, diameters, np.array([1]), 100)
    assert masks.shape == (1, 2, 100, 100) and masks[0, 0].sum() == pytest.approx(np.pi * (10 / 0.82) ** 2, rel=0.05)
    values = np.array([[[20.0, 10.0, 50.0], [np.nan] * 3]])
    pred = np.where(DISK, 1.0, 0.0)[None, None] * np.array([10.0, 5.0, 40.0])[None, :, None, None]
    pred[0, :, masks[0, 0]] = np.array([22.0, 10.0, 40.0])
    errors = inclusion_errors(pred, values, masks, np.array([1]))
    assert errors["HbO"] == pytest.approx([10.0]) and errors["Hb"] == pytest.approx([0.0])
    assert errors["water"] == pytest.approx([20.0])
    assert hbt_contrast_of(pred[0], masks[0, 0], DISK) == pytest.approx(32.0 / 15.0)


def test_markdown_table_lists_every_method_and_chromophore():
    row = {"method": "Z-Net", "n": 2, "seconds_per_phantom": 0.01}
    for name in ("HbO", "Hb", "water"):
        row[name] = {"mse": [0.1, 0.01], "psnr": [40.0, 1.0], "ssim": [0.99, 0.01], "inclusion_error_pct": [1.0, 0.5]}
    table = markdown_table([row], "title")
    assert table.count("| Z-Net |") == 3 and "PSNR (dB)" in table and "water (%)" in table


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 60-phantom dataset and one-epoch tiny Z-Net / Y-Net checkpoints trained on it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 threads on a shared 2-core machine stall in OpenMP barriers
    root = tmp_path_factory.mktemp("eval")
    data = simulate_phantoms(60, seed=8, workers=1, element_size_mm=3.0)
    paths = {}
    for arch, config in (("znet", TINY_ZNET), ("ynet", TINY_YNET)):
        train_network(data, arch=arch, out_dir=root / arch, epochs=1, batch_size=16, device="cpu", net_config=config)
        paths[arch] = root / arch / "best.pt"
    yield data, paths, root
    torch.set_num_threads(threads)


def test_fill_missing_optodes_interpolates_along_the_ring():
    n = 16
    source, offset = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    smooth = torch.tensor(np.cos(2 * np.pi * offset / n) + 0.1 * source, dtype=torch.float32)[None, None]
    grid = smooth.clone()
    grid[:, :, :, 0] = 0
    grid[:, :, 1::2] = 99.0  # unmeasured sources
    grid[:, :, :, 1::2] = 99.0  # unmeasured offsets
    filled = fill_missing_optodes(grid, 2)
    assert torch.all(filled[..., 0] == 0)
    assert torch.allclose(filled[:, :, 0::2, 2::2], smooth[:, :, 0::2, 2::2])  # measured cells kept
    interior = filled[:, :, 2:14:2, 3:14:2] - smooth[:, :, 2:14:2, 3:14:2]
    assert float(interior.abs().max()) < 0.08  # linear interpolation error bound h^2/8 max|f"| = 0.077
    assert float((filled[:, :, 3, 2:14:2] - smooth[:, :, 3, 2:14:2]).abs().max()) < 1e-5  # linear in source


@pytest.mark.parametrize("fill", ["interpolate", "zero"])
def test_8_optode_input_ignores_the_dropped_optodes(trained, fill):
    from deepimaging.nirst.recon import load_reconstructor

    data, paths, _ = trained
    rec = load_reconstructor(paths["znet"], device="cpu")
    kept = measurement_subset(16, range(0, 16, 2))
    assert len(kept) == 9 * 8 * 7
    full = network_maps(rec, data["measurements"][:2], data["mri"][:2], range(0, 16, 2), fill)
    scrambled = data["measurements"][:2].copy()
    dropped = np.setdiff1d(np.arange(2160), kept)
    scrambled[:, dropped] *= 3.0  # what the 8 missing optodes "saw" must not matter
    assert np.allclose(network_maps(rec, scrambled, data["mri"][:2], range(0, 16, 2), fill), full)


def test_evaluate_end_to_end(trained):
    data, paths, root = trained
    out = root / "results"
    result = evaluate(data, znet=paths["znet"], ynet=paths["ynet"], out_dir=out, n_dri=1, workers=1,
                      dri_element_size_mm=5.0, device="cpu")
    results = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in results["common16"]] == ["DRI", "Y-Net", "Z-Net"]
    assert [r["method"] for r in results["common8"]] == [
        "DRI", "Y-Net (interpolated)", "Y-Net (zero-filled)", "Z-Net (interpolated)", "Z-Net (zero-filled)"]
    assert results["n_test"] == 6 and results["n_common"] == 1
    assert set(results["data_range"]) == {"HbO", "Hb", "water"}
    for row in results["common16"] + results["networks16"]:
        for name in ("HbO", "Hb", "water"):
            assert np.isfinite(row[name]["mse"][0]) and np.isfinite(row[name]["inclusion_error_pct"][0])
    text = (out / "results.md").read_text()
    assert "| DRI |" in text and "8 optodes" in text and "data range" in text
    for figure in ("nirst_comparison_16optodes.png", "nirst_comparison_8optodes.png"):
        assert (out / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(result["figures"]) == 2 and result["markdown"].strip() == text.strip()
