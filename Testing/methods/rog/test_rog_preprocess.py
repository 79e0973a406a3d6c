"""ROG preprocessing: normalisation, resampling to the plan's spacing and back, label mapping."""

from dataclasses import replace

import numpy as np
import pytest

from deepimaging.core.errors import GeometryMismatchError, InputError
from deepimaging.core.image import Image
from deepimaging.core.metrics import dice
from deepimaging.rog.plan import ChannelInfo
from deepimaging.rog.preprocess import (Grid, classes_to_labels, labels_to_classes, normalize_channel,
                                        preprocess_image, preprocess_labelled, restore_labels,
                                        restore_probabilities, to_target)
from deepimaging.rog.synthetic import make_blob_case

ROTATED = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])


def test_normalisation_follows_the_plan():
    ct = ChannelInfo("CT", "clip_zscore", -100.0, 300.0, 50.0, 25.0)
    x = np.array([-1000.0, 0.0, 50.0, 1000.0], np.float32)
    assert np.allclose(normalize_channel(x, ct), [-6.0, -2.0, 0.0, 10.0])
    mri = ChannelInfo("T2", "minmax_clip_zscore", 0.1, 0.9, 0.5, 0.2)
    y = np.array([10.0, 20.0, 60.0, 110.0], np.float32)  # min-max scaled: 0, .1, .5, 1
    assert np.allclose(normalize_channel(y, mri), [-2.0, -2.0, 0.0, 2.0])
    with pytest.raises(InputError, match="unknown normalisation"):
        normalize_channel(x, ChannelInfo("X", "histogram", 0, 1, 0, 1))


def test_label_values_map_to_classes_and_back(blob_plan):
    plan = replace(blob_plan, labels=[replace(blob_plan.labels[0]), replace(blob_plan.labels[1], value=7),
                                      replace(blob_plan.labels[2], value=3)])
    label = np.array([[[0, 7, 3, 3]]])
    classes = labels_to_classes(label, plan)
    assert classes.tolist() == [[[0, 1, 2, 2]]] and classes.dtype == np.uint8
    assert classes_to_labels(classes, plan).tolist() == label.tolist()
    with pytest.raises(InputError, match=r"label value\(s\) \[5\] that are not in the plan"):
        labels_to_classes(np.array([[[0, 5]]]), plan)
    with pytest.raises(InputError, match="non-integer"):
        labels_to_classes(np.array([[[0.5]]]), plan)


def test_same_spacing_is_not_resampled_and_restores_exactly(blob_plan):
    image, label = make_blob_case((24, 28, 20), seed=3)
    prep = preprocess_image(image, blob_plan)
    assert not prep.resampled and prep.array.shape == (1, 24, 28, 20)
    assert np.allclose(prep.array[0], normalize_channel(image.array, blob_plan.channels[0]))
    _, classes = preprocess_labelled(image, label, blob_plan)
    restored = restore_labels(classes, prep.grid, blob_plan)
    assert np.array_equal(restored.array, label.array)


def test_resampling_round_trip_returns_the_original_grid(blob_plan):
    """Anisotropic, rotated, shifted input: out to 1 mm isotropic and back to the exact input grid."""
    plan = replace(blob_plan, target_spacing_zyx=(1.0, 1.0, 1.0))
    image, label = make_blob_case((16, 40, 36), spacing=(0.8, 0.9, 2.5), seed=5)
    image = Image(image.array, image.spacing, (12.0, -7.5, 30.0), ROTATED)
    label = image.with_array(label.array)
    prep = preprocess_image(image, plan)
    assert prep.resampled
    assert prep.array.shape == (1, 40, 36, 29)  # round(16 * 2.5), round(40 * 0.9), round(36 * 0.8)
    _, classes = preprocess_labelled(image, label, plan)
    assert classes.shape == prep.array.shape[1:] and set(np.unique(classes)) == {0, 1, 2}
    restored = restore_labels(classes, prep.grid, plan)
    restored.require_same_grid(image)  # shape, spacing, origin and direction all match
    assert np.array_equal(restored.direction, ROTATED) and restored.origin == image.origin
    for value in (1, 2):
        assert dice(restored.array == value, label.array == value) > 0.95
    one_hot = np.stack([(classes == k).astype(np.float32) for k in range(3)])
    probs = restore_probabilities(one_hot, prep.grid, plan)
    assert probs.shape == (3, *image.shape)
    assert np.allclose(probs.sum(0), 1.0, atol=1e-5)
    assert dice(probs.argmax(0) == 1, label.array == 1) > 0.95


def test_upsampling_by_whole_factors_keeps_labels_exactly(blob_plan):
    plan = replace(blob_plan, target_spacing_zyx=(0.5, 1.0, 0.5))
    _, label = make_blob_case((12, 20, 16), seed=2)
    grid = Grid.of(label)
    classes = labels_to_classes(label.array, plan)
    fine = to_target(classes, grid.spacing_zyx, plan, "nearest")
    assert fine.shape == (24, 20, 32)
    assert np.array_equal(restore_labels(fine, grid, plan).array, label.array)


def test_bspline_interpolation_stays_in_range(blob_plan):
    plan = replace(blob_plan, target_spacing_zyx=(0.7, 0.7, 0.7))
    image, _ = make_blob_case((16, 16, 16), seed=1)
    normed = normalize_channel(image.array, plan.channels[0])
    out = preprocess_image(image, plan, interpolation="bspline").array
    assert out.min() >= normed.min() - 1e-5 and out.max() <= normed.max() + 1e-5


def test_bad_volumes_are_rejected(blob_plan):
    image, label = make_blob_case((16, 20, 20))
    with pytest.raises(InputError, match="2-D"):
        preprocess_image(Image(np.zeros((20, 20), np.float32)), blob_plan)
    with pytest.raises(InputError, match="expects 1 channel"):
        preprocess_image([image, image], blob_plan)
    shifted = Image(label.array, label.spacing, (5.0, 0.0, 0.0))
    with pytest.raises(GeometryMismatchError, match="origin"):
        preprocess_labelled(image, shifted, blob_plan)
    nan = image.with_array(np.where(label.array > 0, np.nan, image.array).astype(np.float32))
    with pytest.raises(InputError, match="NaN"):
        preprocess_image(nan, blob_plan)
