"""The ``deepimaging levelset refine`` command end to end, and its bad-input messages."""

import numpy as np
import pytest
import SimpleITK as sitk

from deepimaging.cli import main
from deepimaging.core.image import Image
from deepimaging.core.imageio import read_image, write_image
from deepimaging.core.metrics import dice
from deepimaging.core.segfile import Segmentation, read_segmentation, write_segmentation
from deepimaging.levelset.synthetic import make_refinement_case


@pytest.fixture
def files(tmp_path):
    case = make_refinement_case((1, 96, 96), seed=5)
    write_image(case.image, tmp_path / "img.nrrd")
    seg = Segmentation(case.image.with_array(np.zeros(case.image.shape, np.uint8)))
    seg.add("blob", case.rough, (0.2, 0.6, 0.9))
    seg.add("other", np.roll(case.rough, 3, axis=2))
    write_segmentation(seg, tmp_path / "rough.seg.nrrd")
    write_image(case.image.with_array(case.rough.astype(np.uint8)), tmp_path / "rough.nii.gz")
    return tmp_path, case


def test_refine_seg_nrrd_keeps_name_and_improves(files, capsys):
    tmp, case = files
    out = tmp / "refined.seg.nrrd"
    rc = main(["levelset", "refine", "--image", str(tmp / "img.nrrd"), "--mask", str(tmp / "rough.seg.nrrd"),
               "--segment", "blob", "--out", str(out), "--device", "cpu"])
    assert rc == 0 and "refined 'blob'" in capsys.readouterr().out
    seg = read_segmentation(out)
    assert seg.names() == ["blob"]
    assert seg.segment("blob").color == pytest.approx((0.2, 0.6, 0.9), abs=1e-3)
    assert dice(seg.segment("blob").mask, case.truth) > dice(case.rough, case.truth) + 0.05
    assert seg.geometry.same_grid(case.image)


def test_refine_labelmap_in_labelmap_out(files):
    tmp, case = files
    out = tmp / "refined.nrrd"
    assert main(["levelset", "refine", "--image", str(tmp / "img.nrrd"), "--mask", str(tmp / "rough.nii.gz"),
                 "--out", str(out), "--iterations", "100", "--mu", "0.2"]) == 0
    labels = read_image(out)
    assert labels.array.max() == 1 and dice(labels.array > 0, case.truth) > dice(case.rough, case.truth)


def bad(tmp, args, capsys, expect):
    before = set(tmp.iterdir())
    rc = main(["levelset", "refine"] + args)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert expect in err, err
    assert set(tmp.iterdir()) == before  # no output, not even a half-written one


def test_missing_segment_name(files, capsys):
    tmp, _ = files
    bad(tmp, ["--image", str(tmp / "img.nrrd"), "--mask", str(tmp / "rough.seg.nrrd"), "--segment", "liver",
              "--out", str(tmp / "o.seg.nrrd")], capsys, "no segment named 'liver'")
    bad(tmp, ["--image", str(tmp / "img.nrrd"), "--mask", str(tmp / "rough.seg.nrrd"),
              "--out", str(tmp / "o.seg.nrrd")], capsys, "several segments")


def test_unknown_extension(files, capsys):
    tmp, _ = files
    bad(tmp, ["--image", str(tmp / "img.nrrd"), "--mask", str(tmp / "rough.nii.gz"), "--out", str(tmp / "o.png")],
        capsys, "'.png' is not one of")


def test_geometry_mismatch(files, capsys):
    tmp, case = files
    moved = Image(case.rough.astype(np.uint8), case.image.spacing, (5.0, 0.0, 0.0))
    write_image(moved, tmp / "moved.nrrd")
    bad(tmp, ["--image", str(tmp / "img.nrrd"), "--mask", str(tmp / "moved.nrrd"), "--out", str(tmp / "o.nrrd")],
        capsys, "origin")


def test_empty_mask(files, capsys):
    tmp, case = files
    write_image(case.image.with_array(np.zeros(case.image.shape, np.uint8)), tmp / "empty.nrrd")
    bad(tmp, ["--image", str(tmp / "img.nrrd"), "--mask", str(tmp / "empty.nrrd"), "--out", str(tmp / "o.nrrd")],
        capsys, "no segments")


def test_nan_voxels(files, capsys):
    tmp, case = files
    arr = case.image.array.copy()
    arr[0, 10, 10] = np.inf
    write_image(case.image.with_array(arr), tmp / "nan.nrrd")
    bad(tmp, ["--image", str(tmp / "nan.nrrd"), "--mask", str(tmp / "rough.nii.gz"), "--out", str(tmp / "o.nrrd")],
        capsys, "NaN or infinite")


def test_four_d_image(files, capsys):
    tmp, _ = files
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((2, 3, 96, 96), np.float32), isVector=False), str(tmp / "4d.nrrd"))
    bad(tmp, ["--image", str(tmp / "4d.nrrd"), "--mask", str(tmp / "rough.nii.gz"), "--out", str(tmp / "o.nrrd")],
        capsys, "4-D")


def test_refuses_to_overwrite_input(files, capsys):
    tmp, _ = files
    bad(tmp, ["--image", str(tmp / "img.nrrd"), "--mask", str(tmp / "rough.nii.gz"), "--out", str(tmp / "rough.nii.gz")],
        capsys, "must not overwrite")


def test_demo_command(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "demo"), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "initial" in out and "refined" in out
    for name in ("levelset_image.nrrd", "levelset_initial.seg.nrrd", "levelset_refined.seg.nrrd",
                 "levelset_overlay.png"):
        assert (tmp_path / "demo" / name).stat().st_size > 0
