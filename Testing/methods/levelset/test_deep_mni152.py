"""The MNI152 refinement experiment (deepimaging.levelset.deep.mni152) end to end on a tiny
configuration: 2 mm template, a thin test slab, one ROG step, one short refiner epoch.  It checks
the pipeline and its outputs, not the scores (docs/levelset/mni152.md has the measured ones)."""

import json
import math

import numpy as np
import pytest

pytest.importorskip("nilearn", reason="nilearn is not installed; it ships the MNI152 template (pip install nilearn)")

from deepimaging.levelset.deep.mni152 import METHODS, main, rog_like_coarse, run_refine_experiment  # noqa: E402

TINY = dict(rog_epochs=1, rog_steps=1, epochs=1, steps_per_epoch=2, batch_size=2, grid=32, widths=(8, 16),
            features=8, variants=1, val_items=2, classic_iterations=20, resolution_mm=2, test_z_mm=(8.0, 20.0))


def test_tiny_experiment_writes_finite_scores(tmp_path):
    result = run_refine_experiment(tmp_path, **TINY)
    saved = json.loads((tmp_path / "mni152_refine.json").read_text())
    assert set(saved["methods"]) == {"threshold", *METHODS} == set(result["methods"])
    for scores in saved["methods"].values():
        assert set(scores) == {"dice", "bf1_1mm", "bf1_2mm", "hd95_mm"}
        assert 0.0 <= scores["dice"] <= 1.0 and 0.0 <= scores["bf1_2mm"] <= 1.0
        assert all(math.isfinite(v) for v in scores.values())
    assert saved["methods"]["coarse"]["dice"] == pytest.approx(saved["rog"]["dice"], abs=1e-6)  # coarse = ROG
    assert saved["test_slices"] == 6 and saved["refiner"]["training_samples"] > 0
    assert saved["methods"]["threshold"]["dice"] == pytest.approx(saved["threshold_dice"], abs=1e-6)
    table = (tmp_path / "mni152_refine.md").read_text()
    assert "best global threshold" in table and "phi_N" in table
    assert (tmp_path / "refiner" / "best.pt").is_file() and (tmp_path / "test_learned.nii.gz").is_file()
    # reusing the ROG run (--rog-run) skips ROG training and gives the same coarse scores
    again = main(["--out", str(tmp_path / "again"), "--rog-run", str(tmp_path / "rog"), "--epochs", "1", "--steps",
                  "1", "--batch-size", "2", "--grid", "32", "--variants", "1", "--no-rog-train-coarse",
                  "--classic-iterations", "20"])
    assert again["methods"]["coarse"] == saved["methods"]["coarse"]


def test_rog_like_coarse_is_close_but_not_equal():
    truth = np.zeros((64, 64), bool)
    truth[16:48, 12:52] = True
    rng = np.random.default_rng(0)
    coarse = [rog_like_coarse(truth, rng) for _ in range(8)]
    overlap = [2 * (c & truth).sum() / (c.sum() + truth.sum()) for c in coarse]
    assert all(0.6 < d < 1.0 for d in overlap)
