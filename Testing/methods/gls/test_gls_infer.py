"""GLS inference: masks on the input grid, B-scan stacks slice by slice, keypoints in physical space, errors."""

from __future__ import annotations

import numpy as np
import pytest

from deepimaging.core.checkpoint import load_checkpoint, make_header, save_checkpoint
from deepimaging.core.errors import CheckpointError, InputError
from deepimaging.core.image import Image
from deepimaging.core.progress import CancelToken, Cancelled
from deepimaging.gls.infer import build_network, load_gls, pixel_to_lps, predict_image
from deepimaging.gls.synthetic import make_bscan
from deepimaging.gls.train import train_gls

SIZE = (64, 64)
# a non-identity geometry: anisotropic spacing, an origin, and the i axis along +P, j along -L (90 deg about z)
DIRECTION = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
SPACING, ORIGIN = (0.05, 0.08, 1.5), (10.0, -5.0, 3.0)


def scans(n, size=SIZE, start=0):
    bs = [make_bscan(start + i, size) for i in range(n)]
    return np.stack([b.image for b in bs]), np.stack([b.mask for b in bs]), np.stack([b.keypoints for b in bs])


@pytest.fixture(scope="module")
def keypoint_model(tmp_path_factory):
    """The global-only branch (keypoint head) trained briefly at 64x64 (measured: ~1-2 px on validation)."""
    out = tmp_path_factory.mktemp("global")
    result = train_gls(scans(16), out, arch="global", epochs=6, steps_per_epoch=8, size=SIZE, lr=3e-3,
                       widths=(8, 16, 32, 64, 128), device="cpu")
    return load_gls(result.best_path, device="cpu")


@pytest.fixture(scope="module")
def gls_path(tmp_path_factory):
    """A tiny GLS model (3 epochs of 1 step): accuracy is not the point, the shapes and grids are."""
    out = tmp_path_factory.mktemp("gls")
    return train_gls(scans(4), out, epochs=3, steps_per_epoch=1, size=SIZE, crop_size=32, widths=(4, 8, 16, 32, 64),
                     device="cpu", val_fraction=0.0).best_path


def test_keypoints_land_on_the_tails_in_physical_space(keypoint_model):
    scan = make_bscan(500, (96, 96))  # not the training size: resized to 64x64 and back
    image = Image(scan.image[None], SPACING, ORIGIN, DIRECTION)
    pred = predict_image(image, keypoint_model, device="cpu")
    assert pred.arch == "global" and pred.source == "global"
    assert pred.mask.shape == (1, 96, 96) and pred.mask.array.dtype == np.uint8 and pred.mask.same_grid(image)
    assert pred.probabilities.shape == (1, 96, 96) and pred.probabilities.dtype == np.float32
    assert pred.keypoints_px.shape == (1, 2, 2) and pred.keypoints_lps.shape == (1, 2, 3)
    error_px = np.linalg.norm(pred.keypoints_px[0] - scan.keypoints, axis=-1)
    print(f"\nkeypoint errors on a 96x96 B-scan (network 64x64): {error_px.round(2)} px")
    assert error_px.max() < 6.0
    # physical positions: index (x, y, slice 0) through spacing, direction and origin (LPS mm)
    x, y = pred.keypoints_px[0, :, 0], pred.keypoints_px[0, :, 1]
    expected = np.stack([ORIGIN[0] - SPACING[1] * y, ORIGIN[1] + SPACING[0] * x, np.full(2, ORIGIN[2])], axis=-1)
    np.testing.assert_allclose(pred.keypoints_lps[0], expected, atol=1e-9)
    truth = pixel_to_lps(image, scan.keypoints[None])[0]
    assert np.linalg.norm(pred.keypoints_lps[0] - truth, axis=-1).max() < 6.0 * max(SPACING[:2])
    records = pred.keypoint_records()
    assert [(r["slice"], r["k"]) for r in records] == [(0, 0), (0, 1)]
    assert records[1]["position_lps"] == pytest.approx(pred.keypoints_lps[0, 1].tolist())
    assert 0.0 <= pred.probabilities.min() and pred.probabilities.max() <= 1.0


