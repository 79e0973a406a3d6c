import numpy as np
import pytest

from deepimaging.core.errors import DeepImagingError, GeometryMismatchError, InputError
from deepimaging.core.image import Image
from deepimaging.core.metrics import dice
from deepimaging.levelset import ChanVeseParams, refine_mask
from deepimaging.levelset.refine import region_of_interest
from deepimaging.levelset.synthetic import make_refinement_case


def test_refine_2d_improves_dice_a_lot():
    case = make_refinement_case((1, 128, 128), seed=3)
    res = refine_mask(case.image, case.rough, device="cpu")
    before, after = dice(case.rough, case.truth), dice(res.mask, case.truth)
    assert before < 0.85 and after > 0.95
    assert res.mask.shape == case.image.shape and res.phi.shape == case.image.shape
    assert np.array_equal(res.phi > 0, res.mask)


def test_refine_3d_improves_dice():
    case = make_refinement_case((24, 48, 48), seed=4, spacing=(1.0, 1.0, 1.5))
    res = refine_mask(case.image, case.rough, ChanVeseParams(mu=0.1, max_iterations=150), device="cpu")
    assert dice(res.mask, case.truth) > dice(case.rough, case.truth) + 0.05


def test_roi_auto_margin_and_whole_image():
    m = np.zeros((1, 100, 100), bool)
    m[0, 40:60, 40:50] = True
    roi = region_of_interest(m, "auto")
    assert roi[1] == slice(30, 70) and roi[2] == slice(30, 60)  # max(10, 30 % of extent)
    assert region_of_interest(m, 5)[1] == slice(35, 65)
    assert region_of_interest(m, None)[1] == slice(0, 100)
    with pytest.raises(InputError):
        region_of_interest(m, -3)


def test_refine_bad_inputs():
    case = make_refinement_case((1, 48, 48))
    with pytest.raises(InputError, match="empty"):
        refine_mask(case.image, np.zeros(case.image.shape, bool))
    with pytest.raises(InputError, match="does not match"):
        refine_mask(case.image, np.ones((1, 10, 10), bool))
    nan_image = case.image.with_array(case.image.array.copy())
    nan_image.array[0, 3, 3] = np.nan
    with pytest.raises(InputError, match="NaN"):
        refine_mask(nan_image, case.rough)
    other_grid = Image(case.rough.astype(np.uint8), spacing=(2.0, 2.0, 1.0))
    with pytest.raises(GeometryMismatchError, match="spacing"):
        refine_mask(case.image, other_grid)


def test_refine_never_returns_an_empty_segment():
    flat = Image(np.ones((1, 40, 40), np.float32))
    m = np.zeros(flat.shape, bool)
    m[0, 18:20, 18:20] = True
    with pytest.raises(DeepImagingError, match="shrank to nothing"):
        refine_mask(flat, m, ChanVeseParams(mu=5.0, max_iterations=300), device="cpu")
