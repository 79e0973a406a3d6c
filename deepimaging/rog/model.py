"""ROG: the triangular-lattice network of Daza et al., "Towards Robust General Medical Image
Segmentation" (MICCAI 2021), rebuilt from the paper and its published description.

Layout (all tensors are ``(N, C, D, H, W)``; every per-axis tuple here is in that D, H, W
order, i.e. the (z, y, x) order of the arrays in :mod:`deepimaging.core.image`):

* **Stem** (initial module, four separable convolutions in two stages): stage 1 gives 32
  channels after ``stem_strides[0]``, stage 2 gives 64 channels after ``stem_strides[1]``.
  Each stride is 1 or 2 per axis, so the stem reduces the input to at most 1/4 per axis;
  the planner uses 1 along coarse (anisotropic) axes.
* **Lattice**: 4 levels of 64/128/256/512 channels; with length ``L`` (nodes on the coarsest
  level, 2 in the paper) there are ``2 * (3 + L) - 1`` depth steps (9 for L = 2).  Level ``l``
  holds a cell at step ``s`` when ``s - l`` is even and ``l <= s <= last_step - l``: even
  steps hold levels 0 and 2, odd steps 1 and 3, 14 cells for L = 2.  A cell sends its output
  up (step + 1, level - 1), along (step + 2, same level) and down (step + 1, level + 1)
  wherever such a cell exists, and its input is the sum of what reaches it.
* **Cell**: ``x + IN(sep(swish(IN(sep(swish(x))))))`` with depthwise-then-pointwise 3x3x3
  convolutions without bias and affine instance norm; up = swish, 1x1x1 conv to C/2, IN,
  trilinear upsampling; down = swish, 1x1x1 conv to 2C with stride (``lattice_stride`` from
  level 0 to 1, 2 below that), IN.
* **Head**: the last level-0 cell's up branch (1x1x1 conv 64 -> 32, IN, upsampling to the
  stem-stage-1 grid) plus the stem stage-1 features, then swish, 3x3x3 conv, IN, trilinear
  upsampling to the input size and swish + 1x1x1 classifier (no bias).

With all strides 2 the coarsest level is 1/32 of the input.  Upsampling goes to the exact
size of the grid it returns to, so any input size works; sizes divisible by
:attr:`ROG.total_stride` keep every level aligned with the reference implementation.
"""

from __future__ import annotations

import copy
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

Stride = Tuple[int, int, int]

LEVEL_CHANNELS = (64, 128, 256, 512)
STEM_CHANNELS = (32, 64)
DEFAULT_STEM_STRIDES: Tuple[Stride, Stride] = ((2, 2, 2), (2, 2, 2))
DEFAULT_LATTICE_STRIDE: Stride = (2, 2, 2)


def _stride(value: Sequence[int], what: str) -> Stride:
    """Validate one per-axis stride; only 1 and 2 occur in the published models."""
    out = tuple(int(v) for v in value)
    if len(out) != 3 or any(v not in (1, 2) for v in out):
        raise ValueError(f"{what} must be three values of 1 or 2 (D, H, W), got {tuple(value)}")
    return out  # type: ignore[return-value]


def total_stride(stem_strides: Sequence[Sequence[int]] = DEFAULT_STEM_STRIDES,
                 lattice_stride: Sequence[int] = DEFAULT_LATTICE_STRIDE) -> Stride:
    """Input-to-coarsest-level reduction per axis (32 when every stride is 2)."""
    if len(stem_strides) != 2:
        raise ValueError(f"stem_strides needs two per-axis strides, got {len(stem_strides)}")
    s0, s1 = (_stride(s, "stem stride") for s in stem_strides)
    s2 = _stride(lattice_stride, "lattice_stride")
    return tuple(a * b * c * 4 for a, b, c in zip(s0, s1, s2))  # type: ignore[return-value]


def _norm(channels: int) -> nn.InstanceNorm3d:
    return nn.InstanceNorm3d(channels, affine=True)


class SeparableConv3d(nn.Sequential):
    """Depthwise 3x3x3 (carrying the stride) then pointwise 1x1x1; ~27x fewer weights."""

    def __init__(self, in_channels: int, out_channels: int, stride: Sequence[int] = (1, 1, 1)):
        super().__init__(
            nn.Conv3d(in_channels, in_channels, 3, tuple(stride), 1, groups=in_channels, bias=False),
            nn.Conv3d(in_channels, out_channels, 1, bias=False),
        )


