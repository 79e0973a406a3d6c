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
* Every optimizer step goes through :func:`train_step` (forward, float32 loss, one scaled
  backward, step), the clean loop and Free AT alike.

What an epoch is.  Here an epoch is ``steps_per_epoch`` optimizer steps (default 250) of
``batch_size`` random patches per rank, followed by validation, the lr-plateau decision and the
checkpoints; the reference code's epoch is one pass over the training cases (one patch per
case, i.e. ``ceil(train cases / (batch size x GPUs))`` steps: 16 for the 32 training cases of
the MSD spleen task at batch 2).  ``epochs`` and ``patience`` therefore count much more training
here than there (1000 epochs x 250 steps vs 1000 x 16; a 50-epoch plateau is 12,500 steps here).
To match the reference, pass ``steps_per_epoch=ceil(train_cases / (batch_size x ranks))`` (the
log and the checkpoint header's ``reference_steps_per_epoch`` give the number); the defaults are
not changed.

Free adversarial training (``free_at=True``, :mod:`deepimaging.rog.adversarial`): every
minibatch is replayed ``free_at_replays`` (m) times with a perturbation carried over between
replays and minibatches.  ``steps_per_epoch`` counts optimizer steps, i.e. *replays*: an epoch
costs the same forward/backward passes as a clean epoch and sees m times fewer distinct
minibatches, which is Shafahi et al.'s "divide the number of epochs by m" rule with the epoch
count left unchanged.  The perturbation is not stored in checkpoints: a resumed run starts it
from zero (it adapts within a few minibatches).  The paper fine-tunes clean models with Free AT: ``init_from=best.pt``
starts from a checkpoint's weights with a fresh optimizer and lr schedule (the plan must have the
same labels, channels and network; a resumed run continues from its own ``last.pt`` instead).
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from monai.losses import DiceCELoss

from deepimaging.core.checkpoint import make_header
from deepimaging.core.device import DeviceLike, autocast, seed_everything
from deepimaging.core.distributed import (DistContext, all_gather_objects, all_reduce_sum, barrier, broadcast_flag,
                                          group_initialized, init_distributed, rank_seed, shutdown,
                                          unwrap_model, wrap_model)
from deepimaging.core.errors import CheckpointError, InputError
from deepimaging.core.progress import CancelToken, Cancelled, ProgressCallback, sub_progress
from deepimaging.core.training import TrainingRun, backward_and_step, make_grad_scaler

from .adversarial import FreeAdversarialTraining
from .data import Augmentation, PatchStream, RogDataset, validation_patches
from .infer import read_rog_checkpoint
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
    reference_steps_per_epoch: int = 0  # steps of one pass over the training cases (the reference's epoch)


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


@dataclass
class StepResult:
    """What :func:`train_step` returns: the loss (a float) and, if asked, an input gradient."""

    loss: float
    grad: Optional[torch.Tensor] = None  # d loss / d ``grad_wrt`` (unscaled, float32), else None


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: Any, images: torch.Tensor,
               labels: torch.Tensor, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], *,
               amp: bool = True, grad_wrt: Optional[torch.Tensor] = None, where: str = "") -> StepResult:
    """One optimizer step on a batch: ``images`` (N, C, D, H, W), ``labels`` (N, D, H, W) class indices.

    Forward under autocast when ``amp`` (CUDA only), loss on float32 logits, then
    :func:`~deepimaging.core.training.backward_and_step` (zero grads, one backward scaled by
    ``scaler`` when fp16 needs it, step).  ``grad_wrt``, a leaf tensor that requires grad and
    feeds ``images`` (Free AT's perturbation, or ``images`` itself), gets its gradient from the
    same backward pass; it is returned unscaled (divided by the GradScaler's scale) and may be
    non-finite after an fp16 overflow (the scaler then skips the optimizer step too).  A
    non-finite loss raises ``FloatingPointError`` (``where`` says at which step).
    """
    with autocast(images.device, amp):
        logits = model(images)
    loss = loss_fn(logits.float(), labels[:, None])
    if not torch.isfinite(loss):
        raise FloatingPointError(f"training loss became {loss.item()}{where}; lower the learning rate or "
                                 "check the data")
    scale = float(scaler.get_scale()) if scaler is not None else 1.0
    backward_and_step(loss, optimizer, scaler)
    grad = None
    if grad_wrt is not None:
        if grad_wrt.grad is None:
            raise RuntimeError("grad_wrt received no gradient: pass a leaf tensor that requires grad and feeds images")
        grad = grad_wrt.grad.detach().float()
        if scale != 1.0:
            grad = grad / scale
    return StepResult(float(loss.item()), grad)


