"""Refine an existing segment with Chan-Vese: the pipeline behind the panel, the effect and the CLI.

Input: an :class:`~deepimaging.core.image.Image` and a boolean mask on its grid (from a model,
a threshold or a hand drawing).  The level set starts at the mask's signed distance and
evolves inside a region of interest (the mask's bounding box grown by a margin),
so the inside/outside means describe the structure and its surroundings, not the whole scan.
2D images ((1, y, x)) evolve in 2D; volumes in 3D with their anisotropic spacing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple, Union

import numpy as np

from ..core.device import DeviceLike
from ..core.errors import DeepImagingError, InputError
from ..core.image import Image
from ..core.progress import CancelToken, ProgressCallback, report
from .chanvese import ChanVeseParams, chan_vese
from .tsdf import signed_distance


def refine_defaults() -> ChanVeseParams:
    """Defaults for refining a segment: far less smoothing than scikit-image's 2D default
    (mu 0.25 shrinks 3D segments: a surface's curvature counts twice) and more iterations.
    Measured on the built-in lobed-blob cases, Dice initial -> mu 0.25 / 0.1 / 0.05:
    3D 32x64x64 0.69 -> 0.32 / 0.78 / 0.91; 3D 48x96x96 0.59 -> 0.59 / 0.87 / 0.94;
    2D 192^2 0.82 -> 0.94 / 0.98 / 0.99."""
    return ChanVeseParams(mu=0.05, max_iterations=300)


@dataclass
class RefineResult:
    """Refined mask and level set on the input grid (phi > 0 inside)."""

    mask: np.ndarray
    phi: np.ndarray
    iterations: int
    converged: bool
    roi: Tuple[slice, slice, slice]


def _validated_mask(image: Image, mask: Union[np.ndarray, Image]) -> np.ndarray:
    if isinstance(mask, Image):
        image.require_same_grid(mask, what="mask", of="image")
        mask = mask.array
    mask = np.asarray(mask)
    if mask.ndim == 2:
        mask = mask[np.newaxis]
    if mask.shape != image.shape:
        raise InputError(f"mask shape {mask.shape} does not match image shape {image.shape} (z, y, x)")
    mask = mask.astype(bool) if mask.dtype != bool else mask
    if not mask.any():
        raise InputError("the segment to refine is empty: draw or compute a rough segment first")
    return mask


def region_of_interest(mask: np.ndarray, margin: Union[int, str, None] = "auto") -> Tuple[slice, slice, slice]:
    """Bounding box of ``mask`` grown by ``margin`` voxels per axis.

    ``"auto"``: 10 voxels or 30 % of the box's extent along that axis, whichever is larger
    (a rough segment can be off by a good fraction of its size); ``None``: the whole image.
    """
    if margin is None:
        return tuple(slice(0, s) for s in mask.shape)  # type: ignore[return-value]
    if margin != "auto" and (isinstance(margin, str) or margin < 0):
        raise InputError(f"roi_margin must be 'auto', None or >= 0 voxels, got {margin!r}")
    box = []
    for axis, size in enumerate(mask.shape):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(mask.any(axis=other))
        grow = max(10, int(0.3 * (hits[-1] - hits[0] + 1))) if margin == "auto" else int(margin)
        box.append(slice(max(0, hits[0] - grow), min(size, hits[-1] + grow + 1)))
    return tuple(box)  # type: ignore[return-value]


def refine_mask(image: Image, mask: Union[np.ndarray, Image], params: Optional[ChanVeseParams] = None, *,
                roi_margin: Union[int, str, None] = "auto", init_scale: float = 10.0, device: DeviceLike = None,
                progress: Optional[ProgressCallback] = None, cancel: Optional[CancelToken] = None) -> RefineResult:
    """Refine ``mask`` on ``image`` with classic Chan-Vese; raises :class:`InputError` on bad input.

    The initial level set is the mask's signed distance in units of ``init_scale`` voxels:
    the regularised delta is narrow (eps = 1), so a flatter phi lets the contour travel several
    voxels in a few hundred iterations instead of stalling (measured: Dice 0.86 with the raw
    distance vs 0.98 with scale 10 after 200 iterations on the built-in case).
    Raises :class:`DeepImagingError` instead of returning an empty segment, so a caller never
    replaces a user's segment with nothing.
    """
    params = params or refine_defaults()
    if not init_scale > 0:
        raise InputError(f"init_scale must be positive, got {init_scale}")
    image.require_finite()
    mask = _validated_mask(image, mask)
    roi = region_of_interest(mask, roi_margin)
    sub_image = np.asarray(image.array[roi], dtype=np.float32)
    sub_mask = mask[roi]
    spacing = image.spacing_zyx
    if image.is_2d:
        sub_image, sub_mask, spacing = sub_image[0], sub_mask[0], spacing[1:]
    report(progress, 0.0, "computing the initial signed distance")
    phi0 = signed_distance(sub_mask, spacing) / (init_scale * min(spacing))
    result = chan_vese(sub_image, phi0, params, spacing=spacing, device=device, progress=progress, cancel=cancel)
    phi_roi = result.phi.detach().cpu().numpy()
    if image.is_2d:
        phi_roi = phi_roi[np.newaxis]
    floor = min(float(phi_roi.min()), -1.0)
    phi = np.full(image.shape, floor, dtype=np.float32)
    phi[roi] = phi_roi
    refined = phi > 0
    if not refined.any():
        raise DeepImagingError(
            "the level set shrank to nothing: the segment does not stand out from its surroundings "
            "with these settings; try a smaller mu, a larger ROI margin or a better initial segment")
    report(progress, 1.0, f"refined in {result.iterations} iterations")
    return RefineResult(refined, phi, result.iterations, result.converged, roi)
