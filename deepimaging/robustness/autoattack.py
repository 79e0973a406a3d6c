"""AutoAttack for segmentation: the robustness benchmark of the ROG paper (Daza et al.).

:func:`run_autoattack` attacks a model on a list of cases ``(image, label)`` for each eps:

* clean Dice per case (mean foreground Dice, :func:`deepimaging.robustness.losses.foreground_dice`)
  and ``mu`` = its mean over the cases; a case is **broken** when its Dice falls below ``mu / 2``;
* the attacks (default APGD-CE, APGD-DLR, FAB-T, Square -- for a 2-class model APGD-DLR is
  impossible and is replaced by APGD-T with the targeted cross-entropy, reported as
  ``apgd-t-ce``) run in sequence, each **only on the cases not yet broken** (``cascade=True``, as
  AutoAttack); cases broken on the clean input are never attacked;
* **robust Dice** of a case = the worst (lowest) Dice over the clean input and the attacks;
* per attack and eps the mean Dice over all cases: with ``cascade=True`` the robust Dice after
  that stage (AutoAttack's "robust accuracy after X"); with ``cascade=False`` every attack runs on
  every clean-unbroken case on its own, which gives the paper's Table 1 (per-attack Dice);
* Dice-vs-eps curves and their AUC: trapezoid over eps rescaled to [0, 1] of the eps range
  (eps sorted ascending; a single eps gives its Dice).

``"pgd"`` can be added for comparison: it runs on every clean-unbroken case with the same
iterations and restarts as APGD, does not gate the cascade and does not enter the robust Dice.

Safeguards against false robustness: eval mode + float32 without autocast during the attacks
(restored afterwards), a check that input gradients are finite and non-zero on the clean inputs
(``gradient_check``), fixed seeds, every adversarial input checked to lie in the eps-ball and the
valid range, and warnings (``warnings.warn`` and ``result.warnings``) when APGD-CE ends above PGD
on the same cases or a larger eps gives a higher robust Dice.
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass, field, fields
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from deepimaging.core.device import DeviceLike, select_device
from deepimaging.core.progress import CancelToken, ProgressCallback, check_cancel, report
from deepimaging.robustness.apgd import apgd_attack
from deepimaging.robustness.attacks import (AttackResult, GradientMaskingError, RangeLike, attack_mode,
                                            channel_tensor, check_input_gradients, pgd_attack, range_scaled_eps)
from deepimaging.robustness.fab import fab_t_attack
from deepimaging.robustness.losses import logits_dice
from deepimaging.robustness.square import square_attack

DEFAULT_ATTACKS = ("apgd-ce", "apgd-dlr", "fab-t", "square")
COMPARISON_ATTACKS = ("pgd",)
GRADIENT_ATTACKS = ("pgd", "apgd-ce", "apgd-dlr", "apgd-t-ce", "apgd-t-dlr", "fab-t")
KNOWN_ATTACKS = GRADIENT_ATTACKS + ("apgd-t", "square")
STRENGTH_PAIRS = (("pgd", "apgd-ce"),)  # (weaker, stronger) at equal iterations and restarts
PRESETS = {
    # ROG paper: 5 iterations for APGD and FAB, Square 500-5000 queries
    "paper": {"iterations": 5, "restarts": 1, "square_queries": 500, "n_targets": 1},
    # AutoAttack 'standard': 100 iterations, 9 target classes, 5000 Square queries
    "standard": {"iterations": 100, "restarts": 1, "square_queries": 5000, "n_targets": 9},
}
AttackFn = Callable[..., Union[AttackResult, torch.Tensor]]
AttackSpec = Union[str, Tuple[str, AttackFn]]


@dataclass
class RobustnessResult:
    """Everything :func:`run_autoattack` measured; ``to_dict()`` is the JSON of the report."""

    eps: List[float]
    eps_scale: str
    eps_abs: List[List[float]]           # per eps, the absolute eps per channel (normalised units)
    clean_dice: float
    clean_dice_per_case: List[float]
    threshold: float                     # mu / 2
    attacks: Dict[str, List[float]]      # per attack, mean Dice per eps (see module docstring)
    robust_dice: List[float]             # per eps
    robust_dice_per_case: List[List[float]]
    robust_fraction: List[float]         # per eps, fraction of cases not broken
    auc: Dict[str, float]                # per attack
    robust_auc: float
    per_case: Dict[str, List[List[Optional[float]]]]  # attack -> [eps][case] Dice (None: not run)
    ran_on: Dict[str, List[List[int]]]   # attack -> [eps] -> indices of the cases it ran on
    forward_passes: Dict[str, int]
    mode: str
    num_classes: int
    settings: Dict[str, object]
    warnings: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    examples: Optional[List[List[torch.Tensor]]] = None  # [eps][case] worst adversarial input (CPU)

    def to_dict(self) -> Dict[str, object]:
        out = {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self) if f.name != "examples"}
        out["num_cases"] = len(self.clean_dice_per_case)
        return out


def normalised_auc(eps: Sequence[float], values: Sequence[float]) -> float:
    """Area under ``values`` vs ``eps`` with eps rescaled to [0, 1] (trapezoid; one point: its value)."""
    if len(eps) != len(values) or not eps:
        raise ValueError("eps and values must be non-empty and of equal length")
    if len(eps) == 1:
        return float(values[0])
    lo, hi = float(eps[0]), float(eps[-1])
    xs = [(float(e) - lo) / (hi - lo) for e in eps]
    return float(sum((xs[i + 1] - xs[i]) * (values[i] + values[i + 1]) / 2 for i in range(len(xs) - 1)))


def _prepare_case(image: torch.Tensor, label: torch.Tensor, spatial_dims: int,
                  device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    image, label = torch.as_tensor(image), torch.as_tensor(label)
    if image.dim() == spatial_dims + 1:
        image = image.unsqueeze(0)
    if label.dim() == spatial_dims:
        label = label.unsqueeze(0)
    if image.dim() != spatial_dims + 2 or image.shape[0] != 1 or label.dim() != spatial_dims + 1 \
            or label.shape[0] != 1:
        raise ValueError(f"a case must be an image (C, *spatial) with a label (*spatial) ({spatial_dims}D, "
                         f"optionally with a batch axis of 1); got {tuple(image.shape)} and {tuple(label.shape)}")
    return image.to(device=device, dtype=torch.float32), label.to(device).long()


def _resolve_attacks(specs: Sequence[AttackSpec], num_classes: int, notes: List[str]) -> List[Tuple[str, object]]:
    resolved, seen = [], set()
    for spec in specs:
        if isinstance(spec, str):
            name = spec.lower()
            if name not in KNOWN_ATTACKS:
                raise ValueError(f"unknown attack {spec!r}; choose from {KNOWN_ATTACKS} or pass (name, callable)")
            if name == "apgd-dlr" and num_classes < 3:
                notes.append("APGD-DLR needs >= 3 classes; this 2-class model gets APGD-T with the targeted "
                             "cross-entropy instead, reported as 'apgd-t-ce'")
                name = "apgd-t-ce"
            elif name == "apgd-t":
                name = "apgd-t-dlr" if num_classes >= 4 else "apgd-t-ce"
            elif name == "apgd-t-dlr" and num_classes < 4:
                raise ValueError(f"APGD-T-DLR needs >= 4 classes, the model has {num_classes}; use 'apgd-t-ce'")
            entry: Tuple[str, object] = (name, name)
        else:
            name, fn = spec
            if not callable(fn):
                raise ValueError(f"attack {name!r}: the second item must be a callable")
            entry = (str(name), fn)
        if entry[0] in seen:
            raise ValueError(f"attack {entry[0]!r} is listed twice")
        seen.add(entry[0])
        resolved.append(entry)
    return resolved


def _builtin(name: str, settings: Dict[str, int]) -> AttackFn:
    it, rs, nt = settings["iterations"], settings["restarts"], settings["n_targets"]
    common = {"check_gradients": "off"}
    table = {
        "pgd": lambda *a, **k: pgd_attack(*a, steps=it, restarts=rs, **common, **k),
        "apgd-ce": lambda *a, **k: apgd_attack(*a, loss="ce", steps=it, restarts=rs, **common, **k),
        "apgd-dlr": lambda *a, **k: apgd_attack(*a, loss="dlr", steps=it, restarts=rs, **common, **k),
        "apgd-t-ce": lambda *a, **k: apgd_attack(*a, loss="ce-t", steps=it, restarts=rs, n_targets=nt, **common, **k),
        "apgd-t-dlr": lambda *a, **k: apgd_attack(*a, loss="dlr-t", steps=it, restarts=rs, n_targets=nt, **common,
                                                  **k),
        "fab-t": lambda *a, **k: fab_t_attack(*a, steps=it, restarts=rs, n_targets=nt, **common, **k),
        "square": lambda *a, **k: square_attack(*a, n_queries=settings["square_queries"], restarts=rs, **k),
    }
    return table[name]


def _check_admissible(name: str, x: torch.Tensor, x_adv: torch.Tensor, eps: torch.Tensor,
                      low: Optional[torch.Tensor], high: Optional[torch.Tensor]) -> None:
    if x_adv.shape != x.shape or not torch.isfinite(x_adv).all():
        raise RuntimeError(f"attack {name!r} returned an input of shape {tuple(x_adv.shape)} or with NaN/inf")
    tol = 1e-5 * (1 + x.abs())
    if ((x_adv - x).abs() > eps + tol).any():
        raise RuntimeError(f"attack {name!r} left the eps-ball (max |delta| {float((x_adv - x).abs().max()):.6g})")
    if low is not None and ((x_adv < torch.minimum(low, x) - tol).any()
                            or (x_adv > torch.maximum(high, x) + tol).any()):
        raise RuntimeError(f"attack {name!r} left the valid input range")


def _warn(result_warnings: List[str], message: str) -> None:
    result_warnings.append(message)
    warnings.warn(message, RuntimeWarning, stacklevel=3)


def run_autoattack(model: nn.Module, cases: Sequence[Tuple[torch.Tensor, torch.Tensor]], eps: Sequence[float], *,
                   attacks: Optional[Sequence[AttackSpec]] = None, valid_range: Optional[RangeLike] = None,
                   eps_scale: str = "range", preset: str = "paper", iterations: Optional[int] = None,
                   restarts: Optional[int] = None, square_queries: Optional[int] = None,
                   n_targets: Optional[int] = None, cascade: bool = True, stop_when_broken: bool = True,
                   gradient_check: str = "raise", consistency_tol: float = 0.01, spatial_dims: int = 3,
                   keep_examples: bool = False, seed: int = 0, device: DeviceLike = None,
                   progress: Optional[ProgressCallback] = None,
                   cancel: Optional[CancelToken] = None) -> RobustnessResult:
    """Run the AutoAttack benchmark for segmentation on ``cases`` for every eps.

    ``cases``: ``(image (C, *spatial), label (*spatial))`` tensors (a leading batch axis of 1 is
    accepted; ``spatial_dims`` 3 or 2).  ``eps``: with ``eps_scale="range"`` fractions of each
    channel's valid range (8/255 -> 8/255 of ``high - low``; needs ``valid_range``), with
    ``"absolute"`` eps in the model's input units.  ``valid_range=(low, high)`` per channel (or
    None: no clamping).  ``attacks``: names from :data:`KNOWN_ATTACKS` or ``(name, fn)`` with
    ``fn(model, x, y, eps, *, valid_range, threshold, seed, cancel)`` returning an
    :class:`AttackResult` or the adversarial input.  Budgets come from ``preset`` ("paper" or
    "standard") unless given.  ``stop_when_broken=False`` lets every attack spend its full budget
    lowering Dice (better Dice-vs-eps curves; the cascade still uses ``mu / 2``).
    ``gradient_check``: "raise", "warn" or "off".  ``progress(fraction, message)`` and ``cancel``
    as everywhere in deepimaging.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    settings = dict(PRESETS[preset])
    for key, value in (("iterations", iterations), ("restarts", restarts), ("square_queries", square_queries),
                       ("n_targets", n_targets)):
        if value is not None:
            if int(value) < 1:
                raise ValueError(f"{key} must be >= 1")
            settings[key] = int(value)
    if eps_scale not in ("range", "absolute"):
        raise ValueError("eps_scale must be 'range' or 'absolute'")
    if eps_scale == "range" and valid_range is None:
        raise ValueError("eps_scale='range' needs valid_range=(low, high); pass eps_scale='absolute' otherwise")
    eps_list = sorted(float(e) for e in eps)
    if not eps_list or any(e < 0 or not math.isfinite(e) for e in eps_list) or len(set(eps_list)) != len(eps_list):
        raise ValueError(f"eps must be distinct finite non-negative numbers, got {list(eps)}")
    if not cases:
        raise ValueError("no cases to attack")
    dev = select_device(device)
    prepared = [_prepare_case(img, lab, spatial_dims, dev) for img, lab in cases]
    n_channels = prepared[0][0].shape[1]
    eps_abs = [range_scaled_eps(e, valid_range) if eps_scale == "range" else torch.full((n_channels,), e)
               for e in eps_list]
    low = high = None
    if valid_range is not None:
        low = channel_tensor(valid_range[0], n_channels, spatial_dims, dev, "valid_range low")
        high = channel_tensor(valid_range[1], n_channels, spatial_dims, dev, "valid_range high")

    params = list(model.parameters())
    home = params[0].device if params else None
    model.to(dev)
    try:
        with attack_mode(model, dev):
            return _benchmark(model, prepared, eps_list, eps_abs, attacks, valid_range, low, high, eps_scale,
                              preset, settings, cascade, stop_when_broken, gradient_check, consistency_tol,
                              keep_examples, seed, progress, cancel)
    finally:
        if home is not None:
            model.to(home)


