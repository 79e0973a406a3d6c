"""ROG post-processing: organs keep their largest component, small lesions merge into their surroundings."""

from dataclasses import replace

import numpy as np
import pytest

from deepimaging.rog.plan import LabelInfo
from deepimaging.rog.postprocess import merge_small_components, postprocess_labels


@pytest.fixture
def plan(blob_plan):
    """background 0, organ "liver" 1, lesion "liver tumour" 2 (smallest training lesion 8 mm^3)."""
    return replace(blob_plan, labels=[LabelInfo(0, "background", "background"), LabelInfo(1, "liver", "organ"),
                                      LabelInfo(2, "liver tumour", "lesion", min_size_mm3=8.0)])


def test_organ_keeps_only_its_largest_component(plan):
    labels = np.zeros((20, 20, 20), np.uint8)
    labels[2:12, 2:12, 2:12] = 1
    labels[15:18, 15:18, 15:18] = 1  # stray island
    out = postprocess_labels(labels, plan, (1.0, 1.0, 1.0))
    assert out[2:12, 2:12, 2:12].all() and not out[15:18, 15:18, 15:18].any()
    assert labels[15, 15, 15] == 1  # input untouched


def test_organ_cut_by_a_lesion_stays_whole(plan):
    labels = np.zeros((20, 20, 20), np.uint8)
    labels[2:18, 4:16, 4:16] = 1
    labels[9:12, 4:16, 4:16] = 2  # a large tumour slab splitting the liver in two
    out = postprocess_labels(labels, plan, (1.0, 1.0, 1.0))
    assert np.array_equal(out, labels)


def test_small_lesions_merge_into_the_surrounding_label(plan):
    labels = np.zeros((24, 24, 24), np.uint8)
    labels[2:20, 2:20, 2:20] = 1
    labels[5, 5, 5] = 2                 # 1 voxel inside the liver -> liver
    labels[10:13, 10:13, 10:13] = 2     # 27 voxels: a real lesion, kept
    labels[22, 22, 22] = 2              # 1 voxel in the background -> background
    out = postprocess_labels(labels, plan, (1.0, 1.0, 1.0))
    assert out[5, 5, 5] == 1 and out[22, 22, 22] == 0
    assert (out[10:13, 10:13, 10:13] == 2).all()
    # the threshold is in mm^3: with 2 mm voxels the 1-voxel lesion (8 mm^3) is no longer "small"
    coarse = postprocess_labels(labels, plan, (2.0, 2.0, 2.0))
    assert coarse[5, 5, 5] == 2
    override = postprocess_labels(labels, plan, (1.0, 1.0, 1.0), min_size_mm3={2: 100.0})
    assert not (override == 2).any()


def test_merge_picks_the_most_frequent_neighbour():
    labels = np.zeros((9, 9, 9), np.uint8)
    labels[:, :, :5] = 3
    labels[:, :, 5:] = 4
    labels[4, 4, 3] = 9  # mostly surrounded by 3
    assert merge_small_components(labels, 9, min_voxels=2) == 1
    assert labels[4, 4, 3] == 3
