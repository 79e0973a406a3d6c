"""Tissue optics for NIRST: chromophore absorption spectra and a power-law scattering model.

Absorption of breast tissue from oxy-haemoglobin (HbO), deoxy-haemoglobin (Hb) and water::

    mu_a(lambda) [1/mm] = ln(10) * (eps_HbO * C_HbO + eps_Hb * C_Hb) [1/cm] / 10
                          + water_fraction * mu_a,water(lambda) [1/mm]

with eps the decadic molar extinction (cm^-1 / M) and C the molar concentration (1 uM = 1e-6 M).
Scattering: mu_s'(lambda) = a * (lambda / 1000 nm)^(-b)   [1/mm]  (Mie-like power law).

Sanity check (background HbO 15 uM, Hb 7 uM, water 40 %, 808 nm): mu_a = 0.0049 /mm, i.e.
inside the 0.003-0.01 /mm usually reported for breast in the near infrared; the water peak
makes 948 nm the most absorbing wavelength (~0.02 /mm at the same concentrations).
"""

from __future__ import annotations

from typing import Dict, Sequence, Tuple

import numpy as np

# The nine NIRST wavelengths of the Z-Net paper (nm).
WAVELENGTHS_NM: Tuple[int, ...] = (661, 735, 785, 808, 826, 852, 903, 912, 948)

# Molar extinction coefficients, decadic, cm^-1 / M: (HbO, Hb).
# Source: S. Prahl, "Tabulated molar extinction coefficient for hemoglobin in water"
# (Oregon Medical Laser Center, omlc.org/spectra/hemoglobin/summary.html; compiled from
# W. B. Gratzer and N. Kollias).  The table has 2 nm steps; odd wavelengths are the mean of
# the two neighbouring rows (661 = mean of 660/662, 735 = 734/736, 785 = 784/786, 903 = 902/904).
HEMOGLOBIN_EXTINCTION: Dict[int, Tuple[float, float]] = {
    661: (316.8, 3183.42),
    735: (413.2, 1101.98),
    785: (735.4, 977.04),
    808: (856.0, 723.52),
    826: (956.4, 693.32),
    852: (1062.0, 691.08),
    903: (1204.0, 766.24),
    912: (1216.4, 776.92),
    948: (1207.2, 621.64),
}

# Absorption coefficient of pure (100 %) water, 1/mm.
# Source: G. M. Hale and M. R. Querry, "Optical constants of water in the 200-nm to 200-um
# wavelength region", Appl. Opt. 12, 555-563 (1973), as tabulated in cm^-1 by S. Prahl
# (omlc.org/spectra/water/abs/); linearly interpolated between the tabulated wavelengths
# (650, 675, 725, 750, 775, 800, 810, 825, 830, 850, 860, 900, 910, 920, 940, 950 nm) and
# divided by 10 for 1/mm.
WATER_ABSORPTION_PER_MM: Dict[int, float] = {
    661: 0.0003618,
    735: 0.001994,
    785: 0.002240,
    808: 0.001989,
    826: 0.002821,
    852: 0.004375,
    903: 0.006947,
    912: 0.008018,
    948: 0.03655,
}

# Scattering power law defaults: typical of breast in NIRST (a ~ 0.5-1.5 /mm, b ~ 0.5-1.5 for
# lambda in um; e.g. Srinivasan et al., PNAS 100:12349, 2003).  a = 1 /mm, b = 1 gives
# mu_s' = 1.24 /mm at 808 nm.
DEFAULT_SCATTERING_AMPLITUDE = 1.0  # a, 1/mm at 1000 nm
DEFAULT_SCATTERING_POWER = 1.0  # b, dimensionless

MICROMOLAR = 1e-6  # mol/L per uM


def _check_wavelengths(wavelengths: Sequence[int]) -> Tuple[int, ...]:
    wavelengths = tuple(int(round(w)) for w in np.atleast_1d(wavelengths))
    unknown = [w for w in wavelengths if w not in HEMOGLOBIN_EXTINCTION]
    if unknown:
        raise ValueError(f"no tabulated spectra for {unknown} nm; available: {WAVELENGTHS_NM}")
    return wavelengths


def spectral_matrix(wavelengths: Sequence[int] = WAVELENGTHS_NM) -> np.ndarray:
    """(W, 3) matrix E with mu_a [1/mm] = E @ [HbO uM, Hb uM, water fraction].

    mu_a is linear in the concentrations, so E is also the exact derivative used to chain
    a mu_a Jacobian to chromophore concentrations (E[:, 0] and E[:, 1] are per uM).
    """
    rows = []
    for wavelength in _check_wavelengths(wavelengths):
        eps_hbo, eps_hb = HEMOGLOBIN_EXTINCTION[wavelength]
        per_micromolar = np.log(10.0) * MICROMOLAR / 10.0  # (cm^-1/M) * uM -> 1/mm
        rows.append([eps_hbo * per_micromolar, eps_hb * per_micromolar, WATER_ABSORPTION_PER_MM[wavelength]])
    return np.asarray(rows)


def absorption(
    hbo_uM: np.ndarray,
    hb_uM: np.ndarray,
    water_fraction: np.ndarray,
    wavelengths: Sequence[int] = WAVELENGTHS_NM,
) -> np.ndarray:
    """mu_a [1/mm] with shape (W, *broadcast shape of the inputs), e.g. (9, n_nodes).

    ``water_fraction`` is 0..1 (maps store water in %, divide by 100).
    """
    hbo, hb, water = np.broadcast_arrays(
        np.asarray(hbo_uM, dtype=float), np.asarray(hb_uM, dtype=float), np.asarray(water_fraction, dtype=float)
    )
    concentrations = np.stack([hbo, hb, water])  # (3, ...)
    return np.tensordot(spectral_matrix(wavelengths), concentrations, axes=(1, 0))


def reduced_scattering(
    wavelengths: Sequence[int] = WAVELENGTHS_NM,
    amplitude: float = DEFAULT_SCATTERING_AMPLITUDE,
    power: float = DEFAULT_SCATTERING_POWER,
) -> np.ndarray:
    """mu_s' [1/mm] = a * (lambda / 1000 nm)^(-b), one value per wavelength."""
    lam = np.asarray(np.atleast_1d(wavelengths), dtype=float)
    return float(amplitude) * (lam / 1000.0) ** (-float(power))