@dataclass
class InitWeights:
    """Weights to start from (``init_from``): a checkpoint's state dict and the plan it was trained under."""

    path: str
    plan: Plan
    state_dict: Dict[str, torch.Tensor]


def read_init_weights(path: PathLike) -> InitWeights:
    """Read the checkpoint to fine-tune from (weights and plan only; optimizer state is ignored)."""
    ckpt = read_rog_checkpoint(path)
    try:
        plan = Plan.from_dict(ckpt.header["preprocessing"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: the checkpoint carries no valid ROG plan ({exc})") from None
    return InitWeights(str(path), plan, ckpt.state_dict)


def check_init_plan(init: Plan, plan: Plan, source: str = "the initial checkpoint") -> None:
    """Raise :class:`CheckpointError` unless weights trained under ``init`` fit a run under ``plan``:
    same network (channels, classes, strides), label values and names, channel names and
    normalisation kinds.  Other differences (intensity statistics, spacing, patch) are logged."""
    problems = []
    if init.network_config() != plan.network_config():
        problems.append(f"network {init.network_config()} vs {plan.network_config()}")
    labels = [[(lb.value, lb.name) for lb in p.labels] for p in (init, plan)]
    if labels[0] != labels[1]:
        problems.append(f"labels {labels[0]} vs {labels[1]}")
    channels = [[(c.name, c.normalization) for c in p.channels] for p in (init, plan)]
    if channels[0] != channels[1]:
        problems.append(f"channels {channels[0]} vs {channels[1]}")
    if problems:
        raise CheckpointError(f"cannot start from {source}: it was trained under a plan with a different "
                              + "; ".join(problems) + " (checkpoint vs this run)")
    if init.to_dict() != plan.to_dict():
        log.warning("%s was trained under a plan with other intensity statistics, spacing or patch size; "
                    "its weights are used as they are", source)


def _resolve_plan(data: Any, plan: Any, out_dir: Path, resume: bool, progress: Optional[ProgressCallback],
                  init: Optional[InitWeights] = None) -> Plan:
    """The plan to train with: given, the dataset's, the resumed run's, the initial checkpoint's, or a new one."""
    previous = None
    if resume and (out_dir / "last.pt").is_file():
        header = read_rog_checkpoint(out_dir / "last.pt").header
        previous = Plan.from_dict(header["preprocessing"])
    chosen = load_plan(plan) if plan is not None else data.plan if isinstance(data, RogDataset) else previous
    if chosen is None and init is not None:
        chosen = init.plan
    if chosen is None:
        chosen = plan_dataset(data, progress=progress)
    if isinstance(data, RogDataset) and data.plan.to_dict() != chosen.to_dict():
        raise InputError("the dataset was preprocessed with a different plan than the one given")
    if previous is not None and previous.to_dict() != chosen.to_dict():
        raise CheckpointError(f"{out_dir} holds a run trained with a different plan; choose another output "
                              "folder or pass resume=False to start over")
    if init is not None:
        check_init_plan(init.plan, chosen, init.path)
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
    free_at: bool = False
    free_at_eps: float = 8 / 255   # fraction of each channel's valid range
    free_at_replays: int = 5
    init_from: Optional[str] = None


def reference_steps_per_epoch(train_cases: int, batch_size: int, world_size: int = 1) -> int:
    """Optimizer steps of one reference-code epoch (one patch per training case, spread over ranks)."""
    return max(1, math.ceil(train_cases / max(1, batch_size * world_size)))


def train_rog(data: Any, out_dir: PathLike, epochs: int = 1000, *, plan: Any = None,
              steps_per_epoch: int = 250, batch_size: Optional[int] = None, lr: float = 1e-3,
              weight_decay: float = 1e-5, patience: int = 50, moving_average: int = 5,
              val_fraction: float = 0.2, val_patches_per_case: int = 2, foreground_probability: float = 0.5,
              augmentation: Optional[Augmentation] = Augmentation(), seed: int = 0, num_workers: int = 0,
              cache_dir: Optional[PathLike] = None, resume: bool = True, amp: bool = True,
              free_at: bool = False, free_at_eps: float = 8 / 255, free_at_replays: int = 5,
              init_from: Optional[PathLike] = None, device: DeviceLike = None,
              progress: Optional[ProgressCallback] = None, cancel: Optional[CancelToken] = None) -> TrainResult:
    """Train ROG on ``data`` (a :class:`RogDataset`, an MSD folder, a ``DatasetSpec`` or (image, label)
    path pairs) into ``out_dir``; ``plan`` (a Plan, dict or plan.json) defaults to planning ``data``.

    ``epochs`` is the total: a resumed run continues from ``last.pt`` up to it; an epoch is
    ``steps_per_epoch`` optimizer steps (module docstring: how that differs from the reference).
    ``augmentation=None`` trains on plain patches.  ``free_at`` trains with Free AT
    (``free_at_eps``: fraction of each channel's valid range; ``free_at_replays``: m; every replay
    is one of the ``steps_per_epoch`` steps).  ``init_from`` (a ROG checkpoint) starts from its
    weights with a fresh optimizer and schedule; its plan is the default plan and must match the
    given one.  Returns a :class:`TrainResult` (the model included).
    """
    if epochs < 1 or steps_per_epoch < 1:
        raise InputError(f"epochs and steps_per_epoch must be >= 1, got {epochs} and {steps_per_epoch}")
    if free_at and (free_at_replays < 1 or not 0 < free_at_eps <= 1):
        raise InputError(f"Free AT needs replays >= 1 and 0 < eps <= 1 (a fraction of the valid range, 8/255 in "
                         f"the paper), got {free_at_replays} and {free_at_eps}")
    settings = TrainSettings(epochs, steps_per_epoch, batch_size, lr, weight_decay, patience, moving_average,
                             val_fraction, val_patches_per_case, foreground_probability, seed, num_workers, amp,
                             bool(free_at), float(free_at_eps), int(free_at_replays),
                             str(init_from) if init_from is not None else None)
    started = time.perf_counter()
    owns_group = not group_initialized()
    ctx = init_distributed(device)
    try:
        progress = progress if ctx.is_main else None
        out = Path(out_dir)
        init = read_init_weights(init_from) if init_from is not None else None
        chosen = _resolve_plan(data, plan, out, resume, sub_progress(progress, 0.0, 0.05), init)
        dataset = data if isinstance(data, RogDataset) else RogDataset.from_files(
            data, chosen, cache_dir, sub_progress(progress, 0.05, 0.1), cancel)
        result = _train(dataset, chosen, out, settings, augmentation, resume, ctx,
                        sub_progress(progress, 0.1, 1.0), cancel, init)
        result.seconds = time.perf_counter() - started
        return result
    finally:
        if owns_group:
            shutdown(ctx)


def _train(dataset: RogDataset, plan: Plan, out_dir: Path, cfg: TrainSettings, augmentation: Optional[Augmentation],
           resume: bool, ctx: DistContext, progress: Optional[ProgressCallback],
           cancel: Optional[CancelToken], init: Optional[InitWeights] = None) -> TrainResult:
    device = ctx.device
    train_set, val_set = dataset.split(cfg.val_fraction, cfg.seed)
    batch = int(cfg.batch_size or plan.batch_size)

    seed_everything(cfg.seed)  # identical initial weights on every rank
    model = plan.build_model().to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, amsgrad=True)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=0.5, patience=cfg.patience)
    scaler = make_grad_scaler(device) if cfg.amp else None
    free = FreeAdversarialTraining(plan, cfg.free_at_eps, cfg.free_at_replays, device) if cfg.free_at else None
    reference_steps = reference_steps_per_epoch(len(train_set), batch, ctx.world_size)
    training = {**asdict(cfg), "batch_size": batch, "augmentation": asdict(augmentation) if augmentation else None,
                "world_size": ctx.world_size, "train_cases": [c.name for c in train_set.cases],
                "val_cases": [c.name for c in val_set.cases], "reference_steps_per_epoch": reference_steps}
    if free is not None:
        training["free_at_eps_normalised"] = [float(e) for e in free.eps_abs]
    header = make_header("rog", model.config(), preprocessing=plan.to_dict(),
                         labels={str(lb.value): lb.name for lb in plan.labels}, training=training)
    run = TrainingRun(out_dir, header, cfg.epochs, ctx, higher_is_better=True, progress=progress, cancel=cancel)
    if ctx.is_main:
        (out_dir / "plan.json").write_text(json.dumps(plan.to_dict(), indent=2), encoding="utf-8")
    if resume and run.resume(model, optimizer, scheduler, scaler):
        log.info("resuming from %s at epoch %d", run.last_path, run.epoch)
    elif init is not None:
        try:
            model.load_state_dict(init.state_dict)
        except RuntimeError as exc:
            raise CheckpointError(f"the weights in {init.path} do not fit the network: {exc}") from None
        log.info("starting from the weights of %s (fresh optimizer and lr schedule)", init.path)
    log.info("an epoch is %d optimizer steps%s; one pass over the %d training cases (the reference's epoch) "
             "would be %d", cfg.steps_per_epoch, f" ({cfg.free_at_replays} Free AT replays per minibatch)"
             if free else "", len(train_set), reference_steps)
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

    def fetch() -> Tuple[torch.Tensor, torch.Tensor]:
        x, y = next(batches)
        return x.to(device, non_blocking=True), y.to(device, non_blocking=True)

    while not run.finished:
        net.train()
        total = 0.0
        for step in range(cfg.steps_per_epoch):
            if broadcast_flag(cancel is not None and cancel.cancelled, ctx):
                raise Cancelled("cancelled by the user")
            where = f" at epoch {run.epoch + 1}, step {step + 1}"
            if free is None:
                x, y = fetch()
                result = train_step(net, optimizer, scaler, x, y, loss_fn, amp=cfg.amp, where=where)
            else:
                x, y = free.next_minibatch(fetch)
                x_adv, leaf = free.perturb(x)
                result = train_step(net, optimizer, scaler, x_adv, y, loss_fn, amp=cfg.amp, grad_wrt=leaf,
                                    where=where)
                free.update(result.grad)
            total += result.loss
            run.report_step((step + 1) / cfg.steps_per_epoch, f"loss {total / (step + 1):.4f}")
        val_loss, dice = validate(net, val_patches, loss_fn, len(plan.labels), device, batch, ctx, cfg.amp)
        recent = (recent + [val_loss])[-cfg.moving_average:]
        smoothed = float(np.mean(recent))
        scheduler.step(smoothed)
        metrics = {"train_loss": total / cfg.steps_per_epoch, "val_loss": val_loss, "val_loss_avg": smoothed,
                   "lr": optimizer.param_groups[0]["lr"], "dice_mean": float(np.mean(dice))}
        metrics.update({f"dice_{lb.name}": float(d) for lb, d in zip(plan.labels[1:], dice)})
        if free is not None:
            metrics.update({"free_at_delta_ratio": free.delta_ratio(), "free_at_skipped": float(free.skipped)})
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
                       stopped_early, 0.0, digest, unwrap_model(net), reference_steps)


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
