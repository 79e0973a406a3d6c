"""Baselines the GLS thesis compares against: U-Net, UNet++, CE-Net, and the global-only branch.

:func:`build_baseline` returns an ``nn.Module`` that takes ``(B, in_channels, H, W)`` and
returns **probabilities in [0, 1]** ``(B, out_channels, H, W)`` (sigmoid applied), the same
convention as :class:`deepimaging.gls.model.GLSNet`; ``logits=True`` drops the sigmoid (for
``BCEWithLogitsLoss`` under mixed precision).  Every baseline exposes ``size_divisor`` and
raises :class:`InputError` for other sizes: 16 for ``unet``, ``unetpp`` and ``global``, 32 for
``cenet``; sizes divisible by 32 suit all of them.

Widths.  Ours are the five encoder widths ``(16, 32, 64, 128, 256)`` of Table 1.

* ``unet`` / ``unetpp``: MONAI ``BasicUNet`` / ``BasicUNetPlusPlus`` (2D) with
  ``features = (*widths, widths[0])``: MONAI's first five numbers are the encoder widths
  (four max-pools, like ours) and the sixth is the width of the last decoder stage, which in
  a classic U-Net equals the first.  Batch norm + ReLU as in GLSNet, so the comparison is
  about architecture (MONAI's defaults are instance norm + LeakyReLU).  UNet++ without deep
  supervision; its one-element output list is unwrapped.  MONAI is imported only here.
* ``cenet``: CE-Net (Gu et al., IEEE TMI 2019), written from the paper: ResNet-34 encoder
  (3, 4, 6, 3 basic blocks; no pretrained weights), DAC block (dense atrous convolution: four
  cascade branches over 3x3 convs with dilation 1, 3, 5 and 1x1 convs, summed with the
  input), RMP block (max-pools of size 2, 3, 5, 6, each a 1x1 conv to one channel, upsampled
  and concatenated with the input), decoder blocks (1x1, 3x3 transposed conv stride 2, 1x1)
  with additive skips, a 4x4 transposed conv head.  As in the authors' public code the DAC
  convs and the RMP 1x1 conv are shared between branches.  The full CE-Net uses ResNet widths
  (64, 128, 256, 512) -- about 29M parameters.  Here the ResNet widths are ``widths[:4]``:
  in the original papers CE-Net's four widths equal U-Net's first four, so the default
  ``(16, 32, 64, 128)`` is CE-Net at 1/4 width (1/16 of the parameters), on the budget of
  the other baselines; ``width_scale`` multiplies them (``width_scale=4`` gives the full
  CE-Net).  Five stride-2 steps, so H, W must be divisible by 32; at the coarsest level an
  RMP pool larger than the feature map is reduced to the map size (small inputs).
* ``global``: GLS's global branch alone (:class:`~deepimaging.gls.model.GlobalOnly`), the
  "GS" row of the thesis' Table 3.

Parameters at the default widths (1 in, 1 out): unet 1,948,129; unetpp 2,282,772; cenet
1,817,877 (full-width CE-Net, 3 input channels: 29,003,093); global 3,140,803.
"""

from __future__ import annotations

import math
from typing import Any, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .model import DEFAULT_WIDTHS, GlobalOnly, check_image_batch, count_parameters

BASELINES = ("unet", "unetpp", "cenet", "global")
FOREGROUND_PRIOR = 0.01  # CE-Net output-bias init, see CENet


class ProbabilityWrapper(nn.Module):
    """Checks the input size, runs ``net``, unwraps list outputs and applies the sigmoid."""

    def __init__(self, net: nn.Module, in_channels: int, size_divisor: int, logits: bool = False):
        super().__init__()
        self.net = net
        self.in_channels = in_channels
        self.size_divisor = size_divisor
        self.logits = logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_image_batch(x, self.in_channels, self.size_divisor)
        out = self.net(x)
        if isinstance(out, (list, tuple)):
            out = out[-1]  # UNet++ returns [x_0_4] (the full-depth output) without deep supervision
        return out if self.logits else torch.sigmoid(out)


