"""GLS synthetic AS-OCT B-scans: deterministic, two iris wings, keypoints at the tail tips, faint tails."""

import time

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from deepimaging.core.errors import InputError
from deepimaging.core.imageio import read_image
from deepimaging.gls.keypoints import keypoints_from_mask, read_keypoints_csv
from deepimaging.gls.synthetic import make_bscan, write_synthetic_dataset

SEEDS = range(8)


@pytest.fixture(scope="module")
def scans():
    return {seed: make_bscan(seed) for seed in SEEDS}


def wing_of(mask, point):
    labels, _ = ndimage.label(mask, structure=np.ones((3, 3)))
    return labels == labels[int(point[1]), int(point[0])]


def test_generation_is_deterministic_per_seed_and_varies_between_seeds(scans):
    again = make_bscan(3)
    np.testing.assert_array_equal(again.image, scans[3].image)
    np.testing.assert_array_equal(again.mask, scans[3].mask)
    np.testing.assert_array_equal(again.keypoints, scans[3].keypoints)
    assert not np.array_equal(scans[3].mask, scans[4].mask)
    assert np.ptp([s.keypoints[0, 0] for s in scans.values()]) > 10  # tail position varies
    assert np.ptp([s.params["rotation_deg"] for s in scans.values()]) > 3


def test_image_mask_and_keypoint_types(scans):
    for scan in scans.values():
        assert scan.image.shape == (256, 256) and scan.image.dtype == np.float32
        assert 0.0 <= scan.image.min() and scan.image.max() <= 1.0
        assert scan.mask.dtype == np.uint8 and set(np.unique(scan.mask)) == {0, 1}
        assert scan.keypoints.shape == (2, 2)
        assert 0.01 < scan.mask.mean() < 0.08  # two wings, a few percent of the image


def test_two_wings_one_each_side_of_the_pupil_away_from_the_border(scans):
    for scan in scans.values():
        labels, count = ndimage.label(scan.mask, structure=np.ones((3, 3)))
        assert count == 2
        centroids = ndimage.center_of_mass(scan.mask, labels, [1, 2])
        xs = sorted(c[1] for c in centroids)
        assert xs[0] < 127.5 < xs[1] and xs[1] - xs[0] > 60
        ys, xs_all = np.nonzero(scan.mask)
        assert xs_all.min() >= 8 and xs_all.max() <= 247 and ys.min() >= 8 and ys.max() <= 247


def test_keypoints_are_the_ciliary_side_tail_tips(scans):
    for seed, scan in scans.items():
        left, right = scan.keypoints
        assert left[0] < 127.5 < right[0]
        for point in scan.keypoints:
            assert scan.mask[int(point[1]), int(point[0])] == 1  # on the mask
        xs_left = np.nonzero(wing_of(scan.mask, left))[1]
        xs_right = np.nonzero(wing_of(scan.mask, right))[1]
        assert left[0] - xs_left.min() <= 2 and xs_right.max() - right[0] <= 2, seed
        # the documented mask rule finds the same points within 2 px
        assert np.abs(keypoints_from_mask(scan.mask, 2, "iris-tails") - scan.keypoints).max() <= 2, seed


def test_tails_are_thin_and_low_contrast(scans):
    yy, xx = np.mgrid[0:256, 0:256]
    ratios = []
    for scan in scans.values():
        for point in scan.keypoints:
            wing = wing_of(scan.mask, point)
            ring = ndimage.binary_dilation(wing, iterations=4) & (scan.mask == 0)
            distance = np.hypot(xx - point[0], yy - point[1])

            def contrast(select):
                return scan.image[wing & select].mean() - scan.image[ring & select].mean()

            tail, core = contrast(distance < 10), contrast((distance > 30) & (distance < 50))
            assert core > 0.2  # the wing's core stands out clearly
            ratios.append(tail / core)
            # thickness 4 px inside the tip is less than half the wing's thickest column
            column = int(point[0] + (4 if point[0] < 128 else -4))
            assert wing[:, column].sum() < 0.5 * wing.sum(axis=0).max()
    assert np.median(ratios) < 0.3 and max(ratios) < 0.6, np.round(ratios, 2)


def test_other_sizes_and_bad_size():
    scan = make_bscan(11, size=(128, 192))
    assert scan.image.shape == scan.mask.shape == (128, 192)
    assert ndimage.label(scan.mask, structure=np.ones((3, 3)))[1] == 2
    assert np.all(scan.keypoints >= 0) and np.all(scan.keypoints[:, 0] < 192) and np.all(scan.keypoints[:, 1] < 128)
    with pytest.raises(InputError, match="at least 64"):
        make_bscan(0, size=(32, 256))


def test_generation_is_fast():
    best = np.inf
    for round_ in range(3):
        start = time.perf_counter()
        for seed in range(5):
            make_bscan(100 + seed)
        best = min(best, (time.perf_counter() - start) / 5)
    assert best < 0.05, f"{best * 1000:.1f} ms per 256x256 B-scan"


def test_png_dataset_layout_and_round_trip(tmp_path):
    root = write_synthetic_dataset(tmp_path / "data", n=3, seed=7)
    names = ["bscan_00007", "bscan_00008", "bscan_00009"]
    assert sorted(p.name for p in (root / "images").iterdir()) == [n + ".png" for n in names]
    assert sorted(p.name for p in (root / "masks").iterdir()) == [n + ".png" for n in names]
    table = read_keypoints_csv(root / "keypoints.csv")
    scan = make_bscan(8)
    np.testing.assert_array_equal(table["bscan_00008"], scan.keypoints)
    image = sitk.GetArrayFromImage(sitk.ReadImage(str(root / "images" / "bscan_00008.png")))
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(root / "masks" / "bscan_00008.png")))
    assert image.dtype == np.uint8 and np.abs(image / 255.0 - scan.image).max() <= 0.5 / 255 + 1e-6
    np.testing.assert_array_equal(mask, scan.mask * 255)
    with pytest.raises(InputError, match="already holds 3 file"):
        write_synthetic_dataset(root, n=2)
    write_synthetic_dataset(root, n=2, seed=20, overwrite=True)
    assert sorted(p.name for p in (root / "images").iterdir()) == ["bscan_00020.png", "bscan_00021.png"]
    assert sorted(read_keypoints_csv(root / "keypoints.csv")) == ["bscan_00020", "bscan_00021"]


def test_nrrd_dataset_keeps_float_images(tmp_path):
    root = write_synthetic_dataset(tmp_path, n=1, size=(96, 128), seed=2, fmt="nrrd")
    image = read_image(root / "images" / "bscan_00002.nrrd")
    mask = read_image(root / "masks" / "bscan_00002.nrrd")
    scan = make_bscan(2, size=(96, 128))
    np.testing.assert_array_equal(image.array[0], scan.image)
    np.testing.assert_array_equal(mask.array[0], scan.mask)
    with pytest.raises(InputError, match="format must be one of"):
        write_synthetic_dataset(tmp_path / "x", n=1, fmt="jpg")
