"""Built-in test data for refinement: a noisy image of a lobed blob and a rough segment of it.

Used by ``make demo``, the module self-test and the tests, so every run has data with a known
ground truth and nobody needs to download anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Tuple

import numpy as np
from scipy import ndimage

from ..core.image import Image


@dataclass
class RefinementCase:
    """Image, true mask and a deliberately rough initial mask (all (z, y, x) on one grid)."""

    image: Image
    truth: np.ndarray
    rough: np.ndarray


def lobed_blob(shape: Tuple[int, int, int], lobes: int = 5, amplitude: float = 0.18) -> np.ndarray:
    """A star-shaped blob whose radius wobbles with ``lobes`` bumps (2D) or a lobed ellipsoid (3D)."""
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, s) if s > 1 else np.zeros(1) for s in shape], indexing="ij")
    angle = np.arctan2(y, x)
    radius = 0.55 * (1.0 + amplitude * np.sin(lobes * angle))
    if shape[0] == 1:
        return np.sqrt(x ** 2 + y ** 2) < radius
    return np.sqrt(x ** 2 + y ** 2 + (z * 1.3) ** 2) < radius


def make_refinement_case(shape: Sequence[int] = (1, 192, 192), *, noise: float = 0.35, seed: int = 0,
                         spacing: Sequence[float] = (0.8, 0.8, 1.0)) -> RefinementCase:
    """Noisy smooth-edged blob plus a rough segment (a smoothed, shifted ellipse missing the lobes).

    ``spacing`` is (x, y, z) mm, as everywhere in :class:`Image`.
    """
    shape = tuple(int(s) for s in shape)
    rng = np.random.default_rng(seed)
    truth = lobed_blob(shape)
    smooth = ndimage.gaussian_filter(truth.astype(np.float32), sigma=(0 if shape[0] == 1 else 1.0, 1.5, 1.5))
    bias = np.linspace(0.0, 0.15, shape[-1], dtype=np.float32)[None, None, :]
    image = 100.0 + 60.0 * smooth + 60.0 * bias + rng.normal(0.0, 60.0 * noise, size=shape).astype(np.float32)
    structure = ndimage.generate_binary_structure(3, 1)
    if shape[0] == 1:
        structure[0] = structure[2] = False  # erode in-plane only for a single slice
    rough = ndimage.binary_erosion(truth, structure, iterations=max(2, shape[-1] // 24))
    rough = ndimage.shift(rough.astype(np.float32), (0, shape[1] * 0.03, -shape[2] * 0.03), order=0) > 0.5
    return RefinementCase(Image(image.astype(np.float32), spacing), truth, rough)
