"""ROG training data: dataset building and caching, foreground-biased patch sampling, augmentation."""

from dataclasses import replace

import numpy as np
import pytest
import SimpleITK as sitk

from deepimaging.core.errors import GeometryMismatchError, InputError
from deepimaging.core.image import Image
from deepimaging.core.imageio import write_image
from deepimaging.rog.data import (Augmentation, PatchSampler, PatchStream, RogCase, RogDataset, crop,
                                  validation_patches)
from deepimaging.rog.synthetic import make_blob_case

ALWAYS = Augmentation(spatial_probability=1.0, mirror_probability=0.5, gamma_probability=1.0)


def tiny_blob_dataset(plan, shape=(40, 40, 40), blob=4):
    """One case with a single small cube of class 1 (0.1 % of the voxels)."""
    label = np.zeros(shape, np.uint8)
    label[8:8 + blob, 20:20 + blob, 25:25 + blob] = 1
    image = (label * 3.0 - 1.0).astype(np.float32)[None]
    return RogDataset([RogCase("tiny", image, label)], plan)


def test_half_of_the_patches_are_centred_on_foreground(blob_plan):
    dataset = tiny_blob_dataset(blob_plan)
    sampler = PatchSampler(dataset, (32, 32, 32), foreground_probability=0.5, seed=1)
    centred, forced = [], []
    for _ in range(400):
        image, label, fg = sampler.sample()
        assert image.shape == (1, 32, 32, 32) and label.shape == (32, 32, 32)
        centred.append(label[16, 16, 16] == 1)
        forced.append(fg)
    assert 0.42 < np.mean(centred) < 0.58 and 0.42 < np.mean(forced) < 0.58
    assert all(c for c, f in zip(centred, forced) if f)  # forced patches really are centred on foreground
    never = PatchSampler(dataset, (32, 32, 32), foreground_probability=0.0, seed=1)
    assert np.mean([never.sample()[1][16, 16, 16] == 1 for _ in range(100)]) < 0.05


def test_every_foreground_class_gets_patches(blob_plan):
    label = np.zeros((30, 30, 30), np.uint8)
    label[2:20, 2:20, 2:20] = 1       # big organ
    label[25, 25, 25] = 2              # one-voxel lesion
    dataset = RogDataset([RogCase("two", np.zeros((1, 30, 30, 30), np.float32), label)], blob_plan)
    sampler = PatchSampler(dataset, (16, 16, 16), foreground_probability=1.0, seed=0)
    centres = [sampler.sample()[1][8, 8, 8] for _ in range(200)]
    assert 0.35 < np.mean(np.asarray(centres) == 2) < 0.65  # classes drawn uniformly, not by volume


def test_crop_pads_outside_the_image():
    array = np.arange(2 * 4 * 4 * 4, dtype=np.float32).reshape(2, 4, 4, 4)
    out = crop(array, (-2, 1, 3), (4, 4, 4), np.array([-5.0, -6.0]))
    assert out.shape == (2, 4, 4, 4)
    assert (out[0, :2] == -5).all() and (out[1, :2] == -6).all()
    assert np.array_equal(out[:, 2:, :3, :1], array[:, :2, 1:, 3:])
    assert (crop(array[0], (10, 0, 0), (2, 2, 2), 0) == 0).all()


def test_augmented_patches_keep_image_and_label_aligned(blob_plan):
    image, label = make_blob_case((40, 40, 40), seed=4)
    dataset = RogDataset.from_images([(image, label)], blob_plan)
    sampler = PatchSampler(dataset, (32, 32, 32), foreground_probability=1.0, augmentation=ALWAYS, seed=3)
    for _ in range(6):
        img, lab, _ = sampler.sample()
        assert img.shape == (1, 32, 32, 32) and img.dtype == np.float32 and lab.dtype == np.int64
        assert set(np.unique(lab)) <= {0, 1, 2} and np.isfinite(img).all()
        inside, outside = img[0][lab == 2], img[0][lab == 0]
        if inside.size:
            assert inside.mean() > outside.mean() + 1.0  # the bright organ still lies under its label


