"""Does a network's reconstruction explain the optical data?  The warning when MRI and optics disagree.

Z-Net sees the MRI and the boundary data; trained on phantoms whose MRI always showed the
optical inclusions, it leans on the MRI: it invents an optical lesion where only the MRI has
one and misses one the MRI does not show (README, held-out robustness table).  A data-driven
method cannot do that without paying in data misfit, and neither can the network's output:
we push its maps through the same FEM forward model that simulated the training data and
compare with the (calibrated) measurements,

    misfit = RMS over channels of ln(measured / forward(maps)),

an estimate of the relative data error the maps leave.  Maps that explain the data leave the
noise (2 % in the simulations, so misfit ~0.02); maps that invent or miss a lesion leave a
systematic error on top.  Measured on the held-out robustness cases with the paper-trained Z-Net
(``Testing/methods/nirst/test_nirst_consistency.py`` checks the ordering)::

    case                      misfit   / expected noise
    standard inclusion        0.0217   1.1
    brighter MRI inclusion    0.031    1.6
    two inclusions            0.033    1.6
    MRI-only lesion           0.075    3.8   (Z-Net invents contrast 1.21)
    off-level homogeneous     0.185    9.3   (Z-Net biased 13 %)
    optics-only lesion        0.20    10.1   (Z-Net recovers 1.03 of 2.0)

so a misfit above ``WARNING_RATIO`` (2.5) times the expected noise level flags the cases where
the network's maps contradict the optics, and the user is told to check with DRI, which fits
the data.  Real systems are noisier than 2 % (coupling, model error): the expected noise level
is a parameter (``--expected-noise`` on the CLI).  Works on the network's ring only (the maps
are in the network's frame); with 8 measured optodes only the measured pairs count.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Dict, Optional, Tuple

import numpy as np

EXPECTED_NOISE = 0.02  # multiplicative noise of the simulated training data
WARNING_RATIO = 2.5


@lru_cache(maxsize=2)
def _forward_state(n_optodes: int) -> Dict[str, Any]:
    from .simulate import simulation_settings, simulation_state

    return simulation_state(simulation_settings(seed=0, noise=0.0, n_optodes=int(n_optodes)))


def data_misfit(amplitudes: np.ndarray, maps: np.ndarray, n_optodes: int = 16,
                known: Optional[np.ndarray] = None) -> float:
    """RMS of ln(amplitudes / forward(maps)) over the ``known`` channels (default: all).

    ``amplitudes``: calibrated data on the network's ring and channel order, (W * N * (N - 1),);
    ``maps``: (3, H, W) HbO uM, Hb uM, water % on the network grid.
    """
    from .simulate import measure_maps

    predicted = measure_maps(np.clip(np.asarray(maps, dtype=float), 0.0, None), _forward_state(n_optodes))
    data = np.asarray(amplitudes, dtype=float).ravel()
    if data.shape != predicted.shape:
        raise ValueError(f"{data.size} amplitudes for a {predicted.size}-channel forward model")
    use = np.ones(data.shape, dtype=bool) if known is None else np.asarray(known, dtype=bool).ravel()
    residual = np.log(data[use]) - np.log(predicted[use])
    return float(np.sqrt(np.mean(residual ** 2)))


def reference_misfit(header: Dict[str, Any]) -> float:
    """A network's own typical misfit on held-out phantoms whose MRI and optics agree (0 if unknown).

    A network less precise than the noise (the robust-trained default leaves ~6.8 %) would
    otherwise warn on every reconstruction; its checkpoint header records the level
    (``consistency.reference_misfit``) and the warning is relative to the larger of the two.
    """
    return float((header.get("consistency") or {}).get("reference_misfit", 0.0))


def misfit_verdict(misfit: float, expected_noise: float = EXPECTED_NOISE,
                   ratio: float = WARNING_RATIO, reference: float = 0.0) -> Tuple[bool, str]:
    """``(disagrees, text)``: whether the maps contradict the data, and the note for the user.

    ``reference``: the network's typical misfit (:func:`reference_misfit`); the level compared
    against is the larger of it and ``expected_noise``."""
    level = max(float(expected_noise), float(reference))
    relative = misfit / level
    if relative > ratio:
        return True, (f"the Z-Net maps explain the measurements only to {100 * misfit:.1f} % RMS, "
                      f"{relative:.1f}x the expected level ({100 * level:.1f} %, noise or the network's typical "
                      "misfit): the MRI prior and "
                      "the optical data may disagree (a lesion seen by only one of them, or tissue unlike the "
                      "training phantoms); check with DRI (--method dri / Method: DRI), which fits the data")
    return False, (f"data consistency: the Z-Net maps explain the measurements to {100 * misfit:.1f} % RMS "
                   f"({relative:.1f}x the expected level)")

