"""Training of the learned level set (:func:`train_refiner`): Adam + cosine annealing, best.pt by
validation Dice, resume from last.pt.

Per optimizer step a batch of ROIs is drawn from the training cases: a fresh seeded corruption of
the truth (or the folder's coarse mask, half of the time when there is one), random ROI margin,
flips and axis permutations; a share ``mask_free_fraction`` (default 0.25) of the items are
**ROI mode** (no mask: a jittered true box), so one checkpoint serves both modes.  Validation:
a fixed, seeded set of items from the held-out cases (``val_fraction``; with a single case it is
also the validation case), scored by the Dice of phi_N > 0 on the grid; ``best.pt`` keeps the
best epoch.  A step whose loss or gradients are not finite is skipped (counted as
``skipped_steps`` in the history); gradients are clipped to norm ``grad_clip``.  The random stream of each epoch is seeded by (seed, epoch), so a resumed run
draws what an uninterrupted one would.
"""

from __future__ import annotations

import math
from dataclasses import fields
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ...core.checkpoint import load_checkpoint, make_header
from ...core.device import DeviceLike, seed_everything, select_device
from ...core.errors import CheckpointError, InputError
from ...core.progress import CancelToken, ProgressCallback
from ...core.training import TrainingRun
from .data import RefineSample, as_samples, make_item
from .loss import refine_loss
from .model import METHOD, DeepChanVese, RefinerConfig

TRAIN_DEFAULTS: Dict[str, Any] = {
    "batch_size": 8, "lr": 2e-3, "min_lr_ratio": 0.05, "weight_decay": 1e-5, "val_fraction": 0.2,
    "steps_per_epoch": 16, "val_items": 32, "mask_free_fraction": 0.25, "given_coarse_share": 0.5,
    "detach_phi0": False, "weight_initial": 1.0, "weight_final": 1.0, "grad_clip": 5.0, "seed": 0,
    "resume": True, "augment": True,
}


def split_options(options: Dict[str, Any], dim: int) -> Tuple[RefinerConfig, Dict[str, Any]]:
    """Separate network config keys from training keys; unknown keys are an :class:`InputError`."""
    net_keys = {f.name for f in fields(RefinerConfig)}
    unknown = set(options) - net_keys - set(TRAIN_DEFAULTS)
    if unknown:
        raise InputError(f"unknown training option(s) {sorted(unknown)}; known: {sorted(net_keys | set(TRAIN_DEFAULTS))}")
    net = {k: v for k, v in options.items() if k in net_keys and v is not None}
    net["dim"] = int(dim)
    train = dict(TRAIN_DEFAULTS)
    train.update({k: v for k, v in options.items() if k in TRAIN_DEFAULTS and v is not None})
    return RefinerConfig(**net), train


def _split(samples: List[RefineSample], fraction: float, seed: int) -> Tuple[List[RefineSample], List[RefineSample]]:
    if len(samples) < 2:
        return samples, samples
    order = np.random.default_rng(seed).permutation(len(samples))
    n_val = min(len(samples) - 1, max(1, int(round(fraction * len(samples)))))
    return [samples[i] for i in order[n_val:]], [samples[i] for i in order[:n_val]]


