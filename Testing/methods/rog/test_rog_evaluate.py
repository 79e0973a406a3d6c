"""Per-case mean foreground Dice: labels absent from both maps are excluded, an empty case scores 1 (or NaN)."""

import math

import numpy as np
import pytest

from deepimaging.core.errors import InputError
from deepimaging.core.image import Image
from deepimaging.rog.evaluate import foreground_dice, score_case


def test_foreground_dice_averages_the_labels_either_map_has():
    ref = np.zeros((6, 6, 6), np.uint8)
    pred = np.zeros_like(ref)
    ref[1:3, 1:3, 1:3] = 1          # 8 voxels
    pred[1:3, 1:3, 1:2] = 1         # 4 of them: Dice 2*4/(8+4) = 2/3
    ref[4:6, 4:6, 4:6] = 2          # missed entirely: Dice 0
    # label 3 is in neither map: excluded, not a free 1.0
    assert foreground_dice(pred, ref, [1, 2, 3]) == pytest.approx((2 / 3 + 0) / 2)
    assert foreground_dice(pred, ref, [0, 1]) == pytest.approx(2 / 3)  # background is never scored
    pred[0, 0, 0] = 3               # a false-positive label: Dice 0, now counted
    assert foreground_dice(pred, ref, [1, 2, 3]) == pytest.approx((2 / 3) / 3)
    case = score_case("c", Image(pred), Image(ref), [1, 2, 3])
    assert case.foreground_dice == pytest.approx(foreground_dice(pred, ref, [1, 2, 3]))
    assert case.foreground_dice == pytest.approx(np.mean([s["dice"] for s in case.scores.values()]))


def test_case_without_foreground_and_bad_shapes():
    empty = np.zeros((4, 4, 4), np.uint8)
    assert foreground_dice(empty, empty, [1, 2]) == 1.0           # nothing to find, nothing found
    assert math.isnan(foreground_dice(empty, empty, [1, 2], empty=float("nan")))
    assert score_case("e", Image(empty), Image(empty), [1, 2]).foreground_dice == 1.0
    hit = empty.copy()
    hit[0, 0, 0] = 1
    assert foreground_dice(hit, empty, [1]) == 0.0                # foreground only in the prediction
    assert foreground_dice(Image(hit), Image(hit), [1]) == 1.0
    with pytest.raises(InputError, match="shape"):
        foreground_dice(empty, np.zeros((4, 4, 5), np.uint8), [1])
