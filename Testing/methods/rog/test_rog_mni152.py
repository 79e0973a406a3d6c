"""ROG on real anatomy: white matter of the MNI152 template, trained on axial slabs, scored on a
disjoint held-out slab (deepimaging.rog.mni152).

The Dice bar is set from measurement: 8 epochs x 15 steps (batch 2, patch 16x32x32, one CPU
thread, ~30 s of training, ~50 s for the module) reached 0.824 on the held-out slab.  Trivial
predictors stay far below the bar: everything-is-white-matter scores 0.46 on that slab, the
brain mask 0.64, and the untrained network (the weights train_rog starts from) 0.48.
"""

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("nilearn", reason="nilearn is not installed; it ships the MNI152 template this task is built "
                    "from (pip install nilearn)")

from deepimaging.core.imageio import read_image  # noqa: E402
from deepimaging.rog.mni152 import WM_LABELS, build_mni152_task, run_mni152_experiment  # noqa: E402
from deepimaging.rog.plan import read_msd_dataset  # noqa: E402

DICE_BAR = 0.72
EPOCHS, STEPS = 8, 15


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    out = tmp_path_factory.mktemp("mni152")
    return run_mni152_experiment(out, EPOCHS, STEPS), out


def test_template_ships_with_nilearn():
    """No download: the task reads files inside the installed nilearn package."""
    import nilearn.datasets

    data = Path(nilearn.datasets.__file__).parent / "data"
    for name in ("t1", "wm"):
        assert (data / f"mni_icbm152_{name}_tal_nlin_sym_09a_converted.nii.gz").is_file()


def test_short_training_learns_white_matter(experiment):
    results, out = experiment
    print("\nMNI152 white matter: " + json.dumps({k: round(v, 3) if isinstance(v, float) else v
                                                  for k, v in results.items() if not isinstance(v, list)}))
    assert results["epochs_completed"] == EPOCHS
    assert results["dice"] > DICE_BAR, f"held-out Dice {results['dice']:.3f} <= {DICE_BAR}"
    assert results["untrained_dice"] < DICE_BAR - 0.15, "the untrained network is already close to the bar"
    assert results["dice"] > results["untrained_dice"] + 0.2
    assert np.isfinite(results["hd95_mm"]) and results["hd95_mm"] < 20.0
    assert results["dice_postprocessed"] > DICE_BAR - 0.05
    assert results["train_seconds"] < 150
    assert json.loads((out / "results.json").read_text())["dice"] == pytest.approx(results["dice"])
    prediction = read_image(out / "test_prediction.nii.gz")
    assert prediction.same_grid(read_image(out / "data" / "labelsTs" / "mni152_test.nii.gz"))


def test_task_split_and_geometry(tmp_path):
    """Own build (not the experiment's), so xdist workers need not share the training fixture."""
    task = build_mni152_task(tmp_path / "task")
    spec = read_msd_dataset(task.root)
    assert spec.label_names == WM_LABELS and spec.modalities == ["T1"]
    test_lo, test_hi = task.test_z_mm
    assert (test_lo, test_hi) == (8.0, 40.0)
    slabs = task.train_z_mm
    assert len(slabs) == len(spec.cases) >= 6
    for lo, hi in slabs:  # disjoint from the test slab, with the 4 mm gap
        assert hi <= test_lo - 4.0 or lo >= test_hi + 4.0
    for (lo, hi), (nxt, _) in zip(slabs, slabs[1:]):  # training slabs do not overlap each other
        assert hi <= nxt
    test = read_image(task.test_image)
    assert test.spacing == (1.0, 1.0, 1.0) and np.allclose(test.direction, np.diag([-1.0, -1.0, 1.0]))
    assert test.origin[2] == pytest.approx(test_lo) and test.shape[0] == 32  # slices centred at 8..39 mm
    for (images, label), (lo, hi) in zip(spec.cases, slabs):
        image, lab = read_image(images[0]), read_image(label)
        assert lab.same_grid(image) and lo <= image.origin[2] < lo + 1.0  # first voxel centre
        assert abs(image.shape[0] - (hi - lo)) <= 0.5 and image.shape[1:] == test.shape[1:]
        assert set(np.unique(lab.array)) <= {0, 1}
    truth = read_image(task.test_label).array
    assert 0.2 < truth.mean() < 0.4  # white matter is a large share of this slab

    again = build_mni152_task(tmp_path / "again")  # same seed: the same files
    assert np.array_equal(read_image(again.test_image).array, test.array)
    other = build_mni152_task(tmp_path / "other", seed=1)
    assert not np.array_equal(read_image(other.test_image).array, test.array)
    assert np.array_equal(read_image(other.test_label).array, truth)  # labels do not depend on the noise
