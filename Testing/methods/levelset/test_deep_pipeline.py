"""Learned refiner end to end in Python: tiny training, checkpoints, inference, ROI mode, evaluation."""

import json

import numpy as np
import pytest
import torch

from deepimaging.core.checkpoint import load_checkpoint, make_header, save_checkpoint
from deepimaging.core.errors import CheckpointError, InputError
from deepimaging.core.image import Image
from deepimaging.core.progress import CancelToken, Cancelled
from deepimaging.levelset.deep import (evaluate_refiner, load_refiner, refine_learned, train_refiner,
                                       write_synthetic_refine_dataset)
from deepimaging.levelset.deep.data import load_refine_folder
from deepimaging.levelset.refine import RefineResult

TINY = dict(grid=32, widths=(8, 16), features=16, steps_per_epoch=8, batch_size=4, val_items=8, lr=3e-3,
            mask_free_fraction=0.3)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("deep")
    data = write_synthetic_refine_dataset(root / "data", n=8, dim=2, seed=0, size=48)
    seen = []
    best = train_refiner(data, root / "run", dim=2, epochs=5, device="cpu", progress=lambda f, m: seen.append(f), **TINY)
    return root, data, best, seen


def test_training_lowers_the_loss_and_reaches_a_dice_bar(trained):
    root, _, best, seen = trained
    assert best == root / "run" / "best.pt" and best.is_file() and (root / "run" / "last.pt").is_file()
    history = load_checkpoint(root / "run" / "last.pt").training_state["history"]
    assert len(history) == 5 and seen[-1] == pytest.approx(1.0)
    assert history[-1]["train_loss"] < 0.7 * history[0]["train_loss"]
    assert history[-1]["val_loss"] < history[0]["val_loss"]
    assert max(h["val_dice_final"] for h in history) > 0.8
    header = load_checkpoint(best).header
    assert header["method"] == "levelset-deep" and header["config"]["dim"] == 2 and header["config"]["grid"] == 32


def test_resume_continues_and_cancel_stops(trained, tmp_path):
    root, data, _, _ = trained
    assert train_refiner(data, root / "run", dim=2, epochs=5, device="cpu", **TINY).is_file()  # already finished
    token = CancelToken()
    token.cancel()
    with pytest.raises(Cancelled):
        train_refiner(data, tmp_path / "cancelled", dim=2, epochs=1, device="cpu", cancel=token, **TINY)
    with pytest.raises(InputError, match="unknown training option"):
        train_refiner(data, tmp_path / "x", dim=2, epochs=1, device="cpu", not_an_option=1)
    with pytest.raises(InputError, match="3D refiner"):
        train_refiner(data, tmp_path / "y", dim=3, epochs=1, device="cpu")


def test_checkpoint_round_trip_gives_the_same_output(trained):
    root, data, best, _ = trained
    sample = load_refine_folder(data)[0]
    a = refine_learned(sample.image, sample.coarse, best, device="cpu")
    refiner = load_refiner(best, "cpu")
    b = refine_learned(sample.image, sample.coarse, refiner)
    assert isinstance(a, RefineResult) and np.array_equal(a.phi, b.phi)
    assert a.mask.shape == sample.image.shape and np.array_equal(a.mask, a.phi > 0)
    assert a.iterations == 3 and a.converged and len(a.roi) == 3 and a.roi[0] == slice(0, 1)


def test_corrupt_and_foreign_checkpoints_are_refused(trained, tmp_path):
    _, _, best, _ = trained
    cut = tmp_path / "cut.pt"
    cut.write_bytes(best.read_bytes()[:2000])
    with pytest.raises(CheckpointError):
        load_refiner(cut, "cpu")
    other = tmp_path / "other.pt"
    save_checkpoint(other, {"w": torch.zeros(1)}, make_header("gls", {}))
    with pytest.raises(CheckpointError, match="levelset-deep"):
        load_refiner(other, "cpu")
    broken = tmp_path / "broken.pt"
    save_checkpoint(broken, {"w": torch.zeros(1)}, make_header("levelset-deep", {"dim": 2}))
    with pytest.raises(CheckpointError):
        load_refiner(broken, "cpu")


