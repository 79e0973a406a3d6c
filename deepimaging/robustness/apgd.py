"""Auto-PGD (APGD, Croce & Hein 2020) for segmentation: L-infinity, CE / DLR / targeted losses.

The algorithm is the paper's, with the per-case loss being the per-voxel loss averaged over the
volume (:mod:`deepimaging.robustness.losses`):

* start at a uniform random point of the eps-ball; step size ``eta = 2 eps``;
* ``z = P(x_k + eta sign(grad))``, ``x_{k+1} = P(x_k + a (z - x_k) + (1 - a)(x_k - x_{k-1}))`` with
  momentum ``a = 0.75`` (``a = 1`` on the first step), ``P`` the projection onto eps-ball and valid range;
* checkpoints ``w_j = ceil(p_j N)`` with ``p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)``
  (integer intervals 0.22 N, shrinking by 0.03 N down to 0.06 N as in the reference code);
* at a checkpoint the step is halved when (1) the loss increased in at most ``rho = 75 %`` of the
  steps since the last checkpoint, or (2) the step was not halved at the last checkpoint and the
  best loss has not improved since; on halving the iterate restarts from the best-loss point
  (with the momentum reset).

Adaptation to segmentation: the returned point of a run is its lowest-*Dice* iterate (the
best-loss point is only used internally), and restarts / target classes go to the cases whose
Dice is not yet below the threshold.  Targeted variants ("ce-t", "dlr-t", i.e. APGD-T) take as
target of each voxel the ``r``-th most likely wrong class of the clean prediction, r = 1..n_targets.
"""

from __future__ import annotations

from typing import List, Optional, Union

import torch
from torch import nn

from deepimaging.core.progress import CancelToken, check_cancel
from deepimaging.robustness.attacks import (AttackResult, EpsLike, RangeLike, _Best, _loss_grad_rows, _Problem,
                                            attack_mode, check_input_gradients, make_generator)
from deepimaging.robustness.losses import (ce_loss, dlr_loss, logits_dice, require_dlr_classes, target_classes,
                                           targeted_ce_loss, targeted_dlr_loss)

APGD_LOSSES = {"ce": ("apgd-ce", ce_loss, False), "dlr": ("apgd-dlr", dlr_loss, False),
               "ce-t": ("apgd-t-ce", targeted_ce_loss, True), "dlr-t": ("apgd-t-dlr", targeted_dlr_loss, True)}


def apgd_checkpoint_intervals(steps: int) -> List[int]:
    """Lengths of the intervals between APGD's step-size checkpoints for ``steps`` iterations
    (0.22 N, then shrinking by 0.03 N per checkpoint down to 0.06 N, at least 1 each)."""
    first, shrink, minimum = max(int(0.22 * steps), 1), max(int(0.03 * steps), 1), max(int(0.06 * steps), 1)
    intervals, k, total = [], first, 0
    while total + k <= steps:
        intervals.append(k)
        total += k
        k = max(k - shrink, minimum)
    return intervals


