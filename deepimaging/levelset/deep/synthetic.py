"""Built-in data for the learned refiner: objects under non-uniform intensities, where classic
Chan-Vese (piecewise-constant intensities) fails.

Each image holds one target object (a lobed, rotated blob in 2D, a lobed ellipsoid in 3D) and
1-3 distractor blobs of similar brightness close to it, under

* a **bias field**: a linear ramp in a random direction whose rise across the image is 1-2x the
  object/background contrast, plus a smooth random low-frequency field (+-0.3);
* **texture**: the object's brightness is multiplied by 1 + 0.35 x a smooth random field;
* Gaussian noise (sigma 0.15-0.3 of the contrast) and a random affine intensity scale
  (like CT/MR units), so nothing can rely on absolute values.

The ground truth is the target object; coarse masks come from
:func:`deepimaging.levelset.deep.corruption.corrupt_mask`.  Everything is seeded.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
from scipy import ndimage

from ...core.errors import InputError
from ...core.image import Image
from ...core.imageio import write_image
from .corruption import corrupt_mask

DEFAULT_SIZE = {2: 96, 3: 48}


def _blob(grids, centre, radius: float, lobes: int, amplitude: float, angle: float, stretch: float) -> np.ndarray:
    rel = [g - c for g, c in zip(grids, centre)]
    y, x = rel[-2], rel[-1]
    yr = math.cos(angle) * y - math.sin(angle) * x
    xr = math.sin(angle) * y + math.cos(angle) * x
    theta = np.arctan2(yr, xr)
    r = radius * (1.0 + amplitude * np.sin(lobes * theta))
    dist_sq = (xr * stretch) ** 2 + (yr / stretch) ** 2
    if len(rel) == 3:
        dist_sq = dist_sq + (rel[0] * 1.2) ** 2
    return dist_sq < r * r


def make_sample(dim: int, seed: int, size: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray]:
    """(image float32, truth bool), both (z, y, x) ((1, y, x) in 2D); deterministic in ``seed``."""
    if dim not in (2, 3):
        raise InputError(f"dim must be 2 or 3, got {dim}")
    size = int(size or DEFAULT_SIZE[dim])
    rng = np.random.default_rng(seed)
    shape = (size,) * dim
    grids = np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij")
    centre = rng.uniform(0.35, 0.65, size=dim) * size
    radius = rng.uniform(0.14, 0.22) * size
    truth = _blob(grids, centre, radius, int(rng.integers(3, 7)), rng.uniform(0.1, 0.3), rng.uniform(0, math.pi),
                  rng.uniform(0.8, 1.25))
    keep_out = ndimage.binary_dilation(truth, iterations=2)
    distractors = np.zeros(shape, bool)
    for _ in range(int(rng.integers(1, 4))):
        direction = rng.standard_normal(dim)
        direction /= np.linalg.norm(direction) + 1e-9
        r = rng.uniform(0.07, 0.14) * size
        c = centre + direction * (radius * rng.uniform(1.15, 1.6) + r)
        blob = _blob(grids, c, r, int(rng.integers(2, 5)), rng.uniform(0.0, 0.2), rng.uniform(0, math.pi), 1.0)
        distractors |= blob & ~keep_out
    field = lambda s: ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), s, mode="wrap")  # noqa: E731
    texture = field(size / 16)
    texture /= np.abs(texture).max() + 1e-9
    smooth = field(size / 5)
    smooth /= np.abs(smooth).max() + 1e-9
    objects = truth * (1.0 + 0.35 * texture) + distractors * rng.uniform(0.8, 1.1) * (1.0 + 0.35 * texture)
    objects = ndimage.gaussian_filter(objects.astype(np.float32), 0.7)
    ramp_dir = rng.standard_normal(dim)
    ramp_dir /= np.linalg.norm(ramp_dir) + 1e-9
    ramp = sum(g * d for g, d in zip(grids, ramp_dir)) / size
    bias = rng.uniform(1.0, 2.0) * (ramp - ramp.mean()) + 0.3 * smooth
    image = objects + bias + rng.normal(0.0, rng.uniform(0.15, 0.3), size=shape).astype(np.float32)
    image = rng.uniform(50, 300) * image + rng.uniform(-200, 200)
    if dim == 2:
        image, truth = image[np.newaxis], truth[np.newaxis]
    return image.astype(np.float32), truth


def write_synthetic_refine_dataset(out_dir: Path, n: int = 40, dim: int = 2, seed: int = 0,
                                   size: Optional[int] = None) -> Path:
    """Write ``n`` cases as ``out_dir/{images,masks,coarse}/case_SSSSS.nrrd`` (SSSSS = seed + i); returns out_dir.

    Coarse masks are :func:`corrupt_mask` of the truth with ``rng = default_rng(seed + i + 10**6)``.
    """
    if int(n) < 1:
        raise InputError(f"n must be at least 1, got {n}")
    out_dir = Path(out_dir)
    folders = [out_dir / name for name in ("images", "masks", "coarse")]
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
    for i in range(int(n)):
        case_seed = int(seed) + i
        image, truth = make_sample(dim, case_seed, size)
        view = truth[0] if dim == 2 else truth
        coarse = corrupt_mask(view, np.random.default_rng(case_seed + 10 ** 6))
        coarse = coarse[np.newaxis] if dim == 2 else coarse
        name = f"case_{case_seed:05d}.nrrd"
        write_image(Image(image), folders[0] / name)
        write_image(Image(truth.astype(np.uint8)), folders[1] / name)
        write_image(Image(coarse.astype(np.uint8)), folders[2] / name)
    return out_dir