def test_stream_and_validation_patches_are_reproducible(blob_plan):
    dataset = tiny_blob_dataset(blob_plan)
    a = next(iter(PatchStream(dataset, (32, 32, 32), seed=5)))
    b = next(iter(PatchStream(dataset, (32, 32, 32), seed=5)))
    c = next(iter(PatchStream(dataset, (32, 32, 32), seed=6)))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))
    val = validation_patches(dataset, per_case=3, patch_size=(32, 32, 32))
    again = validation_patches(dataset, per_case=3, patch_size=(32, 32, 32))
    assert len(val) == 3 and all(np.array_equal(p[1], q[1]) for p, q in zip(val, again))
    assert val[0][1][16, 16, 16] == 1  # the first patch of a case is centred on foreground


def test_files_are_preprocessed_once_and_cached(blob_root, blob_plan, tmp_path):
    first = RogDataset.from_files(blob_root, blob_plan, cache_dir=tmp_path)
    assert len(first) == 4 and len(list(tmp_path.glob("*.npy"))) == 8
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.glob("*.npy")}
    again = RogDataset.from_files(blob_root, blob_plan, cache_dir=tmp_path)
    assert {p: p.stat().st_mtime_ns for p in tmp_path.glob("*.npy")} == stamps
    assert isinstance(again[0].image, np.memmap)
    assert np.array_equal(first[0].image, again[0].image) and np.array_equal(first[0].label, again[0].label)
    assert [len(f) for f in again[0].foreground] == [len(f) for f in first[0].foreground]
    train, val = first.split(0.25, seed=0)
    assert len(train) == 3 and len(val) == 1
    assert not {c.name for c in train.cases} & {c.name for c in val.cases}


def test_bad_datasets_give_clear_errors(blob_root, blob_plan, tmp_path):
    with pytest.raises(InputError, match="empty"):
        RogDataset([], blob_plan)
    with pytest.raises(InputError, match="empty"):
        RogDataset.from_files([], blob_plan)
    only_liver = replace(blob_plan, labels=blob_plan.labels[:2])
    with pytest.raises(InputError, match=r"blob_000.*\[2\].*not in the plan"):
        RogDataset.from_files(blob_root, only_liver)
    image, label = make_blob_case((20, 20, 20))
    with pytest.raises(InputError, match=r"case case0: .*\[2\] that are not in the plan"):
        RogDataset.from_images([(image, label)], only_liver)
    moved = Image(label.array, (1.0, 1.0, 2.0), label.origin)
    with pytest.raises(GeometryMismatchError, match="spacing"):
        RogDataset.from_images([(image, moved)], blob_plan)
    with pytest.raises(InputError, match="2-D"):
        RogDataset.from_images([(Image(np.zeros((20, 20))), Image(np.zeros((20, 20), np.uint8)))], blob_plan)
    # files: a 4-D image for a one-channel plan, and a label map on another grid
    write_image(image, tmp_path / "img.nii.gz")
    sitk.WriteImage(sitk.JoinSeries([sitk.ReadImage(str(tmp_path / "img.nii.gz"))] * 3), str(tmp_path / "four.nii.gz"))
    write_image(label, tmp_path / "lab.nii.gz")
    write_image(moved, tmp_path / "moved.nii.gz")
    with pytest.raises(InputError, match="4-D"):
        RogDataset.from_files([(tmp_path / "four.nii.gz", tmp_path / "lab.nii.gz")], blob_plan)
    with pytest.raises(GeometryMismatchError, match="spacing"):
        RogDataset.from_files([(tmp_path / "img.nii.gz", tmp_path / "moved.nii.gz")], blob_plan)


def test_thick_slice_data_is_rotated_in_plane_only(blob_plan):
    plan = replace(blob_plan, target_spacing_zyx=(4.0, 1.0, 1.0))
    label = np.zeros((40, 40, 40), np.uint8)
    label[::4] = 1  # every 4th slice: any out-of-plane rotation would mix slices
    image = label[None].astype(np.float32)
    sampler = PatchSampler(RogDataset([RogCase("slabs", image, label)], plan), (32, 32, 32),
                           foreground_probability=0.0, augmentation=ALWAYS, seed=0)
    for _ in range(6):
        _, lab, _ = sampler.sample()
        centre = lab[:, 10:22, 10:22]  # corners may come from outside the volume (padding)
        assert all(len(np.unique(centre[z])) == 1 for z in range(32))
        assert 0 < lab.mean() < 1
