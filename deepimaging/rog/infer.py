"""ROG inference: preprocess, overlapping patches weighted by inverse distance, restore, post-process.

Windows are placed uniformly with ``overlap`` (MONAI ``sliding_window_inference``, batched),
and every voxel's class probabilities are averaged with weights ``1 / (d + eps)``, ``d`` being
the voxel's distance to its window's centre in half-window units (so the map has the same
shape along every axis of an anisotropic patch).  That is the paper's inverse-distance rule;
``eps`` keeps the centre finite.  MONAI takes the map through ``roi_weight_map``.

Volumes smaller than a patch are padded with the plan's "darkest" value, as in training.  On
GPU out-of-memory the job is retried with one window per batch and the output kept on the CPU,
then entirely on the CPU, each time with a warning.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from monai.data.utils import dense_patch_slices
from monai.inferers import sliding_window_inference

from deepimaging.core.checkpoint import Checkpoint, load_checkpoint
from deepimaging.core.device import DeviceLike, autocast, select_device
from deepimaging.core.errors import CheckpointError
from deepimaging.core.image import Image
from deepimaging.core.progress import CancelToken, ProgressCallback, check_cancel, report, sub_progress
from deepimaging.core.segfile import DEFAULT_COLORS, Segmentation

from .model import ROG
from .plan import Plan
from .postprocess import postprocess_labels
from .preprocess import ImageInput, pad_values, preprocess_image, restore_labels, restore_probabilities

log = logging.getLogger(__name__)
OOM_ERRORS = tuple({getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError), torch.cuda.OutOfMemoryError})


@dataclass
class RogModel:
    """A trained network with the plan it was trained under (all inference needs)."""

    model: ROG
    plan: Plan
    header: Dict[str, Any]

    @property
    def label_names(self) -> Dict[int, str]:
        return {lb.value: lb.name for lb in self.plan.labels}


def load_rog(source: Union[str, Path, Checkpoint, RogModel], device: DeviceLike = "cpu") -> RogModel:
    """Load a ROG checkpoint (path or :class:`Checkpoint`); another method's checkpoint is a CheckpointError."""
    if isinstance(source, RogModel):
        return source
    ckpt = source if isinstance(source, Checkpoint) else load_checkpoint(source, method="rog")
    if ckpt.method != "rog":
        raise CheckpointError(f"this is a checkpoint of method {ckpt.method!r}, but a 'rog' checkpoint is needed")
    try:
        plan = Plan.from_dict(ckpt.header["preprocessing"])
        model = ROG.from_config(ckpt.config)
        model.load_state_dict(ckpt.state_dict)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"the ROG checkpoint is incomplete or does not match its network: {exc}") from exc
    if model.num_classes != len(plan.labels) or model.in_channels != len(plan.channels):
        raise CheckpointError("the checkpoint's network and plan disagree on channels or classes")
    return RogModel(model.to(select_device(device)).eval(), plan, dict(ckpt.header))


def inverse_distance_weights(patch_size: Sequence[int], eps: float = 0.1) -> torch.Tensor:
    """Per-voxel window weight ``1 / (d + eps)``, scaled to a maximum of 1 (positive, centre-peaked)."""
    axes = [(torch.arange(n, dtype=torch.float64) + 0.5 - n / 2) / (n / 2) for n in patch_size]
    grids = torch.meshgrid(*axes, indexing="ij")
    d = torch.sqrt(sum(g ** 2 for g in grids))
    w = 1.0 / (d + eps)
    return (w / w.max()).float()


def count_windows(shape: Sequence[int], patch: Sequence[int], overlap: float) -> int:
    """How many windows MONAI's sliding window places (for progress reporting)."""
    interval = [p if p >= n else max(int(p * (1 - overlap)), 1) for n, p in zip(shape, patch)]
    return len(dense_patch_slices(tuple(max(n, p) for n, p in zip(shape, patch)), tuple(patch), interval))


def _pad_to_patch(array: np.ndarray, patch: Sequence[int], fill: np.ndarray) -> Tuple[np.ndarray, Tuple[slice, ...]]:
    """Pad (C, z, y, x) symmetrically up to ``patch`` with per-channel ``fill``; slices to undo it."""
    shape = np.asarray(array.shape[1:])
    size = np.maximum(shape, patch)
    if np.all(size == shape):
        return array, (slice(None),) * 3
    before = (size - shape) // 2
    out = np.empty((array.shape[0], *size), np.float32)
    out[...] = fill.reshape(-1, 1, 1, 1)
    region = tuple(slice(b, b + n) for b, n in zip(before, shape))
    out[(slice(None), *region)] = array
    return out, region


