"""Calibration of measured NIRST amplitudes onto the forward model's absolute scale (NIRFAST-style).

Measured CW amplitudes carry arbitrary gains (source power, detector and fibre coupling, units)
that the model does not know; Z-Net and DRI read amplitudes on the simulator's scale (fluence per
unit source power of :class:`~deepimaging.nirst.forward.DiffusionForwardModel` on a 1 mm mesh).
Two ways to put data on it, per wavelength w, source i and detector j:

* **Reference phantom** (the NIRFAST habit): measure a homogeneous phantom of known optical
  properties with the same system, then ``data_cal = data * model_homogeneous / reference`` --
  one factor per channel, which cancels every source/detector/wavelength gain.
* **Known background only**: fit the data to the homogeneous model of the known background:
  ``ln data_cal = ln data + a_w`` with ``a_w`` = median over channels of ``ln model - ln data``
  (robust to the channels an inclusion perturbs); with ``per_optode=True`` also per-optode source
  and detector coupling factors, ``ln data + a_w + s_i + d_j`` fitted by least squares (a lesion
  biases these a little: prefer a reference phantom where there is one).

Plausibility check (:func:`check_scale`): the median log-ratio of the data to the homogeneous
model at the middle training background (HbO 14 uM, Hb 7 uM, water 40 %), per wavelength, stays
within +-2.1 over simulated training phantoms (backgrounds HbO 10-18 uM, Hb 5-9 uM, water 30-50 %).
Beyond +-3.5 (a factor 33) the data are refused with an :class:`InputError` that says how to
calibrate; between 2.5 and 3.5 a :class:`CalibrationWarning` is issued.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional, Sequence, Tuple

import numpy as np

from deepimaging.core.errors import InputError

from .dri import REFERENCE_VALUES, _spectral_e
from .forward import DiffusionForwardModel
from .geometry import OptodeGeometry
from .mesh import DEFAULT_ELEMENT_SIZE_MM, make_disk_mesh
from .optics import WAVELENGTHS_NM, reduced_scattering

SCALE_ERROR_LOG = 3.5  # |median ln(data / model)| beyond this: refuse (factor 33)
SCALE_WARNING_LOG = 2.5  # beyond this: warn (training data reach 2.1)
CALIBRATE_HINT = ("calibrate the amplitudes: give a reference measurement of a homogeneous phantom and its optical "
                  "properties (CLI --reference FILE --reference-medium HBO HB WATER; panel: Calibration > Reference), "
                  "or the known background properties (CLI --background HBO HB WATER; panel: Calibration > "
                  "Background)")


class CalibrationWarning(UserWarning):
    """The data's scale is unusual for the model (but not refused)."""


@dataclass(frozen=True)
class Medium:
    """Homogeneous optical properties: chromophores (HbO uM, Hb uM, water %) with the simulator's
    scattering, or per-wavelength ``mua`` and ``musp`` (1/mm) directly."""

    chromophores: Optional[Tuple[float, float, float]] = None
    mua: Optional[Tuple[float, ...]] = None
    musp: Optional[Tuple[float, ...]] = None

    def __post_init__(self) -> None:
        for name in ("chromophores", "mua", "musp"):  # tuples of floats: hashable, so models are cached
            if getattr(self, name) is not None:
                object.__setattr__(self, name, tuple(float(v) for v in np.ravel(getattr(self, name))))
        if (self.chromophores is None) == (self.mua is None):
            raise InputError("give a medium's chromophores (HbO uM, Hb uM, water %) or its mu_a per wavelength")
        if self.chromophores is not None:
            values = np.asarray(self.chromophores, dtype=float)
            if values.shape != (3,) or not np.all(np.isfinite(values)) or np.any(values < 0):
                raise InputError(f"chromophores must be three non-negative numbers (HbO uM, Hb uM, water %), "
                                 f"got {list(self.chromophores)}")
            if self.musp is not None:
                raise InputError("mu_s' can only be given together with mu_a")

    def properties(self, wavelengths: Sequence[int]) -> Tuple[np.ndarray, np.ndarray]:
        """(mu_a, mu_s') per wavelength, 1/mm."""
        n = len(wavelengths)
        musp = (reduced_scattering(wavelengths) if self.musp is None
                else np.asarray(self.musp, dtype=float))
        if self.chromophores is not None:
            mua = _spectral_e(wavelengths) @ np.asarray(self.chromophores, dtype=float)
        else:
            mua = np.asarray(self.mua, dtype=float)
        for name, values in (("mu_a", mua), ("mu_s'", musp)):
            if values.shape != (n,):
                raise InputError(f"{name} needs one value per wavelength ({n}), got {values.size}")
        if np.any(mua < 0) or np.any(musp <= 0) or not np.all(np.isfinite(mua + musp)):
            raise InputError("mu_a must be >= 0 and mu_s' > 0 (1/mm)")
        return mua, musp

    def describe(self) -> str:
        if self.chromophores is not None:
            hbo, hb, water = self.chromophores
            return f"HbO {hbo:g} uM, Hb {hb:g} uM, water {water:g} %"
        return "mu_a " + ", ".join(f"{v:g}" for v in self.mua) + " /mm"


