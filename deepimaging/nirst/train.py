"""Train Z-Net or Y-Net on a simulated dataset (paper: Adam, lr 0.005, batch 128, MSE, 200 epochs).

What is added to the paper's recipe, and why:

* a learning-rate schedule (``schedule="cosine"``, the default; ``"constant"`` is the paper's
  unstated choice): lr decays from ``lr`` to 0 over the run, where the run's progress is the
  larger of epochs done / ``epochs`` and time used / ``max_minutes`` -- so a GPU run cut to a
  few minutes still ends at a small learning rate instead of mid-way through a noisy phase;
  the first 2 % of the run warms up linearly (Adam at 0.005 with BatchNorm can diverge early);
* ``max_minutes``: a wall-clock budget; the loop stops before an epoch that would not finish in
  time, with ``best.pt`` (lowest validation loss) and ``last.pt`` (for resuming) written;
* ``init_from``: fine-tune from a checkpoint's weights (fresh optimizer and schedule), reusing
  its normalisation statistics so the network's inputs and outputs keep their meaning;
* data normalised once and, on CUDA when it fits (half of the free memory), kept on the GPU,
  so an epoch is pure compute; bf16/fp16 autocast on CUDA (:func:`deepimaging.core.device.autocast`).

Checkpoint header (method ``nirst-znet`` / ``nirst-ynet``): ``config`` has the architecture and
its constructor arguments, wavelengths, optode count and placement (``optode_angle_offset_deg``:
angle of optode 0 counter-clockwise from +x; ``optode_winding``: ``"ccw"``, the direction of
increasing optode index, see :mod:`deepimaging.nirst.mesh`), grid, phantom distribution, split seed and the normalisation
schemes; ``extra_tensors`` hold the measurement normaliser and the per-chromophore target
scale; ``training`` the budget (phantoms, epochs, wall time, device); ``metrics`` the last
epoch's losses and, in ``best.pt``, the test-split MSE/PSNR/SSIM per chromophore.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deepimaging.core.checkpoint import load_checkpoint, make_header, save_checkpoint
from deepimaging.core.device import DeviceLike, autocast, seed_everything, select_device
from deepimaging.core.errors import InputError
from deepimaging.core.progress import CancelToken, ProgressCallback
from deepimaging.core.training import TrainingRun, backward_and_step, format_seconds, make_grad_scaler

from .data import (DEFAULT_SPLIT_SEED, MRI_NORMALISATION, SPLIT_FRACTIONS, TARGET_NORMALISATION, DatasetLike,
                   NirstDataset, Normalisation, as_dataset, dataset_summary, split_indices)
from .mesh import DEFAULT_ANGLE_OFFSET_DEG, DEFAULT_WINDING
from .metrics import default_disk, map_metrics, summarise, truth_data_range
from .optics import WAVELENGTHS_NM
from .phantoms import CHROMOPHORE_UNITS, CHROMOPHORES
from .ynet import YNet
from .znet import ZNet

ARCHITECTURES = {"znet": ZNet, "ynet": YNet}
METHODS = {"znet": "nirst-znet", "ynet": "nirst-ynet"}
LOSSES: Dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "mse": F.mse_loss, "l1": F.l1_loss, "smooth_l1": F.smooth_l1_loss}
WARMUP_FRACTION = 0.02
# Optode placement of the simulator (mesh.optode_angles): optode i at 2*pi*i/N counter-clockwise from +x.
OPTODE_ANGLE_OFFSET_DEG = float(DEFAULT_ANGLE_OFFSET_DEG)
OPTODE_WINDING = str(DEFAULT_WINDING)


def build_network(arch: str, n_optodes: int, n_wavelengths: int,
                  net_config: Optional[Dict[str, Any]] = None) -> nn.Module:
    """Z-Net or Y-Net with the given constructor overrides (``net_config``; widths, for tiny tests)."""
    if arch not in ARCHITECTURES:
        raise InputError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[arch](n_optodes=n_optodes, n_wavelengths=n_wavelengths, **(net_config or {}))


def predict(model: nn.Module, signals: Tensor, images: Tensor, device: torch.device,
            batch_size: int = 64) -> Tensor:
    """Normalised network outputs (N, 3, H, W) on the CPU, in eval mode, batched, in float32
    (as :mod:`deepimaging.nirst.recon` predicts; only training steps use mixed precision)."""
    model.eval()
    outputs = []
    with torch.no_grad():
        for start in range(0, len(signals), batch_size):
            s = signals[start:start + batch_size].to(device, non_blocking=True)
            m = images[start:start + batch_size].to(device, non_blocking=True)
            outputs.append(model(s, m).float().cpu())
    return torch.cat(outputs) if outputs else torch.zeros(0)


def learning_rate(base: float, progress: float, schedule: str) -> float:
    """lr at run progress 0..1: linear warm-up over the first 2 %, then constant or cosine to 0."""
    if progress < WARMUP_FRACTION:
        return base * max(progress / WARMUP_FRACTION, 0.05)
    if schedule == "constant":
        return base
    tail = (progress - WARMUP_FRACTION) / (1.0 - WARMUP_FRACTION)
    return base * 0.5 * (1.0 + math.cos(math.pi * min(1.0, tail)))


def _place(dataset: NirstDataset, device: torch.device) -> Tuple[Tensor, Tensor, Tensor]:
    """The dataset's tensors on the GPU if they fit in half the free memory, else pinned on the CPU."""
    tensors = dataset.tensors()
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if dataset.nbytes < 0.5 * free:
            return tuple(t.to(device) for t in tensors)  # type: ignore[return-value]
        return tuple(t.pin_memory() for t in tensors)  # type: ignore[return-value]
    return tensors


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