def sliding_window_probabilities(array: np.ndarray, model: torch.nn.Module, plan: Plan, device: torch.device,
                                 batch_size: int = 2, overlap: float = 0.5,
                                 output_device: Optional[torch.device] = None,
                                 progress: Optional[ProgressCallback] = None,
                                 cancel: Optional[CancelToken] = None) -> np.ndarray:
    """(C, z, y, x) preprocessed channels -> (classes, z, y, x) float32 probabilities, same grid."""
    patch = tuple(plan.patch_size)
    padded, region = _pad_to_patch(array, patch, pad_values(plan))
    total = count_windows(padded.shape[1:], patch, overlap)
    done = [0]
    model = model.to(device).eval()

    def predictor(x: torch.Tensor) -> torch.Tensor:
        check_cancel(cancel)
        with autocast(device):
            logits = model(x)
        done[0] += x.shape[0]
        report(progress, done[0] / total, f"window {min(done[0], total)}/{total}")
        return torch.softmax(logits.float(), dim=1)

    inputs = torch.from_numpy(np.ascontiguousarray(padded[None], np.float32))
    with torch.no_grad():
        out = sliding_window_inference(inputs.to(device), patch, batch_size, predictor, overlap=overlap,
                                       roi_weight_map=inverse_distance_weights(patch).to(device),
                                       sw_device=device, device=output_device or device)
    out = out.as_tensor() if hasattr(out, "as_tensor") else out
    return out[0].float().cpu().numpy()[(slice(None), *region)]


def _attempts(device: torch.device, batch_size: int) -> List[Tuple[torch.device, int, torch.device]]:
    """(compute device, windows per batch, output device), in the order tried on out-of-memory."""
    cpu = torch.device("cpu")
    tries = [(device, batch_size, device)]
    if batch_size > 1 or device.type != "cpu":
        tries.append((device, 1, cpu))
    if device.type != "cpu":
        tries.append((cpu, batch_size, cpu))
    return tries


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, OOM_ERRORS) or (isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower())


def run_with_fallback(job: Callable[[torch.device, int, torch.device], np.ndarray], device: torch.device,
                      batch_size: int) -> np.ndarray:
    """Run ``job``, retrying smaller / on the CPU after an out-of-memory error (with a warning)."""
    tries = _attempts(device, batch_size)
    for i, (dev, bs, out_dev) in enumerate(tries):
        try:
            return job(dev, bs, out_dev)
        except Exception as exc:  # noqa: BLE001 - only out-of-memory is retried
            if not _is_oom(exc) or i == len(tries) - 1:
                raise
            nxt = tries[i + 1]
            message = (f"out of memory on {dev} with {bs} window(s) per batch; retrying on {nxt[0]} with "
                       f"{nxt[1]} window(s) per batch, output on {nxt[2]}")
            warnings.warn(message, RuntimeWarning, stacklevel=2)
            log.warning(message)
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    raise AssertionError("unreachable")


def predict_volume(image: ImageInput, checkpoint_or_model: Union[str, Path, Checkpoint, RogModel],
                   device: DeviceLike = None, batch_size: int = 2, overlap: float = 0.5, postprocess: bool = True,
                   return_probabilities: bool = False, progress: Optional[ProgressCallback] = None,
                   cancel: Optional[CancelToken] = None) -> Tuple[Image, Optional[np.ndarray]]:
    """Segment one volume (an :class:`Image`, or one per channel) with a ROG checkpoint.

    Returns the label-value map on the input grid and, if asked, (classes, z, y, x) float32
    probabilities on the input grid (class i = ``plan.labels[i]``; before post-processing).
    """
    dev = select_device(device)
    rog = load_rog(checkpoint_or_model, device="cpu")  # a RogModel passes through unchanged
    plan = rog.plan
    report(progress, 0.0, "preprocessing")
    prep = preprocess_image(image, plan)
    check_cancel(cancel)

    def job(compute: torch.device, bs: int, out_dev: torch.device) -> np.ndarray:
        return sliding_window_probabilities(prep.array, rog.model, plan, compute, bs, overlap, out_dev,
                                            sub_progress(progress, 0.05, 0.9), cancel)

    probs = run_with_fallback(job, dev, batch_size)
    report(progress, 0.9, "restoring the original grid")
    labels = restore_labels(probs.argmax(0).astype(np.uint8), prep.grid, plan)
    if postprocess:
        report(progress, 0.95, "post-processing")
        labels = labels.with_array(postprocess_labels(labels.array, plan, labels.spacing_zyx))
    restored = restore_probabilities(probs, prep.grid, plan) if return_probabilities else None
    report(progress, 1.0, "done")
    return labels, restored


def labels_to_segmentation(labels: Image, plan: Plan, include_empty: bool = True) -> Segmentation:
    """Named, coloured segments (one per non-background label of the plan) on the label map's grid."""
    seg = Segmentation(labels.with_array(np.zeros(labels.shape, np.uint8)))
    for i, lb in enumerate(lb for lb in plan.labels if lb.kind != "background"):
        mask = labels.array == lb.value
        if include_empty or mask.any():
            seg.add(lb.name, mask, DEFAULT_COLORS[i % len(DEFAULT_COLORS)])
    return seg
