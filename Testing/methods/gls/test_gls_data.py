"""GLS data loading: image/mask folders, CAMUS, arrays on one grid, B-scan stacks."""

import warnings

import numpy as np
import pytest
import SimpleITK as sitk

from deepimaging.core.errors import GeometryMismatchError, InputError
from deepimaging.core.image import Image
from deepimaging.gls.data import (Sample, bscans_from_volume, load_camus, load_folder, scale_keypoints,
                                  to_arrays)
from deepimaging.gls.keypoints import keypoints_from_mask, write_keypoints_csv
from deepimaging.gls.synthetic import make_bscan, write_synthetic_dataset


@pytest.fixture(scope="module")
def png_root(tmp_path_factory):
    return write_synthetic_dataset(tmp_path_factory.mktemp("gls") / "png", n=3, seed=0)


def write_png(path, array, vector=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(sitk.GetImageFromArray(np.asarray(array, np.uint8), isVector=vector), str(path))


def bars_mask(shape=(24, 40)):
    mask = np.zeros(shape, np.uint8)
    mask[5:9, 3:15] = 1
    mask[12:15, 24:37] = 1
    return mask


# -- folders ---------------------------------------------------------------------------------------

def test_load_png_folder_with_keypoints_csv(png_root):
    samples = load_folder(png_root)
    assert [s.name for s in samples] == ["bscan_00000", "bscan_00001", "bscan_00002"]
    for seed, sample in enumerate(samples):
        scan = make_bscan(seed)
        assert sample.image.shape == (1, 256, 256) and sample.image.array.dtype == np.float32
        assert sample.image.spacing == (1.0, 1.0, 1.0) and sample.shape == (256, 256)
        np.testing.assert_allclose(sample.image.array[0] / 255.0, scan.image, atol=0.5 / 255 + 1e-6)
        np.testing.assert_array_equal(sample.mask, scan.mask)  # 0/255 on disk -> 0/1
        np.testing.assert_array_equal(sample.keypoints, scan.keypoints)


def test_keypoints_derived_from_masks_where_the_csv_has_none(tmp_path):
    root = write_synthetic_dataset(tmp_path, n=2, seed=5, fmt="nrrd")
    write_keypoints_csv(root / "keypoints.csv", {"bscan_00005": [[1.0, 2.0], [3.0, 4.0]]})
    first, second = load_folder(root)
    assert first.keypoints.tolist() == [[1.0, 2.0], [3.0, 4.0]]
    np.testing.assert_array_equal(second.keypoints, keypoints_from_mask(second.mask))
    assert np.abs(second.keypoints - make_bscan(6).keypoints).max() <= 2
    np.testing.assert_array_equal(second.image.array[0], make_bscan(6).image)  # nrrd keeps the floats
    assert load_folder(root, keypoints=0)[0].keypoints is None
    with pytest.raises(InputError, match="has 2 keypoint"):
        load_folder(root, keypoints=1)


def test_rgb_images_become_grey_and_equal_channel_masks_are_accepted(tmp_path):
    rgb = np.zeros((24, 40, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 200, 100, 50
    write_png(tmp_path / "images" / "a.png", rgb, vector=True)
    write_png(tmp_path / "masks" / "a.png", np.repeat(bars_mask()[..., None] * 255, 3, -1), vector=True)
    sample, = load_folder(tmp_path)
    np.testing.assert_allclose(sample.image.array, 0.299 * 200 + 0.587 * 100 + 0.114 * 50, rtol=1e-6)
    assert sample.keypoints.tolist() == [[3.0, 6.0], [36.0, 13.0]]
    colour = np.zeros((24, 40, 3), np.uint8)
    colour[5:9, 3:15, 0] = 255  # a red overlay
    write_png(tmp_path / "masks" / "a.png", colour, vector=True)
    with pytest.raises(InputError, match="colour channels that differ"):
        load_folder(tmp_path)


def test_folder_errors_name_the_files(tmp_path):
    with pytest.raises(InputError, match="no images/ folder"):
        load_folder(tmp_path)
    write_png(tmp_path / "images" / "a.png", np.full((24, 40), 9))
    write_png(tmp_path / "images" / "b.png", np.full((24, 40), 9))
    write_png(tmp_path / "masks" / "a.png", bars_mask())
    with pytest.raises(InputError, match=r"no mask in .* for 1 image\(s\): b"):
        load_folder(tmp_path)
    assert load_folder(tmp_path, require_masks=False)[1].mask is None
    write_png(tmp_path / "masks" / "b.png", np.zeros((20, 40)))
    with pytest.raises(GeometryMismatchError, match=r"mask .*b\.png is 40x20 pixels but image .*b\.png is 40x24"):
        load_folder(tmp_path)
    write_png(tmp_path / "masks" / "b.png", bars_mask() * 2)
    with pytest.raises(InputError, match=r"b\.png: mask values must be 0/1 or 0/255, found 2 values \(0, 2\)"):
        load_folder(tmp_path)
    write_png(tmp_path / "masks" / "b.png", np.pad(bars_mask()[:, :20], ((0, 0), (0, 20))))  # one bar: rule needs 2
    with pytest.raises(InputError, match=r"b\.png: .*has 1 connected component"):
        load_folder(tmp_path)
    write_png(tmp_path / "images" / "b.nrrd", np.zeros((2, 2)))  # (never read: duplicate stem)
    with pytest.raises(InputError, match="two files named 'b'"):
        load_folder(tmp_path)


def test_empty_masks_are_kept_without_keypoints_or_refused(tmp_path):
    write_png(tmp_path / "images" / "a.png", np.full((24, 40), 9))
    write_png(tmp_path / "masks" / "a.png", np.zeros((24, 40)))
    with pytest.warns(RuntimeWarning, match="no foreground"):
        sample, = load_folder(tmp_path)
    assert sample.mask.sum() == 0 and sample.keypoints is None
    with pytest.raises(InputError, match="no foreground"):
        load_folder(tmp_path, require_foreground=True)


# -- CAMUS -------------------------------------------------------------------------------------------

def write_camus(root, patients=(1, 2)):
    """A tiny CAMUS tree: 48x32 2D .mhd/.raw images and _gt label maps (1 LV, 2 myocardium, 3 atrium)."""
    yy, xx = np.mgrid[0:48, 0:32]
    for p in patients:
        folder = root / f"patient{p:04d}"
        folder.mkdir(parents=True)
        for v, view in enumerate(("2CH", "4CH")):
            for phase in ("ED", "ES"):
                cx = 12 + p + v  # LV apex at (cx, 14)
                lv = ((xx - cx) / 6.0) ** 2 + ((yy - 26) / 12.0) ** 2 <= 1
                gt = np.where(((xx - cx) / 8.0) ** 2 + ((yy - 26) / 14.0) ** 2 <= 1, 2, 0)
                gt[lv] = 1
                gt[42:, :] = 3
                for name, array in ((f"patient{p:04d}_{view}_{phase}", 40 * gt + p),
                                    (f"patient{p:04d}_{view}_{phase}_gt", gt)):
                    image = sitk.GetImageFromArray(array.astype(np.uint8))
                    image.SetSpacing((0.3, 0.15))
                    sitk.WriteImage(image, str(folder / f"{name}.mhd"))


def test_load_camus(tmp_path):
    write_camus(tmp_path)
    samples = load_camus(tmp_path)
    assert len(samples) == 8 and samples[0].name == "patient0001_2CH_ED" and samples[-1].name == "patient0002_4CH_ES"
    for sample in samples:
        assert isinstance(sample, Sample) and sample.image.spacing[:2] == (0.3, 0.15)
        assert sample.image.array.dtype == np.float32
        gt = (sample.image.array[0] - int(sample.name[7:11])) / 40
        np.testing.assert_array_equal(sample.mask, (gt == 1).astype(np.uint8))
        view = 0 if "_2CH_" in sample.name else 1
        assert sample.keypoints.tolist() == [[12 + int(sample.name[7:11]) + view, 14.0]]  # the apex
    assert [s.name for s in load_camus(tmp_path, views=("4CH",), phases=("ES",))] == [
        "patient0001_4CH_ES", "patient0002_4CH_ES"]
    assert load_camus(tmp_path, label=3)[0].keypoints.tolist() == [[15.0, 42.0]]
    (tmp_path / "patient0002" / "patient0002_4CH_ED_gt.mhd").unlink()
    with pytest.raises(InputError, match=r"ground-truth label map .*patient0002_4CH_ED_gt\.mhd .*not found"):
        load_camus(tmp_path)
    with pytest.raises(InputError, match="no patientNNNN folders"):
        load_camus(tmp_path / "patient0001")


# -- arrays ------------------------------------------------------------------------------------------

def test_to_arrays_hand_checked_scaling():
    mask = bars_mask()
    image = Image(np.linspace(10, 20, 24 * 40, dtype=np.float32).reshape(1, 24, 40))
    sample = Sample("a", image, mask, keypoints_from_mask(mask))  # [[3, 6], [36, 13]]
    images, masks, points = to_arrays([sample], size=(48, 80))
    assert images.shape == masks.shape == (1, 1, 48, 80) and points.shape == (1, 2, 2)
    assert images.min() == 0.0 and images.max() == 1.0
    assert points[0].tolist() == [[6.5, 12.5], [72.5, 26.5]]  # (x + 0.5) * 2 - 0.5
    np.testing.assert_array_equal(scale_keypoints(points[0], (48, 80), (24, 40)), sample.keypoints)
    z = to_arrays([sample], size=(24, 40), normalise="zscore")[0]
    assert abs(z.mean()) < 1e-5 and abs(z.std() - 1) < 1e-4


@pytest.mark.parametrize("size", [(128, 128), (100, 160), (384, 384)])
def test_keypoints_stay_on_the_mask_after_resizing(size):
    samples = [Sample(f"s{seed}", Image(scan.image), scan.mask, scan.keypoints)
               for seed, scan in ((seed, make_bscan(seed)) for seed in range(8))]
    _, masks, points = to_arrays(samples, size=size)
    _, _, unsnapped = to_arrays(samples, size=size, snap_distance=0)
    on, on_unsnapped = [], []
    for i in range(len(samples)):
        expected = scale_keypoints(samples[i].keypoints, (256, 256), size)
        np.testing.assert_allclose(unsnapped[i], expected, atol=1e-4)
        assert np.abs(points[i] - expected).max() <= 3.0  # at most a snap_distance move
        ys, xs = np.nonzero(masks[i, 0])
        for (x, y), (ux, uy) in zip(points[i], unsnapped[i]):
            on.append(masks[i, 0, int(np.floor(y + 0.5)), int(np.floor(x + 0.5))] == 1)
            on_unsnapped.append(masks[i, 0, int(np.floor(uy + 0.5)), int(np.floor(ux + 0.5))] == 1)
            # the contract: on the resized mask, unless its nearest foreground is farther than snap_distance
            assert on[-1] or np.hypot(xs - ux, ys - uy).min() > 3.0
    if size[0] > 256:
        assert all(on_unsnapped)  # upsizing keeps every tail tip on the mask by itself
    else:
        assert all(on) and not all(on_unsnapped)  # thin tips shrink when downsizing: snapping puts them back


def test_to_arrays_missing_keypoints_and_masks():
    scan = make_bscan(1, size=(64, 64))
    with_points = Sample("a", Image(scan.image), scan.mask, scan.keypoints)
    without = Sample("b", Image(scan.image), np.zeros_like(scan.mask), None)
    _, masks, points = to_arrays([with_points, without], size=(64, 64))
    assert np.isnan(points[1]).all() and np.isfinite(points[0]).all() and masks[1].sum() == 0
    images, masks, points = to_arrays([Sample("c", Image(scan.image))], size=(32, 32))
    assert images.shape == (1, 1, 32, 32) and masks is None and points is None
    with pytest.raises(InputError, match="has no mask but others do"):
        to_arrays([with_points, Sample("c", Image(scan.image))])


# -- B-scan stacks ------------------------------------------------------------------------------------

def test_bscans_from_volume_keeps_each_slice_geometry():
    direction = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    volume = Image(np.arange(3 * 40 * 50, dtype=np.float32).reshape(3, 40, 50), (0.1, 0.2, 0.5),
                   (5.0, -2.0, 1.0), direction)
    slices = bscans_from_volume(volume)
    assert len(slices) == 3
    for k, image in enumerate(slices):
        assert image.shape == (1, 40, 50) and image.spacing == volume.spacing
        np.testing.assert_array_equal(image.array[0], volume.array[k])
        np.testing.assert_allclose(image.ijk_to_lps() @ [3, 4, 0, 1], volume.ijk_to_lps() @ [3, 4, k, 1])
    assert len(bscans_from_volume(Image(np.zeros((40, 50))))) == 1
    with pytest.raises(InputError, match="below the 32-pixel minimum"):
        bscans_from_volume(Image(np.zeros((100, 100, 8))))
    with pytest.raises(InputError, match="more than the 512"):
        bscans_from_volume(Image(np.zeros((600, 32, 32), np.uint8)))


def test_3d_files_are_refused_by_the_folder_loader(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((3, 40, 50), np.float32)), str(tmp_path / "images" / "v.nrrd"))
    write_png(tmp_path / "masks" / "v.png", np.zeros((40, 50)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(InputError, match="3D volume with 3 slices"):
            load_folder(tmp_path)