def _benchmark(model, prepared, eps_list, eps_abs, attack_specs, valid_range, low, high, eps_scale, preset,
               settings, cascade, stop_when_broken, gradient_check, consistency_tol, keep_examples, seed,
               progress, cancel) -> RobustnessResult:
    n_cases = len(prepared)
    with torch.no_grad():
        clean_logits = [model(x).float() for x, _ in prepared]
    num_classes = clean_logits[0].shape[1]
    if any(logits.shape[1] != num_classes for logits in clean_logits):
        raise ValueError("the model returned different numbers of classes for different cases")
    clean = [float(logits_dice(logits, y)[0]) for logits, (_, y) in zip(clean_logits, prepared)]
    mu = sum(clean) / n_cases
    thr = mu / 2
    result_warnings: List[str] = []
    notes: List[str] = []
    resolved = _resolve_attacks(DEFAULT_ATTACKS if attack_specs is None else attack_specs, num_classes, notes)
    if any(fn in GRADIENT_ATTACKS or callable(fn) for _, fn in resolved) and gradient_check != "off":
        for ci, (x, y) in enumerate(prepared):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    problems = check_input_gradients(model, x, y, gradient_check)
            except GradientMaskingError as exc:
                raise GradientMaskingError(f"case {ci}: {exc}") from None
            for message in problems:
                _warn(result_warnings, f"case {ci}: {message}")

    names = [name for name, _ in resolved]
    fns = {name: (_builtin(fn, settings) if isinstance(fn, str) else fn) for name, fn in resolved}
    gating = [n for n in names if n not in COMPARISON_ATTACKS]
    per_case = {n: [[None] * n_cases for _ in eps_list] for n in names}
    ran_on: Dict[str, List[List[int]]] = {n: [[] for _ in eps_list] for n in names}
    fwd = {n: 0 for n in names}
    table: Dict[str, List[float]] = {n: [] for n in names}
    robust, robust_cases, robust_fraction, examples = [], [], [], []
    total_units = max(1, len(eps_list) * len(names) * n_cases)
    unit = 0

    for ei, eps_c in enumerate(eps_abs):
        current = list(clean)
        worst_x = [x.detach().cpu().clone() for x, _ in prepared] if keep_examples else None
        eps_t = channel_tensor(eps_c, eps_c.numel(), prepared[0][0].dim() - 2, prepared[0][0].device, "eps")
        for name in names:
            comparison = name in COMPARISON_ATTACKS
            for ci, (x, y) in enumerate(prepared):
                unit += 1
                check_cancel(cancel)
                attacked = clean[ci] >= thr and (comparison or not cascade or current[ci] >= thr)
                if not attacked:
                    continue
                report(progress, (unit - 1) / total_units,
                       f"eps {eps_list[ei]:.4g}: {name} on case {ci + 1}/{n_cases}")
                out = fns[name](model, x, y, eps_c, valid_range=valid_range,
                                threshold=thr if stop_when_broken else 0.0, seed=seed + 1009 * ci, cancel=cancel)
                x_adv = out.x_adv if isinstance(out, AttackResult) else out
                if isinstance(out, AttackResult):
                    fwd[name] += out.forward_passes
                _check_admissible(name, x, x_adv.to(x.device), eps_t, low, high)
                with torch.no_grad():
                    dice = float(logits_dice(model(x_adv.to(x.device)).float(), y)[0])
                per_case[name][ei][ci] = dice
                ran_on[name][ei].append(ci)
                if not comparison and dice < current[ci]:
                    current[ci] = dice
                    if worst_x is not None:
                        worst_x[ci] = x_adv.detach().cpu().clone()
            if comparison or not cascade:
                values = [d if d is not None else clean[i] for i, d in enumerate(per_case[name][ei])]
                table[name].append(sum(min(v, clean[i]) for i, v in enumerate(values)) / n_cases)
            else:
                table[name].append(sum(current) / n_cases)
        robust.append(sum(current) / n_cases)
        robust_cases.append(list(current))
        robust_fraction.append(sum(d >= thr for d in current) / n_cases)
        if worst_x is not None:
            examples.append(worst_x)
    report(progress, 1.0, "robustness benchmark done")

    _consistency(names, per_case, ran_on, eps_list, robust, consistency_tol, result_warnings)
    auc = {n: normalised_auc(eps_list, table[n]) for n in names}
    return RobustnessResult(
        eps=eps_list, eps_scale=eps_scale, eps_abs=[[float(v) for v in e] for e in eps_abs], clean_dice=mu,
        clean_dice_per_case=clean, threshold=thr, attacks=table, robust_dice=robust,
        robust_dice_per_case=robust_cases, robust_fraction=robust_fraction, auc=auc,
        robust_auc=normalised_auc(eps_list, robust), per_case=per_case, ran_on=ran_on, forward_passes=fwd,
        mode="cascade" if cascade else "individual", num_classes=num_classes,
        settings={**settings, "preset": preset, "seed": seed, "cascade": cascade, "gating_attacks": gating,
                  "stop_when_broken": stop_when_broken, "gradient_check": gradient_check,
                  "valid_range": None if valid_range is None else [
                      [float(v) for v in torch.as_tensor(b, dtype=torch.float32).reshape(-1)] for b in valid_range]},
        warnings=result_warnings, notes=notes, examples=examples if keep_examples else None)


