"""Targeted Fast Adaptive Boundary attack (FAB-T, Croce & Hein 2020), adapted to segmentation.

FAB on a classifier linearises the decision function ``z_t - z_y`` of one target class at the
current iterate, projects both the iterate and the clean input onto that hyperplane (minimal
L-infinity step, inside the input box), moves to a convex combination of the two projections
(weight ``alpha <= alpha_max`` on the clean side, overshoot ``eta``), and after reaching an
adversarial point steps back towards the clean input by ``beta`` to look for a smaller one.

A segmentation model has one decision per voxel, but FAB needs one hyperplane per case.  Our
adaptation (documented, since the ROG paper found the naive per-volume FAB-T never succeeds):

* **Target per voxel**: the ``r``-th most likely wrong class of the clean prediction (r = 1: the
  second-best class where the prediction is right), r = 1..n_targets.
* **Aggregated decision function**: ``g(x) = mean_{v in S} (z_y(v) - z_t(v))`` with ``S`` the
  voxels that can change the foreground Dice -- reference or clean prediction is foreground
  (all voxels for a case with no foreground).  Background-only voxels are left out so that the
  bulk of easy background does not dilute the linearisation.  ``g = 0`` (on average the target
  class catches up with the true class over the structures) is the boundary FAB aims at.
* **Scaled norm**: with per-channel eps the step is computed in ``u = (x - x_clean) / eps``, so the
  minimal-norm projections use the eps-weighted L-infinity norm.
* **Budget-constrained iterates**: every iterate is clipped to the eps-ball (and valid range),
  so each point FAB visits is an admissible adversarial candidate; "adversarial" means Dice below
  the threshold, and the attack returns the lowest-Dice iterate.  Restarts after the first start
  at a random point at half the smallest adversarial norm found (half the ball when none).
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

from deepimaging.core.progress import CancelToken, check_cancel
from deepimaging.robustness.attacks import (AttackResult, EpsLike, RangeLike, _Best, _Problem, attack_mode,
                                            check_input_gradients, make_generator)
from deepimaging.robustness.losses import foreground_mask, logits_dice, target_classes


def project_linf_hyperplane(points: torch.Tensor, w: torch.Tensor, residual: torch.Tensor,
                            box_low: torch.Tensor, box_high: torch.Tensor) -> torch.Tensor:
    """Minimal L-infinity steps ``d`` with ``w . d = residual`` and ``points + d`` inside the box.

    All tensors are ``(N, n)`` except ``residual`` ``(N,)``; the box must contain ``points`` and may
    be infinite.  Where the hyperplane cannot be reached inside the box, the step goes as far
    towards it as the box allows.  Solved exactly: moving every coordinate by ``min(lam, room_j)``
    in the direction that helps gives a concave piecewise-linear function of ``lam``; the
    smallest ``lam`` reaching ``|residual|`` is found on the sorted rooms.
    """
    sign_r = torch.sign(residual).unsqueeze(1)
    direction = sign_r * torch.sign(w)
    weight = w.abs()
    room = torch.where(direction > 0, box_high - points, points - box_low).clamp_min(0.0)
    room = torch.where(weight > 0, room, torch.zeros_like(room))
    room_sorted, order = room.sort(dim=1)
    weight_sorted = weight.gather(1, order)
    contrib = torch.where(weight_sorted > 0, weight_sorted * room_sorted, torch.zeros_like(room_sorted))
    cum = contrib.cumsum(dim=1)
    total = weight_sorted.sum(dim=1, keepdim=True)
    suffix = (total - weight_sorted.cumsum(dim=1)).clamp_min(0.0)
    reach = cum + torch.where(suffix > 0, room_sorted * suffix, torch.zeros_like(suffix))
    goal = residual.abs().unsqueeze(1)
    reached = reach >= goal
    k = reached.float().argmax(dim=1, keepdim=True)
    cum_prev = torch.where(k > 0, cum.gather(1, (k - 1).clamp_min(0)), torch.zeros_like(goal))
    suffix_prev = torch.where(k > 0, suffix.gather(1, (k - 1).clamp_min(0)), total)
    lam = (goal - cum_prev) / suffix_prev.clamp_min(1e-30)
    finite_rooms = torch.where(torch.isfinite(room_sorted), room_sorted, torch.zeros_like(room_sorted))
    finite_max = finite_rooms.amax(dim=1, keepdim=True)
    lam = torch.where(reached.any(dim=1, keepdim=True), lam, finite_max)
    lam = torch.where((goal > 0) & (total > 0), lam, torch.zeros_like(lam))
    return direction * torch.minimum(lam, room)


def _fab_run(problem: _Problem, rows: torch.Tensor, start: torch.Tensor, goal: torch.Tensor, mask: torch.Tensor,
             steps: int, alpha_max: float, eta: float, beta: float, thr: torch.Tensor, best: _Best,
             adv_norm: torch.Tensor, cancel: Optional[CancelToken]) -> None:
    """One FAB-T run from ``start`` on the cases ``rows``; offers every iterate to ``best``."""
    x0, y, n = problem.x[rows], problem.y[rows], rows.numel()
    goal_r, mask_r = goal[rows], mask[rows].float()
    count = mask_r.reshape(n, -1).sum(dim=1).clamp_min(1.0)
    eps = problem.eps.expand_as(x0)
    eps_safe = eps.clamp_min(1e-12)
    box_low = ((problem.range_lower[rows] - x0) / eps_safe).reshape(n, -1)
    box_high = ((problem.range_upper[rows] - x0) / eps_safe).reshape(n, -1)
    box_low = torch.where(eps.reshape(n, -1) > 0, box_low, torch.zeros_like(box_low))
    box_high = torch.where(eps.reshape(n, -1) > 0, box_high, torch.zeros_like(box_high))

    def decision(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        z_y = logits.gather(1, labels.unsqueeze(1)).squeeze(1)
        z_t = logits.gather(1, goal_r.unsqueeze(1)).squeeze(1)
        return ((z_y - z_t) * mask_r).reshape(n, -1).sum(dim=1) / count

    v = start
    for it in range(steps + 1):
        check_cancel(cancel)
        if it == steps:  # only evaluate the last iterate
            best.update(v, logits_dice(problem.logits(v), y), rows)
            break
        f, grad, logits = problem.loss_grad(v, decision, y)
        dice = logits_dice(logits, y)
        best.update(v, dice, rows)
        adversarial = dice < thr[rows]
        if adversarial.any():  # record its norm, step back towards the clean input, re-linearise
            norm = ((v - x0) / eps_safe).reshape(n, -1).abs().amax(dim=1)
            adv_norm[rows[adversarial]] = torch.minimum(adv_norm[rows[adversarial]], norm[adversarial])
            shape = (-1, *([1] * (v.dim() - 1)))
            v = torch.where(adversarial.reshape(shape), x0 + beta * (v - x0), v)
            f, grad, _ = problem.loss_grad(v, decision, y)
        u = ((v - x0) / eps_safe).reshape(n, -1)
        w = (grad * eps).reshape(n, -1)
        # hyperplane (linearised at v, in u-coordinates): f + w . (u' - u) = 0
        residual_v = -f
        residual_0 = -(f - (w * u).sum(dim=1))
        d = project_linf_hyperplane(torch.cat([u, torch.zeros_like(u)]), torch.cat([w, w]),
                                    torch.cat([residual_v, residual_0]), torch.cat([box_low, box_low]),
                                    torch.cat([box_high, box_high]))
        d_v, d_0 = d[:n], d[n:]
        a_v = d_v.abs().amax(dim=1).clamp_min(1e-8)
        a_0 = d_0.abs().amax(dim=1).clamp_min(1e-8)
        alpha = (a_v / (a_v + a_0)).clamp(0.0, alpha_max).unsqueeze(1)
        u_new = (u + eta * d_v) * (1 - alpha) + (eta * d_0) * alpha
        v = problem.bound(x0 + u_new.reshape(x0.shape) * eps, rows)


def fab_t_attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: EpsLike, *, steps: int = 10,
                 restarts: int = 1, n_targets: int = 1, alpha_max: float = 0.1, eta: float = 1.05, beta: float = 0.9,
                 valid_range: Optional[RangeLike] = None, threshold: Union[float, torch.Tensor, None] = None,
                 seed: int = 0, check_gradients: str = "raise",
                 cancel: Optional[CancelToken] = None) -> AttackResult:
    """Targeted FAB (FAB-T) on a segmentation model, budget-constrained to the eps-ball.

    See the module docstring for the adaptation (per-voxel targets, decision function averaged
    over the foreground voxels).  ``n_targets`` target ranks x ``restarts`` runs, each only on
    cases whose Dice is still >= ``threshold`` (default half the clean Dice per case).
    """
    if steps < 1 or restarts < 1 or n_targets < 1:
        raise ValueError("steps, restarts and n_targets must be >= 1")
    with attack_mode(model, x.device):
        problem = _Problem(model, x, y, eps, valid_range)
        check_input_gradients(model, problem.x, problem.y, check_gradients)
        thr = problem.threshold(threshold)
        best = _Best(problem)
        gen = make_generator(seed, problem.x.device)
        mask = foreground_mask(problem.clean_logits.argmax(dim=1), problem.y)
        adv_norm = torch.full((problem.x.shape[0],), float("inf"), device=problem.x.device)
        for rank in range(1, min(n_targets, problem.num_classes - 1) + 1):
            goal = target_classes(problem.clean_logits, problem.y, rank)
            for restart in range(restarts):
                rows = (best.dice >= thr).nonzero().flatten()
                if rows.numel() == 0:
                    break
                if restart == 0:
                    start = problem.x[rows].clone()
                else:
                    start = problem.random_start(gen, rows, 0.5 * adv_norm[rows].clamp(max=1.0))
                _fab_run(problem, rows, start, goal, mask, steps, alpha_max, eta, beta, thr, best, adv_norm, cancel)
        return AttackResult("fab-t", best.x, best.dice, problem.clean_dice, best.dice < thr, problem.forward_passes)
