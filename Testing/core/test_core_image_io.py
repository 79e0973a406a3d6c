import numpy as np
import pytest

from deepimaging.core.errors import GeometryMismatchError, InputError, UnsupportedFormatError
from deepimaging.core.image import Image
from deepimaging.core.imageio import read_image, write_image
from deepimaging.core.segfile import Segmentation, read_segmentation, write_segmentation


def oblique_direction():
    c, s = np.cos(0.3), np.sin(0.3)
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])


@pytest.mark.parametrize("ext", [".nrrd", ".nii.gz", ".mha", ".nii"])
def test_roundtrip_keeps_array_and_geometry(tmp_path, ext):
    arr = np.random.default_rng(0).normal(size=(4, 5, 6)).astype(np.float32)
    img = Image(arr, spacing=(0.7, 0.8, 2.5), origin=(10.0, -20.0, 5.0), direction=oblique_direction())
    back = read_image(write_image(img, tmp_path / f"img{ext}"))
    np.testing.assert_allclose(back.array, arr)
    np.testing.assert_allclose(back.spacing, img.spacing, rtol=1e-5)
    np.testing.assert_allclose(back.origin, img.origin, atol=1e-4)
    np.testing.assert_allclose(back.direction, img.direction, atol=1e-5)


def test_2d_image_reads_as_single_slice(tmp_path):
    import SimpleITK as sitk

    s = sitk.GetImageFromArray(np.arange(12, dtype=np.float32).reshape(3, 4))
    s.SetSpacing((0.5, 0.25))
    sitk.WriteImage(s, str(tmp_path / "two_d.nrrd"))
    img = read_image(tmp_path / "two_d.nrrd")
    assert img.shape == (1, 3, 4) and img.is_2d
    assert img.spacing[:2] == (0.5, 0.25)


def test_ras_matrix_roundtrip():
    img = Image(np.zeros((2, 3, 4)), (0.5, 0.6, 0.7), (1, 2, 3), oblique_direction())
    m = img.ijk_to_ras()
    assert m[0, 3] == -1 and m[1, 3] == -2 and m[2, 3] == 3  # LPS -> RAS flips x and y
    back = Image.from_ijk_to_ras(img.array, m)
    assert back.same_grid(img)


def test_four_d_image_rejected(tmp_path):
    with pytest.raises(InputError, match="4-D"):
        Image(np.zeros((2, 3, 4, 5)))
    import SimpleITK as sitk

    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((2, 3, 4, 5), np.float32), isVector=False), str(tmp_path / "4d.nrrd"))
    with pytest.raises(InputError, match="4-D|2D or 3D"):
        read_image(tmp_path / "4d.nrrd")


def test_unknown_extension_and_missing_file(tmp_path):
    with pytest.raises(UnsupportedFormatError, match=".png"):
        write_image(Image(np.zeros((1, 2, 2))), tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()
    with pytest.raises(InputError, match="not found"):
        read_image(tmp_path / "missing.nrrd")


def test_failed_write_leaves_no_file(tmp_path, monkeypatch):
    import SimpleITK as sitk

    def boom(*a, **k):
        with open(a[1], "wb") as f:
            f.write(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(sitk, "WriteImage", boom)
    with pytest.raises(RuntimeError):
        write_image(Image(np.zeros((1, 2, 2))), tmp_path / "out.nrrd")
    assert list(tmp_path.iterdir()) == []


def test_grid_mismatch_message_names_difference():
    a = Image(np.zeros((2, 3, 4)), (1, 1, 1))
    b = Image(np.zeros((2, 3, 4)), (1, 1, 2))
    with pytest.raises(GeometryMismatchError, match="spacing"):
        a.require_same_grid(b)


def test_nan_detection():
    img = Image(np.array([[[1.0, np.nan]]]))
    with pytest.raises(InputError, match="NaN"):
        img.require_finite()


def test_seg_nrrd_roundtrip_keeps_names_colors_and_overlaps(tmp_path):
    geom = Image(np.zeros((3, 8, 9), np.uint8), (0.5, 0.5, 2.0), (1, 2, 3), oblique_direction())
    seg = Segmentation(geom)
    a = np.zeros(geom.shape, bool)
    a[1, 2:5, 2:6] = True
    b = np.zeros(geom.shape, bool)
    b[1, 3:7, 4:8] = True  # overlaps a
    seg.add("liver", a, (0.9, 0.1, 0.1))
    seg.add("tumour", b)
    back = read_segmentation(write_segmentation(seg, tmp_path / "s.seg.nrrd"))
    assert back.names() == ["liver", "tumour"]
    np.testing.assert_array_equal(back.segment("liver").mask, a)
    np.testing.assert_array_equal(back.segment("tumour").mask, b)
    assert back.segment("liver").color == pytest.approx((0.9, 0.1, 0.1), abs=1e-3)
    assert back.geometry.same_grid(geom)


def test_labelmap_read_and_segment_lookup(tmp_path):
    labels = np.zeros((1, 5, 5), np.uint8)
    labels[0, 1:3, 1:3] = 1
    labels[0, 3:5, 3:5] = 4
    write_image(Image(labels), tmp_path / "l.nii.gz")
    seg = read_segmentation(tmp_path / "l.nii.gz")
    assert seg.names() == ["Label 1", "Label 4"]
    with pytest.raises(InputError, match="several segments"):
        seg.segment()
    with pytest.raises(InputError, match="no segment named 'spleen'"):
        seg.segment("spleen")
    assert seg.segment("Label 4").mask.sum() == 4