def _consistency(names, per_case, ran_on, eps_list, robust, tol, result_warnings) -> None:
    """Warn when a stronger attack ends above a weaker one, or robust Dice rises with eps."""
    for weak, strong in STRENGTH_PAIRS:
        if weak not in names or strong not in names:
            continue
        for ei, e in enumerate(eps_list):
            shared = sorted(set(ran_on[weak][ei]) & set(ran_on[strong][ei]))
            if not shared:
                continue
            d_weak = sum(per_case[weak][ei][i] for i in shared) / len(shared)
            d_strong = sum(per_case[strong][ei][i] for i in shared) / len(shared)
            if d_strong > d_weak + tol:
                _warn(result_warnings,
                      f"at eps {e:.4g} {strong.upper()} (Dice {d_strong:.4f}) is weaker than {weak.upper()} "
                      f"(Dice {d_weak:.4f}) on the same {len(shared)} case(s) with the same iterations and restarts: "
                      "a sign of gradient masking, too few iterations or a broken attack -- "
                      "do not trust the robust Dice")
    for ei in range(1, len(robust)):
        if robust[ei] > robust[ei - 1] + tol:
            _warn(result_warnings,
                  f"robust Dice rises from {robust[ei - 1]:.4f} at eps {eps_list[ei - 1]:.4g} to {robust[ei]:.4f} "
                  f"at eps {eps_list[ei]:.4g}: a larger budget should never help the model -- the attacks are not "
                  "converging (gradient masking or too few iterations)")
