"""Per-label Dice and HD95 of predicted label maps against reference label maps.

A label absent from both the prediction and the reference of a case is not scored for that
case (Dice would be a meaningless 1 and HD95 undefined); means are over the scored cases.
HD95 is ``inf`` when exactly one of the two is empty, and such cases are left out of the mean
HD95 but counted in ``hd95_inf_cases``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np

from deepimaging.core.errors import InputError
from deepimaging.core.image import Image
from deepimaging.core.metrics import dice, hausdorff95


@dataclass
class CaseScores:
    """Scores of one case: label value -> {"dice": ..., "hd95": ...} (only labels present in either map)."""

    name: str
    scores: Dict[int, Dict[str, float]] = field(default_factory=dict)


def score_case(name: str, prediction: Image, reference: Image, values: Sequence[int]) -> CaseScores:
    """Dice and HD95 (mm) per label value of one case; the two maps must share a grid."""
    prediction.require_same_grid(reference, what=f"prediction of {name}", of="reference label map")
    out = CaseScores(name)
    for value in values:
        pred, truth = prediction.array == value, reference.array == value
        if not pred.any() and not truth.any():
            continue
        out.scores[int(value)] = {"dice": dice(pred, truth),
                                  "hd95": hausdorff95(pred, truth, reference.spacing_zyx)}
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
