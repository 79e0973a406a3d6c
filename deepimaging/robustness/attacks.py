"""L-infinity adversarial attacks on segmentation models: shared machinery and PGD.

Every attack takes a model that maps ``(B, C, *spatial)`` inputs (2D or 3D) to per-voxel class
logits ``(B, K, *spatial)``, the inputs ``x`` and an integer label map ``y`` ``(B, *spatial)``, and
returns an :class:`AttackResult` with the lowest-Dice point found inside the budget.  The clean
input is itself a candidate, so an attack never reports a Dice above the clean one.

Epsilon and the valid range
---------------------------
``eps`` is on the model's input scale (after normalisation), one value or one per channel.
``valid_range=(low, high)`` (floats or one value per channel) is where inputs may live; perturbed
inputs are clamped to it, never to [0, 1] unless that is the range you pass.  ``None`` means no
clamping.  Where a clean voxel already lies outside the range the range is widened to include it,
so a perturbation never exceeds ``eps``.

For z-scored CT/MRI (the ROG plan clips each channel to its foreground [p0.5, p99.5] before the
z-score) the valid range of channel c is ``[(p0.5 - mean) / std, (p99.5 - mean) / std]``
(:func:`normalise_intensity_range`, :func:`valid_range_from_channels`), and "eps = 8/255" means
8/255 of that range (:func:`range_scaled_eps`): ``eps_c = 8/255 * (p99.5 - p0.5) / std`` in
normalised units, i.e. 8/255 of the clipped intensity span in original units.  Example, a liver
CT with foreground p0.5 = -17 HU, p99.5 = 201 HU, std = 40 HU: the range is 218 HU = 5.45 std
wide, so 8/255 is 6.8 HU = 0.171 in z-units.  MRI channels are similar (their clipped range is
typically 4-6 std wide, so 8/255 ~ 0.13-0.19 std).  :func:`intensity_eps_to_normalised` turns an
eps in original units (HU) into z-units (``eps / std``; the mean cancels in a difference).

Success for segmentation: a case is "broken" when its mean foreground Dice
(:func:`deepimaging.robustness.losses.foreground_dice`) falls below ``threshold`` (default: half
its clean Dice).  Restarts and Square's queries go only to cases not yet broken; ``threshold=0``
never stops early (the attack then minimises Dice with its whole budget).

Safeguards: while attacking, the model is in eval mode and float32 without autocast (its
previous mode and dtypes are restored afterwards); gradient attacks first check that the input
gradient on the clean input is finite and non-zero (:func:`check_input_gradients`).
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from deepimaging.core.progress import CancelToken, check_cancel
from deepimaging.robustness.losses import ce_loss, logits_dice

EpsLike = Union[float, Sequence[float], torch.Tensor]
RangeLike = Tuple[EpsLike, EpsLike]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
GRADIENT_CHECKS = ("raise", "warn", "off")


class GradientMaskingError(RuntimeError):
    """The input gradient is zero or not finite: gradient attacks would report false robustness."""


@dataclass
class AttackResult:
    """Outcome of one attack on a batch of cases."""

    name: str
    x_adv: torch.Tensor      # (B, C, *spatial): the lowest-Dice point found (the clean input if none lowered it)
    dice: torch.Tensor       # (B,) foreground Dice at x_adv
    clean_dice: torch.Tensor  # (B,)
    broken: torch.Tensor     # (B,) bool: dice < threshold
    forward_passes: int      # model evaluations spent (with or without backward)


# ---------------------------------------------------------------------------------- eps / ranges
def _as_channel_vector(value: EpsLike, name: str) -> torch.Tensor:
    t = torch.as_tensor(value, dtype=torch.float32).detach().cpu().reshape(-1)
    if t.numel() == 0 or not torch.isfinite(t).all():
        raise ValueError(f"{name} must be finite numbers, got {value!r}")
    return t


def channel_tensor(value: EpsLike, n_channels: int, spatial_dims: int, device: torch.device,
                   name: str = "value") -> torch.Tensor:
    """``value`` (one number or one per channel) as a ``(1, C, 1, ...)`` float32 tensor."""
    t = _as_channel_vector(value, name)
    if t.numel() == 1:
        t = t.expand(n_channels)
    elif t.numel() != n_channels:
        raise ValueError(f"{name} has {t.numel()} values but the input has {n_channels} channel(s)")
    return t.to(device).reshape(1, n_channels, *([1] * spatial_dims)).clone()


def range_scaled_eps(eps: float, valid_range: RangeLike) -> torch.Tensor:
    """Absolute per-channel eps ``(C,)`` for an eps given as a fraction of each channel's range.

    ``range_scaled_eps(8 / 255, (low, high))`` is ``8/255 * (high_c - low_c)`` for every channel c.
    """
    low, high = (_as_channel_vector(v, n) for v, n in zip(valid_range, ("low", "high")))
    if low.numel() != high.numel() and min(low.numel(), high.numel()) != 1:
        raise ValueError("valid_range low and high have different numbers of channels")
    width = high - low
    if (width <= 0).any():
        raise ValueError(f"valid_range must have high > low for every channel, got {valid_range!r}")
    return float(eps) * width


def intensity_eps_to_normalised(eps: EpsLike, std: EpsLike) -> torch.Tensor:
    """An eps in original intensity units (e.g. HU) in z-scored units: ``eps / std`` per channel.

    The normalisation's mean does not enter: shifting both points does not change their difference.
    """
    std_t = _as_channel_vector(std, "std")
    if (std_t <= 0).any():
        raise ValueError("std must be positive")
    return _as_channel_vector(eps, "eps") / std_t


def normalise_intensity_range(low: EpsLike, high: EpsLike, mean: EpsLike,
                              std: EpsLike) -> Tuple[torch.Tensor, torch.Tensor]:
    """Valid range in z-scored units ``((low - mean) / std, (high - mean) / std)`` per channel."""
    std_t = _as_channel_vector(std, "std")
    mean_t = _as_channel_vector(mean, "mean")
    return ((_as_channel_vector(low, "low") - mean_t) / std_t, (_as_channel_vector(high, "high") - mean_t) / std_t)


def valid_range_from_channels(channels: Sequence[object]) -> Tuple[List[float], List[float]]:
    """Valid range from per-channel normalisation records with ``percentile_00_5``,
    ``percentile_99_5``, ``mean`` and ``std`` attributes (e.g. the ROG plan's channels)."""
    low, high = [], []
    for ch in channels:
        lo, hi = normalise_intensity_range(getattr(ch, "percentile_00_5"), getattr(ch, "percentile_99_5"),
                                           getattr(ch, "mean"), getattr(ch, "std"))
        low.append(float(lo[0]))
        high.append(float(hi[0]))
    return low, high


# ------------------------------------------------------------------------------------ adapters
class ClassifierAsSegmenter(nn.Module):
    """A classifier ``(B, K)`` seen as a segmentation model with one voxel: ``(B, K, 1, 1)``.

    Use labels of shape ``(B, 1, 1)``; the foreground Dice is then the accuracy.
    """

    def __init__(self, classifier: nn.Module) -> None:
        super().__init__()
        self.classifier = classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(x)[:, :, None, None]


# ---------------------------------------------------------------------------------- safeguards
@contextlib.contextmanager
def attack_mode(model: nn.Module, device: Union[torch.device, str, None] = None) -> Iterator[nn.Module]:
    """Eval mode, float32 weights and no autocast while attacking; everything restored afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    converted = []
    for module in model.modules():
        for store in (module._parameters, module._buffers):
            for key, tensor in store.items():
                if tensor is not None and tensor.is_floating_point() and tensor.dtype != torch.float32:
                    converted.append((tensor, tensor.dtype))
                    tensor.data = tensor.data.float()
    model.eval()
    device_types = {"cpu"}
    if device is not None:
        device_types.add(torch.device(device).type)
    try:
        with contextlib.ExitStack() as stack:
            for dev in sorted(device_types):
                try:
                    stack.enter_context(torch.autocast(device_type=dev, enabled=False))
                except (RuntimeError, ValueError):  # device type without autocast support
                    pass
            yield model
    finally:
        for tensor, dtype in converted:
            tensor.data = tensor.data.to(dtype)
        for module, training in modes:
            module.training = training


def _validate(x: torch.Tensor, y: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    if x.dim() not in (4, 5):
        raise ValueError(f"inputs must be (B, C, H, W) or (B, C, D, H, W), got shape {tuple(x.shape)}")
    if y.dim() < 2 or y.shape[0] != x.shape[0]:
        raise ValueError(f"labels must have shape (B, *spatial) with B = {x.shape[0]}, got {tuple(y.shape)}")
    if y.is_floating_point():
        if not torch.equal(y, y.round()):
            raise ValueError("labels must be integer class indices")
    x = x.detach().to(torch.float32)
    if not torch.isfinite(x).all():
        raise ValueError("inputs contain NaN or infinite values")
    return x, y.detach().to(x.device).long()


class _Problem:
    """One batch under attack: bounds, model evaluation, loss gradients, forward-pass count.

    The labels' spatial shape is the logits' (normally the input's; ``(1, 1)`` for a classifier
    wrapped in :class:`ClassifierAsSegmenter`).
    """

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: EpsLike,
                 valid_range: Optional[RangeLike]) -> None:
        self.model = model
        self.x, self.y = _validate(x, y)
        n_channels, spatial_dims = self.x.shape[1], self.x.dim() - 2
        self.eps = channel_tensor(eps, n_channels, spatial_dims, self.x.device, "eps")
        if (self.eps < 0).any():
            raise ValueError("eps must be non-negative")
        # the valid range, widened to include clean values that lie outside it (+-inf: no range)
        self.range_lower = torch.full_like(self.x, float("-inf"))
        self.range_upper = torch.full_like(self.x, float("inf"))
        if valid_range is not None:
            low = channel_tensor(valid_range[0], n_channels, spatial_dims, self.x.device, "valid_range low")
            high = channel_tensor(valid_range[1], n_channels, spatial_dims, self.x.device, "valid_range high")
            if (high <= low).any():
                raise ValueError("valid_range must have high > low for every channel")
            self.range_lower = torch.minimum(low, self.x)
            self.range_upper = torch.maximum(high, self.x)
        self.lower = torch.maximum(self.x - self.eps, self.range_lower)
        self.upper = torch.minimum(self.x + self.eps, self.range_upper)
        self.forward_passes = 0
        self.clean_logits = self.logits(self.x)
        self.num_classes = self.clean_logits.shape[1]
        if int(self.y.min()) < 0 or int(self.y.max()) >= self.num_classes:
            raise ValueError(f"labels must lie in 0..{self.num_classes - 1} "
                             f"(the model returns {self.num_classes} classes)")
        self.clean_dice = logits_dice(self.clean_logits, self.y)

    def _forward(self, v: torch.Tensor) -> torch.Tensor:
        out = self.model(v)
        self.forward_passes += 1
        spatial = tuple(self.y.shape[1:])
        if not torch.is_tensor(out) or out.shape[0] != v.shape[0] or tuple(out.shape[2:]) != spatial:
            shape = tuple(out.shape) if torch.is_tensor(out) else type(out).__name__
            raise ValueError(f"the model must return logits (B, K, *spatial) matching the labels: "
                             f"({v.shape[0]}, K, {', '.join(map(str, spatial))}), got {shape}")
        if out.shape[1] < 2:
            raise ValueError("the model must return at least 2 class logits per voxel")
        return out.float()

    def logits(self, v: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self._forward(v)

    def project(self, v: torch.Tensor) -> torch.Tensor:
        """Into the eps-ball around the clean input, intersected with the valid range."""
        return torch.maximum(torch.minimum(v, self.upper), self.lower)

    def loss_grad(self, v: torch.Tensor, loss_fn: LossFn,
                  y: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-case loss ``(B,)``, its input gradient and the logits at ``v``."""
        v = v.detach().requires_grad_(True)
        with torch.enable_grad():
            logits = self._forward(v)
            loss = loss_fn(logits, self.y if y is None else y)
            if loss.requires_grad:
                grad = torch.autograd.grad(loss.sum(), [v], allow_unused=True)[0]
            else:
                grad = None
        if grad is None:  # the output does not depend on the input (detached / constant model)
            grad = torch.zeros_like(v)
        return loss.detach(), grad.detach().contiguous(), logits.detach()

    def random_start(self, generator: torch.Generator, rows: torch.Tensor,
                     scale: Union[float, torch.Tensor] = 1.0) -> torch.Tensor:
        """Uniform random points for the cases ``rows``, the largest |perturbation| / eps being
        ``scale`` (one number or one per row), projected into the bounds (as in AutoAttack)."""
        x = self.x[rows]
        t = torch.rand(x.shape, generator=generator, device=x.device) * 2 - 1
        shape = (-1, *([1] * (t.dim() - 1)))
        t = t / t.reshape(t.shape[0], -1).abs().amax(dim=1).clamp_min(1e-12).reshape(shape)
        scale_t = torch.as_tensor(scale, dtype=x.dtype, device=x.device).expand(x.shape[0]).reshape(shape)
        return self.bound(x + scale_t * self.eps * t, rows)

    def bound(self, v: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """``project`` for the sub-batch ``rows``."""
        return torch.maximum(torch.minimum(v, self.upper[rows]), self.lower[rows])

    def threshold(self, threshold: Union[float, torch.Tensor, None]) -> torch.Tensor:
        if threshold is None:
            return 0.5 * self.clean_dice
        return torch.as_tensor(threshold, dtype=torch.float32, device=self.x.device).expand(self.x.shape[0]).clone()


class _Best:
    """Tracks, per case, the lowest-Dice point seen (starting from the clean input)."""

    def __init__(self, problem: _Problem) -> None:
        self.x = problem.x.clone()
        self.dice = problem.clean_dice.clone()

    def update(self, v: torch.Tensor, dice: torch.Tensor, rows: Optional[torch.Tensor] = None) -> None:
        """Offer points ``v`` for the cases ``rows`` (all cases when None)."""
        if rows is None:
            rows = torch.arange(self.x.shape[0], device=v.device)
        better = dice < self.dice[rows]
        if better.any():
            idx = rows[better]
            self.x[idx] = v[better]
            self.dice[idx] = dice[better]


def make_generator(seed: int, device: torch.device) -> torch.Generator:
    """A torch.Generator on ``device`` seeded with ``seed`` (every attack's only randomness)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed))
    return gen


def check_input_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                          action: str = "raise") -> List[str]:
    """Check that the cross-entropy's input gradient on the clean input is finite and non-zero.

    A zero gradient (non-differentiable layers such as ``torch.round``/``argmax``, a detached
    input, saturated outputs) or a NaN/inf gradient makes gradient attacks fail silently and the
    model look robust when it is not.  ``action``: ``"raise"`` (:class:`GradientMaskingError`),
    ``"warn"`` (``warnings.warn``) or ``"off"``.  Returns the problems found (empty when fine).
    """
    if action not in GRADIENT_CHECKS:
        raise ValueError(f"gradient check must be one of {GRADIENT_CHECKS}, got {action!r}")
    if action == "off":
        return []
    with attack_mode(model, x.device):
        problem = _Problem(model, x, y, 0.0, None)
        _, grad, _ = problem.loss_grad(problem.x, ce_loss)
    flat = grad.reshape(grad.shape[0], -1)
    problems = []
    nonfinite = (~torch.isfinite(flat)).any(dim=1)
    zero = (flat.abs().sum(dim=1) == 0) & ~nonfinite

    def which(flags: torch.Tensor) -> str:
        return "" if flat.shape[0] == 1 else f" for case(s) {flags.nonzero().flatten().tolist()}"

    if nonfinite.any():
        problems.append(f"the input gradient of the loss is NaN/infinite{which(nonfinite)} on the clean input: "
                        "gradient attacks (PGD/APGD/FAB) cannot be trusted on this model")
    if zero.any():
        problems.append(f"the input gradient of the loss is exactly zero{which(zero)} on the clean input "
                        "(gradient masking: non-differentiable operations such as "
                        "torch.round/argmax, a detached input or saturated outputs); gradient attacks "
                        "(PGD/APGD/FAB) would report false robustness -- rely on the Square attack or make "
                        "the model differentiable")
    for message in problems:
        if action == "raise":
            raise GradientMaskingError(message)
        warnings.warn(message, RuntimeWarning, stacklevel=2)
    return problems


# ----------------------------------------------------------------------------------------- PGD
def pgd_attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: EpsLike, *, steps: int = 10,
               step_size: Optional[float] = None, restarts: int = 1, valid_range: Optional[RangeLike] = None,
               threshold: Union[float, torch.Tensor, None] = None, seed: int = 0,
               check_gradients: str = "raise", cancel: Optional[CancelToken] = None) -> AttackResult:
    """Projected gradient descent (Madry et al. 2018) on the per-voxel cross-entropy.

    Random uniform start in the eps-ball, ``steps`` signed-gradient steps of ``step_size * eps``
    (default ``2.5 / steps``, so the steps can cross the ball) with projection after each;
    ``restarts`` random restarts on the cases not yet broken.  Returns the lowest-Dice iterate.
    """
    if steps < 1 or restarts < 1:
        raise ValueError("steps and restarts must be >= 1")
    factor = 2.5 / steps if step_size is None else float(step_size)
    check_input_gradients(model, x, y, check_gradients)
    with attack_mode(model, x.device):
        problem = _Problem(model, x, y, eps, valid_range)
        thr = problem.threshold(threshold)
        best = _Best(problem)
        gen = make_generator(seed, problem.x.device)
        for restart in range(restarts):
            rows = (best.dice >= thr).nonzero().flatten()
            if rows.numel() == 0:
                break
            v = problem.random_start(gen, rows)
            for _ in range(steps):
                check_cancel(cancel)
                _, grad, logits = _loss_grad_rows(problem, v, rows, ce_loss)
                best.update(v, logits_dice(logits, problem.y[rows]), rows)
                v = problem.bound(v + factor * problem.eps * grad.sign(), rows)
            best.update(v, logits_dice(problem.logits(v), problem.y[rows]), rows)
        return AttackResult("pgd", best.x, best.dice, problem.clean_dice, best.dice < thr, problem.forward_passes)


def _loss_grad_rows(problem: _Problem, v: torch.Tensor, rows: torch.Tensor, loss_fn: LossFn,
                    goal: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``problem.loss_grad`` on the sub-batch ``rows`` (labels and optional targets sliced)."""
    y = problem.y[rows]
    if goal is None:
        return problem.loss_grad(v, loss_fn, y)
    goal_rows = goal[rows]
    return problem.loss_grad(v, lambda logits, labels: loss_fn(logits, labels, goal_rows), y)
