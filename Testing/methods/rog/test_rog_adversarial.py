"""ROG's robustness hooks: valid range and eps helpers, train_step, Free AT, fine-tuning from a checkpoint."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from monai.losses import DiceCELoss

import deepimaging.rog.train as train_module
from deepimaging.core.checkpoint import load_checkpoint
from deepimaging.core.errors import CheckpointError, InputError
from deepimaging.rog.adversarial import (FreeAdversarialTraining, eps_from_fraction, eps_from_intensity,
                                         input_range_tensors)
from deepimaging.rog.data import PatchStream
from deepimaging.rog.plan import ChannelInfo, LabelInfo
from deepimaging.rog.preprocess import normalize_channel, pad_values
from deepimaging.rog.train import check_init_plan, train_rog, train_step, weights_digest

CT = ChannelInfo("CT", "clip_zscore", -41.0, 176.0, 99.0, 39.0)
T2 = ChannelInfo("T2", "minmax_clip_zscore", 0.02, 0.62, 0.25, 0.11)


def test_input_range_is_what_preprocessing_clips_to_and_eps_helpers(blob_plan):
    plan = replace(blob_plan, channels=[CT, T2])
    low, high = plan.input_range()
    assert low == pytest.approx([(-41 - 99) / 39, (0.02 - 0.25) / 0.11], rel=1e-6)
    assert high == pytest.approx([(176 - 99) / 39, (0.62 - 0.25) / 0.11], rel=1e-6)
    ct = normalize_channel(np.array([-1000, -41, 50, 176, 3000], np.float32), CT)
    mr = normalize_channel(np.linspace(0, 500, 101, dtype=np.float32), T2)
    assert (ct.min(), ct.max()) == (low[0], high[0])  # bit-identical to the clipped voxels
    assert (mr.min(), mr.max()) == (low[1], high[1])
    assert pad_values(plan).tolist() == [low[0], low[1]]
    lo_t, hi_t = input_range_tensors(plan)
    assert lo_t.shape == (1, 2, 1, 1, 1) and hi_t[0, 1, 0, 0, 0].item() == high[1]

    eps = eps_from_fraction(plan, 8 / 255)  # the docstring's CT example: 6.8 HU = 0.174 std
    assert eps.shape == (2,) and eps[0].item() == pytest.approx(8 / 255 * 217 / 39, rel=1e-6)
    assert eps[0].item() * 39 == pytest.approx(6.81, abs=0.01) and eps[0].item() == pytest.approx(0.174, abs=1e-3)
    assert eps[1].item() == pytest.approx(8 / 255 * 0.6 / 0.11, rel=1e-6)
    assert eps_from_fraction(plan, [8 / 255, 4 / 255])[1].item() == pytest.approx(4 / 255 * 0.6 / 0.11, rel=1e-6)
    assert eps_from_intensity(plan, 10.0).tolist() == pytest.approx([10 / 39, 10 / 0.11], rel=1e-6)
    assert eps_from_intensity(plan, [6.8, 0.02])[0].item() == pytest.approx(6.8 / 39, rel=1e-6)
    for bad in ([1.0, 2.0, 3.0], -1.0, float("nan")):
        with pytest.raises(InputError):
            eps_from_fraction(plan, bad)
    with pytest.raises(InputError, match="fraction"):
        FreeAdversarialTraining(plan, 8.0)  # 8 instead of 8/255
    with pytest.raises(InputError, match="replay"):
        FreeAdversarialTraining(plan, 8 / 255, replays=0)


def test_free_at_keeps_delta_within_eps_and_inputs_in_range(tiny_plan, tiny_dataset):
    torch.manual_seed(0)
    model = tiny_plan.build_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = DiceCELoss(include_background=False, to_onehot_y=True, softmax=True, batch=True)
    stream = iter(torch.utils.data.DataLoader(PatchStream(tiny_dataset, tiny_plan.patch_size, 0.5, None, seed=0),
                                              batch_size=2))
    fetched = []

    def fetch():
        fetched.append(next(stream))
        return fetched[-1]

    free = FreeAdversarialTraining(tiny_plan, 8 / 255, replays=3)
    low, high = input_range_tensors(tiny_plan)
    losses = []
    for _ in range(9):
        x, y = free.next_minibatch(fetch)
        x_adv, leaf = free.perturb(x)
        assert (x_adv >= low).all() and (x_adv <= high).all()
        result = train_step(model, optimizer, None, x_adv, y, loss_fn, grad_wrt=leaf)
        assert result.grad.shape == x.shape and torch.isfinite(result.grad).all() and result.grad.abs().sum() > 0
        before = free.delta.clone()
        assert free.update(result.grad)
        assert (free.delta.abs() <= free.eps * (1 + 1e-6)).all()
        assert torch.equal(free.delta, torch.clamp(before + free.eps * result.grad.sign(), -free.eps, free.eps))
        losses.append(result.loss)
    assert len(fetched) == free.minibatches == 3  # each minibatch replayed 3 times
    assert free.delta_ratio() == pytest.approx(1.0) and free.resets == 1
    assert losses[2] < losses[0]  # replays of one minibatch already lower its loss
    free.perturb(x[:1])  # another batch shape: a fresh delta
    assert free.resets == 2 and free.delta.abs().max() == 0
    assert not free.update(torch.full_like(free.delta, float("nan"))) and free.skipped == 1


def test_train_step_serves_both_loops(tiny_dataset, tiny_plan, tmp_path, monkeypatch):
    calls = []
    original = train_module.train_step

    def spy(*args, **kwargs):
        calls.append(kwargs.get("grad_wrt") is not None)
        return original(*args, **kwargs)

    monkeypatch.setattr(train_module, "train_step", spy)
    kwargs = dict(plan=tiny_plan, device="cpu", augmentation=None)
    train_rog(tiny_dataset, tmp_path / "clean", 1, steps_per_epoch=2, **kwargs)
    assert calls == [False, False]
    calls.clear()
    train_rog(tiny_dataset, tmp_path / "free", 1, steps_per_epoch=3, free_at=True, free_at_replays=2, **kwargs)
    assert calls == [True, True, True]  # replays are the epoch's steps


def test_free_at_training_learns_and_records_its_settings(tiny_dataset, tiny_plan, tmp_path):
    progress = []
    result = train_rog(tiny_dataset, tmp_path, 3, plan=tiny_plan, steps_per_epoch=10, device="cpu",
                       augmentation=None, free_at=True, progress=lambda f, m: progress.append(m))
    history = result.history
    print("\nFree AT: " + "; ".join(f"e{int(h['epoch'])} loss {h['train_loss']:.3f} Dice {h['dice_mean']:.3f}"
                                    for h in history))
    assert history[-1]["train_loss"] < 0.9 * history[0]["train_loss"]
    assert all(0 < h["free_at_delta_ratio"] <= 1 + 1e-6 and h["free_at_skipped"] == 0 for h in history)
    training = load_checkpoint(result.last_path, method="rog").header["training"]
    assert training["free_at"] is True and training["free_at_replays"] == 5
    assert training["free_at_eps"] == pytest.approx(8 / 255)
    assert training["free_at_eps_normalised"] == pytest.approx(eps_from_fraction(tiny_plan, 8 / 255).tolist())
    assert training["reference_steps_per_epoch"] == 2  # 3 training cases, batch 2
    # progress never names an epoch past the last one ("epoch 4/3" after the end)
    assert not any("epoch 4/3" in m for m in progress)
    assert progress[-1].startswith("epoch 3/3 done:") and any(m.startswith("epoch 1/3 done:") for m in progress)
    with pytest.raises(InputError, match="Free AT"):
        train_rog(tiny_dataset, tmp_path / "x", 1, plan=tiny_plan, free_at=True, free_at_eps=8.0)


def test_init_from_loads_weights_with_a_fresh_optimizer(tiny_run, tiny_dataset, tiny_plan, tmp_path):
    result = train_rog(tiny_dataset, tmp_path / "ft", 1, steps_per_epoch=1, lr=1e-9, device="cpu",
                       augmentation=None, init_from=tiny_run.best_path)
    start = load_checkpoint(tiny_run.best_path).state_dict
    tuned = result.model.state_dict()
    assert all(torch.allclose(tuned[k], v, atol=1e-6) for k, v in start.items())
    state = load_checkpoint(result.last_path).training_state
    assert state["epoch"] == 1 and state["optimizer"]["state"][0]["step"] == 1  # a fresh optimizer
    assert state["optimizer"]["param_groups"][0]["lr"] == 1e-9
    assert load_checkpoint(result.last_path).header["training"]["init_from"] == str(tiny_run.best_path)
    torch.manual_seed(0)
    assert weights_digest(tiny_plan.build_model()) != result.weights_sha256


def test_init_from_refuses_a_checkpoint_of_another_plan(tiny_run, tiny_plan, blob_root, tmp_path):
    two_labels = replace(tiny_plan, labels=tiny_plan.labels[:2])
    with pytest.raises(CheckpointError, match="different network.*labels"):
        train_rog(blob_root, tmp_path / "a", 1, plan=two_labels, device="cpu", init_from=tiny_run.best_path)
    renamed = replace(tiny_plan, labels=[*tiny_plan.labels[:2], LabelInfo(2, "spleen", "organ")])
    with pytest.raises(CheckpointError, match=r"labels .*'kidney'.* vs .*'spleen'"):
        check_init_plan(tiny_plan, renamed)
    mri = replace(tiny_plan, channels=[replace(tiny_plan.channels[0], name="T2", normalization="minmax_clip_zscore")])
    with pytest.raises(CheckpointError, match="channels"):
        check_init_plan(tiny_plan, mri)
    check_init_plan(tiny_plan, replace(tiny_plan, patch_size=(32, 32, 32)))  # other patch: fine
    not_a_checkpoint = tmp_path / "notes.pt"
    not_a_checkpoint.write_text("not weights")
    with pytest.raises(CheckpointError, match="cannot read") as info:
        train_rog(blob_root, tmp_path / "b", 1, plan=tiny_plan, device="cpu", init_from=not_a_checkpoint)
    assert "weights_only" not in str(info.value)
