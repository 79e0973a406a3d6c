"""ROG's adversarial-robustness hooks: valid input range, eps conversions, Free AT perturbations.

Valid range.  Preprocessing clips every channel to the foreground [p0.5, p99.5] of the training
set (MRI-like channels: of the per-image min-max scaled values) and then z-scores it, so every
network input lies in ``[(p0.5 - mean) / std, (p99.5 - mean) / std]`` per channel
(:meth:`Plan.input_range <deepimaging.rog.plan.Plan.input_range>`; the same float32 arithmetic
preprocessing uses, so clipped voxels sit exactly on the limits).  Perturbed inputs are clamped
to it: an attack may not create intensities that preprocessing can never produce.

Eps.  Image-classification papers quote eps for inputs in [0, 1]; "8/255" here means 8/255 of
each channel's valid range (:func:`eps_from_fraction`): ``eps_c = 8/255 * (p99.5 - p0.5) / std``
in normalised units, i.e. 8/255 of the clipped intensity span in original units.  Example, a
typical abdominal CT plan with foreground p0.5 = -41 HU, p99.5 = 176 HU, mean 99 HU, std 39 HU:
the valid range is [-3.59, 1.97] (5.56 std wide), and 8/255 is 0.174 std = 6.8 HU; 16/255 is
13.6 HU.  MRI channels are similar: their clipped range is typically 4-6 std wide, so 8/255 is
about 0.13-0.19 std.  :func:`eps_from_intensity` converts an eps in original units (HU) instead:
``value / std`` per channel (the mean cancels in a difference); for min-max scaled (MRI-like)
channels the "original units" are those of the per-image min-max scaled image (0-1).

Free adversarial training (Shafahi et al., NeurIPS 2019), as ROG's paper applies it (eps 8/255,
m = 5): each minibatch is replayed ``m`` times; one perturbation ``delta`` (the batch's shape)
is carried over between replays and minibatches (zeroed when the batch shape changes).  At each
replay the network is trained on ``clamp(x + delta, valid range)``, and the same backward pass
gives the gradient with respect to ``delta``, which takes one signed step:
``delta = clamp(delta + eps * sign(grad), -eps, eps)``.  :class:`FreeAdversarialTraining` keeps
``delta`` and the replay count; :func:`deepimaging.rog.train.train_step` does the step.  (The
reference code scales eps by each patch's own min-max range and clamps to it; we use the plan's
fixed range, so eps means the same for every patch, for training and for the attacks.)
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple, Union

import torch

from deepimaging.core.errors import InputError

from .plan import Plan

EpsValue = Union[float, Sequence[float], torch.Tensor]
Batch = Tuple[torch.Tensor, torch.Tensor]


def _per_channel(value: EpsValue, n: int, what: str) -> torch.Tensor:
    t = torch.as_tensor(value, dtype=torch.float64).detach().cpu().reshape(-1)
    if t.numel() == 1:
        t = t.expand(n)
    if t.numel() != n or not torch.isfinite(t).all() or (t < 0).any():
        raise InputError(f"{what} must be one non-negative number or one per channel ({n}), got {value!r}")
    return t


def input_range_tensors(plan: Plan, device: Union[str, torch.device, None] = None,
                        dims: int = 5) -> Tuple[torch.Tensor, torch.Tensor]:
    """:meth:`Plan.input_range` as two float32 tensors shaped ``(1, C, 1, ...)`` (``dims`` axes)."""
    low, high = plan.input_range()
    shape = (1, len(low)) + (1,) * (dims - 2)
    return (torch.tensor(low, dtype=torch.float32, device=device).reshape(shape),
            torch.tensor(high, dtype=torch.float32, device=device).reshape(shape))


def eps_from_fraction(plan: Plan, fraction: EpsValue) -> torch.Tensor:
    """Absolute per-channel eps ``(C,)`` (normalised units) for ``fraction`` of each channel's
    valid range: ``eps_from_fraction(plan, 8 / 255)[c] = 8/255 * (high_c - low_c)``."""
    low, high = (torch.tensor(v, dtype=torch.float64) for v in plan.input_range())
    return (_per_channel(fraction, len(plan.channels), "eps fraction") * (high - low)).float()


def eps_from_intensity(plan: Plan, value: EpsValue) -> torch.Tensor:
    """Per-channel eps ``(C,)`` in normalised units for an eps in original intensity units
    (e.g. HU for CT): ``value / std`` (one value for all channels or one per channel)."""
    std = torch.tensor([c.std for c in plan.channels], dtype=torch.float64)
    return (_per_channel(value, len(plan.channels), "eps") / std).float()


class FreeAdversarialTraining:
    """The state of Free AT in a training loop: the current minibatch, its replays and ``delta``.

    Per optimizer step::

        x, y = free.next_minibatch(fetch)        # a new minibatch after every m replays
        x_adv, leaf = free.perturb(x)            # clamp(x + delta, valid range); leaf = delta
        result = train_step(..., x_adv, y, ..., grad_wrt=leaf)
        free.update(result.grad)                 # delta += eps * sign(grad), clamped to +-eps

    ``eps`` is per channel in normalised units (:func:`eps_from_fraction`).  A non-finite
    gradient (fp16 overflow: the GradScaler then skips the step too) leaves ``delta`` unchanged
    and is counted in :attr:`skipped`.
    """

    def __init__(self, plan: Plan, eps_fraction: EpsValue = 8 / 255, replays: int = 5,
                 device: Union[str, torch.device, None] = None):
        if int(replays) < 1:
            raise InputError(f"Free AT needs at least one replay per minibatch, got {replays}")
        fractions = _per_channel(eps_fraction, len(plan.channels), "Free AT eps")
        if (fractions <= 0).any() or (fractions > 1).any():
            raise InputError(f"Free AT eps is a fraction of each channel's valid range in (0, 1], got {eps_fraction!r}"
                             " (8/255 is the paper's)")
        self.replays = int(replays)
        self.eps_abs = eps_from_fraction(plan, fractions)
        self.low, self.high = input_range_tensors(plan, device)
        self.eps = self.eps_abs.to(device).reshape(self.low.shape)
        self.delta: Optional[torch.Tensor] = None
        self.minibatches = 0   # minibatches drawn
        self.resets = 0        # times delta was (re)created for a new batch shape
        self.skipped = 0       # updates skipped for a non-finite gradient
        self._batch: Optional[Batch] = None
        self._left = 0

    def next_minibatch(self, fetch: Callable[[], Batch]) -> Batch:
        """The minibatch to train on now: the current one until it has been replayed m times."""
        if self._batch is None or self._left == 0:
            self._batch = fetch()
            self._left = self.replays
            self.minibatches += 1
        self._left -= 1
        return self._batch

    def perturb(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(clamp(x + delta, low, high), delta leaf)``; the leaf collects the input gradient."""
        if self.delta is None or self.delta.shape != x.shape or self.delta.device != x.device:
            self.delta = torch.zeros_like(x, dtype=torch.float32)
            self.resets += 1
        if self.eps.device != x.device:
            self.eps, self.low, self.high = (t.to(x.device) for t in (self.eps, self.low, self.high))
        leaf = self.delta.clone().requires_grad_(True)
        return torch.clamp(x.float() + leaf, self.low, self.high), leaf

    def update(self, grad: Optional[torch.Tensor]) -> bool:
        """One signed step of ``delta`` along ``grad`` (d loss / d delta); False if skipped."""
        if self.delta is None:
            raise RuntimeError("update() before perturb()")
        if grad is None or not bool(torch.isfinite(grad).all()):
            self.skipped += 1
            return False
        self.delta = torch.clamp(self.delta + self.eps * grad.detach().float().sign(), -self.eps, self.eps)
        return True

    def delta_ratio(self) -> float:
        """max over voxels of ``|delta_c| / eps_c`` (<= 1; 0 before the first step)."""
        if self.delta is None:
            return 0.0
        return float((self.delta.abs() / self.eps.clamp_min(1e-12)).max())