def test_dimension_mismatch_and_bad_inputs(trained):
    _, _, best, _ = trained
    volume = Image(np.random.default_rng(0).normal(size=(12, 40, 40)).astype(np.float32))
    mask = np.zeros(volume.shape, bool)
    mask[4:8, 10:20, 10:20] = True
    with pytest.raises(InputError, match="2D but the image is a 3D volume"):
        refine_learned(volume, mask, best, device="cpu")
    flat = Image(np.zeros((1, 40, 40), np.float32))
    with pytest.raises(InputError, match="empty"):
        refine_learned(flat, np.zeros((1, 40, 40), bool), best, device="cpu")
    with pytest.raises(InputError, match="ROI box"):
        refine_learned(flat, None, best, device="cpu")


def test_roi_mode_output_is_not_empty(trained):
    _, data, best, _ = trained
    sample = load_refine_folder(data)[1]
    coords = np.argwhere(sample.truth[0])
    box = (0, *coords.min(axis=0), 1, *(coords.max(axis=0) + 1))
    result = refine_learned(sample.image, None, best, roi=box, device="cpu")
    assert result.mask.any() and result.mask.shape == sample.image.shape


def test_evaluation_writes_json_md_png(trained, tmp_path):
    _, data, best, _ = trained
    result = evaluate_refiner(best, data, tmp_path / "ev", detached_model=best, device="cpu", timing=False)
    saved = json.loads((tmp_path / "ev" / "evaluation.json").read_text())
    assert saved["cases"] == 8 and set(saved["methods"]) == {"coarse", "classic", "initial", "learned", "detached",
                                                             "roi_mode"}
    for m in saved["methods"].values():
        assert 0 <= m["dice"] <= 1 and 0 <= m["bf1_1px"] <= m["bf1_2px"] + 1e-9
    assert (tmp_path / "ev" / "evaluation.png").stat().st_size > 1000
    assert "classic Chan-Vese" in (tmp_path / "ev" / "evaluation.md").read_text()
    assert result["methods"]["detached"] == result["methods"]["learned"]


def test_png_folders_load(tmp_path):
    import SimpleITK as sitk

    for sub in ("images", "masks"):
        (tmp_path / sub).mkdir()
    image = (np.arange(30 * 40).reshape(30, 40) % 251).astype(np.uint8)
    mask = np.zeros((30, 40), np.uint8)
    mask[10:20, 10:25] = 255
    sitk.WriteImage(sitk.GetImageFromArray(image), str(tmp_path / "images" / "a.png"))
    sitk.WriteImage(sitk.GetImageFromArray(mask), str(tmp_path / "masks" / "a.png"))
    (sample,) = load_refine_folder(tmp_path)
    assert sample.image.shape == (1, 30, 40) and sample.truth.sum() == 150 and sample.coarse is None
    (tmp_path / "masks" / "a.png").unlink()
    with pytest.raises(InputError, match="no mask"):
        load_refine_folder(tmp_path)


def test_an_interrupted_run_resumes_where_it_stopped(trained, tmp_path):
    _, data, _, _ = trained
    options = dict(TINY, steps_per_epoch=2, val_items=4)
    token = CancelToken()

    def stop_in_epoch_two(fraction, message):
        if fraction > 0.6:
            token.cancel()

    with pytest.raises(Cancelled):
        train_refiner(data, tmp_path / "run", dim=2, epochs=2, device="cpu", progress=stop_in_epoch_two, cancel=token,
                      **options)
    assert len(load_checkpoint(tmp_path / "run" / "last.pt").training_state["history"]) == 1
    train_refiner(data, tmp_path / "run", dim=2, epochs=2, device="cpu", **options)
    history = load_checkpoint(tmp_path / "run" / "last.pt").training_state["history"]
    assert [h["epoch"] for h in history] == [1.0, 2.0] and history[-1]["skipped_steps"] == 0
    with pytest.raises(CheckpointError, match="another network config"):
        train_refiner(data, tmp_path / "run", dim=2, epochs=3, device="cpu", **dict(options, grid=16))
