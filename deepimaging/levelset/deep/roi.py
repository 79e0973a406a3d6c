"""Regions of interest for the learned level set: crop + resample to a fixed grid, and paste back.

The network always sees a fixed grid (2D default 64 x 64, 3D default 32^3), like the RoIAlign
crops of LevelSet R-CNN.  A ROI here is a **physically square/cubic** box (same side in mm on
every axis) around the segment (or a user box), so the grid is isotropic and the Chan-Vese
curvature needs no spacing; anisotropic voxels just give fewer voxels along the coarse axis.

* Side = the segment's largest extent in mm grown by ``margin`` (fraction of the extent on each
  side, default 0.25) and at least ``min_side`` voxels of the finest spacing (default 12), so a
  one-voxel segment gets a 12-voxel ROI instead of an error.
* Boxes may reach past the image border: the image is padded by **edge replication** and masks
  by zeros; pasting back writes only the part inside the image.
* Resampling is linear with voxel centres mapped consistently both ways (``align_corners=False``);
  when the crop is larger than the grid the image is Gaussian-prefiltered against aliasing.
* 2D images are stored as (1, y, x); a 2D model works on the (y, x) plane of such an image.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from ...core.errors import InputError

DEFAULT_GRID = {2: 64, 3: 32}


@dataclass
class RoiBox:
    """Voxel box per model axis ((y, x) for 2D, (z, y, x) for 3D); ``hi`` is exclusive.

    ``lo``/``hi`` may lie outside the image (the crop is padded there)."""

    lo: Tuple[int, ...]
    hi: Tuple[int, ...]

    @property
    def size(self) -> Tuple[int, ...]:
        return tuple(h - lo for lo, h in zip(self.lo, self.hi))

    def clipped(self, shape: Sequence[int]) -> Tuple[slice, ...]:
        """Slices of the part of the box inside an array of ``shape``."""
        return tuple(slice(max(0, lo), min(int(s), h)) for lo, h, s in zip(self.lo, self.hi, shape))


def spatial_view(array: np.ndarray, dim: int) -> np.ndarray:
    """The model's view of a (z, y, x) array: (y, x) of a single slice for 2D, as is for 3D."""
    array = np.asarray(array)
    if array.ndim == 2:
        array = array[np.newaxis]
    if dim == 2:
        if array.shape[0] != 1:
            raise InputError(f"a 2D model needs a single slice (1, y, x), got a volume of shape {array.shape}; "
                             "use a 3D model for volumes")
        return array[0]
    if array.shape[0] == 1:
        raise InputError(f"a 3D model needs a volume, got a single slice of shape {array.shape}; use a 2D model")
    return array


def box_around(lo: Sequence[float], hi: Sequence[float], spacing: Sequence[float], *, margin: float = 0.25,
               min_side: int = 12) -> RoiBox:
    """Square/cubic (in mm) box around the voxel range [lo, hi) (float bounds allowed).

    ``spacing`` per model axis; side = max extent (mm) x (1 + 2 margin), >= ``min_side`` finest voxels.
    """
    if margin < 0:
        raise InputError(f"ROI margin must be >= 0, got {margin}")
    sp = np.asarray(spacing, dtype=float)
    lo_a, hi_a = np.asarray(lo, dtype=float), np.asarray(hi, dtype=float)
    if np.any(hi_a <= lo_a):
        raise InputError(f"empty box: lo {tuple(lo)} hi {tuple(hi)}")
    extent_mm = float(np.max((hi_a - lo_a) * sp))
    side_mm = max(extent_mm * (1.0 + 2.0 * margin), int(min_side) * float(sp.min()))
    centre = (lo_a + hi_a) / 2.0
    size = np.maximum(1, np.ceil(side_mm / sp - 1e-6)).astype(int)
    start = np.floor(centre - size / 2.0 + 0.5).astype(int)
    return RoiBox(tuple(int(v) for v in start), tuple(int(v) for v in start + size))


def box_from_mask(mask: np.ndarray, spacing: Sequence[float], *, margin: float = 0.25, min_side: int = 12) -> RoiBox:
    """ROI around the bounding box of a (model-axes) mask; an empty mask is an :class:`InputError`."""
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        raise InputError("the segment is empty: draw or compute a rough segment first (or give a box)")
    lo, hi = [], []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(mask.any(axis=other))
        lo.append(hits[0])
        hi.append(hits[-1] + 1)
    return box_around(lo, hi, spacing, margin=margin, min_side=min_side)


