"""Calibration onto the model's scale and the refusal of uncalibrated data (issue #11)."""

import warnings

import numpy as np
import pytest
import torch

from deepimaging.core.checkpoint import make_header, save_checkpoint
from deepimaging.core.errors import InputError
from deepimaging.nirst.calibration import (DEFAULT_MEDIUM, Calibration, CalibrationWarning, Medium, calibrate,
                                           check_scale, homogeneous_amplitudes)
from deepimaging.nirst.data import Normalisation
from deepimaging.nirst.geometry import OptodeGeometry
from deepimaging.nirst.pipeline import reconstruct
from deepimaging.nirst.recon import load_reconstructor, simulate_example
from deepimaging.nirst.train import build_network
from deepimaging.nirst.znet import MeasurementNormalizer

TINY = {"signal_widths": [16, 8, 8, 8, 8], "signal_stem": 8, "mri_widths": [4, 4, 8, 8, 16],
        "decoder_widths": [16, 8, 8, 8, 8]}
GEOMETRY = OptodeGeometry()
DRI = {"method": "dri", "dri_element_size_mm": 5.0, "dri_iterations": 2}


@pytest.fixture(scope="module")
def rec(tmp_path_factory):
    torch.manual_seed(0)
    model = build_network("znet", 16, 9, TINY)
    reference = torch.from_numpy(homogeneous_amplitudes())
    amplitudes = reference[None] * torch.exp(0.3 * torch.randn(8, 2160, dtype=torch.float64))
    normalizer = MeasurementNormalizer(16, 9).fit(amplitudes, reference)
    config = {"arch": "znet", "net_config": TINY, "n_optodes": 16, "n_wavelengths": 9,
              "wavelengths_nm": [661, 735, 785, 808, 826, 852, 903, 912, 948], "grid_size": 100, "diameter_mm": 82.0}
    path = tmp_path_factory.mktemp("cal") / "tiny.pt"
    save_checkpoint(path, model.state_dict(), make_header("nirst-znet", config),
                    Normalisation(normalizer, np.array([14.0, 7.0, 40.0])).tensors())
    return load_reconstructor(path, device="cpu")


@pytest.fixture(scope="module")
def example():
    return simulate_example(seed=1)


def background(truth):
    """The phantom's true background chromophores as a Medium."""
    outside = (truth["HbT"] > 0) & ~truth["inclusion_mask"]
    return Medium(tuple(float(np.median(truth[name][outside])) for name in ("HbO", "Hb", "water")))


def coupling(seed=0, scale=1000.0):
    """Gains x ``scale``: a factor per wavelength, per source and per detector (wavelength-independent)."""
    rng = np.random.default_rng(seed)
    wavelength, source, detector = rng.uniform(0.5, 2, 9), rng.uniform(0.3, 3, 16), rng.uniform(0.3, 3, 16)
    dets = np.array([j for i in range(16) for j in range(16) if j != i])
    pairs = np.repeat(source, 15) * detector[dets]
    return scale * (wavelength[:, None] * pairs[None, :]).ravel()


def test_reference_calibration_undoes_scale_and_coupling_exactly(example):
    measurements, _, _ = example
    gains = coupling()
    phantom = Medium((10.0, 5.0, 30.0))  # the reference phantom need not be the data's background
    reference = homogeneous_amplitudes(phantom) * gains
    result = calibrate(measurements * gains, Calibration(phantom, reference=reference), GEOMETRY)
    np.testing.assert_allclose(result.data, measurements, rtol=1e-10)
    assert "reference phantom" in result.summary
    with pytest.raises(InputError, match="reference measurement has 100 values"):
        calibrate(measurements, Calibration(phantom, reference=reference[:100]), GEOMETRY)


def test_background_calibration_is_scale_and_coupling_invariant(example):
    measurements, _, truth = example
    medium = background(truth)
    plain = calibrate(measurements, Calibration(medium), GEOMETRY).data
    np.testing.assert_allclose(calibrate(measurements * 1000, Calibration(medium), GEOMETRY).data, plain, rtol=1e-10)
    # The global fit moves the original data by the median log-ratio to its background model only.
    assert np.max(np.abs(np.log(plain / measurements))) < 0.05
    per_optode = calibrate(measurements, Calibration(medium, per_optode=True), GEOMETRY).data
    coupled = calibrate(measurements * coupling(), Calibration(medium, per_optode=True), GEOMETRY)
    np.testing.assert_allclose(coupled.data, per_optode, rtol=1e-8)
    assert "per-optode" in coupled.summary


def test_scale_check_refuses_warns_and_passes(example):
    measurements, mri, _ = example
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_scale(measurements, GEOMETRY) < 2.1
    with pytest.warns(CalibrationWarning, match="calibrate"):
        check_scale(measurements * 20, GEOMETRY)
    with pytest.raises(InputError, match=r"\d+x the model.*--reference FILE.*--background"):
        check_scale(measurements * 1000, GEOMETRY)
    with pytest.raises(InputError, match="not on the model's absolute scale"):
        reconstruct(measurements * 1000, mri, **DRI)
    with pytest.raises(InputError, match="chromophores must be three"):
        Medium((1.0, 2.0))
    with pytest.raises(InputError, match="one value per wavelength"):
        Medium(mua=(0.01, 0.02)).properties([661, 735, 785])


@pytest.mark.parametrize("method", ["znet", "dri"])
def test_calibrated_x1000_with_coupling_gives_the_original_maps(rec, example, method):
    measurements, mri, truth = example
    options = DRI if method == "dri" else {"reconstructor": rec}
    original = reconstruct(measurements, mri, **options)
    gains = coupling(seed=3)
    calibration = Calibration(DEFAULT_MEDIUM, reference=homogeneous_amplitudes() * gains)
    calibrated = reconstruct(measurements * gains, mri, calibration=calibration, **options)
    for name in ("HbO", "Hb", "water"):
        np.testing.assert_allclose(calibrated.maps[name].array, original.maps[name].array, rtol=1e-4, atol=1e-4)
    # Background-only: x1000 gives exactly what the original gives with the same calibration, and
    # that stays within 3 % of the uncalibrated original's background (DRI; the tiny net is random).
    known = Calibration(background(truth))
    scaled = reconstruct(measurements * 1000, mri, calibration=known, **options)
    same = reconstruct(measurements, mri, calibration=known, **options)
    np.testing.assert_allclose(scaled.maps["HbT"].array, same.maps["HbT"].array, rtol=1e-4, atol=1e-4)
    if method == "dri":
        disk = original.maps["HbO"].array > 0
        ratio = np.median(scaled.maps["HbO"].array[disk]) / np.median(original.maps["HbO"].array[disk])
        assert abs(ratio - 1) < 0.03, ratio
