"""GLS baselines: U-Net and UNet++ (MONAI), CE-Net (written here), global-only branch."""

from __future__ import annotations

import pytest
import torch

from deepimaging.core.errors import InputError
from deepimaging.gls.baselines import (BASELINES, CENet, DACBlock, RMPBlock, baseline_parameter_counts,
                                       build_baseline)
from deepimaging.gls.model import GlobalOnly, count_parameters

pytest.importorskip("monai")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# parts a probability forward does not use: UNet++'s shallow deep-supervision heads, the
# global-only baseline's keypoint decoder (trained through forward_global)
UNUSED = {"unetpp": ("net.final_conv_0_1.", "net.final_conv_0_2.", "net.final_conv_0_3."),
          "global": ("global_net.keypoint_decoder.",)}


@pytest.mark.parametrize("name", BASELINES)
def test_forward_backward_shapes_and_probabilities(name):
    net = build_baseline(name).train()
    x = torch.randn(2, 1, 64, 96)
    y = net(x)
    assert y.shape == (2, 1, 64, 96)
    assert 0.0 <= y.min().item() and y.max().item() <= 1.0
    torch.nn.functional.binary_cross_entropy(y, (x > 0).float()).backward()
    used = {n: p for n, p in net.named_parameters() if not n.startswith(UNUSED.get(name, ("-",)))}
    assert len(used) > 20
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in used.values())


@pytest.mark.parametrize("name", BASELINES)
def test_logits_option_and_size_errors(name):
    net = build_baseline(name, logits=True).eval()
    x = torch.randn(1, 1, 32, 64)
    with torch.no_grad():
        logits = net(x)
    assert logits.shape == (1, 1, 32, 64)
    divisor = net.size_divisor
    assert divisor == (32 if name == "cenet" else 16)
    with pytest.raises(InputError, match=f"divisible by {divisor}"):
        net(torch.randn(1, 1, 32 + divisor // 2, 64))
    with pytest.raises(InputError, match="channel"):
        net(torch.randn(1, 2, 32, 64))


def test_logits_and_probabilities_agree():
    net = build_baseline("unet").eval()
    with torch.no_grad():
        x = torch.randn(1, 1, 32, 32)
        p = net(x)
        net.logits = True
        assert torch.allclose(torch.sigmoid(net(x)), p)


def test_parameter_counts_at_default_widths():
    counts = baseline_parameter_counts()
    print("baseline parameter counts:", counts)
    for n in counts.values():
        assert 1_000_000 < n < 4_000_000  # comparable budgets
    # CE-Net at its published ResNet-34 widths is about 29M parameters (3-channel input)
    full = count_parameters(CENet(3, 1, (64, 128, 256, 512)))
    print(f"full CE-Net: {full:,} parameters")
    assert 28_500_000 < full < 29_500_000
    assert count_parameters(build_baseline("cenet", width_scale=4)) == count_parameters(CENet(1, 1))


def test_cenet_blocks():
    dac = DACBlock(8)
    x = torch.randn(1, 8, 6, 6)
    assert dac(x).shape == x.shape
    assert RMPBlock(8)(x).shape == (1, 12, 6, 6)
    assert RMPBlock(8)(torch.randn(1, 8, 2, 3)).shape == (1, 12, 2, 3)  # pools clipped to the map


def test_global_baseline_is_the_gls_global_branch():
    net = build_baseline("global")
    assert isinstance(net, GlobalOnly)
    with pytest.raises(ValueError):
        build_baseline("global", out_channels=2)
    with pytest.raises(ValueError, match="unknown baseline"):
        build_baseline("segformer")


def test_multichannel_outputs():
    for name in ("unet", "unetpp", "cenet"):
        with torch.no_grad():
            assert build_baseline(name, in_channels=2, out_channels=3).eval()(torch.randn(1, 2, 32, 32)).shape == (
                1, 3, 32, 32)
