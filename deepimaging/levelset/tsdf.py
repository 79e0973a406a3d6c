"""Masks <-> (truncated) signed distance functions, positive inside, in millimetres.

The level-set methods start from the signed distance of an existing segment, and the
learned level set regresses a truncated SDF normalised to [-1, 1] (LevelSet R-CNN).
Distances are exact Euclidean (SciPy's EDT) with anisotropic spacing; the zero crossing lies
half-way between the last inside and first outside voxel centre.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
from scipy import ndimage

from ..core.errors import InputError


def signed_distance(mask: np.ndarray, spacing: Optional[Sequence[float]] = None) -> np.ndarray:
    """Signed distance (mm) of a 2D/3D mask, > 0 inside, < 0 outside, 0 nowhere exactly.

    Inside voxels get (distance to the nearest outside voxel) - h/2, outside voxels
    -((distance to the nearest inside voxel) - h/2), h = the smallest spacing: the boundary
    sits between voxel centres, which keeps ``signed_distance(m) > 0 == m`` exact.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim not in (2, 3):
        raise InputError(f"expected a 2D or 3D mask, got shape {mask.shape}")
    sampling = tuple(float(s) for s in spacing) if spacing is not None else (1.0,) * mask.ndim
    if len(sampling) != mask.ndim:
        raise InputError(f"spacing {tuple(sampling)} needs one value per mask axis ({mask.ndim})")
    if not mask.any():
        raise InputError("the mask is empty: there is no segment to measure a distance from")
    half = 0.5 * min(sampling)
    if mask.all():
        # Nothing outside: distance to the array border stands in for the distance to the boundary.
        padded = np.pad(mask, 1, constant_values=False)
        inside = ndimage.distance_transform_edt(padded, sampling=sampling)[(slice(1, -1),) * mask.ndim]
        return (inside - half).astype(np.float32)
    inside = ndimage.distance_transform_edt(mask, sampling=sampling)
    outside = ndimage.distance_transform_edt(~mask, sampling=sampling)
    return np.where(mask, inside - half, -(outside - half)).astype(np.float32)


def truncated_sdf(mask: np.ndarray, truncation: float, spacing: Optional[Sequence[float]] = None) -> np.ndarray:
    """Signed distance clipped to +-``truncation`` (mm) and divided by it: values in [-1, 1]."""
    if truncation <= 0:
        raise InputError(f"truncation must be positive, got {truncation}")
    return np.clip(signed_distance(mask, spacing) / truncation, -1.0, 1.0).astype(np.float32)


def sdf_to_mask(phi: np.ndarray) -> np.ndarray:
    """Inside = phi > 0 (the convention of every level set in this package)."""
    return np.asarray(phi) > 0
