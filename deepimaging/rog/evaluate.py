"""Per-label Dice and HD95 of predicted label maps against reference label maps.

A label absent from both the prediction and the reference of a case is not scored for that
case (Dice would be a meaningless 1 and HD95 undefined); means are over the scored cases.
HD95 is ``inf`` when exactly one of the two is empty, and such cases are left out of the mean
HD95 but counted in ``hd95_inf_cases``.

One number per case, the **mean foreground Dice** (:func:`foreground_dice`, also
``CaseScores.foreground_dice``): the mean Dice over the foreground labels present in the
reference or the prediction, labels absent from both being excluded as above.  A case in which
neither map has any foreground scores ``empty`` (1.0 by default: nothing to find and nothing
found, as :func:`deepimaging.robustness.losses.foreground_dice` counts it; pass ``nan`` to leave
such cases out of means).  The robustness benchmark calls a case broken when this number drops
below half the clean mean.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Union

import numpy as np

from deepimaging.core.errors import InputError
from deepimaging.core.image import Image
from deepimaging.core.metrics import dice, hausdorff95


@dataclass
class CaseScores:
    """Scores of one case: label value -> {"dice": ..., "hd95": ...} (only labels present in either
    map) and the case's mean foreground Dice (the mean of those Dice values; 1.0 if there are none)."""

    name: str
    scores: Dict[int, Dict[str, float]] = field(default_factory=dict)
    foreground_dice: float = 1.0


def foreground_dice(prediction: Union[Image, np.ndarray], reference: Union[Image, np.ndarray],
                    values: Sequence[int], empty: float = 1.0) -> float:
    """Mean Dice over the foreground label ``values`` (0 is ignored) present in ``reference`` or
    ``prediction``; ``empty`` when neither map holds any of them (module docstring)."""
    pred = prediction.array if isinstance(prediction, Image) else np.asarray(prediction)
    truth = reference.array if isinstance(reference, Image) else np.asarray(reference)
    if pred.shape != truth.shape:
        raise InputError(f"prediction shape {pred.shape} differs from the reference's {truth.shape}")
    scores = [dice(pred == v, truth == v) for v in values
              if int(v) != 0 and ((pred == v).any() or (truth == v).any())]
    return float(np.mean(scores)) if scores else float(empty)


def score_case(name: str, prediction: Image, reference: Image, values: Sequence[int]) -> CaseScores:
    """Dice and HD95 (mm) per label value of one case, and its mean foreground Dice; the two maps
    must share a grid."""
    prediction.require_same_grid(reference, what=f"prediction of {name}", of="reference label map")
    out = CaseScores(name)
    for value in values:
        pred, truth = prediction.array == value, reference.array == value
        if not pred.any() and not truth.any():
            continue
        out.scores[int(value)] = {"dice": dice(pred, truth),
                                  "hd95": hausdorff95(pred, truth, reference.spacing_zyx)}
    foreground = [s["dice"] for v, s in out.scores.items() if v != 0]
    out.foreground_dice = float(np.mean(foreground)) if foreground else 1.0
    return out


def summarize(cases: Sequence[CaseScores], names: Mapping[int, str]) -> Dict[str, Dict[str, float]]:
    """Mean Dice / HD95 per label name over the cases that scored it."""
    if not cases:
        raise InputError("no cases to evaluate")
    summary: Dict[str, Dict[str, float]] = {}
    for value, name in names.items():
        rows = [c.scores[value] for c in cases if value in c.scores]
        if not rows:
            continue
        d = [r["dice"] for r in rows]
        h = [r["hd95"] for r in rows if math.isfinite(r["hd95"])]
        summary[name] = {"value": float(value), "cases": float(len(rows)), "dice_mean": float(np.mean(d)),
                         "dice_std": float(np.std(d)), "hd95_mean_mm": float(np.mean(h)) if h else float("inf"),
                         "hd95_inf_cases": float(len(rows) - len(h))}
    return summary


def label_values(names: Optional[Mapping[int, str]], references: Sequence[Image]) -> Dict[int, str]:
    """Foreground label values to score: the plan's, or those found in the references."""
    if names:
        return {int(v): n for v, n in names.items() if int(v) != 0}
    found: List[int] = sorted({int(v) for ref in references for v in np.unique(ref.array)} - {0})
    return {v: f"label_{v}" for v in found}
