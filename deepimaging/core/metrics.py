"""Segmentation metrics in physical units: Dice, IoU, HD95, ASSD and boundary F1.

Surface distances follow MONAI's definition (surface = mask XOR its binary erosion; distance
from each surface voxel of one mask to the nearest surface voxel of the other, with
anisotropic spacing), so our numbers agree with ``monai.metrics`` — the tests check that.
We compute them directly with SciPy's exact Euclidean distance transform because the
pipelines work on NumPy masks with a known spacing, and MONAI would need one-hot tensors.
Empty masks: Dice/IoU of two empty masks is 1; a distance with one empty mask is ``inf``.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage


def _pair(pred: np.ndarray, truth: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    pred = np.asarray(pred).astype(bool)
    truth = np.asarray(truth).astype(bool)
    if pred.shape != truth.shape:
        raise ValueError(f"masks have different shapes {pred.shape} and {truth.shape}")
    return pred, truth


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Sørensen-Dice overlap 2|A∩B| / (|A| + |B|)."""
    pred, truth = _pair(pred, truth)
    total = pred.sum() + truth.sum()
    return 1.0 if total == 0 else float(2.0 * np.logical_and(pred, truth).sum() / total)


def iou(pred: np.ndarray, truth: np.ndarray) -> float:
    """Jaccard index |A∩B| / |A∪B|."""
    pred, truth = _pair(pred, truth)
    union = np.logical_or(pred, truth).sum()
    return 1.0 if union == 0 else float(np.logical_and(pred, truth).sum() / union)


def surface(mask: np.ndarray) -> np.ndarray:
    """Boundary voxels of a mask: the mask minus its (face-connected) erosion."""
    mask = np.asarray(mask, dtype=bool)
    return mask ^ ndimage.binary_erosion(mask)


def _spacing(mask: np.ndarray, spacing: Optional[Sequence[float]]) -> Tuple[float, ...]:
    if spacing is None:
        return (1.0,) * mask.ndim
    if len(spacing) != mask.ndim:
        raise ValueError(f"spacing {tuple(spacing)} needs one value per array axis ({mask.ndim})")
    return tuple(float(s) for s in spacing)


def surface_distances(pred: np.ndarray, truth: np.ndarray,
                      spacing: Optional[Sequence[float]] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Distances (mm) pred-surface -> truth-surface and truth-surface -> pred-surface.

    ``spacing`` is given per array axis (z, y, x order for a (z, y, x) array).
    """
    pred, truth = _pair(pred, truth)
    sp = _spacing(pred, spacing)
    sp_pred, sp_truth = surface(pred), surface(truth)
    if not sp_pred.any() or not sp_truth.any():
        inf = np.array([np.inf])
        return inf, inf
    to_truth = ndimage.distance_transform_edt(~sp_truth, sampling=sp)
    to_pred = ndimage.distance_transform_edt(~sp_pred, sampling=sp)
    return to_truth[sp_pred], to_pred[sp_truth]


def hausdorff95(pred: np.ndarray, truth: np.ndarray, spacing: Optional[Sequence[float]] = None) -> float:
    """95th-percentile symmetric Hausdorff distance in mm (max of both directed 95th percentiles)."""
    d_pt, d_tp = surface_distances(pred, truth, spacing)
    if not (np.all(np.isfinite(d_pt)) and np.all(np.isfinite(d_tp))):
        return float("inf")
    return float(max(np.percentile(d_pt, 95), np.percentile(d_tp, 95)))


def assd(pred: np.ndarray, truth: np.ndarray, spacing: Optional[Sequence[float]] = None) -> float:
    """Average symmetric surface distance in mm (mean over both surfaces' distances)."""
    d_pt, d_tp = surface_distances(pred, truth, spacing)
    return float(np.concatenate([d_pt, d_tp]).mean())


def boundary_f1(pred: np.ndarray, truth: np.ndarray, tolerance: float = 1.0,
                spacing: Optional[Sequence[float]] = None) -> float:
    """Boundary F1: a boundary voxel matches if the other boundary lies within ``tolerance``.

    ``tolerance`` is in the units of ``spacing`` (pixels when spacing is None), as in the
    LevelSet R-CNN paper's boundary F-score at 1/2 pixel.
    """
    pred, truth = _pair(pred, truth)
    if not pred.any() and not truth.any():
        return 1.0
    d_pt, d_tp = surface_distances(pred, truth, spacing)
    if not np.all(np.isfinite(d_pt)):
        return 0.0
    precision = float(np.mean(d_pt <= tolerance))
    recall = float(np.mean(d_tp <= tolerance))
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)
