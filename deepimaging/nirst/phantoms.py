"""Random breast-like NIRST phantoms as in the Z-Net paper (Optica 2022), on the 100 x 100 grid.

Geometry (paper, section 2.2): an 82 mm disk with either one circular inclusion of diameter
12, 16 or 20 mm, or two inclusions of 16 mm whose edge-to-edge distance is 4-42 mm, at random
positions fully inside the disk.  The four configurations are equally likely (the paper does
not give their proportions); the edge-to-edge distance is uniform on [4, 42] mm.

Chromophores: the paper draws background/inclusion values from its Supplement Table S1, which
is not part of the text we have.  We therefore use the documented levels below, chosen to span
in vivo breast NIRST values (HbT ~15-30 uM, StO2 ~50-80 %, water ~25-60 %; e.g. Srinivasan
et al., PNAS 100:12349, 2003) and tumour-like inclusion contrasts (HbT up to ~2.5x, water up to
~1.75x).  Each chromophore of the background takes one of its levels, each inclusion one
contrast factor per chromophore (independently, also between two inclusions).

MRI image (paper): inclusion grey 80, background 50, 4 % Gaussian noise -- read here as
multiplicative, sigma = 4 % of the local grey value -- and 0 outside the disk.  Maps: HbO (uM),
Hb (uM), water (%) inside the disk, 0 outside.

Two distributions (``distribution=``): ``"paper"`` (the default; the above, discrete levels and
one fixed MRI contrast) and ``"robust"`` (:mod:`deepimaging.nirst.robust_phantoms`): continuous
chromophore values, random MRI contrast (incl. darker lesions), bias field and texture, and
phantoms whose MRI shows a region the optics do not (and vice versa), so that a network trained
on it must take structure, not values, from the MRI (issue #11).

Reproducibility: phantom ``index`` of a dataset with ``seed`` uses its own generator
``numpy.random.default_rng([seed, index, 0])`` (measurement noise uses ``[seed, index, 1]``),
so any shard of indices regenerates exactly the phantoms of the full run, and different seeds
never share streams (which ``seed + index`` would).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Tuple

import numpy as np

from .mesh import DEFAULT_DIAMETER_MM, DEFAULT_GRID_SIZE, disk_mask, pixel_centres

CHROMOPHORES: Tuple[str, ...] = ("HbO", "Hb", "water")
CHROMOPHORE_UNITS: Tuple[str, ...] = ("uM", "uM", "%")

# Background levels (HbO uM, Hb uM, water %).
BACKGROUND_LEVELS: Dict[str, Tuple[float, ...]] = {
    "HbO": (10.0, 14.0, 18.0),
    "Hb": (5.0, 7.0, 9.0),
    "water": (30.0, 40.0, 50.0),
}
# Inclusion value = background level x one of these contrast factors.
INCLUSION_CONTRASTS: Dict[str, Tuple[float, ...]] = {
    "HbO": (1.25, 1.5, 2.0, 2.5),
    "Hb": (1.25, 1.5, 2.0, 2.5),
    "water": (1.1, 1.25, 1.5, 1.75),
}

SINGLE_INCLUSION_DIAMETERS_MM: Tuple[float, ...] = (12.0, 16.0, 20.0)
PAIR_DIAMETER_MM = 16.0
PAIR_EDGE_DISTANCE_MM: Tuple[float, float] = (4.0, 42.0)
MRI_BACKGROUND = 50.0
MRI_INCLUSION = 80.0
MRI_NOISE = 0.04
DISTRIBUTIONS: Tuple[str, ...] = ("paper", "robust")


@dataclass
class Phantom:
    """One phantom: geometry, chromophore values and its 100 x 100 images.

    ``maps`` (3, size, size) float32 HbO uM / Hb uM / water %; ``mri`` (size, size) float32;
    ``centres_mm`` (k, 2) and ``diameters_mm`` (k,) of the k = 1 or 2 inclusions;
    ``background`` (3,) and ``inclusion_values`` (k, 3) in map units; ``mri_ratio`` (k,) the
    MRI grey value of each inclusion over the background's (1.0: invisible in the MRI);
    ``kind``: ``"paper"``, ``"both"`` (every inclusion in optics and MRI), ``"mri_only"`` (one
    inclusion has no optical contrast) or ``"optics_only"`` (one inclusion is invisible in the MRI).
    """

    index: int
    seed: int
    centres_mm: np.ndarray
    diameters_mm: np.ndarray
    background: np.ndarray
    inclusion_values: np.ndarray
    maps: np.ndarray
    mri: np.ndarray
    mri_ratio: np.ndarray = field(default_factory=lambda: np.zeros(0))
    kind: str = "paper"

    @property
    def edge_distance_mm(self) -> float:
        """Edge-to-edge distance of a two-inclusion phantom (NaN for one inclusion)."""
        if len(self.diameters_mm) < 2:
            return float("nan")
        gap = np.linalg.norm(self.centres_mm[1] - self.centres_mm[0])
        return float(gap - 0.5 * (self.diameters_mm[0] + self.diameters_mm[1]))


def phantom_generator(seed: int, index: int, stream: int = 0) -> np.random.Generator:
    """The independent random stream of phantom ``index`` (stream 0: phantom, 1: data noise)."""
    return np.random.default_rng([int(seed), int(index), int(stream)])


def _uniform_in_disk(rng: np.random.Generator, radius: float) -> np.ndarray:
    r = radius * np.sqrt(rng.uniform())
    angle = rng.uniform(0.0, 2.0 * np.pi)
    return np.array([r * np.cos(angle), r * np.sin(angle)])


def sample_geometry(
    rng: np.random.Generator, radius: float = 0.5 * DEFAULT_DIAMETER_MM
) -> Tuple[np.ndarray, np.ndarray]:
    """Centres (k, 2) and diameters (k,) of the inclusions, fully inside the disk."""
    configuration = rng.integers(len(SINGLE_INCLUSION_DIAMETERS_MM) + 1)
    if configuration < len(SINGLE_INCLUSION_DIAMETERS_MM):
        diameter = SINGLE_INCLUSION_DIAMETERS_MM[configuration]
        return _uniform_in_disk(rng, radius - 0.5 * diameter)[None, :], np.array([diameter])
    limit = radius - 0.5 * PAIR_DIAMETER_MM
    gap = rng.uniform(*PAIR_EDGE_DISTANCE_MM)
    separation = PAIR_DIAMETER_MM + gap
    if separation > 2.0 * limit:
        raise ValueError("the disk is too small for the requested inclusion pair")
    for _ in range(100000):
        first = _uniform_in_disk(rng, limit)
        angle = rng.uniform(0.0, 2.0 * np.pi)
        second = first + separation * np.array([np.cos(angle), np.sin(angle)])
        if np.hypot(*second) <= limit:
            return np.stack([first, second]), np.full(2, PAIR_DIAMETER_MM)
    raise RuntimeError("could not place the inclusion pair")


def sample_values(rng: np.random.Generator, n_inclusions: int) -> Tuple[np.ndarray, np.ndarray]:
    """Background (3,) and inclusion (k, 3) values from the documented level tables."""
    background = np.array([rng.choice(BACKGROUND_LEVELS[name]) for name in CHROMOPHORES])
    contrasts = np.array(
        [[rng.choice(INCLUSION_CONTRASTS[name]) for name in CHROMOPHORES] for _ in range(n_inclusions)]
    )
    return background, background[None, :] * contrasts


def render_phantom(
    centres_mm: np.ndarray,
    diameters_mm: np.ndarray,
    background: np.ndarray,
    inclusion_values: np.ndarray,
    rng: np.random.Generator,
    radius: float = 0.5 * DEFAULT_DIAMETER_MM,
    size: int = DEFAULT_GRID_SIZE,
    mri_noise: float = MRI_NOISE,
) -> Tuple[np.ndarray, np.ndarray]:
    """Chromophore maps (3, size, size) and the noisy MRI (size, size), both float32."""
    x, y = pixel_centres(radius, size)
    inside = disk_mask(radius, size)
    maps = np.where(inside[None], np.asarray(background, dtype=float)[:, None, None], 0.0)
    mri = np.where(inside, MRI_BACKGROUND, 0.0)
    for centre, diameter, values in zip(centres_mm, diameters_mm, inclusion_values):
        lesion = np.hypot(x - centre[0], y - centre[1]) < 0.5 * diameter
        maps[:, lesion] = np.asarray(values, dtype=float)[:, None]
        mri[lesion] = MRI_INCLUSION
    mri = mri * (1.0 + mri_noise * rng.standard_normal(mri.shape))
    return maps.astype(np.float32), np.where(inside, mri, 0.0).astype(np.float32)


def make_phantom(
    index: int,
    seed: int = 0,
    diameter_mm: float = DEFAULT_DIAMETER_MM,
    size: int = DEFAULT_GRID_SIZE,
    distribution: str = "paper",
) -> Phantom:
    """Phantom ``index`` of the dataset ``seed`` -- the same whichever shard asks for it."""
    if distribution == "robust":
        from .robust_phantoms import make_robust_phantom

        return make_robust_phantom(index, seed, diameter_mm, size)
    if distribution != "paper":
        raise ValueError(f"unknown phantom distribution {distribution!r}; choose one of {', '.join(DISTRIBUTIONS)}")
    rng = phantom_generator(seed, index, 0)
    radius = 0.5 * float(diameter_mm)
    centres, diameters = sample_geometry(rng, radius)
    background, inclusion_values = sample_values(rng, len(diameters))
    maps, mri = render_phantom(centres, diameters, background, inclusion_values, rng, radius, size)
    ratio = np.full(len(diameters), MRI_INCLUSION / MRI_BACKGROUND)
    return Phantom(int(index), int(seed), centres, diameters, background, inclusion_values, maps, mri, ratio)