DEFAULT_MEDIUM = Medium(tuple(REFERENCE_VALUES))


@lru_cache(maxsize=8)
def _model_cached(medium: Medium, geometry: OptodeGeometry, wavelengths: Tuple[int, ...],
                  element_size_mm: float) -> np.ndarray:
    mesh = make_disk_mesh(geometry.diameter_mm, element_size_mm)
    model = DiffusionForwardModel(mesh, geometry.n_optodes, angle_offset_deg=geometry.angle_offset_deg,
                                  winding=geometry.winding)
    mua, musp = medium.properties(wavelengths)
    return model.measure(mua, musp).ravel()


def homogeneous_amplitudes(medium: Medium = DEFAULT_MEDIUM, geometry: OptodeGeometry = OptodeGeometry(),
                           wavelengths: Sequence[int] = WAVELENGTHS_NM,
                           element_size_mm: float = DEFAULT_ELEMENT_SIZE_MM) -> np.ndarray:
    """The simulator's amplitudes (W * N * (N - 1),) of a homogeneous disk (cached)."""
    return _model_cached(medium, geometry, tuple(int(w) for w in wavelengths), float(element_size_mm)).copy()


@dataclass
class Calibration:
    """What to calibrate with: ``reference`` amplitudes of a homogeneous phantom whose properties
    are ``medium``; or, without ``reference``, ``medium`` = the data's known background
    (``per_optode`` then also fits source/detector coupling)."""

    medium: Medium
    reference: Optional[np.ndarray] = None
    per_optode: bool = False


@dataclass
class CalibrationResult:
    """Calibrated amplitudes, the factors applied (data_cal = data * factors) and a summary line."""

    data: np.ndarray
    factors: np.ndarray
    summary: str


def _positive_vector(values: np.ndarray, what: str) -> np.ndarray:
    array = np.asarray(values, dtype=float).ravel()
    if not np.all(np.isfinite(array)) or np.any(array <= 0):
        raise InputError(f"the {what} must be finite positive amplitudes")
    return array


