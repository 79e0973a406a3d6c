"""Attacks of deepimaging.robustness on tiny hand-built 2D/3D segmentation models (CPU, seconds)."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deepimaging.robustness import (ClassifierAsSegmenter, GradientMaskingError, apgd_attack, apgd_checkpoint_intervals,
                                    attack_mode, check_input_gradients, dlr_loss, fab_t_attack, foreground_dice,
                                    intensity_eps_to_normalised, logits_dice, normalise_intensity_range, pgd_attack,
                                    project_linf_hyperplane, range_scaled_eps, square_attack, square_fraction,
                                    valid_range_from_channels)


class Bands(nn.Module):
    """Hand-built segmenter: logits_k = -gain (s(x) - k)^2, s = channel mean, centre-weighted smoothing."""

    def __init__(self, num_classes: int = 3, dims: int = 3, gain: float = 4.0) -> None:
        super().__init__()
        kernel = torch.full((3,) * dims, 0.4 / (3 ** dims - 1))
        kernel[(1,) * dims] = 0.6
        self.register_buffer("kernel", kernel[None, None])
        self.register_buffer("levels", torch.arange(num_classes, dtype=torch.float32))
        self.dims, self.gain = dims, gain

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = F.conv3d if self.dims == 3 else F.conv2d
        s = conv(x.mean(dim=1, keepdim=True), self.kernel, padding=1)
        levels = self.levels.reshape(1, -1, *([1] * self.dims))
        return -self.gain * (s - levels) ** 2


def phantom(dims: int = 3, n: int = 12, channels: int = 1, num_classes: int = 3, seed: int = 0):
    """Image (1, C, *spatial) and label (1, *spatial): a sphere/disk of class 1 with a class-2 core."""
    gen = torch.Generator().manual_seed(seed)
    axes = torch.meshgrid(*[torch.arange(n, dtype=torch.float32) - n / 2 + 0.5] * dims, indexing="ij")
    r = torch.stack(axes).pow(2).sum(0).sqrt()
    label = torch.zeros((n,) * dims, dtype=torch.long)
    label[r < 0.4 * n] = 1
    if num_classes > 2:
        label[r < 0.2 * n] = 2
    image = label.float().expand(channels, *label.shape) + 0.1 * torch.randn(channels, *label.shape, generator=gen)
    return image[None].contiguous(), label[None]


ALL = ["pgd", "apgd-ce", "apgd-dlr", "apgd-t-ce", "fab-t", "square"]


def run(name, model, x, y, eps, **kw):
    if name == "pgd":
        return pgd_attack(model, x, y, eps, steps=5, **kw)
    if name.startswith("apgd"):
        loss = {"apgd-ce": "ce", "apgd-dlr": "dlr", "apgd-t-ce": "ce-t"}[name]
        return apgd_attack(model, x, y, eps, loss=loss, steps=5, restarts=2, **kw)
    if name == "fab-t":
        return fab_t_attack(model, x, y, eps, steps=5, restarts=2, **kw)
    return square_attack(model, x, y, eps, n_queries=40, restarts=2, **kw)


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("name", ALL)
def test_perturbation_stays_in_eps_ball_and_valid_range(name, dims):
    x, y = phantom(dims, n=10 if dims == 3 else 16, channels=2)
    model = Bands(dims=dims)
    eps = torch.tensor([0.3, 0.15])  # per channel
    low, high = torch.tensor([-0.05, -0.2]), torch.tensor([2.05, 1.9])  # some clean voxels lie outside
    out = run(name, model, x, y, eps, valid_range=(low, high), threshold=0.0)
    delta = (out.x_adv - x).abs()
    assert (delta <= eps.reshape(1, 2, *([1] * dims)) + 1e-6).all()
    lo = torch.minimum(low.reshape(1, 2, *([1] * dims)), x)
    hi = torch.maximum(high.reshape(1, 2, *([1] * dims)), x)
    assert (out.x_adv >= lo - 1e-6).all() and (out.x_adv <= hi + 1e-6).all()
    assert out.dice.shape == (1,) and float(out.dice) <= float(out.clean_dice) + 1e-7
    assert torch.allclose(out.dice, logits_dice(model(out.x_adv), y))


def test_no_clamp_to_unit_interval_unless_asked():
    x, y = phantom(3, n=8)
    out = apgd_attack(Bands(), x, y, 0.2, steps=4, valid_range=(-1.0, 3.0), threshold=0.0)
    assert float(out.x_adv.max()) > 1.5  # z-scored-like data above 1 survive: no [0, 1] clamp
    out01 = apgd_attack(Bands(), x, y, 0.2, steps=4, valid_range=(0.0, 1.0), threshold=0.0)
    assert float(out01.x_adv.max()) <= torch.maximum(torch.tensor(1.0), x.max()) + 1e-6


def test_apgd_ce_beats_random_noise_on_3d_model():
    x, y = phantom(3, n=12)
    model = Bands()
    eps = 0.4
    gen = torch.Generator().manual_seed(1)
    noise = x + eps * (torch.randint(0, 2, x.shape, generator=gen).float() * 2 - 1)
    noise_dice = float(logits_dice(model(noise), y))
    out = apgd_attack(model, x, y, eps, steps=10, threshold=0.0)
    assert float(out.dice) <= noise_dice - 0.1
    assert float(out.dice) < float(out.clean_dice) - 0.2


def test_dlr_refuses_two_class_models():
    x, y = phantom(3, n=8, num_classes=2)
    model = Bands(num_classes=2)
    with pytest.raises(ValueError, match="at least 3 classes"):
        apgd_attack(model, x, y, 0.1, loss="dlr")
    with pytest.raises(ValueError, match="at least 3 classes"):
        dlr_loss(model(x), y)
    out = apgd_attack(model, x, y, 0.3, loss="ce-t", steps=5, threshold=0.0)  # the 2-class alternative works
    assert out.name == "apgd-t-ce" and float(out.dice) < float(out.clean_dice)


class Rounded(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = Bands()

    def forward(self, x):
        return self.inner(torch.round(x))


class Detached(Rounded):
    def forward(self, x):
        return self.inner(x.detach())


class NanGrad(Rounded):
    def forward(self, x):
        return self.inner(x) + torch.sqrt((x - x.detach()) ** 2).mean()


@pytest.mark.parametrize("model_cls", [Rounded, Detached])
def test_gradient_masking_check_fires(model_cls):
    x, y = phantom(3, n=8)
    model = model_cls()
    with pytest.raises(GradientMaskingError, match="exactly zero"):
        check_input_gradients(model, x, y)
    for attack in (pgd_attack, apgd_attack, fab_t_attack):
        with pytest.raises(GradientMaskingError):
            attack(model, x, y, 0.1, steps=2)
    with pytest.warns(RuntimeWarning, match="gradient masking"):
        apgd_attack(model, x, y, 0.1, steps=2, check_gradients="warn")
    assert check_input_gradients(Bands(), x, y) == []


def test_gradient_check_catches_nan_gradients():
    x, y = phantom(3, n=8)
    with pytest.raises(GradientMaskingError, match="NaN"):
        check_input_gradients(NanGrad(), x, y)


@pytest.mark.parametrize("name", ALL)
def test_fixed_seed_reproduces(name):
    x, y = phantom(3, n=8)
    model = Bands()
    a = run(name, model, x, y, 0.3, seed=3, threshold=0.0)
    b = run(name, model, x, y, 0.3, seed=3, threshold=0.0)
    assert torch.equal(a.x_adv, b.x_adv) and torch.equal(a.dice, b.dice)


def test_different_seeds_differ():
    x, y = phantom(3, n=8)
    a = square_attack(Bands(), x, y, 0.3, n_queries=20, seed=0, threshold=0.0)
    b = square_attack(Bands(), x, y, 0.3, n_queries=20, seed=1, threshold=0.0)
    assert not torch.equal(a.x_adv, b.x_adv)


def test_attack_mode_restores_mode_and_dtype():
    seen = {}

    class Probe(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Conv2d(1, 3, 1).double()
            self.drop = nn.Dropout(0.5)

        def forward(self, x):
            seen["training"] = self.training or self.drop.training
            seen["dtype"] = self.lin.weight.dtype
            seen["autocast"] = torch.is_autocast_enabled("cpu")
            return self.drop(self.lin(x.to(self.lin.weight.dtype)))

    model = Probe().train()
    x, y = phantom(2, n=8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        apgd_attack(model, x, y, 0.1, steps=2, threshold=0.0)
    assert seen == {"training": False, "dtype": torch.float32, "autocast": False}
    assert model.training and model.drop.training and model.lin.weight.dtype == torch.float64
    with attack_mode(model):
        assert not model.training
    assert model.training


def test_threshold_stops_restarts_on_broken_cases():
    x, y = phantom(3, n=8)
    model = Bands()
    full = apgd_attack(model, x, y, 1.5, steps=4, restarts=3, threshold=0.0)
    early = apgd_attack(model, x, y, 1.5, steps=4, restarts=3)  # default threshold: half the clean Dice
    assert bool(early.broken) and early.forward_passes < full.forward_passes


def test_foreground_dice_definition():
    y = torch.tensor([[0, 1, 1, 2]])
    assert float(foreground_dice(y.clone(), y, 3)) == 1.0
    assert float(foreground_dice(torch.tensor([[0, 1, 0, 0]]), y, 3)) == pytest.approx((2 / 3 + 0) / 2)
    assert float(foreground_dice(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long), 3)) == 1.0
    # class 2 absent from both reference and prediction: not averaged in
    assert float(foreground_dice(torch.tensor([[0, 1, 1, 0]]), torch.tensor([[0, 1, 0, 0]]), 3)) == pytest.approx(2 / 3)
    # one voxel (classifier adapter): Dice == accuracy
    pred, truth = torch.tensor([1, 0, 2, 2]).view(4, 1, 1), torch.tensor([1, 0, 1, 2]).view(4, 1, 1)
    assert foreground_dice(pred, truth, 3).tolist() == [1.0, 1.0, 0.0, 1.0]


def test_classifier_adapter_and_dlr_matches_classification_formula():
    clf = nn.Sequential(nn.Flatten(), nn.Linear(4, 5))
    seg = ClassifierAsSegmenter(clf)
    x = torch.randn(6, 1, 2, 2)
    z = clf(x)
    assert seg(x).shape == (6, 5, 1, 1) and torch.equal(seg(x)[:, :, 0, 0], z)
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    zs, _ = z.sort(dim=1, descending=True)
    z_y = z.gather(1, y[:, None])[:, 0]
    other = torch.where(z.argmax(1) == y, zs[:, 1], zs[:, 0])
    expected = -(z_y - other) / (zs[:, 0] - zs[:, 2] + 1e-12)
    assert torch.allclose(dlr_loss(z[:, :, None, None], y.view(6, 1, 1)), expected, atol=1e-6)
    assert torch.allclose(dlr_loss(3 * z[:, :, None, None] + 1, y.view(6, 1, 1)), expected, atol=1e-5)


def test_eps_helpers():
    assert torch.allclose(range_scaled_eps(8 / 255, ([-2.0, 0.0], [3.1, 1.0])), torch.tensor([8 / 255 * 5.1, 8 / 255]))
    assert torch.allclose(intensity_eps_to_normalised(10.0, 40.0), torch.tensor([0.25]))
    low, high = normalise_intensity_range(-17.0, 201.0, 99.0, 40.0)
    assert float(low) == pytest.approx(-2.9) and float(high) == pytest.approx(2.55)
    ch = SimpleNamespace(percentile_00_5=-17.0, percentile_99_5=201.0, mean=99.0, std=40.0)
    lo_list, hi_list = valid_range_from_channels([ch, ch])
    assert lo_list == pytest.approx([-2.9, -2.9]) and hi_list == pytest.approx([2.55, 2.55])
    # 8/255 of the clipped CT range = 6.8 HU = 0.171 z-units (the module docstring's example)
    eps = range_scaled_eps(8 / 255, (lo_list, hi_list))
    assert float(eps[0]) == pytest.approx(float(intensity_eps_to_normalised(218 * 8 / 255, 40.0)), rel=1e-5)
    with pytest.raises(ValueError):
        range_scaled_eps(0.1, (1.0, 0.0))


def test_apgd_checkpoints_and_square_schedule():
    assert apgd_checkpoint_intervals(100) == [22, 19, 16, 13, 10, 7, 6, 6]  # p_j = .22 .41 .57 .70 .80 .87 .93 .99
    assert apgd_checkpoint_intervals(5) == [1, 1, 1, 1, 1]
    assert square_fraction(0, 10000) == 0.8 and square_fraction(11, 10000) == 0.4
    assert square_fraction(9000, 10000) == pytest.approx(0.8 / 512)
    assert square_fraction(1, 100) == pytest.approx(0.8 / 4)  # rescaled to the query budget


def test_linf_hyperplane_projection():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(3, 20, generator=gen)
    p = torch.zeros(3, 20)
    r = torch.tensor([1.0, -2.0, 0.0])
    inf = torch.full_like(p, float("inf"))
    d = project_linf_hyperplane(p, w, r, -inf, inf)
    assert torch.allclose((w * d).sum(1), r, atol=1e-5)
    assert torch.allclose(d.abs().amax(1), r.abs() / w.abs().sum(1), atol=1e-6)
    box = torch.full_like(p, 0.05)
    d = project_linf_hyperplane(p, w, r, -box, box)
    assert (d.abs() <= 0.05 + 1e-7).all()
    reachable = 0.05 * w.abs().sum(1)
    assert torch.allclose((w * d).sum(1), torch.sign(r) * torch.minimum(r.abs(), reachable), atol=1e-5)
    lo, hi = -torch.rand(3, 20, generator=gen), torch.rand(3, 20, generator=gen)  # feasible: minimal lambda
    r = torch.tensor([0.3, -0.2, 0.1])
    d = project_linf_hyperplane(p, w, r, lo, hi)
    assert torch.allclose((w * d).sum(1), r, atol=1e-5)
    lam = d.abs().amax(1, keepdim=True) * 0.99
    room = torch.where(torch.sign(r)[:, None] * w > 0, hi, -lo)
    assert ((w.abs() * torch.minimum(lam, room)).sum(1) < r.abs()).all()


def test_input_validation():
    x, y = phantom(3, n=8)
    with pytest.raises(ValueError, match="labels"):
        apgd_attack(Bands(), x, y[0], 0.1)
    with pytest.raises(ValueError, match="inputs"):
        apgd_attack(Bands(), x[0, 0], y, 0.1)
    with pytest.raises(ValueError, match="channel"):
        apgd_attack(Bands(), x, y, [0.1, 0.2])
    with pytest.raises(ValueError, match="unknown APGD loss"):
        apgd_attack(Bands(), x, y, 0.1, loss="hinge")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        square_attack(Bands(), x, y, 0.0, n_queries=3)  # eps 0 is allowed and changes nothing
