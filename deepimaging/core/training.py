"""Training-loop plumbing every method shares: best/last checkpoints, resume, ETA, AMP, cancel.

A method's ``train`` function owns its model, data and loss; :class:`TrainingRun` owns the
bookkeeping around them so that all methods resume, report progress and write checkpoints the
same way (and only on the main rank when distributed).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

import torch

from .checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from .distributed import DistContext, unwrap_model
from .progress import CancelToken, ProgressCallback, check_cancel, report


def format_seconds(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


@dataclass
class TrainingRun:
    """Bookkeeping for one training job writing ``best.pt`` and ``last.pt`` into ``out_dir``.

    ``higher_is_better`` says how :meth:`end_epoch`'s ``metric`` ranks checkpoints (Dice: True;
    validation loss: False).  ``header`` is the checkpoint header (method, config, ...).
    """

    out_dir: Path
    header: Dict[str, Any]
    epochs: int
    ctx: DistContext = field(default_factory=DistContext)
    higher_is_better: bool = True
    progress: Optional[ProgressCallback] = None
    cancel: Optional[CancelToken] = None
    epoch: int = 0
    best_metric: Optional[float] = None
    history: List[Dict[str, float]] = field(default_factory=list)
    _start: float = field(default_factory=time.perf_counter)
    _start_epoch: int = 0

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)
        if self.ctx.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)

    @property
    def best_path(self) -> Path:
        return self.out_dir / "best.pt"

    @property
    def last_path(self) -> Path:
        return self.out_dir / "last.pt"

    def resume(self, model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
               scheduler: Any = None, scaler: Any = None, path: Optional[Path] = None) -> bool:
        """Load ``last.pt`` (or ``path``) if it exists; returns True when training resumes."""
        path = Path(path) if path else self.last_path
        if not path.is_file():
            return False
        ckpt: Checkpoint = load_checkpoint(path, method=self.header.get("method"))
        unwrap_model(model).load_state_dict(ckpt.state_dict)
        state = ckpt.training_state
        for obj, key in ((optimizer, "optimizer"), (scheduler, "scheduler"), (scaler, "scaler")):
            if obj is not None and key in state:
                obj.load_state_dict(state[key])
        self.epoch = int(state.get("epoch", 0))
        self.best_metric = state.get("best_metric")
        self.history = list(state.get("history", []))
        self._start_epoch = self.epoch
        self._start = time.perf_counter()
        return True

    def check_cancel(self) -> None:
        check_cancel(self.cancel)

    def report_step(self, fraction_of_epoch: float, message: str = "") -> None:
        """Progress within the current epoch (0-1), with an ETA over the whole run."""
        self._report(self.epoch, fraction_of_epoch, message)

    def _report(self, completed: int, fraction_of_epoch: float, message: str) -> None:
        """``epoch completed+1/epochs``: ``fraction_of_epoch`` of that epoch is done."""
        done = completed + min(1.0, max(0.0, fraction_of_epoch))
        elapsed = time.perf_counter() - self._start
        rate = (done - self._start_epoch) / elapsed if elapsed > 0 else 0.0
        eta = (self.epochs - done) / rate if rate > 0 else float("inf")
        report(self.progress, done / max(1, self.epochs),
               f"epoch {completed + 1}/{self.epochs} {message} ETA {format_seconds(eta)}".strip())

    def end_epoch(self, model: torch.nn.Module, metrics: Mapping[str, float], metric: float,
                  optimizer: Optional[torch.optim.Optimizer] = None, scheduler: Any = None, scaler: Any = None,
                  extra_tensors: Optional[Mapping[str, torch.Tensor]] = None) -> bool:
        """Record the epoch, write ``last.pt`` and (if improved) ``best.pt``; True if new best."""
        self.epoch += 1
        self.history.append({"epoch": float(self.epoch), **{k: float(v) for k, v in metrics.items()}})
        improved = self.best_metric is None or (metric > self.best_metric if self.higher_is_better
                                                else metric < self.best_metric)
        if improved:
            self.best_metric = float(metric)
        if self.ctx.is_main:
            header = dict(self.header)
            header["metrics"] = {**header.get("metrics", {}), **{k: float(v) for k, v in metrics.items()},
                                 "epoch": self.epoch}
            weights = unwrap_model(model).state_dict()
            state = {"epoch": self.epoch, "best_metric": self.best_metric, "history": self.history}
            for obj, key in ((optimizer, "optimizer"), (scheduler, "scheduler"), (scaler, "scaler")):
                if obj is not None:
                    state[key] = obj.state_dict()
            save_checkpoint(self.last_path, weights, header, extra_tensors, training_state=state)
            if improved:
                save_checkpoint(self.best_path, weights, header, extra_tensors)
        # "epoch N/N done", not "epoch N+1/N": all of the epoch just counted is done.
        self._report(self.epoch - 1, 1.0, "done: " + " ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
        return improved

    @property
    def finished(self) -> bool:
        return self.epoch >= self.epochs


def make_grad_scaler(device: torch.device) -> Optional["torch.amp.GradScaler"]:
    """A GradScaler for fp16 autocast on CUDA (None elsewhere or when bf16 is used)."""
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.amp.GradScaler("cuda")
    return None


def backward_and_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, scaler: Any = None) -> None:
    """Zero the gradients, back-propagate ``loss`` and step, through ``scaler`` when fp16 needs one."""
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