def _apgd_run(problem: _Problem, rows: torch.Tensor, loss_fn, goal: Optional[torch.Tensor], steps: int,
              rho: float, gen: torch.Generator, best: _Best, cancel: Optional[CancelToken]) -> None:
    """One APGD run on the cases ``rows``; offers every iterate to ``best``."""
    y = problem.y[rows]
    n = rows.numel()
    shape = (n, *([1] * (problem.x.dim() - 1)))
    checkpoints = {}
    total = 0
    for length in apgd_checkpoint_intervals(steps):
        total += length
        checkpoints[total] = length

    v = problem.random_start(gen, rows)
    loss, grad, logits = _loss_grad_rows(problem, v, rows, loss_fn, goal)
    best.update(v, logits_dice(logits, y), rows)
    v_best, grad_best, loss_best = v.clone(), grad.clone(), loss.clone()
    v_prev, prev_loss = v.clone(), loss.clone()
    step = torch.full((n,), 2.0, device=v.device)
    increases = torch.zeros(n, device=v.device)
    reduced_last = torch.ones(n, dtype=torch.bool, device=v.device)
    loss_best_last = loss_best.clone()

    for i in range(steps):
        check_cancel(cancel)
        momentum = 1.0 if i == 0 else 0.75
        eta = step.reshape(shape) * problem.eps
        z = problem.bound(v + eta * grad.sign(), rows)
        v_new = problem.bound(v + momentum * (z - v) + (1.0 - momentum) * (v - v_prev), rows)
        v_prev, v = v, v_new
        loss, grad, logits = _loss_grad_rows(problem, v, rows, loss_fn, goal)
        best.update(v, logits_dice(logits, y), rows)

        increases += (loss > prev_loss).float()
        prev_loss = loss.clone()
        improved = loss > loss_best
        v_best[improved], grad_best[improved], loss_best[improved] = v[improved], grad[improved], loss[improved]

        if i + 1 in checkpoints:
            oscillating = increases <= rho * checkpoints[i + 1]
            stalled = ~reduced_last & (loss_best_last >= loss_best)
            reduce = oscillating | stalled
            if reduce.any():
                step[reduce] /= 2.0
                v[reduce], grad[reduce] = v_best[reduce], grad_best[reduce]
                v_prev[reduce], prev_loss[reduce] = v_best[reduce], loss_best[reduce]
            reduced_last, loss_best_last = reduce, loss_best.clone()
            increases.zero_()


def apgd_attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: EpsLike, *, loss: str = "ce",
                steps: int = 10, restarts: int = 1, n_targets: int = 1, rho: float = 0.75,
                valid_range: Optional[RangeLike] = None, threshold: Union[float, torch.Tensor, None] = None,
                seed: int = 0, check_gradients: str = "raise",
                cancel: Optional[CancelToken] = None) -> AttackResult:
    """APGD on a segmentation model (inputs ``(B, C, *spatial)``, labels ``(B, *spatial)``).

    ``loss``: ``"ce"`` (APGD-CE), ``"dlr"`` (APGD-DLR; needs >= 3 classes -- a 2-class model
    raises ``ValueError``, use ``"ce"`` or ``"ce-t"``), ``"ce-t"`` / ``"dlr-t"`` (APGD-T with the
    targeted cross-entropy / targeted DLR (>= 4 classes), ``n_targets`` target ranks).
    ``restarts`` random restarts per target, each only on cases whose Dice is still >= ``threshold``
    (default half the clean Dice per case).  Reproducible for a fixed ``seed``.
    """
    if loss not in APGD_LOSSES:
        raise ValueError(f"unknown APGD loss {loss!r}; choose one of {sorted(APGD_LOSSES)}")
    if steps < 1 or restarts < 1 or n_targets < 1:
        raise ValueError("steps, restarts and n_targets must be >= 1")
    name, loss_fn, targeted = APGD_LOSSES[loss]
    with attack_mode(model, x.device):
        problem = _Problem(model, x, y, eps, valid_range)
        if loss in ("dlr", "dlr-t"):  # refuses 2-class models (3-class for targeted DLR) before any work
            require_dlr_classes(problem.num_classes, targeted)
        check_input_gradients(model, problem.x, problem.y, check_gradients)
        thr = problem.threshold(threshold)
        best = _Best(problem)
        gen = make_generator(seed, problem.x.device)
        ranks = range(1, min(n_targets, problem.num_classes - 1) + 1) if targeted else [None]
        for rank in ranks:
            goal = target_classes(problem.clean_logits, problem.y, rank) if targeted else None
            for _ in range(restarts):
                rows = (best.dice >= thr).nonzero().flatten()
                if rows.numel() == 0:
                    break
                _apgd_run(problem, rows, loss_fn, goal, steps, rho, gen, best, cancel)
        return AttackResult(name, best.x, best.dice, problem.clean_dice, best.dice < thr, problem.forward_passes)
