"""DistributedDataParallel helpers shared by every method's training (torchrun-compatible).

``torchrun --nproc_per_node N`` (or multi-node torchrun) sets RANK, WORLD_SIZE and LOCAL_RANK;
:func:`init_distributed` reads them, picks NCCL on CUDA and gloo on CPU, and returns a
:class:`DistContext`.  Without those variables everything degrades to a single process, so the
same training code runs from the CLI, from Slicer's background process and under torchrun.
Only the main rank writes checkpoints and logs (``ctx.is_main``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from .device import DeviceLike, select_device


@dataclass
class DistContext:
    """Where this process sits in a (possibly one-process) training job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: Optional[str] = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_distributed(device: DeviceLike = None) -> DistContext:
    """Join the process group if launched by torchrun; otherwise a single-process context."""
    if not launched_by_torchrun():
        return DistContext(device=select_device(device))
    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = select_device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local % torch.cuda.device_count())
        torch.cuda.set_device(dev)
        backend = "nccl"
    else:
        dev = torch.device("cpu")
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return DistContext(rank, world, local, dev, backend)


def wrap_model(model: torch.nn.Module, ctx: DistContext) -> torch.nn.Module:
    """DDP-wrap ``model`` (already on ``ctx.device``) when distributed, else return it."""
    if not ctx.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)


def all_reduce_mean(value: float, ctx: DistContext) -> float:
    """Mean of a Python number over ranks (identity when not distributed)."""
    if not ctx.distributed:
        return float(value)
    t = torch.tensor([float(value)], device=ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t.item()) / ctx.world_size


def all_reduce_sum(values: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Element-wise sum over ranks of a (small) tensor; returned on the CPU."""
    if not ctx.distributed:
        return values
    t = values.to(ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.cpu()


def all_gather_objects(obj, ctx: DistContext) -> list:
    """Every rank's picklable ``obj`` (e.g. a checksum string), in rank order."""
    if not ctx.distributed:
        return [obj]
    gathered = [None] * ctx.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def group_initialized() -> bool:
    """True when a process group already exists (then its creator also destroys it)."""
    return dist.is_available() and dist.is_initialized()


def broadcast_flag(flag: bool, ctx: DistContext) -> bool:
    """Rank 0's boolean (e.g. 'cancel' or 'new best') seen by every rank."""
    if not ctx.distributed:
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=ctx.device)
    dist.broadcast(t, src=0)
    return bool(t.item() > 0.5)


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()


def shutdown(ctx: DistContext) -> None:
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()


def rank_seed(seed: int, ctx: DistContext) -> int:
    """A different, reproducible seed per rank, so each rank samples its own patches."""
    return int(seed) + 1000003 * ctx.rank
