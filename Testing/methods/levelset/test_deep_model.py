"""The deep Chan-Vese network: heads, parameter ranges, gradient paths (incl. the detach ablation), 3D, loss."""

import numpy as np
import pytest
import torch

from deepimaging.core.errors import InputError
from deepimaging.levelset.deep.corruption import KINDS, corrupt_mask
from deepimaging.levelset.deep.loss import refine_loss
from deepimaging.levelset.deep.model import DeepChanVese, RefinerConfig


def small(dim, **kw):
    return RefinerConfig(dim=dim, grid=16, widths=(4, 8), features=8, **kw)


def batch(cfg, b=2):
    torch.manual_seed(0)
    x = torch.randn((b, 3) + cfg.grid_shape)
    target = torch.zeros((b,) + cfg.grid_shape)
    target[(slice(None),) + (slice(4, 12),) * cfg.dim] = 1.0
    return x, target * 2 - 1, target


def test_heads_shapes_and_parameter_ranges():
    cfg = small(2, steps=3)
    model = DeepChanVese(cfg)
    x, _, _ = batch(cfg, 3)
    with torch.no_grad():
        out = model(x)
    assert out["phi0"].shape == (3, 16, 16) and out["phiN"].shape == (3, 16, 16)
    assert out["phi0"].abs().max() <= 1.0 and len(out["phis"]) == 4
    assert out["features"].shape == (3, 8, 16, 16)
    p = out["params"]
    assert p["eps"].shape == (3, 3) and p["dt"].shape == (3, 3) and p["mu"].shape == (3,)
    for v in p.values():
        assert float(v.min()) > 0 and float(v.max()) < 2
    assert sum(v.shape[-1] if v.dim() > 1 else 1 for v in p.values()) == 2 * 3 + 3


def final_only_grad(detach):
    cfg = small(2)
    model = DeepChanVese(cfg)
    x, tsdf, mask = batch(cfg)
    out = model(x, detach_phi0=detach)
    refine_loss(out, tsdf, mask, weight_initial=0.0, weight_final=1.0)["loss"].backward()
    return model


def test_gradient_flows_through_phi0_into_the_tsdf_head():
    model = final_only_grad(detach=False)
    assert model.tsdf_head.weight.grad is not None and model.tsdf_head.weight.grad.abs().sum() > 0
    assert model.hyper_fc[-1].weight.grad.abs().sum() > 0 and model.feature_head[-1].weight.grad.abs().sum() > 0


def test_detached_phi0_gets_no_gradient_from_the_unroll():
    model = final_only_grad(detach=True)
    grad = model.tsdf_head.weight.grad
    assert grad is None or float(grad.abs().sum()) == 0.0
    assert model.feature_head[-1].weight.grad.abs().sum() > 0  # the rest still learns from phi_N


def test_3d_forward_backward_and_dimension_check():
    cfg = small(3, steps=2)
    model = DeepChanVese(cfg)
    x, tsdf, mask = batch(cfg)
    out = model(x)
    assert out["phiN"].shape == (2, 16, 16, 16)
    refine_loss(out, tsdf, mask)["loss"].backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    with pytest.raises(InputError):
        model(torch.zeros(1, 3, 16, 16))


def test_loss_is_zero_free_and_smaller_for_the_truth():
    cfg = small(2)
    _, tsdf, mask = batch(cfg)
    good = refine_loss({"phi0": tsdf, "phiN": tsdf}, tsdf, mask)["loss"]
    bad = refine_loss({"phi0": -tsdf, "phiN": -tsdf}, tsdf, mask)["loss"]
    assert float(good) < float(bad)


def test_config_validation():
    with pytest.raises(InputError):
        RefinerConfig(dim=4)
    with pytest.raises(InputError):
        RefinerConfig(dim=2, grid=30, widths=(4, 8, 16))
    assert RefinerConfig(dim=3).grid == 32 and RefinerConfig(dim=2).grid == 64


@pytest.mark.parametrize("kind", KINDS)
def test_corruptions_are_seeded_and_non_empty(kind):
    mask = np.zeros((40, 40), bool)
    mask[10:30, 12:28] = True
    a = corrupt_mask(mask, np.random.default_rng(3), kinds=(kind,))
    b = corrupt_mask(mask, np.random.default_rng(3), kinds=(kind,))
    assert a.any() and np.array_equal(a, b)
