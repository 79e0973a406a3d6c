"""GLS keypoints on hand-checked shapes: rules from masks, Gaussian heatmaps, argmax, CSV files."""

import numpy as np
import pytest
import torch

from deepimaging.core.errors import InputError
from deepimaging.gls.keypoints import (gaussian_heatmaps, gaussian_heatmaps_torch, heatmap_argmax,
                                       keypoints_from_mask, read_keypoints_csv, write_keypoints_csv)


def two_bars():
    """20 x 40 mask: a left bar (rows 5-7, cols 3-14) and a right bar (rows 10-11, cols 25-37)."""
    mask = np.zeros((20, 40), np.uint8)
    mask[5:8, 3:15] = 1
    mask[10:12, 25:38] = 1
    return mask


# -- rules ------------------------------------------------------------------------------------------

def test_iris_tails_on_two_bars_are_the_outer_extremes():
    # left bar: leftmost column 3, rows 5..7 -> mean 6; right bar: rightmost column 37, rows 10, 11 -> mean
    # 10.5 -> the nearer pixel, ties to the upper one: 10
    assert keypoints_from_mask(two_bars()).tolist() == [[3.0, 6.0], [37.0, 10.0]]


def test_iris_tails_keeps_the_two_largest_components_and_orders_them_left_to_right():
    mask = two_bars()[:, ::-1].copy()  # mirrored: the 2-row bar is now on the left
    mask[0, 20] = 1  # a one-pixel speck in the middle is ignored
    points = keypoints_from_mask(mask, k=2)
    assert points.tolist() == [[2.0, 10.0], [36.0, 6.0]]


