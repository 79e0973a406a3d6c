"""GLS training: the thesis' three stages for ``gls``, and the baselines on the same budget.

:func:`train_gls` trains any architecture of :data:`~deepimaging.gls.infer.ARCHS` into
``out_dir`` (``best.pt``, ``last.pt``, ``training_log.csv``); the CLI, Slicer's background
process and :func:`~deepimaging.gls.compare.compare_archs` all call it.

Stages of ``arch="gls"`` (thesis 2.3); the epochs are split ``stage_split`` = 50/25/25 %:

1. **global + keypoint network**: mask BCE + ``heatmap_weight`` x heatmap loss.  The heatmap loss
   is the BCE between the keypoint decoder's logits and Gaussian heatmaps (sigma ``sigma`` px on
   the network grid, default ``max(2, min(H, W) / 64)``, peak 1) at the annotated keypoints
   (``heatmap_loss="mse"``: squared error of the sigmoid).  Then the global network is frozen.
2. **local U-Net** on crops centred at the *predicted* keypoints (argmax of the frozen keypoint
   decoder on the augmented image); the mask is cropped at the same windows; BCE.  The local
   U-Net has the global branch's layers and starts from its trained weights (``local_init``;
   the thesis does not say; "random" keeps the fresh init).
3. **everything unfrozen**, fine-tuned through the fusion network: BCE of the fused output plus
   ``aux_weight`` (0.5) x (global mask BCE + heatmap loss), auxiliary terms that keep the shared
   encoder serving the keypoint decoder (its argmax gets no gradient through the crops);
   ``aux_weight=0`` is the literal thesis.  The new fusion net learns at ``fusion_lr_ratio`` (5)
   x lr, the pretrained parts at ``finetune_lr_ratio`` (0.1) x lr and only after the first
   ``fusion_warmup`` (half) of the stage: a random fusion otherwise pushes noise into them
   (measured, synthetic 96 px, 200 steps, 3 seeds: fused Dice 0.86-0.89 this way, 0.50-0.87
   with the fusion at lr and a 30 % warm-up).

Optimiser: Adam per stage, cosine annealing per step from the start lr to ``min_lr_ratio`` x it.
The thesis: 5e-5 annealed over 500 epochs; the default here, lr 1e-3, suits runs of tens of
epochs on a CPU (pass ``lr=5e-5, epochs=500`` for the thesis' schedule).

Budget: an epoch is ``steps_per_epoch`` optimizer steps (default one pass, ``ceil(n_train /
batch_size)``) of ``batch_size`` samples, so every architecture gets ``epochs x steps_per_epoch``
steps.  Baselines (``unet``, ``unetpp``, ``cenet``): mask BCE, one Adam + cosine over the budget;
``global``: stage 1 for the whole budget.  Samples without keypoints (empty masks) count for the
mask losses only; stage 2 draws its batches from the samples with keypoints.

Init: GLS's own networks use Kaiming-normal convs (:func:`init_weights`); the baselines keep their
implementations' defaults.  Augmentation (:class:`Augmentation`): random gamma, contrast,
brightness and small shifts (mask and keypoints moved alike); **no flips**, which would swap
the left/right iris-tail keypoints and mirror an echo's anatomy.

Checkpoints (:class:`~deepimaging.core.training.TrainingRun`, method ``"gls"``): one file holds
every part and the training state; the stage of an epoch follows from the epoch and the split
(``stage`` in the history, ``stage_reached`` in the header), so a resumed run continues
mid-stage with that stage's optimizer state.  ``best.pt`` is the epoch with the best validation
Dice of the final output: for ``gls`` the fused output of stage 3; before stage 3 it holds the
best global-branch epoch, so an interrupted run leaves a usable model (segmenting with the
global branch).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from deepimaging.core.checkpoint import make_header
from deepimaging.core.device import DeviceLike, autocast, seed_everything, select_device
from deepimaging.core.errors import CheckpointError, InputError
from deepimaging.core.progress import CancelToken, ProgressCallback
from deepimaging.core.training import TrainingRun, backward_and_step, make_grad_scaler

from .crops import extract_crops, heatmap_argmax
from .infer import KEYPOINT_ARCHS, SIZE_DIVISORS, build_network, check_arch, read_gls_checkpoint, validate_arrays
from .keypoints import KEYPOINT_RULES, gaussian_heatmaps_torch
from .model import DEFAULT_WIDTHS, GLSNet
from .trainingdata import (Augmentation, DataLike, TrainingArrays, as_samples, prepare_arrays,
                           split_indices)

log = logging.getLogger(__name__)
STAGE_SPLIT = (0.5, 0.25, 0.25)
KEYPOINT_NAMES = {"iris-tails": ("left tail", "right tail"), "extremes-x": ("left end", "right end"),
                  "lv-apex": ("LV apex",)}
HEATMAP_PRIOR_BIAS = -4.0  # sigmoid(-4) = 0.018: heatmaps start near their zero background
TUNABLE = ("heatmap_loss", "heatmap_weight", "aux_weight", "local_init", "fusion_lr_ratio", "finetune_lr_ratio",
           "fusion_warmup", "min_lr_ratio")  # GLSTrainConfig fields train_gls takes as keyword options


def stage_epochs(epochs: int, split: Sequence[float] = STAGE_SPLIT) -> Tuple[int, int, int]:
    """Epochs of stages 1, 2, 3 for a total of ``epochs`` (each >= 1; rounding goes to stage 3)."""
    if len(split) != 3 or min(split) <= 0:
        raise InputError(f"stage_split needs three positive shares, got {tuple(split)}")
    if epochs < 3:
        raise InputError(f"GLS trains in three stages and needs at least 3 epochs, got {epochs}")
    e1 = min(epochs - 2, max(1, int(round(epochs * split[0] / sum(split)))))
    e2 = min(epochs - e1 - 1, max(1, int(round(epochs * split[1] / sum(split)))))
    return e1, e2, epochs - e1 - e2


@dataclass
class GLSTrainConfig:
    """Every optimisation setting of a run; stored (JSON) in the checkpoint header as ``training``."""

    arch: str
    epochs: int
    steps_per_epoch: int
    batch_size: int
    lr: float
    stage_epochs: Tuple[int, int, int]
    sigma_px: float
    heatmap_loss: str = "bce"
    heatmap_weight: float = 1.0
    aux_weight: float = 0.5
    local_init: str = "global"
    fusion_lr_ratio: float = 5.0
    finetune_lr_ratio: float = 0.1
    fusion_warmup: float = 0.5
    min_lr_ratio: float = 0.01
    seed: int = 0
    val_fraction: float = 0.2
    augmentation: Optional[Augmentation] = None
    amp: bool = True
    train_names: List[str] = field(default_factory=list)
    val_names: List[str] = field(default_factory=list)

    def stage_of(self, epoch: int) -> int:
        """Stage (1-3) of 0-based ``epoch``; 1 for ``global``, 0 for the plain baselines."""
        if self.arch != "gls":
            return 1 if self.arch == "global" else 0
        e1, e2, _ = self.stage_epochs
        return 1 if epoch < e1 else 2 if epoch < e1 + e2 else 3

    def to_header(self) -> Dict[str, Any]:
        """JSON-able form (tuples become lists, as a stored header has them)."""
        return json.loads(json.dumps({**asdict(self), "optimizer": "adam, cosine annealing per stage and step"}))


@dataclass
class GLSTrainResult:
    """What :func:`train_gls` produced."""

    out_dir: Path
    best_path: Path
    last_path: Path
    arch: str
    history: List[Dict[str, float]]
    epochs_completed: int
    stage_reached: Optional[int]
    best_dice: Optional[float]
    seconds: float
    steps_per_epoch: int
    train_names: List[str]
    val_names: List[str]
    model: Optional[nn.Module] = field(default=None, repr=False)


def train_gls(data: DataLike, out_dir: Union[str, Path], arch: str = "gls", epochs: int = 100,
              size: Sequence[int] = (256, 256), keypoints: int = 2, crop_size: int = 96, batch_size: int = 4,
              lr: float = 1e-3, sigma: Optional[float] = None, val_fraction: float = 0.2, seed: int = 0,
              device: DeviceLike = None, resume: bool = True, progress: Optional[ProgressCallback] = None,
              cancel: Optional[CancelToken] = None, *, keypoint_rule: str = "iris-tails",
              widths: Sequence[int] = DEFAULT_WIDTHS, steps_per_epoch: Optional[int] = None,
              stage_split: Sequence[float] = STAGE_SPLIT, augmentation: Optional[Augmentation] = Augmentation(),
              amp: bool = True, **options: Any) -> GLSTrainResult:
    """Train ``arch`` on ``data`` into ``out_dir`` (module docstring: stages, losses, budget).

    ``data``: a folder (``images/``, ``masks/``, optional ``keypoints.csv``), a list of
    :class:`~deepimaging.gls.data.Sample` (e.g. from ``load_camus``) or ``(images, masks[,
    keypoints])`` arrays.  ``size`` (H, W) is the network grid, ``crop_size`` the GLS crop on it,
    ``keypoints`` K.  ``epochs`` is the total (a resumed run continues from ``last.pt`` up to it).
    ``options``: the other fields of :class:`GLSTrainConfig` (``heatmap_loss``, ``aux_weight`` ...).
    """
    started = time.perf_counter()
    arch = check_arch(arch)
    size, crop, k = (int(size[0]), int(size[1])), (int(crop_size), int(crop_size)), int(keypoints)
    unknown = set(options) - set(TUNABLE)
    if unknown:
        raise TypeError(f"train_gls got unknown option(s) {sorted(unknown)}")
    _check_inputs(arch, epochs, size, crop, k, keypoint_rule, batch_size, lr, steps_per_epoch, options)
    k_data = k if arch in KEYPOINT_ARCHS else 0
    arrays = prepare_arrays(as_samples(data, k_data, keypoint_rule), size, k_data)
    small = [(n, s) for n, s in zip(arrays.names, arrays.source_shapes) if s[0] < crop[0] or s[1] < crop[1]]
    if arch == "gls" and small:
        raise InputError(f"image {small[0][0]!r} is {small[0][1][1]}x{small[0][1][0]} pixels, smaller than the "
                         f"{crop[1]}x{crop[0]} local crop; GLS needs images of at least {crop[1]}x{crop[0]} pixels "
                         "(or a smaller crop size)")
    train_idx, val_idx = split_indices(len(arrays.names), val_fraction, seed)
    train, val = arrays.subset(train_idx), arrays.subset(val_idx)
    if arch in KEYPOINT_ARCHS and not train.has_keypoints.any():
        raise InputError("no training sample has keypoints (every mask is empty); the keypoint decoder cannot learn")
    cfg = GLSTrainConfig(arch, int(epochs), int(steps_per_epoch or math.ceil(len(train.names) / batch_size)),
                         int(batch_size), float(lr), stage_epochs(epochs, stage_split) if arch == "gls" else
                         (int(epochs), 0, 0), float(sigma) if sigma is not None else max(2.0, min(size) / 64.0),
                         seed=int(seed), val_fraction=float(val_fraction), augmentation=augmentation, amp=amp,
                         train_names=train.names, val_names=val.names, **options)
    dev = select_device(device)
    seed_everything(seed)
    if arch == "gls":
        model: nn.Module = GLSNet(keypoints=k, crop_size=crop, widths=tuple(widths))
        config = model.config()
    else:
        config = {"in_channels": 1, "widths": [int(w) for w in widths],
                  **({"keypoints": k} if arch == "global" else {"width_scale": 1.0})}
        model = build_network(arch, config)
    if arch in KEYPOINT_ARCHS:
        init_weights(model)
    model = model.to(dev)
    header = make_header("gls", config, preprocessing={"size": list(size), "normalisation": "minmax",
                                                       "resize": "linear (scipy.ndimage.zoom, pixel-area grid)",
                                                       "in_channels": 1},
                         labels={"1": "foreground"}, arch=arch, training=cfg.to_header(), stage_reached=None,
                         keypoint_rule=keypoint_rule if arch in KEYPOINT_ARCHS else None,
                         keypoint_names=list(KEYPOINT_NAMES.get(keypoint_rule, ())) if arch in KEYPOINT_ARCHS
                         and len(KEYPOINT_NAMES.get(keypoint_rule, ())) == k else None,
                         keypoint_source="keypoints.csv where listed, else derived from the mask by the rule")
    out = Path(out_dir)
    if resume and (out / "last.pt").is_file():
        previous = read_gls_checkpoint(out / "last.pt").header.get("training", {})
        differ = sorted(key for key in set(previous) | set(header["training"])
                        if previous.get(key) != header["training"].get(key))
        if differ:
            raise CheckpointError(f"{out} holds a run with other settings or data ({', '.join(differ)}); choose "
                                  "another output folder or start over (resume=False / --no-resume)")
    run = TrainingRun(out, header, int(epochs), higher_is_better=True, progress=progress, cancel=cancel)
    state: Dict[str, Any] = {}
    if resume and run.resume(model):
        log.info("resuming from %s after epoch %d", run.last_path, run.epoch)
        state = read_gls_checkpoint(run.last_path).training_state
        if run.history and "stage" in run.history[-1]:
            run.header["stage_reached"] = int(run.history[-1]["stage"])
    elif (out / "training_log.csv").is_file():
        (out / "training_log.csv").unlink()  # a fresh run starts a fresh log
    _loop(run, model, cfg, train, val, dev, state)
    return GLSTrainResult(out, run.best_path, run.last_path, arch, run.history, run.epoch,
                          run.header.get("stage_reached"), run.best_metric, time.perf_counter() - started,
                          cfg.steps_per_epoch, train.names, val.names, model)


def _check_inputs(arch: str, epochs: int, size: Tuple[int, int], crop: Tuple[int, int], k: int, rule: str,
                  batch_size: int, lr: float, steps: Optional[int], options: Dict[str, Any]) -> None:
    if int(epochs) < 1 or int(batch_size) < 1 or (steps is not None and int(steps) < 1) or not lr > 0:
        raise InputError(f"epochs, batch size and steps per epoch must be >= 1 and lr > 0; got {epochs}, "
                         f"{batch_size}, {steps}, {lr}")
    d = SIZE_DIVISORS[arch]
    if size[0] % d or size[1] % d or min(size) < d:
        up = [max(d, -(-s // d) * d) for s in size]
        raise InputError(f"size {size[0]}x{size[1]} (H x W) must be a positive multiple of {d} for arch {arch!r}, "
                         f"e.g. {up[0]}x{up[1]}")
    if arch == "gls" and (crop[0] > min(size) or crop[0] < 8):
        raise InputError(f"crop size {crop[0]} must be at least 8 and at most the network size {size[0]}x{size[1]}; "
                         f"use a crop size <= {min(size)} or a size of at least {crop[0]}x{crop[1]}")
    if arch in KEYPOINT_ARCHS and k < 1:
        raise InputError(f"arch {arch!r} predicts keypoints and needs keypoints >= 1, got {k}")
    if rule not in KEYPOINT_RULES:
        raise InputError(f"unknown keypoint rule {rule!r}; choose one of {', '.join(KEYPOINT_RULES)}")
    if options.get("heatmap_loss", "bce") not in ("bce", "mse") or options.get("local_init", "global") not in (
            "global", "random"):
        raise InputError("heatmap_loss must be 'bce' or 'mse' and local_init 'global' or 'random'")


def init_weights(model: nn.Module) -> None:
    """Kaiming-normal convs (fan_out, ReLU) and zero biases for GLS's own networks; the keypoint
    head keeps PyTorch's default weights and starts with bias -4 (sigmoid 0.018, the heatmaps'
    background: the prior init of Lin et al. 2017).

    Measured reason: with PyTorch's default init the two-conv decoders can start with mostly
    negative head weights and keep the thin foreground below 0.5 for hundreds of steps (seed 0:
    Dice 0 after 300 steps); He et al.'s init for ReLU networks does not.
    """
    head = model.global_net.keypoint_decoder.head
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)) and module is not head:
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    nn.init.constant_(head.bias, HEATMAP_PRIOR_BIAS)


def _optimizer(model: nn.Module, cfg: GLSTrainConfig, stage: int) -> Tuple[torch.optim.Optimizer, Any]:
    """Adam over the parts that train in ``stage`` + a cosine factor per step (LambdaLR)."""
    if cfg.arch == "gls":
        model.set_stage(stage)
    total = max(1, cfg.stage_epochs[stage - 1 if cfg.arch == "gls" else 0] * cfg.steps_per_epoch)
    if cfg.arch == "gls" and stage == 3:
        rest = [p for n, p in model.named_parameters() if not n.startswith("fusion.")]
        groups = [{"params": list(model.fusion.parameters()), "lr": cfg.lr * cfg.fusion_lr_ratio},
                  {"params": rest, "lr": cfg.lr * cfg.finetune_lr_ratio}]
    else:
        groups = [{"params": [p for p in model.parameters() if p.requires_grad], "lr": cfg.lr}]
    warm = int(round(total * cfg.fusion_warmup))

    def cosine(step: int, length: int) -> float:
        t = min(max(step, 0), length) / max(1, length)
        return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))

    factors = [lambda step: cosine(step, total), lambda step: 0.0 if step < warm else cosine(step - warm, total - warm)]
    optimizer = torch.optim.Adam(groups, lr=cfg.lr)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factors[:len(groups)])


def _heatmap_loss(logits: torch.Tensor, points: torch.Tensor, cfg: GLSTrainConfig) -> torch.Tensor:
    target = gaussian_heatmaps_torch(points.float(), logits.shape[-2:], cfg.sigma_px)
    if cfg.heatmap_loss == "bce":
        return F.binary_cross_entropy_with_logits(logits.float(), target)
    return F.mse_loss(torch.sigmoid(logits.float()), target)


def _loss(model: nn.Module, cfg: GLSTrainConfig, stage: int, x: torch.Tensor, y: torch.Tensor, kp: torch.Tensor,
          valid: torch.Tensor) -> torch.Tensor:
    """The training loss of one batch for ``cfg.arch`` in ``stage`` (module docstring)."""
    bce = F.binary_cross_entropy_with_logits
    if cfg.arch not in KEYPOINT_ARCHS:
        return bce(model(x).float(), y)
    if stage == 2:
        with torch.no_grad():
            centres = heatmap_argmax(model.global_net(x)[1].float())
        logits, origins = model.forward_local(x, centres)
        return bce(logits.float(), extract_crops(y, origins, model.crop_size))
    if stage == 3:
        out = model(x)
        mask_logits, heat_logits, weight = out["global_logits"], out["heatmap_logits"], cfg.aux_weight
        loss = bce(out["fused_logits"].float(), y)
    else:
        (mask_logits, heat_logits), weight, loss = model.global_net(x), 1.0, 0.0
    if weight > 0:
        aux = bce(mask_logits.float(), y)
        if bool(valid.any()):
            aux = aux + cfg.heatmap_weight * _heatmap_loss(heat_logits[valid], kp[valid], cfg)
        loss = loss + weight * aux
    return loss


def _loop(run: TrainingRun, model: nn.Module, cfg: GLSTrainConfig, train: TrainingArrays, val: TrainingArrays,
          device: torch.device, state: Dict[str, Any]) -> None:
    tensors = [torch.from_numpy(a) for a in (train.images, train.masks, train.keypoints, train.has_keypoints)]
    every, with_points = np.arange(len(train.names)), np.nonzero(train.has_keypoints)[0]
    scaler = make_grad_scaler(device) if cfg.amp else None
    optimizer, scheduler, current = None, None, None
    while not run.finished:
        epoch = run.epoch
        stage = cfg.stage_of(epoch)
        if stage != current:
            if cfg.arch == "gls" and stage == 2 and epoch == cfg.stage_epochs[0] and cfg.local_init == "global":
                model.local_net.encoder.load_state_dict(model.global_net.encoder.state_dict())
                model.local_net.decoder.load_state_dict(model.global_net.seg_decoder.state_dict())
            optimizer, scheduler = _optimizer(model, cfg, stage)
            if current is None and epoch > 0 and cfg.stage_of(epoch - 1) == stage and "optimizer" in state:
                optimizer.load_state_dict(state["optimizer"])  # resumed mid-stage
                scheduler.load_state_dict(state["scheduler"])
            current = stage
        model.train()
        rng = np.random.default_rng(cfg.seed * 100_003 + epoch)  # per epoch: a resumed run sees the same batches
        gen = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
        pool = with_points if (cfg.arch == "gls" and stage == 2) else every
        order = np.concatenate([rng.permutation(pool) for _ in range(-(-cfg.steps_per_epoch * cfg.batch_size
                                                                        // len(pool)))])
        total = 0.0
        for step in range(cfg.steps_per_epoch):
            run.check_cancel()
            idx = torch.from_numpy(order[step * cfg.batch_size:(step + 1) * cfg.batch_size])
            x, y, kp, valid = (t[idx] for t in tensors)
            if cfg.augmentation is not None:
                x, y, kp = cfg.augmentation(x, y, kp, gen)
            x, y, kp, valid = (t.to(device) for t in (x, y, kp, valid))
            with autocast(device, cfg.amp):
                loss = _loss(model, cfg, stage, x, y, kp, valid)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"training loss became {loss.item()} at epoch {epoch + 1}, step {step + 1}; "
                                         "lower the learning rate or check the data")
            backward_and_step(loss, optimizer, scaler)
            scheduler.step()
            total += float(loss.item())
            run.report_step((step + 1) / cfg.steps_per_epoch,
                            (f"stage {stage} " if cfg.arch == "gls" else "") + f"loss {total / (step + 1):.4f}")
        metrics = {"train_loss": total / cfg.steps_per_epoch, "lr": optimizer.param_groups[0]["lr"]}
        metrics.update(validate_arrays(model, cfg.arch, val.images, val.masks, val.keypoints, device, stage,
                                       cfg.batch_size))
        if cfg.arch in KEYPOINT_ARCHS:
            metrics["stage"] = float(stage)
            run.header["stage_reached"] = stage
        score = metrics["val_dice"] - (1.0 if cfg.arch == "gls" and stage < 3 else 0.0)
        run.end_epoch(model, metrics, score, optimizer, scheduler, scaler)
        _append_log(run.out_dir / "training_log.csv", run.history[-1])
        log.info("epoch %d/%d %s", run.epoch, run.epochs, " ".join(f"{k} {v:.4g}" for k, v in metrics.items()))


def _append_log(path: Path, row: Dict[str, float]) -> None:
    """One CSV line per epoch; rewritten with the union of the columns (stage 3 adds some)."""
    rows = []
    if path.is_file():
        with path.open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    rows.append({k: f"{v:.6g}" for k, v in row.items()})
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(c for r in rows for c in r)), restval="")
        writer.writeheader()
        writer.writerows(rows)