# -- CE-Net ---------------------------------------------------------------------------------------
def _bn_relu(conv: nn.Module, channels: int) -> nn.Sequential:
    return nn.Sequential(conv, nn.BatchNorm2d(channels), nn.ReLU(inplace=True))


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convs with batch norm and an identity (or 1x1) shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                                          nn.BatchNorm2d(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)), inplace=True)
        return F.relu(self.bn2(self.conv2(y)) + self.shortcut(x), inplace=True)


def resnet_stage(in_channels: int, out_channels: int, blocks: int, stride: int) -> nn.Sequential:
    """``blocks`` basic blocks, the first with ``stride``."""
    layers = [BasicBlock(in_channels, out_channels, stride)]
    layers += [BasicBlock(out_channels, out_channels) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class DACBlock(nn.Module):
    """Dense atrous convolution: x + relu of four cascades (receptive fields 3, 7, 9, 19)."""

    def __init__(self, channels: int):
        super().__init__()
        self.d1 = nn.Conv2d(channels, channels, 3, padding=1, dilation=1)
        self.d3 = nn.Conv2d(channels, channels, 3, padding=3, dilation=3)
        self.d5 = nn.Conv2d(channels, channels, 3, padding=5, dilation=5)
        self.project = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a1 = self.d1(x)
        a13 = self.d3(a1)
        branches = (a1, self.project(self.d3(x)), self.project(a13), self.project(self.d5(a13)))
        return x + sum(F.relu(b) for b in branches)


class RMPBlock(nn.Module):
    """Residual multi-kernel pooling: [1-channel maps of 2/3/5/6 max-pools, x] -> C + 4 channels."""

    POOLS = (2, 3, 5, 6)

    def __init__(self, channels: int):
        super().__init__()
        self.reduce = nn.Conv2d(channels, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        maps = []
        for k in self.POOLS:
            size = (min(k, h), min(k, w))
            pooled = F.max_pool2d(x, kernel_size=size, stride=size)
            maps.append(F.interpolate(self.reduce(pooled), size=(h, w), mode="bilinear", align_corners=False))
        return torch.cat(maps + [x], dim=1)


class DecoderBlock(nn.Sequential):
    """CE-Net decoder block: 1x1 (C/4), 3x3 transposed conv stride 2, 1x1 (out), each BN + ReLU."""

    def __init__(self, in_channels: int, out_channels: int):
        mid = max(in_channels // 4, 1)
        super().__init__(_bn_relu(nn.Conv2d(in_channels, mid, 1), mid),
                         _bn_relu(nn.ConvTranspose2d(mid, mid, 3, stride=2, padding=1, output_padding=1), mid),
                         _bn_relu(nn.Conv2d(mid, out_channels, 1), out_channels))


class CENet(nn.Module):
    """CE-Net with a ResNet-34 encoder at ``widths`` (full size: 64, 128, 256, 512); returns logits."""

    def __init__(self, in_channels: int = 1, out_channels: int = 1, widths: Sequence[int] = (64, 128, 256, 512)):
        super().__init__()
        c1, c2, c3, c4 = _four_widths(widths)
        self.stem = nn.Sequential(_bn_relu(nn.Conv2d(in_channels, c1, 7, 2, 3, bias=False), c1),
                                  nn.MaxPool2d(3, 2, 1))
        self.layer1 = resnet_stage(c1, c1, 3, 1)
        self.layer2 = resnet_stage(c1, c2, 4, 2)
        self.layer3 = resnet_stage(c2, c3, 6, 2)
        self.layer4 = resnet_stage(c3, c4, 3, 2)
        self.dac = DACBlock(c4)
        self.rmp = RMPBlock(c4)
        self.decoder4 = DecoderBlock(c4 + len(RMPBlock.POOLS), c3)
        self.decoder3 = DecoderBlock(c3, c2)
        self.decoder2 = DecoderBlock(c2, c1)
        self.decoder1 = DecoderBlock(c1, c1)
        # The published head has 32 channels whatever the encoder width; halving it with the
        # width (8 channels at base width 16) let its two ReLUs die and the net collapse to
        # background.
        head = 32
        self.head = nn.Sequential(nn.ConvTranspose2d(c1, head, 4, 2, 1), nn.ReLU(inplace=True),
                                  nn.Conv2d(head, head, 3, padding=1), nn.ReLU(inplace=True),
                                  nn.Conv2d(head, out_channels, 3, padding=1))
        # Output bias at the logit of a 1 % foreground prior (Lin et al. 2017, RetinaNet): the
        # original CE-Net starts from an ImageNet encoder; from scratch at 1/4 width it sat on
        # the all-background plateau for all 480 steps of the synthetic comparison (Dice 0 on
        # 2 of 2 seeds), and escaped it within ~200 steps with this init (Dice 0.976 / 0.984).
        nn.init.constant_(self.head[-1].bias, -math.log((1.0 - FOREGROUND_PRIOR) / FOREGROUND_PRIOR))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.layer1(self.stem(x))
        e2 = self.layer2(e1)
        e3 = self.layer3(e2)
        e4 = self.rmp(self.dac(self.layer4(e3)))
        d4 = self.decoder4(e4) + e3
        d3 = self.decoder3(d4) + e2
        d2 = self.decoder2(d3) + e1
        return self.head(self.decoder1(d2))


def _four_widths(widths: Sequence[int]) -> Tuple[int, int, int, int]:
    out = tuple(int(w) for w in widths)
    if len(out) != 4 or any(w < 2 for w in out):
        raise ValueError(f"CE-Net needs four ResNet widths >= 2, got {tuple(widths)}")
    return out  # type: ignore[return-value]


# -- factory --------------------------------------------------------------------------------------
def _monai_nets() -> Any:
    from deepimaging.core.optional import import_optional
    return import_optional("monai.networks.nets", "monai>=1.3", "The U-Net / UNet++ baselines")


def build_baseline(name: str, in_channels: int = 1, out_channels: int = 1,
                   widths: Sequence[int] = DEFAULT_WIDTHS, width_scale: float = 1.0,
                   logits: bool = False) -> nn.Module:
    """Baseline ``name`` (``unet``, ``unetpp``, ``cenet``, ``global``) returning probabilities.

    ``widths`` are the five U-Net encoder widths; ``width_scale`` multiplies CE-Net's ResNet
    widths (``widths[:4]``); ``logits=True`` returns logits instead of probabilities.
    """
    key = str(name).lower().replace("-", "").replace("+", "p")
    ws = tuple(int(w) for w in widths)
    if len(ws) != 5:
        raise ValueError(f"widths must be the five encoder widths, got {tuple(widths)}")
    if key in ("unet", "unetpp"):
        nets = _monai_nets()
        cls = nets.BasicUNet if key == "unet" else nets.BasicUNetPlusPlus
        extra = {} if key == "unet" else {"deep_supervision": False}
        net = cls(spatial_dims=2, in_channels=in_channels, out_channels=out_channels, features=ws + (ws[0],),
                  act=("relu", {"inplace": True}), norm="batch", **extra)
        return ProbabilityWrapper(net, in_channels, 16, logits)
    if key == "cenet":
        scaled = [max(int(round(w * width_scale)), 2) for w in ws[:4]]
        return ProbabilityWrapper(CENet(in_channels, out_channels, scaled), in_channels, 32, logits)
    if key in ("global", "globalonly", "gs"):
        if out_channels != 1:
            raise ValueError("the global-only GLS branch predicts one foreground channel")
        return GlobalOnly(logits=logits, in_channels=in_channels, widths=ws)
    raise ValueError(f"unknown baseline {name!r}; choose one of {BASELINES}")


def baseline_parameter_counts(in_channels: int = 1, widths: Sequence[int] = DEFAULT_WIDTHS) -> dict:
    """Parameter count of every baseline at ``widths`` (builds each once; MONAI needed)."""
    return {name: count_parameters(build_baseline(name, in_channels, 1, widths)) for name in BASELINES}