def test_iris_tails_of_a_tilted_wing_use_the_mean_row_of_the_extreme_column():
    mask = np.zeros((30, 30), np.uint8)
    for i, x in enumerate(range(2, 12)):  # a staircase wing whose outer column holds rows 20..23
        mask[20 - i // 2: 24 - i // 2, x] = 1
    mask[5:9, 20:28] = 1  # a right wing, rows 5..8 -> mean 6.5 -> row 6
    assert keypoints_from_mask(mask).tolist() == [[2.0, 21.0], [27.0, 6.0]]


def test_single_blob_rules():
    mask = np.zeros((16, 16), np.uint8)
    mask[4:9, 6:12] = 1  # rows 4..8, cols 6..11
    mask[4, 6:8] = 0  # top row: cols 8..11 -> apex x 9 (mean 9.5, tie -> 9); col 6: rows 5..8 -> y 6
    assert keypoints_from_mask(mask, k=2, rule="extremes-x").tolist() == [[6.0, 6.0], [11.0, 6.0]]
    assert keypoints_from_mask(mask, k=1, rule="lv-apex").tolist() == [[9.0, 4.0]]
    # k=1 iris-tails: the blob is right of the centre line x = 7.5, so its rightmost column
    assert keypoints_from_mask(mask, k=1).tolist() == [[11.0, 6.0]]
    # a speck above the blob is not the apex: the largest component is used
    mask[0, 1] = 1
    assert keypoints_from_mask(mask[None], k=1, rule="lv-apex").tolist() == [[9.0, 4.0]]


def test_mask_errors_are_clear():
    with pytest.raises(InputError, match="no foreground"):
        keypoints_from_mask(np.zeros((8, 8)))
    one = np.zeros((8, 8))
    one[2:4, 2:6] = 1
    with pytest.raises(InputError, match="1 connected component"):
        keypoints_from_mask(one, k=2)
    with pytest.raises(InputError, match="unknown keypoint rule"):
        keypoints_from_mask(one, rule="corners")
    with pytest.raises(InputError, match="gives 1 keypoint"):
        keypoints_from_mask(one, k=2, rule="lv-apex")
    with pytest.raises(InputError, match="2D mask"):
        keypoints_from_mask(np.zeros((2, 8, 8)))


# -- heatmaps ---------------------------------------------------------------------------------------

def test_heatmap_peak_value_location_and_width():
    maps = gaussian_heatmaps([[5, 3], [10.5, 7.25], [-3, 2], [np.nan, 1]], (12, 16), sigma=2.0)
    assert maps.shape == (4, 12, 16) and maps.dtype == np.float32
    assert maps[0, 3, 5] == 1.0 and maps[0].argmax() == 3 * 16 + 5
    assert maps[0, 3, 7] == pytest.approx(np.exp(-4 / 8), rel=1e-6)  # two pixels away: exp(-d^2 / 2 sigma^2)
    assert maps[1].max() < 1.0 and maps[1, 7, 10] == pytest.approx(maps[1, 7, 11])  # sub-pixel: halfway
    assert not maps[2].any() and not maps[3].any()  # outside the image / NaN -> zero maps
    edge = gaussian_heatmaps([[15.4, -0.4], [15.6, 0]], (12, 16), 1.0)
    assert edge[0].max() > 0 and not edge[1].any()  # inside means: rounds onto a pixel of the image


def test_torch_heatmaps_match_numpy_and_batch():
    points = np.array([[[5, 3], [10.5, 7.25]], [[-3, 2], [0, 11]]], np.float32)
    maps = gaussian_heatmaps_torch(torch.from_numpy(points), (12, 16), 1.5)
    assert maps.shape == (2, 2, 12, 16)
    for b in range(2):
        np.testing.assert_allclose(maps[b].numpy(), gaussian_heatmaps(points[b], (12, 16), 1.5), atol=1e-6)


def test_argmax_round_trip_ties_and_empty_maps():
    points = np.array([[5, 3], [0, 11], [15, 0]], float)
    maps = gaussian_heatmaps(points, (12, 16), 2.0)
    np.testing.assert_array_equal(heatmap_argmax(maps), points)
    batch = torch.from_numpy(np.stack([maps, maps[::-1].copy()]))
    np.testing.assert_array_equal(heatmap_argmax(batch).numpy(), np.stack([points, points[::-1]]))
    tie = np.zeros((1, 4, 5))
    tie[0, 2, 1] = tie[0, 1, 3] = 0.5
    assert heatmap_argmax(tie).tolist() == [[3.0, 1.0]]  # first maximum in row-major order
    empty = np.zeros((2, 4, 5))
    empty[1, 0, 0] = np.nan
    assert np.isnan(heatmap_argmax(empty)).all()
    assert heatmap_argmax(empty, empty="centre").tolist() == [[2.0, 1.5], [2.0, 1.5]]
    assert torch.isnan(heatmap_argmax(torch.zeros(1, 2, 4, 5))).all()


# -- CSV --------------------------------------------------------------------------------------------

def test_csv_round_trip(tmp_path):
    table = {"scan_a": np.array([[3.0, 6.0], [37.25, 10.125]]), "scan b": np.array([[0.5, 1e3]])}
    path = write_keypoints_csv(tmp_path / "keypoints.csv", table)
    assert path.read_text().splitlines()[0] == "name,k,x,y"
    back = read_keypoints_csv(path)
    assert list(back) == ["scan_a", "scan b"]
    for name in table:
        np.testing.assert_array_equal(back[name], table[name])


@pytest.mark.parametrize("text, message", [
    ("name,x,y\na,1,2\n", "missing column"),
    ("name,k,x,y\na,0,one,2\n", "line 2: x must be a finite number"),
    ("name,k,x,y\na,0,1,2\na,0,3,4\n", "line 3: keypoint k=0 of 'a' appears twice"),
    ("name,k,x,y\na,0,1,2\na,2,3,4\n", r"lacks k=\[1\]"),
    ("name,k,x,y\na,-1,1,2\n", "k must be a non-negative integer"),
    ("name,k,x,y\n,0,1,2\n", "empty name"),
])
def test_bad_csv_files_are_refused_clearly(tmp_path, text, message):
    path = tmp_path / "keypoints.csv"
    path.write_text(text)
    with pytest.raises(InputError, match=message):
        read_keypoints_csv(path)


def test_csv_extra_columns_and_unordered_rows_are_fine(tmp_path):
    path = tmp_path / "k.csv"
    path.write_text("name,k,x,y,comment\nb,1,5,6,right\nb,0,1,2,left\n")
    assert read_keypoints_csv(path)["b"].tolist() == [[1.0, 2.0], [5.0, 6.0]]
    with pytest.raises(InputError, match="NaN"):
        write_keypoints_csv(tmp_path / "out.csv", {"a": [[np.nan, 1.0]]})