class LatticeCell(nn.Module):
    """One lattice node: residual pair of separable convs and optional up/down branches.

    ``forward`` returns ``(up, same, down)``; ``up`` is still on this cell's grid (the caller
    interpolates it to the target grid's exact size), unused branches are ``None``.
    """

    def __init__(self, channels: int, up_channels: Optional[int], same: bool,
                 down_stride: Optional[Stride]):
        super().__init__()
        self.core = nn.Sequential(
            nn.SiLU(), SeparableConv3d(channels, channels), _norm(channels),
            nn.SiLU(), SeparableConv3d(channels, channels), _norm(channels),
        )
        self.up = None if up_channels is None else nn.Sequential(
            nn.SiLU(), nn.Conv3d(channels, up_channels, 1, bias=False), _norm(up_channels))
        self.same = same
        self.down = None if down_stride is None else nn.Sequential(
            nn.SiLU(), nn.Conv3d(channels, 2 * channels, 1, down_stride, bias=False),
            _norm(2 * channels))

    def forward(self, x: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
        y = x + self.core(x)
        return (None if self.up is None else self.up(y),
                y if self.same else None,
                None if self.down is None else self.down(y))


def lattice_layout(length: int = 2, levels: int = len(LEVEL_CHANNELS)) -> List[List[int]]:
    """Levels present at each depth step of the triangular lattice (``[[0], [1], [0, 2], ...]``)."""
    if length < 1:
        raise ValueError(f"lattice length must be >= 1, got {length}")
    last = 2 * (levels - 1) + 2 * (length - 1)
    return [[lv for lv in range(levels) if (step - lv) % 2 == 0 and lv <= step <= last - lv]
            for step in range(last + 1)]


def _upsample(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    if tuple(x.shape[2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="trilinear", align_corners=True)


class ROG(nn.Module):
    """RObust Generic segmentation lattice; 2,596,315 parameters for 1 modality / 2 classes.

    Args:
        in_channels: number of modalities (image channels).
        num_classes: output channels (background included); the output is raw logits.
        stem_strides: per-axis strides (1 or 2) of the two stem stages, D, H, W order.
        lattice_stride: per-axis stride (1 or 2) of the level-0 -> level-1 down branches.
        length: cells on the coarsest level (the paper's L; 2 as published).
    """

    def __init__(self, in_channels: int, num_classes: int,
                 stem_strides: Sequence[Sequence[int]] = DEFAULT_STEM_STRIDES,
                 lattice_stride: Sequence[int] = DEFAULT_LATTICE_STRIDE, length: int = 2):
        super().__init__()
        if int(in_channels) < 1 or int(num_classes) < 1:
            raise ValueError(f"in_channels and num_classes must be >= 1, got {in_channels}, {num_classes}")
        self.in_channels, self.num_classes, self.length = int(in_channels), int(num_classes), int(length)
        self.total_stride = total_stride(stem_strides, lattice_stride)
        s0, s1 = (_stride(s, "stem stride") for s in stem_strides)
        self.stem_strides: Tuple[Stride, Stride] = (s0, s1)
        self.lattice_stride = _stride(lattice_stride, "lattice_stride")
        c1, c2 = STEM_CHANNELS
        self.stem1 = nn.Sequential(
            SeparableConv3d(self.in_channels, c1), _norm(c1), nn.SiLU(),
            SeparableConv3d(c1, c1, s0), _norm(c1), nn.SiLU())
        self.stem2 = nn.Sequential(
            SeparableConv3d(c1, c1), _norm(c1), nn.SiLU(),
            SeparableConv3d(c1, c2, s1), _norm(c2))

        self.layout = lattice_layout(self.length)
        last = len(self.layout) - 1
        present = {(s, lv) for s, lvs in enumerate(self.layout) for lv in lvs}
        steps = []
        for s, levels in enumerate(self.layout):
            cells = nn.ModuleList()
            for lv in levels:
                channels = LEVEL_CHANNELS[lv]
                if (s + 1, lv - 1) in present:
                    up: Optional[int] = channels // 2
                elif s == last:  # the final node's up branch feeds the head (64 -> 32)
                    up = c1
                else:
                    up = None
                down = None
                if (s + 1, lv + 1) in present:
                    down = self.lattice_stride if lv == 0 else (2, 2, 2)
                cells.append(LatticeCell(channels, up, (s + 2, lv) in present, down))
            steps.append(cells)
        self.lattice = nn.ModuleList(steps)

        self.combine = nn.Sequential(nn.SiLU(), nn.Conv3d(c1, c1, 3, padding=1, bias=False), _norm(c1))
        self.classifier = nn.Sequential(nn.SiLU(), nn.Conv3d(c1, self.num_classes, 1, bias=False))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Kaiming-normal convolutions (negative slope 0.01) and unit/zero instance-norm affines.

        Not what the reference code's models start from: it defines this initialiser
        (``_init_weights``) but never calls it, so its networks keep PyTorch's defaults
        (Kaiming-uniform with a = sqrt(5), i.e. weight std 1/sqrt(3 fan_in), about 2.4x smaller than
        here; the norms are 1/0 either way).  We apply the He initialiser the reference evidently
        meant to use, deliberately: every convolution except the classifier feeds an instance norm,
        so the scale only changes the initial logits and Adam's relative step size, and all our
        tests and benchmarks were measured with it.  Call ``reset_parameters`` again to
        re-initialise (it is deterministic under ``torch.manual_seed``).
        """
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, a=1e-2)
            elif isinstance(m, nn.InstanceNorm3d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 5 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected input (N, {self.in_channels}, D, H, W), got {tuple(x.shape)}")
        small = [n for n, t in zip(x.shape[2:], self.total_stride) if n < t]
        if small:
            raise ValueError(f"input {tuple(x.shape[2:])} is smaller than the network's total stride "
                             f"{self.total_stride} along some axis; pad it or use smaller strides")
        if all(-(-n // t) == 1 for n, t in zip(x.shape[2:], self.total_stride)):
            raise ValueError(f"input {tuple(x.shape[2:])} leaves one voxel at the coarsest level (total "
                             f"stride {self.total_stride}); instance norm needs more: enlarge one axis")
        skip = self.stem1(x)
        inbox: Dict[int, List[torch.Tensor]] = {lv: [] for lv in range(len(LEVEL_CHANNELS))}
        inbox[0].append(self.stem2(skip))
        grids: Dict[int, Sequence[int]] = {-1: skip.shape[2:]}
        head_in: Optional[torch.Tensor] = None
        for levels, cells in zip(self.layout, self.lattice):
            for lv, cell in zip(levels, cells):
                incoming, inbox[lv] = inbox[lv], []
                feat = sum(incoming[1:], incoming[0])
                grids.setdefault(lv, feat.shape[2:])
                up, same, down = cell(feat)
                if up is not None:
                    up = _upsample(up, grids[lv - 1])
                    if lv == 0:
                        head_in = up
                    else:
                        inbox[lv - 1].append(up)
                if same is not None:
                    inbox[lv].append(same)
                if down is not None:
                    inbox[lv + 1].append(down)
        if head_in is None:  # cannot happen: the layout always ends with a level-0 cell
            raise RuntimeError("the lattice produced no output for the head")
        out = self.combine(head_in + skip)
        return self.classifier(_upsample(out, x.shape[2:]))

    # -- checkpoint support -------------------------------------------------------------------
    def config(self) -> Dict[str, Any]:
        """JSON-able constructor arguments, stored in checkpoint headers."""
        return {
            "in_channels": self.in_channels,
            "num_classes": self.num_classes,
            "stem_strides": [list(s) for s in self.stem_strides],
            "lattice_stride": list(self.lattice_stride),
            "length": self.length,
        }

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "ROG":
        """Rebuild from :meth:`config`; unknown keys are an error, not silently dropped."""
        known = {"in_channels", "num_classes", "stem_strides", "lattice_stride", "length"}
        extra = set(config) - known
        if extra:
            raise ValueError(f"unknown ROG config key(s): {sorted(extra)}")
        missing = {"in_channels", "num_classes"} - set(config)
        if missing:
            raise ValueError(f"ROG config lacks {sorted(missing)}")
        return cls(**dict(config))


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (all, or only those with ``requires_grad``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def count_conv_macs(model: nn.Module, patch_size: Sequence[int], in_channels: Optional[int] = None) -> int:
    """Multiply-accumulates of all convolutions for one ``patch_size`` input (batch 1).

    Runs a copy of the model on the ``meta`` device, so no memory is allocated and no
    arithmetic is done; norms, activations and interpolation are not counted.
    """
    channels = in_channels if in_channels is not None else getattr(model, "in_channels", None)
    if channels is None:
        raise ValueError("in_channels is required for a model without an in_channels attribute")
    meta = copy.deepcopy(model).to("meta")
    total = [0]

    def hook(module: nn.Module, _inputs: Tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        kernel = 1
        for k in module.kernel_size:
            kernel *= k
        per_output = kernel * module.in_channels // module.groups
        total[0] += output[0].numel() * per_output

    handles = [m.register_forward_hook(hook) for m in meta.modules()
               if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d))]
    try:
        with torch.no_grad():
            meta(torch.empty((1, int(channels), *[int(p) for p in patch_size]), device="meta"))
    finally:
        for h in handles:
            h.remove()
    return int(total[0])


def estimate_gflops(model: nn.Module, patch_size: Sequence[int], in_channels: Optional[int] = None) -> float:
    """Convolution GMACs for one patch, reported as "GFLOPs" like the paper does.

    The paper's 30.55 GFLOPs (mean over the ten MSD models at 96^3) is in the
    multiply-accumulate convention of common profilers (one MAC = one "FLOP"); use
    ``2 * count_conv_macs(...)`` for strict floating-point operations.
    """
    return count_conv_macs(model, patch_size, in_channels) / 1e9