def _batch(samples: Sequence[RefineSample], config: RefinerConfig, rng: np.random.Generator, size: int,
           opts: Dict[str, Any], augment: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    items = [make_item(samples[int(rng.integers(len(samples)))], config, rng,
                       mask_free=bool(rng.random() < float(opts["mask_free_fraction"])),
                       given_coarse_share=float(opts["given_coarse_share"]), augment=augment) for _ in range(size)]
    return tuple(torch.from_numpy(np.stack([it[k] for it in items])) for k in range(3))  # type: ignore[return-value]


def grid_dice(phi: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-item Dice of phi > 0 against a (B, *grid) mask."""
    pred = (phi > 0).float().flatten(1)
    truth = mask.flatten(1)
    inter = (pred * truth).sum(1)
    total = pred.sum(1) + truth.sum(1)
    return torch.where(total > 0, 2 * inter / total.clamp_min(1e-9), torch.ones_like(total))


def _validate(model: DeepChanVese, batches, device: torch.device, opts: Dict[str, Any]) -> Dict[str, float]:
    model.eval()
    losses, d0, dn = [], [], []
    with torch.no_grad():
        for x, tsdf, mask in batches:
            x, tsdf, mask = x.to(device), tsdf.to(device), mask.to(device)
            out = model(x)
            losses.append(float(refine_loss(out, tsdf, mask, weight_initial=opts["weight_initial"],
                                             weight_final=opts["weight_final"])["loss"]))
            d0.append(grid_dice(out["phi0"], mask).cpu())
            dn.append(grid_dice(out["phiN"], mask).cpu())
    model.train()
    return {"val_loss": float(np.mean(losses)), "val_dice_initial": float(torch.cat(d0).mean()),
            "val_dice_final": float(torch.cat(dn).mean())}


def train_refiner(data: Union[str, Path, Sequence[RefineSample]], out_dir: Union[str, Path], *, dim: int = 2,
                  epochs: int = 30, device: DeviceLike = None, progress: Optional[ProgressCallback] = None,
                  cancel: Optional[CancelToken] = None, **config: Any) -> Path:
    """Train the deep Chan-Vese refiner; writes ``out_dir/best.pt`` and ``last.pt``; returns best.pt.

    ``data``: a folder (``images/``, ``masks/``, optional ``coarse/``) or a list of
    :class:`RefineSample`.  ``config``: network keys of :class:`RefinerConfig` (grid, steps,
    features, widths, margin, min_side, truncation) and training keys of :data:`TRAIN_DEFAULTS`
    (batch_size, lr, steps_per_epoch, mask_free_fraction, detach_phi0, weight_initial, ...).
    """
    if int(epochs) < 1:
        raise InputError(f"epochs must be >= 1, got {epochs}")
    net_config, opts = split_options(config, dim)
    samples = as_samples(data)
    for s in samples:  # fail early on a dimension mismatch
        if (s.image.shape[0] == 1) != (net_config.dim == 2):
            raise InputError(f"{s.name}: a {'single slice' if s.image.shape[0] == 1 else 'volume'} cannot train a "
                             f"{net_config.dim}D refiner; pass dim={2 if s.image.shape[0] == 1 else 3}")
    train_set, val_set = _split(samples, float(opts["val_fraction"]), int(opts["seed"]))
    dev = select_device(device)
    seed_everything(int(opts["seed"]))
    model = DeepChanVese(net_config).to(dev)
    optimizer = torch.optim.Adam(model.parameters(), lr=float(opts["lr"]), weight_decay=float(opts["weight_decay"]))
    steps = int(opts["steps_per_epoch"])
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=int(epochs) * steps,
                                                           eta_min=float(opts["lr"]) * float(opts["min_lr_ratio"]))
    training = {**{k: v for k, v in opts.items() if k != "resume"}, "epochs": int(epochs)}
    header = make_header(METHOD, net_config.to_dict(),
                         preprocessing={"intensity": "z-score within the ROI", "roi": "square/cubic mm box, see roi.py"},
                         training=training, train_cases=[s.name for s in train_set],
                         val_cases=[s.name for s in val_set])
    run = TrainingRun(Path(out_dir), header, int(epochs), progress=progress, cancel=cancel, higher_is_better=True)
    if opts["resume"] and run.last_path.is_file():
        previous = load_checkpoint(run.last_path, method=METHOD).config
        if previous != net_config.to_dict():
            raise CheckpointError(f"{run.last_path} was trained with another network config; "
                                  "use a new output folder or resume=False (--no-resume)")
        run.resume(model, optimizer, scheduler)
    val_rng = np.random.default_rng([int(opts["seed"]), 7919])
    n_val = max(1, int(opts["val_items"]))
    val_batches = [_batch(val_set, net_config, val_rng, min(int(opts["batch_size"]), n_val - i), opts, False)
                   for i in range(0, n_val, int(opts["batch_size"]))]
    model.train()
    while not run.finished:
        rng = np.random.default_rng([int(opts["seed"]), run.epoch])
        total, skipped = 0.0, 0
        for step in range(steps):
            run.check_cancel()
            x, tsdf, mask = (t.to(dev) for t in _batch(train_set, net_config, rng, int(opts["batch_size"]), opts,
                                                         bool(opts["augment"])))
            out = model(x, detach_phi0=bool(opts["detach_phi0"]))
            loss = refine_loss(out, tsdf, mask, weight_initial=float(opts["weight_initial"]),
                               weight_final=float(opts["weight_final"]))["loss"]
            optimizer.zero_grad(set_to_none=True)
            if torch.isfinite(loss):
                loss.backward()
                grads_ok = all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
                if grads_ok:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), float(opts["grad_clip"]))
                    optimizer.step()
                else:
                    skipped += 1
            else:
                skipped += 1
            scheduler.step()
            value = float(loss.detach())
            total += value if math.isfinite(value) else 0.0
            run.report_step((step + 1) / steps, f"loss {total / (step + 1):.4f}")
        metrics = {"train_loss": total / steps, "skipped_steps": skipped, **_validate(model, val_batches, dev, opts)}
        run.end_epoch(model, metrics, metrics["val_dice_final"], optimizer, scheduler)
    return run.best_path
