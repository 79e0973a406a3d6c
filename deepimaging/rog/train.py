"""ROG training: Dice + cross-entropy on foreground-biased augmented patches, as in the paper.

One function, :func:`train_rog`, serves the CLI, Slicer's background process and torchrun:

* Adam (amsgrad) lr 1e-3, weight decay 1e-5; the lr halves when the moving average (5 epochs)
  of the validation loss has not improved for ``patience`` epochs, and training stops early
  once it has been halved four times (the reference implementation's rule).
* Loss: MONAI ``DiceCELoss`` (soft Dice over the foreground classes + CE, weight 1 each; Dice
  over the whole batch, so a patch without foreground does not produce a degenerate term).
* Validation: fixed un-augmented patches of held-out cases (one centred on foreground per case,
  the rest random) - cheap enough for every epoch; Dice per label from summed TP/FP/FN.
* Checkpoints through :class:`~deepimaging.core.training.TrainingRun`: ``best.pt`` (by mean
  validation Dice) and ``last.pt`` (with optimizer/scheduler state for resuming) in ``out_dir``,
  whose header carries the plan, so a checkpoint alone is enough for inference.
* Mixed precision on CUDA (bf16, or fp16 with a GradScaler).  Under ``torchrun`` every rank
  samples its own patches (``rank_seed``), DDP averages the gradients, validation is sharded
  and all-reduced so every rank takes the same lr decisions, and only rank 0 writes.  At the
  end the ranks compare weight checksums (``ddp_ranks.json``) - a cheap proof they agree.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from monai.losses import DiceCELoss

from deepimaging.core.checkpoint import load_checkpoint, make_header
from deepimaging.core.device import DeviceLike, autocast, seed_everything
from deepimaging.core.distributed import (DistContext, all_gather_objects, all_reduce_sum, barrier, broadcast_flag,
                                          group_initialized, init_distributed, rank_seed, shutdown,
                                          unwrap_model, wrap_model)
from deepimaging.core.errors import CheckpointError, InputError
from deepimaging.core.progress import CancelToken, Cancelled, ProgressCallback, sub_progress
from deepimaging.core.training import TrainingRun, backward_and_step, make_grad_scaler

from .data import Augmentation, PatchStream, RogDataset, validation_patches
from .plan import Plan, plan_dataset

log = logging.getLogger(__name__)
PathLike = Union[str, Path]


@dataclass
class TrainResult:
    """What a training run produced (paths are meaningful on rank 0)."""

    out_dir: Path
    best_path: Path
    last_path: Path
    plan: Plan
    history: List[Dict[str, float]]
    epochs_completed: int
    best_dice: Optional[float]
    stopped_early: bool
    seconds: float
    weights_sha256: str = ""
    model: Optional[torch.nn.Module] = field(default=None, repr=False)


def load_plan(plan: Union[Plan, PathLike, Dict[str, Any]]) -> Plan:
    """A :class:`Plan` from itself, its dict, or a ``plan.json`` path."""
    if isinstance(plan, Plan):
        return plan
    if isinstance(plan, dict):
        return Plan.from_dict(plan)
    path = Path(plan)
    if not path.is_file():
        raise InputError(f"plan file not found: {path}")
    try:
        return Plan.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise InputError(f"{path} is not a ROG plan: {exc}") from exc


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 over the state dict (names and exact bytes): equal iff the weights are identical."""
    h = hashlib.sha256()
    for name, tensor in unwrap_model(model).state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def validate(model: torch.nn.Module, patches: Sequence[Tuple[np.ndarray, np.ndarray]], loss_fn: DiceCELoss,
             num_classes: int, device: torch.device, batch_size: int, ctx: DistContext,
             amp: bool = True) -> Tuple[float, np.ndarray]:
    """(mean loss, Dice per class 1..K-1) over ``patches``, sharded over ranks and summed."""
    net = unwrap_model(model)
    net.eval()
    mine = list(patches)[ctx.rank::ctx.world_size]
    sums = torch.zeros(2 + 3 * num_classes, dtype=torch.float64)  # loss*n, n, then TP/FP/FN per class
    with torch.no_grad():
        for i in range(0, len(mine), batch_size):
            x = torch.from_numpy(np.stack([p[0] for p in mine[i:i + batch_size]])).to(device)
            y = torch.from_numpy(np.stack([p[1] for p in mine[i:i + batch_size]])).to(device)
            with autocast(device, amp):
                logits = net(x)
            logits = logits.float()
            sums[0] += float(loss_fn(logits, y[:, None])) * len(x)
            sums[1] += len(x)
            pred = logits.argmax(1)
            for k in range(num_classes):
                p, t = pred == k, y == k
                sums[2 + 3 * k] += float((p & t).sum())
                sums[3 + 3 * k] += float((p & ~t).sum())
                sums[4 + 3 * k] += float((~p & t).sum())
    net.train()
    sums = all_reduce_sum(sums, ctx)
    tp, fp, fn = (sums[2 + i::3].numpy() for i in range(3))
    denominator = 2 * tp + fp + fn
    dice = np.where(denominator > 0, 2 * tp / np.maximum(denominator, 1), 1.0)
    return float(sums[0] / max(float(sums[1]), 1.0)), dice[1:]


