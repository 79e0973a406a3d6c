"""GLS training data: samples from folders, Samples or arrays, on the network grid, split and augmented.

Kept apart from :mod:`deepimaging.gls.train` (the stages, losses and loop) so each file has one job.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import List, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from deepimaging.core.errors import InputError
from deepimaging.core.image import Image

from .data import Sample, load_folder, to_arrays
from .keypoints import keypoints_from_mask

DataLike = Union[str, Path, Sequence[Sample], Tuple[np.ndarray, ...]]


@dataclass
class Augmentation:
    """Light per-sample augmentation, applied to a sample with probability ``probability``."""

    probability: float = 0.8
    gamma: Tuple[float, float] = (0.7, 1.5)  # log-uniform exponent on [0, 1] intensities
    contrast: Tuple[float, float] = (0.8, 1.25)  # scale about the image mean
    brightness: float = 0.1  # +- offset
    shift: float = 0.05  # +- fraction of H and W (whole pixels; edge-replicated image, zero mask)

    def __call__(self, x: torch.Tensor, y: torch.Tensor, kp: torch.Tensor,
                 gen: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Augment a CPU batch: images (B, 1, H, W), masks (B, 1, H, W), keypoints (B, K, 2)."""
        b, _, h, w = x.shape
        r = torch.rand(b, 6, generator=gen).tolist()
        x, y, kp = x.clone(), y.clone(), kp.clone()
        lo, hi = math.log(self.gamma[0]), math.log(self.gamma[1])
        for i in range(b):
            if r[i][0] >= self.probability:
                continue
            xi = x[i].clamp(0, 1) ** math.exp(lo + (hi - lo) * r[i][1])
            c = self.contrast[0] + (self.contrast[1] - self.contrast[0]) * r[i][2]
            xi = ((xi - xi.mean()) * c + xi.mean() + self.brightness * (2 * r[i][3] - 1)).clamp(0, 1)
            dx, dy = (int(round(self.shift * n * (2 * u - 1))) for n, u in ((w, r[i][4]), (h, r[i][5])))
            x[i], y[i] = _shift(xi, dx, dy, "replicate"), _shift(y[i], dx, dy, "constant")
            kp[i] = kp[i] + torch.tensor([dx, dy], dtype=kp.dtype)
        return x, y, kp


def _shift(t: torch.Tensor, dx: int, dy: int, mode: str) -> torch.Tensor:
    """Move (C, H, W) content by (dx, dy) pixels; the uncovered border is filled by ``mode``."""
    p = max(abs(dx), abs(dy))
    if p == 0:
        return t
    h, w = t.shape[-2:]
    return F.pad(t[None], (p, p, p, p), mode=mode)[0][:, p - dy:p - dy + h, p - dx:p - dx + w]


@dataclass
class TrainingArrays:
    """Samples on the network grid: images (N, 1, H, W) in [0, 1], masks 0/1, keypoints (N, K, 2) xy."""

    names: List[str]
    images: np.ndarray
    masks: np.ndarray
    keypoints: np.ndarray
    source_shapes: List[Tuple[int, int]]

    @property
    def has_keypoints(self) -> np.ndarray:
        """(N,) True where all K keypoints are known (False everywhere when K = 0)."""
        if self.keypoints.shape[1] == 0:
            return np.zeros(len(self.names), bool)
        return np.all(np.isfinite(self.keypoints), axis=(1, 2))

    def subset(self, index: Sequence[int]) -> "TrainingArrays":
        idx = np.asarray(index, dtype=int)
        return TrainingArrays([self.names[i] for i in idx], self.images[idx], self.masks[idx], self.keypoints[idx],
                              [self.source_shapes[i] for i in idx])


def as_samples(data: DataLike, keypoints: int = 2, keypoint_rule: str = "iris-tails") -> List[Sample]:
    """A folder, Samples, or ``(images, masks[, keypoints])`` arrays -> Samples with K keypoints each
    (derived by ``keypoint_rule`` where a non-empty mask has none; ``keypoints=0`` drops them)."""
    if isinstance(data, (str, Path)):
        return load_folder(data, keypoints=keypoints, keypoint_rule=keypoint_rule)
    if isinstance(data, (list, tuple)) and data and all(isinstance(s, Sample) for s in data):
        samples = list(data)
    elif isinstance(data, (list, tuple)) and len(data) in (2, 3) and all(isinstance(a, np.ndarray) for a in data):
        images, masks = np.asarray(data[0], np.float32), np.asarray(data[1])
        images, masks = (a[:, 0] if a.ndim == 4 else a for a in (images, masks))
        if images.ndim != 3 or masks.shape != images.shape:
            raise InputError(f"array data must be images and masks of shape (N, H, W) or (N, 1, H, W); got "
                             f"{np.shape(data[0])} and {np.shape(data[1])}")
        points = data[2] if len(data) == 3 else [None] * len(images)
        samples = [Sample(f"sample_{i:04d}", Image(images[i][None]), (masks[i] > 0).astype(np.uint8),
                          None if p is None or not np.all(np.isfinite(p)) else np.asarray(p, np.float64))
                   for i, p in enumerate(points)]
    else:
        raise InputError("training data must be a folder (images/, masks/), a list of Samples or a tuple "
                         f"(images, masks[, keypoints]) of arrays; got {type(data).__name__}")
    out = []
    for s in samples:
        if s.mask is None:
            raise InputError(f"sample {s.name!r} has no mask; training needs a mask for every image")
        s.image.require_finite(f"image {s.name!r}")
        points = s.keypoints if keypoints > 0 else None
        if keypoints > 0 and points is None and s.mask.any():
            points = keypoints_from_mask(s.mask, keypoints, keypoint_rule)
        if points is not None and len(points) != keypoints:
            raise InputError(f"sample {s.name!r} has {len(points)} keypoint(s), but keypoints={keypoints}")
        out.append(Sample(s.name, s.image, s.mask, points))
    return out


def prepare_arrays(samples: Sequence[Sample], size: Tuple[int, int], keypoints: int) -> TrainingArrays:
    """Resize + normalise samples onto the ``size`` grid (:func:`~deepimaging.gls.data.to_arrays`)."""
    if not samples:
        raise InputError("no training samples")
    images, masks, points = to_arrays(samples, size)
    if masks is None:
        raise InputError("training needs a mask for every image")
    if not masks.any():
        raise InputError(f"all {len(samples)} masks are empty (no foreground pixel): there is nothing to learn; "
                         "check the masks (values 0/1 or 0/255)")
    if points is None:
        points = np.full((len(samples), keypoints, 2), np.nan, np.float32)
    return TrainingArrays([s.name for s in samples], images, masks.astype(np.float32), points.astype(np.float32),
                          [s.shape for s in samples])


def split_indices(n: int, fraction: float, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """(kept, held-out) indices: a seeded permutation, ``round(n * fraction)`` (>= 1) held out;
    ``fraction=0`` holds nothing out and returns all indices twice (validate on the training set)."""
    if not 0.0 <= fraction < 1.0:
        raise InputError(f"the held-out fraction must be in [0, 1), got {fraction}")
    if fraction == 0:
        return np.arange(n), np.arange(n)
    if n < 2:
        raise InputError(f"{n} sample(s): need at least 2 (one to train on, one held out; or a fraction of 0)")
    order = np.random.default_rng(seed).permutation(n)
    n_out = min(n - 1, max(1, int(round(n * fraction))))
    return np.sort(order[n_out:]), np.sort(order[:n_out])
