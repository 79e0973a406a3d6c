"""The Z-Net data-consistency check: maps that contradict the optics leave a misfit far above the noise."""

import warnings

import numpy as np
import pytest

from deepimaging.core.image import Image
from deepimaging.nirst.consistency import (EXPECTED_NOISE, WARNING_RATIO, data_misfit, misfit_verdict,
                                          reference_misfit)
from deepimaging.nirst.pipeline import reconstruct
from deepimaging.nirst.recon import load_reconstructor
from deepimaging.nirst.robustness_eval import robustness_cases, simulate_cases

CASES = ("standard", "mri_only", "optics_only")


@pytest.fixture(scope="module")
def cases():
    chosen = robustness_cases(CASES)
    return chosen, simulate_cases(chosen)


def test_true_maps_leave_only_the_noise(cases):
    chosen, data = cases
    for case, amplitudes in zip(chosen, data):
        assert data_misfit(amplitudes, case["maps"]) == pytest.approx(EXPECTED_NOISE, rel=0.1)


def test_known_mask_restricts_the_channels(cases):
    chosen, data = cases
    wrong = data[0].copy()
    wrong[::2] *= 1.5  # half the channels far off
    known = np.zeros(wrong.size, dtype=bool)
    known[1::2] = True
    assert data_misfit(wrong, chosen[0]["maps"]) > 0.15
    assert data_misfit(wrong, chosen[0]["maps"], known=known) < 0.03


def _mri_image(mri):
    return Image(mri[np.newaxis].astype(np.float32), spacing=(0.82, 0.82, 1.0), origin=(-40.59, -40.59, 0.0))


def _misfits_and_warnings(network, cases):
    chosen, data = cases
    rec = load_reconstructor(network, "cpu")
    misfits, warned = {}, {}
    for case, amplitudes in zip(chosen, data):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            output = reconstruct(amplitudes, _mri_image(case["mri"]), reconstructor=rec)
        misfits[case["name"]] = output.misfit
        warned[case["name"]] = any("may disagree" in str(w.message) for w in caught)
    return misfits, warned


def test_paper_trained_znet_warns_only_where_mri_and_optics_disagree(cases):
    """This network invents the MRI-only lesion and misses the optics-only one: both warn."""
    misfits, warned = _misfits_and_warnings("znet-paper", cases)
    assert warned == {"standard": False, "mri_only": True, "optics_only": True}, misfits
    assert misfits["standard"] < 1.5 * EXPECTED_NOISE
    assert misfits["optics_only"] > misfits["mri_only"] > WARNING_RATIO * EXPECTED_NOISE


def test_shipped_znet_passes_the_margins_and_warns_relative_to_its_own_precision(cases):
    """The robust-trained default leaves more misfit than the noise everywhere: its own level keeps it quiet."""
    rec = load_reconstructor(None, "cpu")
    assert reference_misfit(rec.header) > EXPECTED_NOISE
    misfits, warned = _misfits_and_warnings(None, cases)
    assert not any(warned.values()), misfits
    assert misfits["standard"] > WARNING_RATIO * EXPECTED_NOISE * 0.9  # would warn against the noise alone
    assert misfit_verdict(misfits["standard"], reference=reference_misfit(rec.header))[0] is False
    assert misfit_verdict(3 * reference_misfit(rec.header), reference=reference_misfit(rec.header))[0] is True


def test_verdict_text_and_switch_off(cases):
    chosen, data = cases
    disagrees, text = misfit_verdict(0.1)
    assert disagrees and "DRI" in text and "5.0x" in text
    assert misfit_verdict(0.02)[0] is False
    output = reconstruct(data[1], _mri_image(chosen[1]["mri"]), expected_noise=0)
    assert output.misfit is None
