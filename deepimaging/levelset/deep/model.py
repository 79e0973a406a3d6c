"""The deep Chan-Vese network (LevelSet R-CNN's ROI heads + unrolled level set), 2D or 3D.

Input per ROI, on a fixed grid: [image normalised within the ROI, coarse segment as a truncated
signed distance in [-1, 1] (zeros in ROI mode), has-mask flag (1 / 0 everywhere)].  A small
U-Net (three levels, GroupNorm + ReLU, plain torch) feeds three heads, as in the paper:

* **initial TSDF head**: 1x1 conv + tanh -> phi_0 in [-1, 1] (positive inside);
* **hyperparameter head**: conv, global average pooling, two fully connected layers,
  ``2 * sigmoid`` -> a vector of 2N + 3 positive values: lambda1, lambda2, mu, eps_1..N, dt_1..N;
* **Chan-Vese feature head**: C (default 64) channels that replace the image intensities.

Then N (default 3) semi-implicit vector-valued Chan-Vese steps
(:func:`deepimaging.levelset.chanvese.chan_vese_update` with ``soft_means=True`` and the
per-instance parameters) evolve phi_0 into phi_N; every step is differentiable, so the loss on
phi_N trains all three heads.  ``detach_phi0=True`` cuts the gradient from the unroll into phi_0
(the paper's ablation: its gradient path through phi_0 was worth +2 AP).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Dict, List, Mapping, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...core.errors import CheckpointError, InputError
from ..chanvese import chan_vese_update
from .roi import DEFAULT_GRID

METHOD = "levelset-deep"
IN_CHANNELS = 3


@dataclass
class RefinerConfig:
    """Everything needed to rebuild the network and its ROI pre-processing (stored in checkpoints)."""

    dim: int = 2                      # 2 (slices) or 3 (volumes)
    grid: int = 0                     # grid side in voxels; 0 -> 64 in 2D, 32 in 3D
    steps: int = 3                    # N unrolled Chan-Vese steps
    features: int = 64                # C channels of the Chan-Vese feature embedding
    widths: Tuple[int, ...] = field(default_factory=lambda: (16, 32, 64))  # U-Net widths per level
    margin: float = 0.25              # ROI margin on each side, fraction of the segment's extent
    min_side: int = 12                # smallest ROI side in voxels
    truncation: float = 0.125         # TSDF truncation as a fraction of the grid side (8 px at 64)

    def __post_init__(self) -> None:
        self.widths = tuple(int(w) for w in self.widths)
        if int(self.grid) == 0 and int(self.dim) in DEFAULT_GRID:
            self.grid = DEFAULT_GRID[int(self.dim)]
        self.validate()

    def validate(self) -> None:
        if int(self.dim) not in (2, 3):
            raise InputError(f"dim must be 2 or 3, got {self.dim}")
        levels = len(self.widths)
        if levels < 1 or int(self.grid) < 8 or int(self.grid) % (2 ** (levels - 1)):
            raise InputError(f"grid {self.grid} must be >= 8 and divisible by {2 ** (levels - 1)}")
        if int(self.steps) < 0 or int(self.features) < 1:
            raise InputError(f"steps must be >= 0 and features >= 1, got {self.steps}, {self.features}")
        if not 0 < float(self.truncation) <= 1:
            raise InputError(f"truncation must be in (0, 1], got {self.truncation}")

    @property
    def grid_shape(self) -> Tuple[int, ...]:
        return (int(self.grid),) * int(self.dim)

    @property
    def truncation_px(self) -> float:
        return float(self.truncation) * int(self.grid)

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d["widths"] = list(self.widths)
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "RefinerConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise CheckpointError(f"unknown refiner config keys {sorted(unknown)}")
        return cls(**dict(data))


def _conv(dim: int):
    return nn.Conv2d if dim == 2 else nn.Conv3d


def _block(dim: int, cin: int, cout: int) -> nn.Sequential:
    conv = _conv(dim)
    return nn.Sequential(conv(cin, cout, 3, padding=1, bias=False), nn.GroupNorm(min(8, cout), cout), nn.ReLU(inplace=True),
                         conv(cout, cout, 3, padding=1, bias=False), nn.GroupNorm(min(8, cout), cout), nn.ReLU(inplace=True))


class DeepChanVese(nn.Module):
    """U-Net backbone + initial-TSDF / hyperparameter / feature heads + N unrolled Chan-Vese steps."""

    def __init__(self, config: RefinerConfig):
        super().__init__()
        self.config = config
        d, w = int(config.dim), config.widths
        conv = _conv(d)
        self.encoder = nn.ModuleList([_block(d, IN_CHANNELS if i == 0 else w[i - 1], w[i]) for i in range(len(w))])
        self.decoder = nn.ModuleList([_block(d, w[i] + w[i + 1], w[i]) for i in range(len(w) - 1)])
        self.tsdf_head = conv(w[0], 1, 1)
        self.feature_head = nn.Sequential(conv(w[0], w[0], 3, padding=1), nn.ReLU(inplace=True),
                                          conv(w[0], int(config.features), 1))
        n_params = 2 * int(config.steps) + 3
        self.hyper_conv = nn.Sequential(conv(w[-1], w[-1], 3, padding=1), nn.ReLU(inplace=True))
        self.hyper_fc = nn.Sequential(nn.Linear(w[-1], 64), nn.ReLU(inplace=True), nn.Linear(64, n_params))
        with torch.no_grad():  # start near lambda 1, mu 0.1, eps 1, dt 1 (2 sigmoid(0) = 1)
            self.hyper_fc[-1].weight.mul_(0.1)
            self.hyper_fc[-1].bias.zero_()
            self.hyper_fc[-1].bias[2] = math.log(0.05 / 0.95)

    def backbone(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(finest decoder features, coarsest encoder features)."""
        skips = []
        for i, block in enumerate(self.encoder):
            if i > 0:
                x = F.max_pool2d(x, 2) if self.config.dim == 2 else F.max_pool3d(x, 2)
            x = block(x)
            skips.append(x)
        bottom = x
        for i in reversed(range(len(self.decoder))):
            x = F.interpolate(x, size=skips[i].shape[2:], mode="nearest")
            x = self.decoder[i](torch.cat([skips[i], x], dim=1))
        return x, bottom

    def hyperparameters(self, bottom: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Per-instance lambda1, lambda2, mu (B,) and eps, dt (B, N), all in (0, 2)."""
        pooled = self.hyper_conv(bottom).flatten(2).mean(dim=2)
        values = 2.0 * torch.sigmoid(self.hyper_fc(pooled))
        n = int(self.config.steps)
        return {"lambda1": values[:, 0], "lambda2": values[:, 1], "mu": values[:, 2],
                "eps": values[:, 3:3 + n], "dt": values[:, 3 + n:3 + 2 * n]}

    def forward(self, x: torch.Tensor, detach_phi0: bool = False) -> Dict[str, Any]:
        """``x``: (B, 3, *grid).  Returns phi0, phiN (B, *grid), phis (list of N+1), params, features."""
        if x.dim() != 2 + int(self.config.dim) or x.shape[1] != IN_CHANNELS:
            raise InputError(f"expected input (B, {IN_CHANNELS}, *{self.config.dim}D grid), got {tuple(x.shape)}")
        top, bottom = self.backbone(x)
        phi0 = torch.tanh(self.tsdf_head(top))[:, 0]
        features = self.feature_head(top)
        params = self.hyperparameters(bottom)
        phis: List[torch.Tensor] = [phi0]
        phi = phi0.detach() if detach_phi0 else phi0
        spacing = (1.0,) * int(self.config.dim)
        for n in range(int(self.config.steps)):
            phi = chan_vese_update(phi, features, mu=params["mu"], lambda1=params["lambda1"],
                                   lambda2=params["lambda2"], dt=params["dt"][:, n], eps=params["eps"][:, n],
                                   spacing=spacing, soft_means=True)
            phis.append(phi)
        return {"phi0": phi0, "phiN": phis[-1], "phis": phis, "params": params, "features": features}