def train_network(
    data: DatasetLike,
    arch: str = "znet",
    out_dir: Path | str = "nirst-training",
    epochs: int = 200,
    batch_size: int = 128,
    lr: float = 0.005,
    loss: str = "mse",
    device: DeviceLike = None,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
    resume: bool = True,
    max_minutes: Optional[float] = None,
    schedule: str = "cosine",
    seed: int = 0,
    split_seed: int = DEFAULT_SPLIT_SEED,
    net_config: Optional[Dict[str, Any]] = None,
    log: Optional[Callable[[str], None]] = None,
    export: Optional[Path | str] = None,
    init_from: Optional[Path | str] = None,
) -> Dict[str, Any]:
    """Train, checkpoint (``out_dir/best.pt``, ``last.pt``), test; returns a summary dict.

    ``data``: a dataset file, a folder of shards or a loaded dataset dict.  ``resume`` continues
    from ``out_dir/last.pt`` if present (same data and settings expected; ``max_minutes`` counts
    the training time of the earlier sessions too).  ``export`` also
    writes the best weights in half precision with the full header (the shippable file).
    ``init_from``: a checkpoint of the same architecture to fine-tune (its normalisation is kept).
    """
    if arch not in ARCHITECTURES:
        raise InputError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    if loss not in LOSSES:
        raise InputError(f"unknown loss {loss!r}; choose one of {', '.join(LOSSES)}")
    if schedule not in ("cosine", "constant"):
        raise InputError(f"unknown schedule {schedule!r}; choose cosine or constant")
    if epochs < 1 or batch_size < 2 or lr <= 0:
        raise InputError("epochs >= 1, batch_size >= 2 and lr > 0 are required")
    say = log or (lambda line: None)
    began = time.perf_counter()
    dataset = as_dataset(data)
    meta = dataset.get("meta", {})
    wavelengths = [int(w) for w in meta.get("wavelengths_nm", WAVELENGTHS_NM)]
    n_optodes = int(meta.get("n_optodes", 16))
    train_rows, val_rows, test_rows = split_indices(len(dataset["measurements"]), split_seed)
    device = select_device(device)
    seed_everything(seed)
    initial = _initial_checkpoint(init_from, arch, n_optodes, wavelengths)
    normalisation = (Normalisation.from_tensors(initial.extra_tensors) if initial is not None
                     else Normalisation.fit(dataset, train_rows))
    train_set = NirstDataset(dataset, train_rows, normalisation)
    val_set = NirstDataset(dataset, val_rows, normalisation)
    train_s, train_m, train_t = _place(train_set, device)
    val_s, val_m, val_t = _place(val_set, device)
    say(f"{arch}: {len(train_rows)} train / {len(val_rows)} validation / {len(test_rows)} test phantoms "
        f"on {_device_name(device)}; data on {train_s.device.type} "
        f"({(train_set.nbytes + val_set.nbytes) / 2**20:.0f} MiB),"
        f" prepared in {time.perf_counter() - began:.1f} s")

    if initial is not None:
        net_config = dict(initial.header["config"].get("net_config") or {})
    model = build_network(arch, n_optodes, len(wavelengths), net_config)
    if initial is not None:
        model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in initial.state_dict.items()})
        say(f"initialised from {init_from} (its normalisation kept)")
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
        torch.backends.cudnn.benchmark = True
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    scaler = make_grad_scaler(device)
    criterion = LOSSES[loss]
    config = {"arch": arch, "net_config": dict(net_config or {}), "n_optodes": n_optodes,
              "n_wavelengths": len(wavelengths), "wavelengths_nm": wavelengths,
              "grid_size": int(dataset["maps"].shape[-1]), "diameter_mm": float(meta.get("diameter_mm", 82.0)),
              "optode_angle_offset_deg": OPTODE_ANGLE_OFFSET_DEG, "optode_winding": OPTODE_WINDING,
              "distribution": str(meta.get("distribution", "paper")),
              "init_from": None if init_from is None else Path(init_from).name,
              "split_seed": int(split_seed), "split_fractions": list(SPLIT_FRACTIONS), "loss": loss, "lr": lr,
              "batch_size": batch_size, "epochs": epochs, "schedule": schedule, "seed": seed,
              "parameters": int(sum(p.numel() for p in model.parameters()))}
    preprocessing = {"measurements": "ln(amplitude) - ln(homogeneous reference), standardised per wavelength",
                     "mri": MRI_NORMALISATION, "targets": TARGET_NORMALISATION,
                     "target_scale": [float(v) for v in normalisation.target_scale]}
    header = make_header(METHODS[arch], config, preprocessing=preprocessing,
                         labels={"channels": list(CHROMOPHORES), "units": list(CHROMOPHORE_UNITS)},
                         data=dataset_summary(dataset), training={})
    run = TrainingRun(Path(out_dir), header, epochs, higher_is_better=False, progress=progress, cancel=cancel)
    if resume and run.resume(model, optimizer, scaler=scaler):
        say(f"resumed from {run.last_path} at epoch {run.epoch}")
    previous = float(run.history[-1].get("elapsed_s", 0.0)) if run.history else 0.0
    budget_s = 60.0 * max_minutes if max_minutes else None
    start = time.perf_counter()
    extra = normalisation.tensors()
    steps_per_epoch = max(1, len(train_rows) // batch_size)
    stopped_by = "epochs"
    epoch_times = []

    def elapsed() -> float:
        return previous + time.perf_counter() - start

    while not run.finished:
        if budget_s is not None and epoch_times and elapsed() + np.mean(epoch_times[-3:]) > budget_s:
            stopped_by = "time budget"
            break
        epoch_start = time.perf_counter()
        model.train()
        generator = torch.Generator().manual_seed(seed * 100003 + run.epoch)
        order = torch.randperm(len(train_rows), generator=generator)
        running = torch.zeros((), device=device)  # summed on the device: no host sync per step
        count = 0
        for step in range(steps_per_epoch):
            run.check_cancel()
            frac = (run.epoch + step / steps_per_epoch) / epochs
            if budget_s is not None:
                frac = max(frac, elapsed() / budget_s)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(lr, frac, schedule)
            index = order[step * batch_size:(step + 1) * batch_size]
            index_dev = index.to(train_s.device)
            s = train_s[index_dev].to(device, non_blocking=True)
            m = train_m[index_dev].to(device, non_blocking=True)
            t = train_t[index_dev].to(device, non_blocking=True)
            if device.type == "cuda":
                m = m.contiguous(memory_format=torch.channels_last)
            with autocast(device):
                value = criterion(model(s, m).float(), t)
            backward_and_step(value, optimizer, scaler)
            running += value.detach() * len(index)
            count += len(index)
            if progress is not None and step % 10 == 0:
                run.report_step(step / steps_per_epoch, f"loss {float(running) / max(count, 1):.4g}")
        train_loss = float(running) / max(count, 1)
        if not math.isfinite(train_loss):
            stopped_by = "divergence"
            say(f"epoch {run.epoch + 1}: training loss is {train_loss}; stopping (lower --lr); keeping best.pt")
            break
        val_loss = _validation_loss(model, criterion, val_s, val_m, val_t, device, 2 * batch_size)
        epoch_times.append(time.perf_counter() - epoch_start)
        metrics = {"train_loss": train_loss, "val_loss": val_loss,
                   "lr": optimizer.param_groups[0]["lr"], "epoch_time_s": epoch_times[-1], "elapsed_s": elapsed()}
        run.header["training"] = _budget(dataset, train_rows, run.epoch + 1, elapsed(), device, stopped_by)
        improved = run.end_epoch(model, metrics, val_loss, optimizer, None, scaler, extra_tensors=extra)
        say(f"epoch {run.epoch}/{epochs}  train {metrics['train_loss']:.5f}  val {val_loss:.5f}"
            f"{'  *best' if improved else ''}  lr {metrics['lr']:.2e}  {epoch_times[-1]:.1f} s"
            f"  elapsed {format_seconds(elapsed())}")

    return _finish(run, model, dataset, normalisation, test_rows, device, batch_size, stopped_by,
                   elapsed(), train_rows, export, say)


def _initial_checkpoint(path: Optional[Path | str], arch: str, n_optodes: int, wavelengths: list) -> Any:
    """The checkpoint to fine-tune from (checked against the data), or None."""
    if path is None:
        return None
    checkpoint = load_checkpoint(Path(path), method=METHODS[arch])
    config = checkpoint.header.get("config", {})
    if int(config.get("n_optodes", n_optodes)) != n_optodes or \
            [int(w) for w in config.get("wavelengths_nm", wavelengths)] != list(wavelengths):
        raise InputError(f"{path} was trained for other optodes/wavelengths than this dataset")
    return checkpoint


def _validation_loss(model: nn.Module, criterion: Callable[[Tensor, Tensor], Tensor], signals: Tensor,
                     images: Tensor, targets: Tensor, device: torch.device, batch_size: int) -> float:
    """Mean loss over the validation split (eval mode; batches stay on the device)."""
    model.eval()
    total = 0.0
    with torch.no_grad():
        for start in range(0, len(signals), batch_size):
            s, m, t = (x[start:start + batch_size].to(device, non_blocking=True) for x in (signals, images, targets))
            with autocast(device):
                total += float(criterion(model(s, m).float(), t)) * len(s)
    return total / max(1, len(signals))


def _budget(dataset: Dict[str, Any], train_rows: np.ndarray, epochs_run: int, wall_s: float,
            device: torch.device, stopped_by: str) -> Dict[str, Any]:
    return {"n_phantoms": int(len(dataset["measurements"])), "n_train": int(len(train_rows)),
            "epochs_run": int(epochs_run), "wall_time_s": round(float(wall_s), 1), "device": _device_name(device),
            "stopped_by": stopped_by, "torch": torch.__version__}


def split_test_metrics(model: nn.Module, dataset: Dict[str, Any], rows: np.ndarray, normalisation: Normalisation,
                 device: torch.device, batch_size: int = 128) -> Dict[str, float]:
    """MSE/PSNR/SSIM per chromophore on ``rows`` in physical units (see :mod:`.metrics`)."""
    test_set = NirstDataset(dataset, rows, normalisation)
    pred = normalisation.to_physical(predict(model, test_set.signals, test_set.images, device, batch_size))
    truth = np.asarray(dataset["maps"][rows], dtype=np.float32)
    disk = default_disk(truth.shape[-1])
    pred = np.where(disk, np.clip(pred, 0.0, None), 0.0)
    data_range = truth_data_range(truth, disk)
    flat = summarise(map_metrics(pred, truth, data_range, disk, ssim="auto"))
    flat.update({f"data_range_{n}": float(r) for n, r in zip(CHROMOPHORES, data_range)})
    flat["n_test"] = int(len(rows))
    return {f"test_{k}": v for k, v in flat.items()}


def _finish(run: TrainingRun, model: nn.Module, dataset: Dict[str, Any], normalisation: Normalisation,
            test_rows: np.ndarray, device: torch.device, batch_size: int, stopped_by: str, wall_s: float,
            train_rows: np.ndarray, export: Optional[Path | str], say: Callable[[str], None]) -> Dict[str, Any]:
    """Reload the best weights, add test metrics and the final budget to ``best.pt`` (and ``export``)."""
    if not run.best_path.is_file():
        raise InputError(f"no checkpoint was written to {run.out_dir}: stopped by {stopped_by} "
                         "before the first epoch ended")
    best = load_checkpoint(run.best_path, method=run.header["method"])
    model.load_state_dict(best.state_dict)
    header = dict(best.header)
    epochs_run = int(run.history[-1]["epoch"]) if run.history else 0
    header["training"] = _budget(dataset, train_rows, epochs_run, wall_s, device, stopped_by)
    header["training"]["best_epoch"] = int(best.header.get("metrics", {}).get("epoch", 0))
    metrics = split_test_metrics(model, dataset, test_rows, normalisation, device, batch_size)
    header["metrics"] = {**header.get("metrics", {}), **metrics}
    save_checkpoint(run.best_path, best.state_dict, header, best.extra_tensors)
    if export:
        half = {k: (v.half() if v.is_floating_point() else v) for k, v in best.state_dict.items()}
        save_checkpoint(Path(export), half, header, best.extra_tensors)
        say(f"exported {export} (half-precision weights)")
    say("test: " + "  ".join(f"{n} MSE {metrics[f'test_mse_{n}']:.4g} PSNR {metrics[f'test_psnr_{n}']:.2f} dB "
                             f"SSIM {metrics[f'test_ssim_{n}']:.3f}" for n in CHROMOPHORES))
    say(f"stopped by {stopped_by} after {epochs_run} epochs, {format_seconds(wall_s)}; best {run.best_path}")
    return {"best": run.best_path, "last": run.last_path, "history": run.history, "metrics": metrics,
            "training": header["training"], "export": Path(export) if export else None}