def box_from_user(box: Sequence[int], shape_zyx: Sequence[int], dim: int, spacing: Sequence[float], *,
                  margin: float = 0.25, min_side: int = 12) -> RoiBox:
    """ROI from a user box (z0, y0, x0, z1, y1, x1) in voxel indices, ends exclusive (like slices).

    For a 2D image z0, z1 are ignored (use 0, 1).  The box must overlap the image.
    """
    values = [int(v) for v in box]
    if len(values) != 6:
        raise InputError(f"a ROI box needs six numbers z0,y0,x0,z1,y1,x1, got {len(values)}")
    lo, hi = values[:3], values[3:]
    axes = range(1, 3) if dim == 2 else range(3)
    for a in axes:
        if hi[a] <= lo[a]:
            raise InputError(f"ROI box {tuple(values)}: end must be larger than start on every axis")
        if hi[a] <= 0 or lo[a] >= shape_zyx[a]:
            raise InputError(f"ROI box {tuple(values)} lies outside the image of shape {tuple(shape_zyx)}")
    return box_around([lo[a] for a in axes], [hi[a] for a in axes], spacing, margin=margin, min_side=min_side)


def crop_padded(array: np.ndarray, box: RoiBox, mode: str = "edge") -> np.ndarray:
    """The box's content; outside the image: edge replication (``mode="edge"``) or zeros."""
    shape = array.shape
    inner = box.clipped(shape)
    part = array[inner]
    pad = [(max(0, -lo), max(0, h - int(s))) for lo, h, s in zip(box.lo, box.hi, shape)]
    if any(p != (0, 0) for p in pad):
        if part.size == 0:
            raise InputError("the ROI lies entirely outside the image")
        part = np.pad(part, pad, mode="edge") if mode == "edge" else np.pad(part, pad, mode="constant")
    return part


def _interp(tensor: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    mode = "bilinear" if tensor.dim() == 4 else "trilinear"
    return F.interpolate(tensor, size=tuple(int(s) for s in size), mode=mode, align_corners=False)


def resample(array: np.ndarray, grid: Sequence[int], *, antialias: bool = True) -> np.ndarray:
    """Linear resampling of a crop to ``grid`` (voxel centres aligned); Gaussian prefilter when shrinking."""
    data = np.asarray(array, dtype=np.float32)
    if antialias:
        sigma = [max(0.0, (s / g - 1.0) / 2.0) for s, g in zip(data.shape, grid)]
        if max(sigma) > 0.1:
            data = ndimage.gaussian_filter(data, sigma, mode="nearest")
    tensor = torch.from_numpy(np.ascontiguousarray(data))[None, None]
    return _interp(tensor, grid)[0, 0].numpy()


def crop_image(array: np.ndarray, box: RoiBox, grid: Sequence[int]) -> np.ndarray:
    """Image crop (edge-padded) on the grid."""
    return resample(crop_padded(np.asarray(array, dtype=np.float32), box, "edge"), grid)


def crop_mask(mask: np.ndarray, box: RoiBox, grid: Sequence[int]) -> np.ndarray:
    """Mask crop (zero-padded) on the grid, thresholded at 0.5 of its linear interpolation."""
    crop = crop_padded(np.asarray(mask, dtype=np.float32), box, "zeros")
    return resample(crop, grid, antialias=False) > 0.5


def paste(phi_grid: np.ndarray, box: RoiBox, shape: Sequence[int], fill: Optional[float] = None) -> np.ndarray:
    """Resample a grid level set back to the box's voxels and write it into an array of ``shape``.

    Voxels outside the box get ``fill`` (default: min(phi.min(), -1), i.e. outside).
    """
    phi_grid = np.asarray(phi_grid, dtype=np.float32)
    full_box = _interp(torch.from_numpy(np.ascontiguousarray(phi_grid))[None, None], box.size)[0, 0].numpy()
    floor = min(float(phi_grid.min()), -1.0) if fill is None else float(fill)
    out = np.full(tuple(int(s) for s in shape), floor, dtype=np.float32)
    inner = box.clipped(shape)
    src = tuple(slice(sl.start - lo, sl.stop - lo) for sl, lo in zip(inner, box.lo))
    out[inner] = full_box[src]
    return out


def normalise_crop(crop: np.ndarray) -> np.ndarray:
    """Zero mean, unit standard deviation within the ROI (constant crops -> zeros)."""
    crop = np.asarray(crop, dtype=np.float32)
    std = float(crop.std())
    return (crop - float(crop.mean())) / std if std > 1e-8 else np.zeros_like(crop)
