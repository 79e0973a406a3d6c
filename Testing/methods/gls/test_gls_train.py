"""GLS training: the three stages run (global frozen in stage 2), it learns, resume continues, baselines."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from deepimaging.core.checkpoint import load_checkpoint
from deepimaging.core.errors import CheckpointError, InputError
from deepimaging.core.progress import CancelToken, Cancelled
from deepimaging.gls.infer import load_gls
from deepimaging.gls.synthetic import make_bscan
from deepimaging.gls.train import Augmentation, split_indices, stage_epochs, train_gls

SIZE = (64, 64)
WIDTHS = (8, 16, 32, 64, 128)  # half of Table 1: learns in ~100 steps at 64x64
TINY = (4, 8, 16, 32, 64)
FAST = dict(size=SIZE, crop_size=32, device="cpu")


def scans(n: int, start: int = 0):
    """(images, masks, keypoints) arrays of synthetic B-scans."""
    bs = [make_bscan(start + i, SIZE) for i in range(n)]
    return (np.stack([b.image for b in bs]), np.stack([b.mask for b in bs]), np.stack([b.keypoints for b in bs]))


def global_state(path):
    return {k: v for k, v in load_checkpoint(path).state_dict.items() if k.startswith("global_net.")}


@pytest.fixture(scope="module")
def staged(tmp_path_factory):
    """A 12-epoch GLS run (stages 6/3/3 epochs x 8 steps), cancelled after stages 1 and 2 and resumed."""
    out = tmp_path_factory.mktemp("gls_run")
    data = scans(20)
    snapshots, token = {}, [CancelToken()]

    def progress(fraction, message):
        for epoch in (6, 9):
            if message.startswith(f"epoch {epoch}/12 done"):
                snapshots[epoch] = global_state(out / "last.pt")
                snapshots[f"local{epoch}"] = {k: v for k, v in load_checkpoint(out / "last.pt").state_dict.items()
                                              if k.startswith("local_net.")}
                token[0].cancel()

    kwargs = dict(epochs=12, steps_per_epoch=8, widths=WIDTHS, lr=3e-3, val_fraction=0.2, progress=progress, **FAST)
    for _ in range(2):
        with pytest.raises(Cancelled):
            train_gls(data, out, cancel=token[0], **kwargs)
        token[0] = CancelToken()
    result = train_gls(data, out, cancel=token[0], **kwargs)
    return result, snapshots


def test_stage_split_and_holdout():
    assert stage_epochs(100) == (50, 25, 25) and stage_epochs(12) == (6, 3, 3) and stage_epochs(3) == (1, 1, 1)
    assert stage_epochs(10, (2, 1, 1)) == (5, 2, 3)
    with pytest.raises(InputError, match="at least 3 epochs"):
        stage_epochs(2)
    train, val = split_indices(20, 0.2, 0)
    assert len(val) == 4 and sorted(np.concatenate([train, val]).tolist()) == list(range(20))
    assert np.array_equal(split_indices(5, 0.0, 0)[1], np.arange(5))


def test_three_stages_learn_and_global_is_frozen_in_stage_2(staged):
    result, snapshots = staged
    history = result.history
    print("\n" + "\n".join(f"e{int(h['epoch'])} s{int(h['stage'])} loss {h['train_loss']:.3f} Dice {h['val_dice']:.3f}"
                           f" global {h['val_dice_global']:.3f} kp {h['val_keypoint_error_px']:.2f}" for h in history))
    assert [int(h["stage"]) for h in history] == [1] * 6 + [2] * 3 + [3] * 3
    assert result.epochs_completed == 12 and result.stage_reached == 3
    # stage 1 learns (measured: loss 0.41 -> 0.12, global Dice 0 -> 0.61, keypoints 1.4 px)
    assert history[5]["train_loss"] < 0.5 * history[0]["train_loss"]
    assert history[5]["val_dice_global"] > history[0]["val_dice_global"] + 0.3
    assert history[5]["val_keypoint_error_px"] < 6.0
    # stage 2 trains only the local net: the global net is bit-identical (weights and BN statistics)
    assert snapshots[6].keys() == snapshots[9].keys() and len(snapshots[6]) > 10
    assert all(torch.equal(snapshots[6][k], snapshots[9][k]) for k in snapshots[6])
    assert any(not torch.equal(snapshots["local6"][k], snapshots["local9"][k]) for k in snapshots["local6"])
    assert history[8]["train_loss"] < history[6]["train_loss"]  # local crop BCE falls
    # stage 3 unfreezes: the global net moves again, and the fused output is good (measured: 0.67, 0.57, 0.76)
    final = global_state(result.last_path)
    assert any(not torch.equal(final[k], snapshots[9][k]) for k in final if k.endswith("weight"))
    assert result.best_dice == max(h["val_dice_fused"] for h in history[9:]) > 0.6
    assert history[-1]["val_dice_fused"] > 0.5
    best = load_checkpoint(result.best_path, method="gls")
    assert best.header["arch"] == "gls" and best.header["stage_reached"] == 3
    assert best.header["metrics"]["val_dice_fused"] == pytest.approx(result.best_dice)
    assert best.header["preprocessing"]["size"] == [64, 64] and best.header["keypoint_rule"] == "iris-tails"
    training = best.header["training"]
    assert training["stage_epochs"] == [6, 3, 3] and training["heatmap_loss"] == "bce"
    assert training["sigma_px"] == 2.0 and len(training["val_names"]) == 4
    assert (result.out_dir / "training_log.csv").read_text().count("\n") == 13


def test_resume_mid_stage_gives_the_uninterrupted_run(tmp_path):
    data = scans(6)
    kwargs = dict(epochs=6, steps_per_epoch=2, widths=TINY, augmentation=Augmentation(), **FAST)  # stages 3/2/1 epochs
    whole = train_gls(data, tmp_path / "whole", **kwargs)
    token = CancelToken()

    def stop_after_4(fraction, message):
        if message.startswith("epoch 4/6 done"):
            token.cancel()

    with pytest.raises(Cancelled):
        train_gls(data, tmp_path / "split", cancel=token, progress=stop_after_4, **kwargs)
    state = load_checkpoint(tmp_path / "split" / "last.pt").training_state
    assert state["epoch"] == 4 and state["history"][-1]["stage"] == 2.0  # epoch 4 is the first of stage 2
    assert state["optimizer"]["state"][0]["step"] == 2  # the stage-2 optimizer after one epoch
    resumed = train_gls(data, tmp_path / "split", **kwargs)
    assert resumed.epochs_completed == 6 and len(resumed.history) == 6
    assert resumed.history[:4] == state["history"]
    a, b = (load_checkpoint(p / "last.pt") for p in (tmp_path / "whole", tmp_path / "split"))
    assert a.training_state["optimizer"]["state"][0]["step"] == b.training_state["optimizer"]["state"][0]["step"] == 2
    assert all(torch.equal(a.state_dict[k], b.state_dict[k]) for k in a.state_dict)
    assert whole.history[-1] == resumed.history[-1]
    with pytest.raises(CheckpointError, match="other settings"):
        train_gls(data, tmp_path / "split", **{**kwargs, "epochs": 9})
    restarted = train_gls(data, tmp_path / "split", resume=False, **{**kwargs, "epochs": 3})
    assert restarted.epochs_completed == 3


def test_baseline_trains_and_reloads(tmp_path):
    result = train_gls(scans(8), tmp_path, arch="unet", epochs=3, steps_per_epoch=2, widths=TINY, **FAST)
    assert result.stage_reached is None and "stage" not in result.history[-1]
    model = load_gls(result.best_path, device="cpu")
    assert model.arch == "unet" and model.keypoints == 0 and model.crop_size is None
    ckpt = load_checkpoint(result.best_path, method="gls")
    assert ckpt.header["training"]["steps_per_epoch"] == 2 and ckpt.header["config"]["widths"] == list(TINY)
    last, x = load_gls(result.last_path, device="cpu"), torch.rand(1, 1, *SIZE)
    result.model.eval()
    with torch.no_grad():
        assert torch.equal(last.network(x), result.model(x))
    glob = train_gls(scans(8), tmp_path / "global", arch="global", epochs=2, steps_per_epoch=1, widths=TINY, **FAST)
    assert [h["stage"] for h in glob.history] == [1.0, 1.0] and "val_keypoint_error_px" in glob.history[-1]
    assert load_gls(glob.best_path, device="cpu").keypoints == 2


def test_bad_training_input(tmp_path):
    images, masks, points = scans(4)
    kwargs = dict(epochs=3, steps_per_epoch=1, widths=TINY, **FAST)
    with pytest.raises(InputError, match="all 4 masks are empty"):
        train_gls((images, np.zeros_like(masks)), tmp_path / "empty", **kwargs)
    assert not (tmp_path / "empty").exists()
    small = (images[:, ::2, ::2], masks[:, ::2, ::2], points / 2)
    with pytest.raises(InputError, match=r"32x32 pixels, smaller than the 48x48 local crop.*at least 48x48"):
        train_gls(small, tmp_path / "small", **{**kwargs, "size": (48, 48), "crop_size": 48})
    with pytest.raises(InputError, match="crop size 96 must be at least 8 and at most the network size 64x64"):
        train_gls((images, masks), tmp_path / "crop", **{**kwargs, "crop_size": 96})
    with pytest.raises(InputError, match="multiple of 32"):
        train_gls((images, masks), tmp_path / "cenet", arch="cenet", **{**kwargs, "size": (48, 48)})
    with pytest.raises(InputError, match="three stages"):
        train_gls((images, masks), tmp_path / "short", **{**kwargs, "epochs": 2})
    with pytest.raises(InputError, match="unknown architecture"):
        train_gls((images, masks), tmp_path / "arch", arch="resnet", **kwargs)
    nan = images.copy()
    nan[0, 3, 3] = np.nan
    with pytest.raises(InputError, match="NaN"):
        train_gls((nan, masks), tmp_path / "nan", **kwargs)
    # one empty mask among others: kept for the mask loss, without keypoints
    masks[1] = 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = train_gls((images, masks), tmp_path / "partly", val_fraction=0.0, **kwargs)
    assert result.epochs_completed == 3
