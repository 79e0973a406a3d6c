"""ROG post-processing of a predicted label map (values, not class indices).

* **Lesions** (``LabelInfo.kind == "lesion"``): connected components smaller than the plan's
  ``min_size_mm3`` (the smallest lesion component seen in training) are merged into the label
  that surrounds them: the most frequent label on the component's outer boundary.  Done first,
  so a speck of "tumour" inside the liver becomes liver before the organ step.
* **Organs**: only the largest component survives; the rest becomes background.  Components
  are taken over the organ *together with* the lesion labels, because lesions sit inside
  organs (liver + tumour, kidney + tumour) and may cut an organ's mask in two; the component
  with the most organ voxels is kept.

Components use 26-connectivity, as the planner's statistics do.
"""

from __future__ import annotations

from typing import Dict, Mapping, Optional, Sequence

import numpy as np
from scipy import ndimage

from .plan import Plan

FULL = np.ones((3, 3, 3), bool)


def _grow(slices: tuple, shape: Sequence[int]) -> tuple:
    """A bounding box one voxel larger on every side (clipped to the image)."""
    return tuple(slice(max(s.start - 1, 0), min(s.stop + 1, n)) for s, n in zip(slices, shape))


def merge_small_components(labels: np.ndarray, value: int, min_voxels: float) -> int:
    """Relabel components of ``value`` with fewer than ``min_voxels`` voxels by their surroundings,
    in place; returns how many components were merged."""
    cc, n = ndimage.label(labels == value, structure=FULL)
    if n == 0:
        return 0
    sizes = np.bincount(cc.ravel())
    merged = 0
    for index, box in enumerate(ndimage.find_objects(cc), start=1):
        if box is None or sizes[index] >= min_voxels:
            continue
        box = _grow(box, labels.shape)
        comp = cc[box] == index
        ring = ndimage.binary_dilation(comp, structure=FULL) & ~comp
        around = labels[box][ring]
        around = around[around != value]
        fill = int(np.bincount(around.astype(np.int64)).argmax()) if around.size else 0
        labels[box][comp] = fill
        merged += 1
    return merged


def keep_largest_component(labels: np.ndarray, value: int, companions: Sequence[int] = ()) -> int:
    """Keep only the component of ``value`` (joined through ``companions``) holding the most
    ``value`` voxels; other ``value`` voxels become 0, in place.  Returns voxels removed."""
    organ = labels == value
    if not organ.any():
        return 0
    region = organ | np.isin(labels, list(companions)) if companions else organ
    cc, n = ndimage.label(region, structure=FULL)
    if n <= 1:
        return 0
    counts = np.bincount(cc[organ], minlength=n + 1)
    counts[0] = 0
    drop = organ & (cc != int(counts.argmax()))
    labels[drop] = 0
    return int(drop.sum())


def postprocess_labels(labels: np.ndarray, plan: Plan, spacing_zyx: Sequence[float],
                       min_size_mm3: Optional[Mapping[int, float]] = None) -> np.ndarray:
    """Apply the plan's organ/lesion rules to a (z, y, x) label-value map; returns a new array.

    ``min_size_mm3`` overrides the plan's lesion size threshold per label value.
    """
    out = np.array(labels, copy=True)
    voxel_mm3 = float(np.prod(spacing_zyx))
    thresholds: Dict[int, float] = {lb.value: lb.min_size_mm3 for lb in plan.labels if lb.kind == "lesion"}
    thresholds.update({int(k): float(v) for k, v in (min_size_mm3 or {}).items()})
    lesions = [lb.value for lb in plan.labels if lb.kind == "lesion"]
    for value in lesions:
        if thresholds.get(value, 0.0) > 0:
            merge_small_components(out, value, thresholds[value] / voxel_mm3)
    for lb in plan.labels:
        if lb.kind == "organ":
            keep_largest_component(out, lb.value, lesions)
    return out