def test_two_d_image_and_three_slice_stack(gls_path):
    images = scans(3, (80, 96), start=40)[0]  # H 80, W 96: neither is the network's 64
    stack = Image(images, SPACING, ORIGIN, DIRECTION)
    messages = []
    pred = predict_image(stack, gls_path, device="cpu", progress=lambda f, m: messages.append((f, m)))
    assert pred.arch == "gls" and pred.source == "fused"
    assert pred.mask.shape == pred.probabilities.shape == (3, 80, 96) and pred.mask.same_grid(stack)
    assert set(np.unique(pred.mask.array)) <= {0, 1}
    assert np.array_equal(pred.mask.array, (pred.probabilities >= 0.5).astype(np.uint8))
    assert pred.keypoints_px.shape == (3, 2, 2) and np.isfinite(pred.keypoints_px).all()
    assert [m for _, m in messages][:3] == ["slice 1/3", "slice 2/3", "slice 3/3"] and messages[-1][0] == 1.0
    for s in range(3):  # slice s of the stack = the 2D image of that slice; its z is slice s
        single = predict_image(Image(images[s][None], SPACING, ORIGIN, DIRECTION), gls_path, device="cpu")
        np.testing.assert_allclose(single.probabilities[0], pred.probabilities[s], atol=1e-6)
        np.testing.assert_allclose(single.keypoints_px[0], pred.keypoints_px[s])
        step = np.asarray(DIRECTION)[:, 2] * SPACING[2] * s
        np.testing.assert_allclose(pred.keypoints_lps[s], single.keypoints_lps[0] + step, atol=1e-9)
    token = CancelToken()
    token.cancel()
    with pytest.raises(Cancelled):
        predict_image(stack, gls_path, device="cpu", cancel=token)


def test_baseline_has_no_keypoints_and_early_checkpoints_use_the_global_branch(gls_path, tmp_path):
    config = {"in_channels": 1, "widths": [4, 8, 16, 32, 64], "width_scale": 1.0}
    header = make_header("gls", config, preprocessing={"size": [64, 64], "normalisation": "minmax"}, arch="cenet")
    save_checkpoint(tmp_path / "cenet.pt", build_network("cenet", config).state_dict(), header)
    image = Image(scans(1)[0])
    pred = predict_image(image, tmp_path / "cenet.pt", device="cpu")
    assert pred.arch == "cenet" and pred.source == "network" and pred.keypoints_px.shape == (1, 0, 2)
    assert pred.keypoint_records() == []
    ckpt = load_checkpoint(gls_path)
    save_checkpoint(tmp_path / "stage1.pt", ckpt.state_dict, {**ckpt.header, "stage_reached": 1})
    with pytest.warns(RuntimeWarning, match="stage 1"):
        early = predict_image(image, tmp_path / "stage1.pt", device="cpu")
    assert early.source == "global"


def test_bad_input(gls_path, tmp_path):
    with pytest.raises(InputError, match=r"20x24 pixels.*smaller than this GLS model's 32x32 local crop"):
        predict_image(Image(np.random.rand(1, 24, 20).astype(np.float32)), gls_path, device="cpu")
    with pytest.raises(InputError, match="RGB"):
        predict_image(Image(np.random.rand(64, 64, 3).astype(np.float32)), gls_path, device="cpu")
    with pytest.raises(InputError, match="more than the 512"):
        predict_image(Image(np.zeros((600, 40, 40), np.float32)), gls_path, device="cpu")
    nan = np.random.rand(1, 64, 64).astype(np.float32)
    nan[0, 5, 5] = np.nan
    with pytest.raises(InputError, match="NaN"):
        predict_image(Image(nan), gls_path, device="cpu")
    with pytest.raises(InputError, match="threshold"):
        predict_image(Image(nan), gls_path, device="cpu", threshold=1.5)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="gls train"):
        load_gls(tmp_path / "junk.pt")
    save_checkpoint(tmp_path / "rog.pt", {}, make_header("rog", {}))
    with pytest.raises(CheckpointError, match="'gls' checkpoint is needed"):
        load_gls(tmp_path / "rog.pt")
