"""ROG training: it learns, checkpoints carry the plan, resume continues, cancel stops, DDP ranks agree."""

import json
from dataclasses import replace
from pathlib import Path

import pytest
from deepimaging.core.checkpoint import load_checkpoint
from deepimaging.core.device import seed_everything
from deepimaging.core.errors import CheckpointError, InputError
from deepimaging.core.progress import CancelToken, Cancelled
from deepimaging.rog.data import RogDataset
from deepimaging.rog.infer import load_rog
from deepimaging.rog.plan import Plan
from deepimaging.rog.train import train_rog, weights_digest
from torchrun import run_two_ranks



def test_short_training_learns_the_blobs(trained, blob_plan):
    history = trained.history
    print(f"\n{trained.epochs_completed} epochs x 12 steps in {trained.seconds:.1f} s; "
          + "; ".join(f"e{int(h['epoch'])} loss {h['train_loss']:.3f} Dice {h['dice_mean']:.3f}" for h in history))
    assert trained.epochs_completed == 6 and not trained.stopped_early
    assert history[-1]["train_loss"] < 0.75 * history[0]["train_loss"]
    assert history[-1]["val_loss"] < history[0]["val_loss"]
    assert trained.best_dice > 0.7 and history[-1]["dice_liver"] > 0.7
    assert trained.seconds > 0  # wall time is printed, not asserted: it depends on the machine's load
    best = load_checkpoint(trained.best_path, method="rog")
    assert Plan.from_dict(best.header["preprocessing"]) == blob_plan
    assert best.header["labels"] == {"0": "background", "1": "liver", "2": "kidney"}
    assert best.header["metrics"]["dice_mean"] == pytest.approx(trained.best_dice)
    assert best.header["training"]["val_cases"] and best.header["training"]["lr"] == 1e-3
    assert (trained.out_dir / "plan.json").is_file() and (trained.out_dir / "training_log.csv").is_file()
    assert len((trained.out_dir / "training_log.csv").read_text().strip().splitlines()) == 7
    assert weights_digest(load_rog(trained.last_path).model) == trained.weights_sha256


def test_resume_continues_from_last(blob_root, blob_plan, tmp_path):
    dataset = RogDataset.from_files(blob_root, blob_plan)
    kwargs = dict(plan=blob_plan, steps_per_epoch=2, device="cpu", augmentation=None)
    first = train_rog(dataset, tmp_path, 1, **kwargs)
    state = load_checkpoint(first.last_path).training_state
    assert state["epoch"] == 1 and state["optimizer"]["state"][0]["step"] == 2
    progress = []
    second = train_rog(dataset, tmp_path, 2, progress=lambda f, m: progress.append(m), **kwargs)
    assert second.epochs_completed == 2 and len(second.history) == 2
    assert second.history[0] == first.history[0]  # epoch 1 was not repeated
    assert load_checkpoint(second.last_path).training_state["optimizer"]["state"][0]["step"] == 4
    assert any("epoch 2/2" in m and "ETA" in m for m in progress)
    done = train_rog(dataset, tmp_path, 2, **kwargs)  # already finished: nothing more to do
    assert done.epochs_completed == 2 and done.weights_sha256 == second.weights_sha256
    other = replace(blob_plan, patch_size=(32, 32, 48))
    with pytest.raises(CheckpointError, match="different plan"):
        train_rog(blob_root, tmp_path, 3, **{**kwargs, "plan": other})


def test_cancel_and_bad_arguments(blob_root, blob_plan, tmp_path):
    token = CancelToken()
    token.cancel()
    with pytest.raises(Cancelled):
        train_rog(blob_root, tmp_path, 1, plan=blob_plan, steps_per_epoch=2, device="cpu", cancel=token)
    with pytest.raises(InputError, match="empty"):
        train_rog([], tmp_path / "empty", 1, plan=blob_plan)
    with pytest.raises(InputError, match="epochs"):
        train_rog(blob_root, tmp_path, 0, plan=blob_plan)
    with pytest.raises(InputError, match="plan file not found"):
        train_rog(blob_root, tmp_path / "x", 1, plan=tmp_path / "missing.json")


def test_two_process_ddp_training_ends_with_identical_weights(blob_root, blob_plan, tmp_path):
    """`deepimaging rog train` under torchrun with 2 CPU ranks (gloo); every rank hashes its weights."""
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(json.dumps(blob_plan.to_dict()))
    out = tmp_path / "ddp"
    proc = run_two_ranks(["-m", "deepimaging", "rog", "train", "--data", blob_root, "--plan", plan_file, "--out", out,
                          "--epochs", "1", "--steps-per-epoch", "3", "--batch-size", "1", "--threads", "1",
                          "--device", "cpu"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = json.loads((out / "ddp_ranks.json").read_text())
    assert ranks["world_size"] == 2 and len(set(ranks["sha256"])) == 1
    ckpt = load_checkpoint(out / "last.pt", method="rog")
    assert ckpt.header["training"]["world_size"] == 2
    assert weights_digest(load_rog(out / "last.pt").model) == ranks["sha256"][0]
    assert proc.stdout.count("trained 1 epoch(s)") == 1  # only rank 0 reports
    seed_everything(0)  # the seed train_rog initialises with: training moved the weights away from it
    assert weights_digest(blob_plan.build_model()) != ranks["sha256"][0]
