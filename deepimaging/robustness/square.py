"""Square attack (Andriushchenko et al. 2020), L-infinity, on 2D and 3D segmentation models.

A score-based black-box random search -- it needs only the model's logits, no gradients, so it
is the attack that still works when gradients are masked:

* start from vertical stripes: each channel and each index of the last spatial axis gets a
  random ``+-eps``;
* each query overwrites one random square (2D) or cube (3D) of the perturbation with a random
  ``+-eps`` per channel (the "marginal" update at the boundary of the ball) and keeps it if it
  is better;
* the square/cube covers a fraction ``p`` of the voxels, side ``round((p * n_voxels)^(1/d))``;
  ``p`` starts at ``p_init`` and halves at iterations 10, 50, 200, 500, 1000, 2000, 4000, 6000,
  8000 of the paper's 10000-query schedule, rescaled to ``n_queries``.

"Better" for segmentation: lower hard foreground Dice first, and on equal Dice a lower mean
positive margin ``max(z_y - max_{i != y} z_i, 0)`` over the voxels that can change the Dice (the
reference or clean prediction is foreground).  On a one-voxel classifier this is exactly the
Square paper's margin loss.  Cases stop receiving queries once their Dice is below the threshold.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

from deepimaging.core.progress import CancelToken, check_cancel
from deepimaging.robustness.attacks import (AttackResult, EpsLike, RangeLike, _Best, _Problem, attack_mode,
                                            make_generator)
from deepimaging.robustness.losses import foreground_mask, logits_dice, margin

_SCHEDULE = ((10, 1), (50, 2), (200, 4), (500, 8), (1000, 16), (2000, 32), (4000, 64), (6000, 128), (8000, 256))


def square_fraction(iteration: int, n_queries: int, p_init: float = 0.8) -> float:
    """The fraction ``p`` of voxels a square/cube covers at ``iteration`` (Square paper's schedule)."""
    it = int(iteration / max(n_queries, 1) * 10000)
    divisor = 512
    for limit, div in _SCHEDULE:
        if it <= limit:
            divisor = div
            break
    return p_init / divisor


def _score(problem: _Problem, v: torch.Tensor, rows: torch.Tensor, mask: torch.Tensor):
    logits = problem.logits(v)
    y = problem.y[rows]
    m = margin(logits, y).clamp_min(0.0) * mask
    loss = m.reshape(m.shape[0], -1).sum(dim=1) / mask.reshape(mask.shape[0], -1).sum(dim=1).clamp_min(1.0)
    return logits_dice(logits, y), loss


def _cube_mask(starts: torch.Tensor, side: int, spatial, device) -> torch.Tensor:
    """Boolean ``(n, 1, *spatial)``: for each row the cube of ``side`` starting at ``starts[row]``."""
    n = starts.shape[0]
    mask = torch.ones((n, *([1] * len(spatial))), dtype=torch.bool, device=device)
    for axis, size in enumerate(spatial):
        idx = torch.arange(size, device=device)
        inside = (idx >= starts[:, axis:axis + 1]) & (idx < starts[:, axis:axis + 1] + side)
        shape = [n] + [1] * len(spatial)
        shape[axis + 1] = size
        mask = mask & inside.reshape(shape)
    return mask.unsqueeze(1)


def _random_signs(shape, gen: torch.Generator, device) -> torch.Tensor:
    return torch.randint(0, 2, shape, generator=gen, device=device).float() * 2 - 1


def _square_run(problem: _Problem, rows: torch.Tensor, n_queries: int, p_init: float, thr: torch.Tensor,
                fg: torch.Tensor, gen: torch.Generator, best: _Best, cancel: Optional[CancelToken]) -> None:
    x0 = problem.x[rows]
    n, channels, spatial = x0.shape[0], x0.shape[1], tuple(x0.shape[2:])
    n_voxels = 1
    for size in spatial:
        n_voxels *= size
    device = x0.device
    stripes = _random_signs((n, channels, *([1] * (len(spatial) - 1)), spatial[-1]), gen, device)
    state = problem.bound(x0 + problem.eps * stripes, rows)
    dice, loss = _score(problem, state, rows, fg[rows])
    best.update(state, dice, rows)
    for i in range(n_queries):
        check_cancel(cancel)
        active = (dice >= thr[rows]).nonzero().flatten()
        if active.numel() == 0:
            break
        sub = rows[active]
        p = square_fraction(i, n_queries, p_init)
        side = max(1, min(int(round((p * n_voxels) ** (1.0 / len(spatial)))), min(spatial)))
        high = torch.tensor([size - side + 1 for size in spatial], device=device)
        starts = (torch.rand((active.numel(), len(spatial)), generator=gen, device=device) * high).long()
        cube = _cube_mask(starts, side, spatial, device)
        signs = _random_signs((active.numel(), channels, *([1] * len(spatial))), gen, device)
        candidate = torch.where(cube, x0[active] + problem.eps * signs, state[active])
        candidate = problem.bound(candidate, sub)
        new_dice, new_loss = _score(problem, candidate, sub, fg[sub])
        better = (new_dice < dice[active]) | ((new_dice == dice[active]) & (new_loss < loss[active]))
        if better.any():
            idx = active[better]
            state[idx], dice[idx], loss[idx] = candidate[better], new_dice[better], new_loss[better]
            best.update(candidate[better], new_dice[better], sub[better])


def square_attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: EpsLike, *, n_queries: int = 500,
                  restarts: int = 1, p_init: float = 0.8, valid_range: Optional[RangeLike] = None,
                  threshold: Union[float, torch.Tensor, None] = None, seed: int = 0,
                  cancel: Optional[CancelToken] = None) -> AttackResult:
    """Square attack (L-infinity) with ``n_queries`` queries per restart (plus one for the start).

    Inputs ``(B, C, H, W)`` use squares, ``(B, C, D, H, W)`` cubes.  No gradients are used, so no
    gradient check is made.  Reproducible for a fixed ``seed``.
    """
    if n_queries < 1 or restarts < 1:
        raise ValueError("n_queries and restarts must be >= 1")
    if not 0 < p_init <= 1:
        raise ValueError("p_init must be in (0, 1]")
    with attack_mode(model, x.device):
        problem = _Problem(model, x, y, eps, valid_range)
        thr = problem.threshold(threshold)
        best = _Best(problem)
        gen = make_generator(seed, problem.x.device)
        fg = foreground_mask(problem.clean_logits.argmax(dim=1), problem.y).float()
        for _ in range(restarts):
            rows = (best.dice >= thr).nonzero().flatten()
            if rows.numel() == 0:
                break
            _square_run(problem, rows, n_queries, p_init, thr, fg, gen, best, cancel)
        return AttackResult("square", best.x, best.dice, problem.clean_dice, best.dice < thr, problem.forward_passes)