def _resolve_plan(data: Any, plan: Any, out_dir: Path, resume: bool,
                  progress: Optional[ProgressCallback]) -> Plan:
    """The plan to train with: given, the dataset's, the resumed run's, or a fresh one."""
    previous = None
    if resume and (out_dir / "last.pt").is_file():
        header = load_checkpoint(out_dir / "last.pt", method="rog").header
        previous = Plan.from_dict(header["preprocessing"])
    chosen = load_plan(plan) if plan is not None else data.plan if isinstance(data, RogDataset) else previous
    if chosen is None:
        chosen = plan_dataset(data, progress=progress)
    if isinstance(data, RogDataset) and data.plan.to_dict() != chosen.to_dict():
        raise InputError("the dataset was preprocessed with a different plan than the one given")
    if previous is not None and previous.to_dict() != chosen.to_dict():
        raise CheckpointError(f"{out_dir} holds a run trained with a different plan; choose another output "
                              "folder or pass resume=False to start over")
    return chosen


@dataclass
class TrainSettings:
    """Optimisation settings of one run; stored (JSON) in the checkpoint header as "training"."""

    epochs: int
    steps_per_epoch: int
    batch_size: Optional[int]
    lr: float
    weight_decay: float
    patience: int
    moving_average: int
    val_fraction: float
    val_patches_per_case: int
    foreground_probability: float
    seed: int
    num_workers: int
    amp: bool


def train_rog(data: Any, out_dir: PathLike, epochs: int = 1000, *, plan: Any = None,
              steps_per_epoch: int = 250, batch_size: Optional[int] = None, lr: float = 1e-3,
              weight_decay: float = 1e-5, patience: int = 50, moving_average: int = 5,
              val_fraction: float = 0.2, val_patches_per_case: int = 2, foreground_probability: float = 0.5,
              augmentation: Optional[Augmentation] = Augmentation(), seed: int = 0, num_workers: int = 0,
              cache_dir: Optional[PathLike] = None, resume: bool = True, amp: bool = True,
              device: DeviceLike = None, progress: Optional[ProgressCallback] = None,
              cancel: Optional[CancelToken] = None) -> TrainResult:
    """Train ROG on ``data`` (a :class:`RogDataset`, an MSD folder, a ``DatasetSpec`` or (image, label)
    path pairs) into ``out_dir``; ``plan`` (a Plan, dict or plan.json) defaults to planning ``data``.

    ``epochs`` is the total: a resumed run continues from ``last.pt`` up to it.  ``augmentation=None``
    trains on plain patches.  Returns a :class:`TrainResult` (the model included).
    """
    if epochs < 1 or steps_per_epoch < 1:
        raise InputError(f"epochs and steps_per_epoch must be >= 1, got {epochs} and {steps_per_epoch}")
    settings = TrainSettings(epochs, steps_per_epoch, batch_size, lr, weight_decay, patience, moving_average,
                             val_fraction, val_patches_per_case, foreground_probability, seed, num_workers, amp)
    started = time.perf_counter()
    owns_group = not group_initialized()
    ctx = init_distributed(device)
    try:
        progress = progress if ctx.is_main else None
        out = Path(out_dir)
        chosen = _resolve_plan(data, plan, out, resume, sub_progress(progress, 0.0, 0.05))
        dataset = data if isinstance(data, RogDataset) else RogDataset.from_files(
            data, chosen, cache_dir, sub_progress(progress, 0.05, 0.1), cancel)
        result = _train(dataset, chosen, out, settings, augmentation, resume, ctx,
                        sub_progress(progress, 0.1, 1.0), cancel)
        result.seconds = time.perf_counter() - started
        return result
    finally:
        if owns_group:
            shutdown(ctx)


