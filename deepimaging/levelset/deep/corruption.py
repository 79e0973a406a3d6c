"""Coarse masks from true ones: the documented, seeded corruptions used for training and evaluation.

Each call applies one or two of (chosen with the seeded ``rng``), in 2D or 3D:

* ``erode`` / ``dilate``: binary erosion or dilation by 1..``max_radius`` voxels;
* ``jitter``: the signed distance plus a smooth random field (amplitude up to ``max_radius``
  voxels, correlation length ~ 1/6 of the object), thresholded at 0 -- a wobbly boundary;
* ``elastic``: a smooth random displacement field (up to ``max_radius`` voxels) warps the mask;
* ``blobs``: 1-3 balls (radius 1..``max_radius``) centred near the boundary are added or cut out;
* ``shift``: a translation by up to ``max_radius`` voxels.

``max_radius`` defaults to 12 % of the object's extent (at least 1).  The result is never empty:
if a corruption removes everything, the true mask dilated by one voxel is returned.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
from scipy import ndimage

from ..tsdf import signed_distance

KINDS = ("erode", "dilate", "jitter", "elastic", "blobs", "shift")


def _extent(mask: np.ndarray) -> float:
    coords = np.argwhere(mask)
    return float((coords.max(axis=0) - coords.min(axis=0) + 1).max())


def _smooth_field(shape, sigma: float, rng: np.random.Generator) -> np.ndarray:
    field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma, mode="wrap")
    peak = float(np.abs(field).max())
    return field / peak if peak > 0 else field


def corrupt_mask(mask: np.ndarray, rng: np.random.Generator, *, kinds: Sequence[str] = KINDS,
                 max_radius: Optional[float] = None) -> np.ndarray:
    """A seeded coarse version of the 2D/3D boolean ``mask`` (see the module docstring)."""
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return mask.copy()
    extent = _extent(mask)
    radius = max(1.0, 0.12 * extent) if max_radius is None else max(1.0, float(max_radius))
    chosen = rng.choice(list(kinds), size=min(len(kinds), int(rng.integers(1, 3))), replace=False)
    out = mask.copy()
    for kind in chosen:
        out = _apply(str(kind), out, rng, radius, extent)
    if not out.any():
        out = ndimage.binary_dilation(mask)
    return out


def _apply(kind: str, mask: np.ndarray, rng: np.random.Generator, radius: float, extent: float) -> np.ndarray:
    nd = mask.ndim
    if kind in ("erode", "dilate"):
        it = int(rng.integers(1, max(2, int(round(radius))) + 1))
        op = ndimage.binary_erosion if kind == "erode" else ndimage.binary_dilation
        return op(mask, iterations=it)
    if kind == "jitter":
        sdf = signed_distance(mask) if mask.any() and not mask.all() else np.zeros(mask.shape, np.float32)
        return sdf + radius * rng.uniform(0.4, 1.0) * _smooth_field(mask.shape, max(1.5, extent / 6), rng) > 0
    if kind == "elastic":
        grids = np.meshgrid(*[np.arange(s, dtype=np.float32) for s in mask.shape], indexing="ij")
        amp = radius * rng.uniform(0.4, 1.0)
        coords = [g + amp * _smooth_field(mask.shape, max(2.0, extent / 5), rng) for g in grids]
        return ndimage.map_coordinates(mask.astype(np.float32), coords, order=1, mode="constant") > 0.5
    if kind == "blobs":
        edge = np.argwhere(mask ^ ndimage.binary_erosion(mask))
        if len(edge) == 0:
            return mask
        out = mask.copy()
        grids = np.ogrid[tuple(slice(0, s) for s in mask.shape)]
        for _ in range(int(rng.integers(1, 4))):
            centre = edge[int(rng.integers(len(edge)))]
            r = rng.uniform(1.0, max(1.5, radius))
            ball = sum((g - c) ** 2 for g, c in zip(grids, centre)) <= r * r
            out = (out | ball) if rng.random() < 0.5 else (out & ~ball)
        return out
    if kind == "shift":
        offset = rng.uniform(-radius, radius, size=nd)
        return ndimage.shift(mask.astype(np.float32), offset, order=0, mode="constant") > 0.5
    raise ValueError(f"unknown corruption {kind!r}; choose from {KINDS}")
