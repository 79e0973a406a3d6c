"""Image-quality metrics of chromophore maps: MSE, PSNR, SSIM and inclusion-value errors.

Conventions (used by training's test metrics, ``evaluate`` and the README table):

* every metric is computed over the pixels inside the imaging disk only -- outside it every map
  is 0 by construction, and counting those pixels would flatter all methods equally;
* PSNR and SSIM need a data range: per chromophore, ``max - min`` of the ground-truth maps inside
  the disk over the whole evaluated test set (:func:`truth_data_range`), one fixed number per
  chromophore so that PSNR is comparable between phantoms and methods;
* PSNR = ``10 log10(range^2 / MSE)`` on the disk pixels (what
  ``skimage.metrics.peak_signal_noise_ratio`` computes); SSIM =
  ``skimage.metrics.structural_similarity`` (7x7 uniform window, the skimage default) on the
  whole 100 x 100 map, its SSIM image averaged over the disk pixels;
* inclusion error: |mean of the reconstruction inside the true inclusion - true value| / true
  value, per inclusion and chromophore (the paper's "errors of recovered values").

scikit-image serves only SSIM, an evaluation metric: it is imported when SSIM is computed, so
reconstruction and training run on Slicer's Python without it (training then reports SSIM
as NaN and says why; ``evaluate`` requires it).
"""

from __future__ import annotations

import logging
from typing import Dict, Sequence, Union

import numpy as np

from ..core.optional import import_optional, is_available
from .mesh import DEFAULT_DIAMETER_MM, disk_mask, pixel_centres
from .phantoms import CHROMOPHORES


def truth_data_range(truth: np.ndarray, disk: np.ndarray) -> np.ndarray:
    """(3,) per-chromophore max - min of the true maps (N, 3, H, W) over the disk pixels."""
    inside = np.asarray(truth)[:, :, disk]
    value_range = inside.max(axis=(0, 2)) - inside.min(axis=(0, 2))
    return np.where(value_range > 0, value_range, 1.0).astype(np.float64)


def map_metrics(pred: np.ndarray, truth: np.ndarray, data_range: Sequence[float],
                disk: np.ndarray, ssim: Union[bool, str] = True) -> Dict[str, Dict[str, np.ndarray]]:
    """Per-phantom MSE, PSNR (dB) and SSIM of each chromophore: ``{name: {"mse": (N,), ...}}``.

    ``ssim``: True needs scikit-image; ``"auto"`` computes SSIM when scikit-image is installed
    and reports NaN otherwise (training inside Slicer, whose Python lacks it).
    """
    if ssim == "auto":
        ssim = is_available("skimage")
        if not ssim:
            logging.getLogger(__name__).warning("SSIM not computed: scikit-image is not installed")
    structural_similarity = None
    if ssim:
        structural_similarity = import_optional("skimage.metrics", "scikit-image", "SSIM").structural_similarity
    pred = np.asarray(pred, dtype=np.float64)
    truth = np.asarray(truth, dtype=np.float64)
    if pred.shape != truth.shape or pred.ndim != 4:
        raise ValueError(f"prediction {pred.shape} and truth {truth.shape} must both be (N, 3, H, W)")
    out: Dict[str, Dict[str, np.ndarray]] = {}
    for c, name in enumerate(CHROMOPHORES[: pred.shape[1]]):
        rng = float(data_range[c])
        mse, psnr, ssims = [], [], []
        for p, t in zip(pred[:, c], truth[:, c]):
            p = np.where(disk, p, 0.0)
            mse.append(float(np.mean((p[disk] - t[disk]) ** 2)))
            psnr.append(float(10.0 * np.log10(rng ** 2 / mse[-1])) if mse[-1] > 0 else float("inf"))
            if structural_similarity is None:
                ssims.append(float("nan"))
            else:
                _, ssim_map = structural_similarity(t, p, data_range=rng, full=True)
                ssims.append(float(ssim_map[disk].mean()))
        out[name] = {"mse": np.asarray(mse), "psnr": np.asarray(psnr), "ssim": np.asarray(ssims)}
    return out


def inclusion_masks(centres_mm: np.ndarray, diameters_mm: np.ndarray, counts: np.ndarray,
                    size: int, diameter_mm: float = DEFAULT_DIAMETER_MM) -> np.ndarray:
    """(N, 2, H, W) boolean masks of each phantom's (up to two) inclusions on the pixel grid."""
    x, y = pixel_centres(0.5 * diameter_mm, size)
    masks = np.zeros((len(counts), 2, size, size), dtype=bool)
    for i, k in enumerate(np.asarray(counts, dtype=int)):
        for j in range(k):
            cx, cy = centres_mm[i, j]
            masks[i, j] = np.hypot(x - cx, y - cy) < 0.5 * diameters_mm[i, j]
    return masks


def inclusion_errors(pred: np.ndarray, inclusion_values: np.ndarray, masks: np.ndarray,
                     counts: np.ndarray) -> Dict[str, np.ndarray]:
    """Relative error (%) of the mean recovered value in each true inclusion, flattened per chromophore."""
    out: Dict[str, list] = {name: [] for name in CHROMOPHORES}
    for i, k in enumerate(np.asarray(counts, dtype=int)):
        for j in range(k):
            if not masks[i, j].any():
                continue
            for c, name in enumerate(CHROMOPHORES):
                truth = float(inclusion_values[i, j, c])
                out[name].append(100.0 * abs(float(pred[i, c][masks[i, j]].mean()) - truth) / truth)
    return {name: np.asarray(values) for name, values in out.items()}


def hbt_contrast_of(maps: np.ndarray, inside: np.ndarray, disk: np.ndarray) -> float:
    """Mean HbT inside ``inside`` over mean HbT in the rest of the disk, for (3, H, W) maps."""
    hbt = maps[0] + maps[1]
    outside = disk & ~inside
    return float(hbt[inside].mean() / max(float(hbt[outside].mean()), 1e-12))


def summarise(per_phantom: Dict[str, Dict[str, np.ndarray]]) -> Dict[str, float]:
    """Flat ``{"<metric>_<chromophore>": mean}`` plus ``..._std`` (JSON-able, for headers)."""
    flat: Dict[str, float] = {}
    for name, metrics in per_phantom.items():
        for metric, values in metrics.items():
            finite = values[np.isfinite(values)]
            flat[f"{metric}_{name}"] = float(finite.mean()) if finite.size else float("nan")
            flat[f"{metric}_{name}_std"] = float(finite.std()) if finite.size else float("nan")
    return flat


def default_disk(size: int) -> np.ndarray:
    """The disk's pixel mask on a ``size`` x ``size`` grid over its bounding square."""
    return disk_mask(0.5 * DEFAULT_DIAMETER_MM, size)