def _train(dataset: RogDataset, plan: Plan, out_dir: Path, cfg: TrainSettings, augmentation: Optional[Augmentation],
           resume: bool, ctx: DistContext, progress: Optional[ProgressCallback],
           cancel: Optional[CancelToken]) -> TrainResult:
    device = ctx.device
    train_set, val_set = dataset.split(cfg.val_fraction, cfg.seed)
    batch = int(cfg.batch_size or plan.batch_size)

    seed_everything(cfg.seed)  # identical initial weights on every rank
    model = plan.build_model().to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, amsgrad=True)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=0.5, patience=cfg.patience)
    scaler = make_grad_scaler(device) if cfg.amp else None
    training = {**asdict(cfg), "batch_size": batch, "augmentation": asdict(augmentation) if augmentation else None,
                "world_size": ctx.world_size, "train_cases": [c.name for c in train_set.cases],
                "val_cases": [c.name for c in val_set.cases]}
    header = make_header("rog", model.config(), preprocessing=plan.to_dict(),
                         labels={str(lb.value): lb.name for lb in plan.labels}, training=training)
    run = TrainingRun(out_dir, header, cfg.epochs, ctx, higher_is_better=True, progress=progress, cancel=cancel)
    if ctx.is_main:
        (out_dir / "plan.json").write_text(json.dumps(plan.to_dict(), indent=2), encoding="utf-8")
    if resume and run.resume(model, optimizer, scheduler, scaler):
        log.info("resuming from %s at epoch %d", run.last_path, run.epoch)
    net = wrap_model(model, ctx)

    stream = PatchStream(train_set, plan.patch_size, cfg.foreground_probability, augmentation,
                         seed=rank_seed(cfg.seed + 7919 * run.epoch, ctx))  # fresh patches after a resume
    loader = torch.utils.data.DataLoader(stream, batch_size=batch, num_workers=cfg.num_workers,
                                         pin_memory=device.type == "cuda")
    val_patches = validation_patches(val_set, cfg.val_patches_per_case, plan.patch_size, cfg.seed)
    loss_fn = DiceCELoss(include_background=False, to_onehot_y=True, softmax=True, batch=True)
    recent = [h["val_loss"] for h in run.history if "val_loss" in h][-cfg.moving_average:]
    stopped_early = False
    batches = iter(loader)
    while not run.finished:
        net.train()
        total = 0.0
        for step in range(cfg.steps_per_epoch):
            if broadcast_flag(cancel is not None and cancel.cancelled, ctx):
                raise Cancelled("cancelled by the user")
            x, y = next(batches)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with autocast(device, cfg.amp):
                logits = net(x)
            loss = loss_fn(logits.float(), y[:, None])
            if not torch.isfinite(loss):
                raise FloatingPointError(f"training loss became {loss.item()} at epoch {run.epoch + 1}, step "
                                         f"{step + 1}; lower the learning rate or check the data")
            backward_and_step(loss, optimizer, scaler)
            total += loss.item()
            run.report_step((step + 1) / cfg.steps_per_epoch, f"loss {total / (step + 1):.4f}")
        val_loss, dice = validate(net, val_patches, loss_fn, len(plan.labels), device, batch, ctx, cfg.amp)
        recent = (recent + [val_loss])[-cfg.moving_average:]
        smoothed = float(np.mean(recent))
        scheduler.step(smoothed)
        metrics = {"train_loss": total / cfg.steps_per_epoch, "val_loss": val_loss, "val_loss_avg": smoothed,
                   "lr": optimizer.param_groups[0]["lr"], "dice_mean": float(np.mean(dice))}
        metrics.update({f"dice_{lb.name}": float(d) for lb, d in zip(plan.labels[1:], dice)})
        run.end_epoch(net, metrics, metrics["dice_mean"], optimizer, scheduler, scaler)
        if ctx.is_main:
            _append_log(out_dir / "training_log.csv", run.history[-1])
            log.info("epoch %d/%d %s", run.epoch, cfg.epochs, " ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
        if optimizer.param_groups[0]["lr"] < cfg.lr / 2 ** 4 * (1 + 1e-6):
            stopped_early = not run.finished
            log.info("stopping: the learning rate has been halved four times")
            break
    digest = _check_ranks_agree(net, ctx, out_dir)
    return TrainResult(out_dir, run.best_path, run.last_path, plan, run.history, run.epoch, run.best_metric,
                       stopped_early, 0.0, digest, unwrap_model(net))


def _append_log(path: Path, row: Dict[str, float]) -> None:
    """One CSV line per epoch (the header once), readable while training runs."""
    new = not path.is_file()
    with path.open("a", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)


def _check_ranks_agree(model: torch.nn.Module, ctx: DistContext, out_dir: Path) -> str:
    """Weights checksum; under DDP every rank's is gathered, written by rank 0 and must agree."""
    digest = weights_digest(model)
    if not ctx.distributed:
        return digest
    barrier(ctx)
    digests = all_gather_objects(digest, ctx)
    if ctx.is_main:
        (out_dir / "ddp_ranks.json").write_text(json.dumps({"world_size": ctx.world_size, "sha256": digests},
                                                           indent=2), encoding="utf-8")
    if len(set(digests)) != 1:
        raise RuntimeError(f"DDP ranks ended with different weights: {digests}")
    return digest
