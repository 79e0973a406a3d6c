"""The ``"robust"`` phantom distribution: the MRI gives structure, never values (issue #11).

The paper-style set (:mod:`deepimaging.nirst.phantoms`) draws chromophores from a few discrete
levels and always shows every inclusion in the MRI at grey 80 over 50.  A network trained on it
can read the optical contrast off the MRI: it invents lesions the MRI shows but the optics do
not have, misses lesions the MRI does not show, and snaps homogeneous tissue to a level.  Here:

* geometry: one inclusion of diameter U[10, 22] mm or two of U[12, 18] mm each (edge-to-edge
  4-42 mm), equally likely as in the paper (1/4 pairs), fully inside the disk;
* chromophores, continuous: background HbO U[8, 22] uM, Hb U[4, 11] uM, water U[25, 60] %
  (covering the paper levels 10-18, 5-9, 30-50); each inclusion, independently per chromophore,
  background x a contrast HbO/Hb U[0.75, 2.75], water U[0.8, 1.9] (covering 1.25-2.5 / 1.1-1.75,
  and some inclusions darker than the background);
* MRI, independent of the optics: background grey U[30, 150]; each inclusion's grey ratio to the
  background drawn from [0.45, 0.83] (30 %) or [1.2, 2.5] (70 %), log-uniform; a smooth
  multiplicative bias field (linear gradient up to +-20 % across the radius, radial term up to
  +-15 %); smooth texture (Gaussian-filtered noise, sigma 2-8 px, amplitude 0-8 %) and white
  multiplicative noise 1-8 %;
* kinds: 70 % ``"both"`` (every inclusion in optics and MRI), 15 % ``"mri_only"`` (one
  inclusion -- the only one, or one of the pair -- has exactly the background's chromophores
  but is visible in the MRI), 15 % ``"optics_only"`` (one inclusion has MRI ratio 1, i.e. is
  invisible in the MRI, but has optical contrast).

Random streams: phantom ``index`` of dataset ``seed`` uses ``default_rng([seed, index, 2])``
(stream 2, so robust and paper phantoms of one seed never share draws; the data noise keeps
stream 1).
"""

from __future__ import annotations

from typing import Dict, Tuple

import numpy as np
from scipy import ndimage

from .mesh import DEFAULT_DIAMETER_MM, DEFAULT_GRID_SIZE, disk_mask, pixel_centres
from .phantoms import CHROMOPHORES, PAIR_EDGE_DISTANCE_MM, Phantom, _uniform_in_disk, phantom_generator

ROBUST_STREAM = 2
BACKGROUND_RANGES: Dict[str, Tuple[float, float]] = {"HbO": (8.0, 22.0), "Hb": (4.0, 11.0), "water": (25.0, 60.0)}
CONTRAST_RANGES: Dict[str, Tuple[float, float]] = {"HbO": (0.75, 2.75), "Hb": (0.75, 2.75), "water": (0.8, 1.9)}
SINGLE_DIAMETER_RANGE_MM = (10.0, 22.0)
PAIR_DIAMETER_RANGE_MM = (12.0, 18.0)
MRI_BACKGROUND_RANGE = (30.0, 150.0)
MRI_BRIGHT_RATIO = (1.2, 2.5)
MRI_DARK_RATIO = (0.45, 0.83)
MRI_DARK_PROBABILITY = 0.3
MRI_NOISE_RANGE = (0.01, 0.08)
TEXTURE_AMPLITUDE_RANGE = (0.0, 0.08)
TEXTURE_SIGMA_PX = (2.0, 8.0)
BIAS_GRADIENT = 0.2
BIAS_RADIAL = 0.15
KIND_PROBABILITIES: Dict[str, float] = {"both": 0.70, "mri_only": 0.15, "optics_only": 0.15}


def sample_robust_geometry(rng: np.random.Generator, radius: float) -> Tuple[np.ndarray, np.ndarray]:
    """Centres (k, 2) and continuous diameters (k,) of one or two inclusions inside the disk."""
    if rng.uniform() < 0.75:
        diameter = rng.uniform(*SINGLE_DIAMETER_RANGE_MM)
        return _uniform_in_disk(rng, radius - 0.5 * diameter)[None, :], np.array([diameter])
    diameters = rng.uniform(*PAIR_DIAMETER_RANGE_MM, size=2)
    limit = radius - 0.5 * float(diameters.max())
    for _ in range(100000):
        separation = 0.5 * diameters.sum() + rng.uniform(*PAIR_EDGE_DISTANCE_MM)
        first = _uniform_in_disk(rng, radius - 0.5 * diameters[0])
        angle = rng.uniform(0.0, 2.0 * np.pi)
        second = first + separation * np.array([np.cos(angle), np.sin(angle)])
        if separation <= 2.0 * limit and np.hypot(*second) <= radius - 0.5 * diameters[1]:
            return np.stack([first, second]), diameters
    raise RuntimeError("could not place the inclusion pair")


