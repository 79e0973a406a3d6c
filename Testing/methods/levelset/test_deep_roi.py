"""ROI crop / resample / paste of the learned refiner, incl. image borders and tiny segments."""

import numpy as np
import pytest

from deepimaging.core.errors import InputError
from deepimaging.core.metrics import dice
from deepimaging.levelset.deep.data import grid_tsdf
from deepimaging.levelset.deep.roi import (box_from_mask, box_from_user, crop_image, crop_mask, paste,
                                           spatial_view)


def disk(shape, centre, radius):
    grids = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    return sum((g - c) ** 2 for g, c in zip(grids, centre)) <= radius ** 2


@pytest.mark.parametrize("shape,centre,radius,grid", [((80, 90), (40, 45), 12, 64), ((40, 44, 36), (20, 22, 18), 7, 32)])
def test_round_trip_keeps_the_segment(shape, centre, radius, grid):
    mask = disk(shape, centre, radius)
    box = box_from_mask(mask, (1.0,) * len(shape))
    assert all(s >= 2 * radius for s in box.size) and len(set(box.size)) == 1  # square/cubic box
    on_grid = crop_mask(mask, box, (grid,) * len(shape))
    back = paste(grid_tsdf(on_grid, 8.0), box, shape) > 0
    assert back.shape == mask.shape and dice(back, mask) > 0.97
    assert not back[tuple(slice(0, max(0, lo)) for lo in box.lo)].any()


def test_box_past_the_border_is_padded_and_pasted_inside():
    mask = disk((50, 50), (2, 47), 6)  # touches two image borders
    box = box_from_mask(mask, (1.0, 1.0))
    assert box.lo[0] < 0 and box.hi[1] > 50
    image = np.arange(2500, dtype=np.float32).reshape(50, 50)
    crop = crop_image(image, box, (32, 32))
    assert crop.shape == (32, 32) and np.isfinite(crop).all()
    back = paste(grid_tsdf(crop_mask(mask, box, (32, 32)), 4.0), box, (50, 50)) > 0
    assert dice(back, mask) > 0.9


def test_one_voxel_segment_gets_the_minimum_roi():
    mask = np.zeros((30, 30), bool)
    mask[10, 20] = True
    box = box_from_mask(mask, (1.0, 1.0), min_side=12)
    assert box.size == (12, 12)
    back = paste(grid_tsdf(crop_mask(mask, box, (64, 64)), 8.0), box, mask.shape) > 0
    assert back[10, 20] and back.sum() <= 4


def test_anisotropic_spacing_gives_a_physically_square_box():
    mask = np.zeros((20, 60, 60), bool)
    mask[8:12, 20:40, 20:40] = True
    box = box_from_mask(mask, (3.0, 1.0, 1.0))
    assert box.size[1] == box.size[2] and abs(box.size[0] * 3.0 - box.size[1]) <= 3.0


def test_views_and_user_boxes():
    assert spatial_view(np.zeros((1, 5, 6)), 2).shape == (5, 6)
    with pytest.raises(InputError, match="2D model"):
        spatial_view(np.zeros((4, 5, 6)), 2)
    with pytest.raises(InputError, match="3D model"):
        spatial_view(np.zeros((1, 5, 6)), 3)
    box = box_from_user((0, 10, 10, 1, 30, 20), (1, 50, 50), 2, (1.0, 1.0))
    assert box.size[0] == box.size[1] >= 20
    with pytest.raises(InputError, match="six numbers"):
        box_from_user((0, 1, 2), (1, 50, 50), 2, (1.0, 1.0))
    with pytest.raises(InputError, match="outside"):
        box_from_user((0, 60, 60, 1, 70, 70), (1, 50, 50), 2, (1.0, 1.0))
    with pytest.raises(InputError, match="end must be larger"):
        box_from_user((0, 30, 10, 1, 20, 20), (1, 50, 50), 2, (1.0, 1.0))
    with pytest.raises(InputError, match="empty"):
        box_from_mask(np.zeros((5, 5), bool), (1.0, 1.0))