def calibrate(measurements: np.ndarray, calibration: Calibration, geometry: OptodeGeometry,
              wavelengths: Sequence[int] = WAVELENGTHS_NM) -> CalibrationResult:
    """Put measured amplitudes (user layout) on the model's scale (module docstring)."""
    data = _positive_vector(measurements, "measurements")
    model = homogeneous_amplitudes(calibration.medium, geometry, wavelengths)
    if data.size != model.size:
        raise InputError(f"{data.size} measurements do not fit {len(wavelengths)} wavelengths x {geometry.n_optodes} "
                         f"x {geometry.n_optodes - 1} pairs ({model.size})")
    if calibration.reference is not None:
        reference = _positive_vector(calibration.reference, "reference measurement")
        if reference.size != data.size:
            raise InputError(f"the reference measurement has {reference.size} values, the data {data.size}: "
                             "both must come from the same optodes and wavelengths")
        factors = model / reference
        summary = (f"calibrated channel by channel with a reference phantom ({calibration.medium.describe()}); "
                   f"factors {factors.min():.3g}-{factors.max():.3g}")
        return CalibrationResult(data * factors, factors, summary)
    n_w, n = len(wavelengths), geometry.n_optodes
    residual = (np.log(model) - np.log(data)).reshape(n_w, n, n - 1)
    if calibration.per_optode:
        design = _coupling_design(n_w, n)
        solution = np.linalg.lstsq(design, residual.ravel(), rcond=None)[0]
        log_factors = design @ solution
    else:
        log_factors = np.repeat(np.median(residual.reshape(n_w, -1), axis=1), n * (n - 1))
    factors = np.exp(log_factors)
    per_wavelength = np.exp(np.median(log_factors.reshape(n_w, -1), axis=1))
    summary = (f"calibrated to the known background ({calibration.medium.describe()}): per-wavelength scale "
               f"{per_wavelength.min():.3g}-{per_wavelength.max():.3g}"
               + (", with per-optode source/detector coupling" if calibration.per_optode else ""))
    return CalibrationResult(data * factors, factors, summary)


def _coupling_design(n_wavelengths: int, n_optodes: int) -> np.ndarray:
    """Design matrix of ln factor = a_w + s_i + d_j over the source-major channels."""
    n = n_optodes
    sources = np.repeat(np.arange(n), n - 1)
    detectors = np.array([j for i in range(n) for j in range(n) if j != i])
    rows = n_wavelengths * n * (n - 1)
    design = np.zeros((rows, n_wavelengths + 2 * n))
    channel = np.arange(rows)
    wavelength = channel // (n * (n - 1))
    design[channel, wavelength] = 1.0
    design[channel, n_wavelengths + np.tile(sources, n_wavelengths)] = 1.0
    design[channel, n_wavelengths + n + np.tile(detectors, n_wavelengths)] = 1.0
    return design


def scale_log_ratio(measurements: np.ndarray, geometry: OptodeGeometry,
                    wavelengths: Sequence[int] = WAVELENGTHS_NM) -> np.ndarray:
    """Per-wavelength median ln(data / homogeneous model at the middle training background)."""
    data = _positive_vector(measurements, "measurements")
    model = homogeneous_amplitudes(DEFAULT_MEDIUM, geometry, wavelengths)
    if data.size != model.size:
        raise InputError(f"expected {model.size} measurements, got {data.size}")
    return np.median((np.log(data) - np.log(model)).reshape(len(wavelengths), -1), axis=1)


def check_scale(measurements: np.ndarray, geometry: OptodeGeometry, wavelengths: Sequence[int] = WAVELENGTHS_NM,
                calibrated: bool = False) -> float:
    """Refuse (InputError) or warn (CalibrationWarning) on data whose scale does not fit the model.

    Returns the largest per-wavelength |median log-ratio| (module docstring).
    """
    ratios = scale_log_ratio(measurements, geometry, wavelengths)
    worst = int(np.argmax(np.abs(ratios)))
    value = float(abs(ratios[worst]))
    factor = float(np.exp(ratios[worst]))
    where = (f"the amplitudes at {int(wavelengths[worst])} nm are {factor:.3g}x the model's homogeneous disk "
             f"(median log-ratio {ratios[worst]:+.2f}; simulated tissue stays within +-2.1)")
    if value > SCALE_ERROR_LOG:
        if calibrated:
            raise InputError(f"after calibration {where}: check the reference file and the medium's properties")
        raise InputError(f"{where}: the data are not on the model's absolute scale; {CALIBRATE_HINT}")
    if value > SCALE_WARNING_LOG:
        warnings.warn(f"{where}; the reconstruction may be biased: {CALIBRATE_HINT}", CalibrationWarning,
                      stacklevel=2)
    return value


__all__ = ["CALIBRATE_HINT", "Calibration", "CalibrationResult", "CalibrationWarning", "DEFAULT_MEDIUM", "Medium",
           "SCALE_ERROR_LOG", "SCALE_WARNING_LOG", "calibrate", "check_scale", "homogeneous_amplitudes",
           "scale_log_ratio"]