def sample_robust_values(rng: np.random.Generator, n_inclusions: int) -> Tuple[np.ndarray, np.ndarray]:
    """Continuous background (3,) and inclusion (k, 3) values (HbO uM, Hb uM, water %)."""
    background = np.array([rng.uniform(*BACKGROUND_RANGES[name]) for name in CHROMOPHORES])
    contrasts = np.array([[rng.uniform(*CONTRAST_RANGES[name]) for name in CHROMOPHORES]
                          for _ in range(n_inclusions)])
    return background, background[None, :] * contrasts


def sample_mri_ratio(rng: np.random.Generator) -> float:
    """A visible inclusion's MRI grey ratio to the background: darker (30 %) or brighter, log-uniform."""
    low, high = MRI_DARK_RATIO if rng.uniform() < MRI_DARK_PROBABILITY else MRI_BRIGHT_RATIO
    return float(np.exp(rng.uniform(np.log(low), np.log(high))))


def smooth_texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """Unit-std smooth random field (size, size): Gaussian-filtered white noise, random width."""
    field = ndimage.gaussian_filter(rng.standard_normal((size, size)), rng.uniform(*TEXTURE_SIGMA_PX), mode="wrap")
    return field / max(float(field.std()), 1e-12)


def bias_field(rng: np.random.Generator, x: np.ndarray, y: np.ndarray, radius: float) -> np.ndarray:
    """Smooth multiplicative coil-like bias: 1 + linear gradient + radial quadratic term."""
    angle = rng.uniform(0.0, 2.0 * np.pi)
    gradient = rng.uniform(-BIAS_GRADIENT, BIAS_GRADIENT)
    radial = rng.uniform(-BIAS_RADIAL, BIAS_RADIAL)
    along = (x * np.cos(angle) + y * np.sin(angle)) / radius
    return 1.0 + gradient * along + radial * ((x ** 2 + y ** 2) / radius ** 2 - 0.5)


def render_robust_mri(rng: np.random.Generator, centres_mm: np.ndarray, diameters_mm: np.ndarray,
                      ratios: np.ndarray, radius: float, size: int) -> np.ndarray:
    """MRI (size, size) float32: background grey x inclusion ratios x bias x texture x noise."""
    x, y = pixel_centres(radius, size)
    inside = disk_mask(radius, size)
    contrast = np.ones((size, size))
    for centre, diameter, ratio in zip(centres_mm, diameters_mm, ratios):
        contrast[np.hypot(x - centre[0], y - centre[1]) < 0.5 * diameter] = ratio
    grey = rng.uniform(*MRI_BACKGROUND_RANGE) * contrast * bias_field(rng, x, y, radius)
    grey = grey * (1.0 + rng.uniform(*TEXTURE_AMPLITUDE_RANGE) * smooth_texture(rng, size))
    grey = grey * (1.0 + rng.uniform(*MRI_NOISE_RANGE) * rng.standard_normal((size, size)))
    return np.where(inside, np.maximum(grey, 0.0), 0.0).astype(np.float32)


def render_maps(centres_mm: np.ndarray, diameters_mm: np.ndarray, background: np.ndarray,
                inclusion_values: np.ndarray, radius: float, size: int) -> np.ndarray:
    """Chromophore maps (3, size, size) float32, 0 outside the disk."""
    x, y = pixel_centres(radius, size)
    inside = disk_mask(radius, size)
    maps = np.where(inside[None], np.asarray(background, dtype=float)[:, None, None], 0.0)
    for centre, diameter, values in zip(centres_mm, diameters_mm, inclusion_values):
        lesion = np.hypot(x - centre[0], y - centre[1]) < 0.5 * diameter
        maps[:, lesion] = np.asarray(values, dtype=float)[:, None]
    return maps.astype(np.float32)


def make_robust_phantom(index: int, seed: int = 0, diameter_mm: float = DEFAULT_DIAMETER_MM,
                        size: int = DEFAULT_GRID_SIZE) -> Phantom:
    """Phantom ``index`` of the robust dataset ``seed`` (module docstring)."""
    rng = phantom_generator(seed, index, ROBUST_STREAM)
    radius = 0.5 * float(diameter_mm)
    centres, diameters = sample_robust_geometry(rng, radius)
    background, values = sample_robust_values(rng, len(diameters))
    ratios = np.array([sample_mri_ratio(rng) for _ in diameters])
    kinds = list(KIND_PROBABILITIES)
    kind = kinds[int(rng.choice(len(kinds), p=list(KIND_PROBABILITIES.values())))]
    if kind != "both":
        chosen = int(rng.integers(len(diameters)))
        if kind == "mri_only":
            values[chosen] = background
        else:
            ratios[chosen] = 1.0
    maps = render_maps(centres, diameters, background, values, radius, size)
    mri = render_robust_mri(rng, centres, diameters, ratios, radius, size)
    return Phantom(int(index), int(seed), centres, diameters, background, values, maps, mri, ratios, kind)
