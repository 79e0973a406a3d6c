"""ROG inference: preprocess, overlapping patches weighted by inverse distance, restore, post-process.

Windows are placed uniformly with ``overlap`` (MONAI ``sliding_window_inference``, batched),
and every voxel's class probabilities are averaged with weights ``1 / (d + eps)``, ``d`` being
the voxel's distance to its window's centre in half-window units (so the map has the same
shape along every axis of an anisotropic patch).  That is the paper's inverse-distance rule;
``eps`` keeps the centre finite.  MONAI takes the map through ``roi_weight_map``.

Volumes smaller than a patch are padded with the plan's "darkest" value, as in training.  On
GPU out-of-memory the job is retried with one window per batch and the output kept on the CPU,
then entirely on the CPU, each time with a warning.

For adversarial attacks, :func:`volume_logits` runs the same windows and weights with gradients
(float32, no autocast) and :class:`SlidingWindowSegmenter` wraps it as an ``nn.Module``;
:func:`prepare_case` turns a held-out case into the normalised tensor and class-index labels
they work on.  The prediction path above is unchanged by them.
"""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.utils.checkpoint
from monai.data.utils import dense_patch_slices
from monai.inferers import sliding_window_inference

from deepimaging.core.checkpoint import Checkpoint, load_checkpoint
from deepimaging.core.device import DeviceLike, autocast, select_device
from deepimaging.core.errors import CheckpointError, InputError
from deepimaging.core.image import Image
from deepimaging.core.progress import CancelToken, ProgressCallback, check_cancel, report, sub_progress
from deepimaging.core.segfile import DEFAULT_COLORS, Segmentation

from .model import ROG
from .plan import Plan
from .postprocess import postprocess_labels
from .preprocess import (Grid, ImageInput, as_channels, pad_values, preprocess_image, restore_labels,
                         restore_probabilities)

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


def read_rog_checkpoint(path: Union[str, Path]) -> Checkpoint:
    """:func:`~deepimaging.core.checkpoint.load_checkpoint` for a ROG checkpoint, with a plain
    :class:`CheckpointError` for files torch cannot read (and torch's warnings silenced)."""
    path = Path(path)
    try:
        return load_checkpoint(path, method="rog")
    except CheckpointError as exc:
        if not str(exc).startswith("cannot read checkpoint"):
            raise
        message = str(exc)
    raise CheckpointError(f"{message}; use a best.pt or last.pt written by deepimaging rog train")


def load_rog(source: Union[str, Path, Checkpoint, RogModel], device: DeviceLike = "cpu") -> RogModel:
    """Load a ROG checkpoint (path or :class:`Checkpoint`); another method's checkpoint, or a file
    that is not a checkpoint, is a :class:`CheckpointError` with a plain message."""
    if isinstance(source, RogModel):
        return source
    ckpt = source if isinstance(source, Checkpoint) else read_rog_checkpoint(source)
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


# -- differentiable whole-volume logits (for adversarial attacks) --------------------------------
AVERAGES = ("probabilities", "logits")


def _no_autocast(device: torch.device) -> Any:
    """A context with autocast off on ``device`` (float32 even inside a caller's autocast region)."""
    try:
        return torch.autocast(device_type=device.type, enabled=False)
    except (RuntimeError, ValueError):  # a device type this torch has no autocast for
        return contextlib.nullcontext()


def volume_logits(model: torch.nn.Module, volume: torch.Tensor, plan: Plan, *, overlap: float = 0.5,
                  batch_size: int = 2, average: str = "probabilities",
                  checkpoint: Optional[bool] = None) -> torch.Tensor:
    """Whole-volume per-voxel logits ``(1, K, D, H, W)`` of a normalised volume ``(1, C, D, H, W)``,
    with gradients, in float32 (autocast is switched off: fp16 overflow would put NaN into the
    sign of an attack's gradient).

    The windows, padding and inverse-distance weights are those of the prediction path
    (:func:`sliding_window_probabilities`, MONAI's window placement); ``average`` chooses what is
    averaged, differentiably:

    * ``"probabilities"`` (default): the logits are ``log p``, ``p`` being the weighted mean of the
      windows' softmax, i.e. exactly what prediction computes: ``softmax(logits)`` equals its
      probabilities and the arg-max its labels.  Accumulated in log space (running log-sum-exp),
      so confident voxels give large negative logits instead of ``log 0``.  Where one window
      covers a voxel these are the network's log-softmax (its logits shifted per voxel).
    * ``"logits"``: the weighted mean of the raw window logits (what the reference code's test
      does); its arg-max may differ from prediction where windows disagree.

    ``checkpoint`` (default: when gradients are being recorded) recomputes each window's forward
    pass during backward instead of keeping its activations, so memory stays at about one
    window's activations plus a few ``(K, D, H, W)`` maps whatever the number of windows.  Call
    ``model.eval()`` first (the model's mode is not changed here).
    """
    if average not in AVERAGES:
        raise ValueError(f"average must be one of {AVERAGES}, got {average!r}")
    channels = len(plan.channels)
    if volume.ndim != 5 or volume.shape[0] != 1 or volume.shape[1] != channels:
        raise InputError(f"expected a normalised volume (1, {channels}, D, H, W), got {tuple(volume.shape)}")
    patch = tuple(int(p) for p in plan.patch_size)
    shape = tuple(int(n) for n in volume.shape[2:])
    size = tuple(max(n, p) for n, p in zip(shape, patch))
    device = volume.device
    x = volume.float()
    region = tuple(slice((s - n) // 2, (s - n) // 2 + n) for s, n in zip(size, shape))
    if size != shape:  # pad with the clip floor, as prediction does (autograd flows into the region)
        fill = torch.as_tensor(pad_values(plan), device=device).reshape(1, channels, 1, 1, 1)
        padded = fill.expand(1, channels, *size).clone()
        padded[(slice(None), slice(None)) + region] = x
        x = padded
    interval = [p if p >= n else max(int(p * (1 - overlap)), 1) for n, p in zip(size, patch)]
    windows = dense_patch_slices(size, patch, interval)
    weights = inverse_distance_weights(patch).to(device)
    log_weights = torch.log(weights)
    use_checkpoint = (torch.is_grad_enabled() and x.requires_grad) if checkpoint is None else bool(checkpoint)
    classes = len(plan.labels)
    total = torch.zeros((classes, *size), device=device)          # sum of w * p (scaled) or of w * logits
    shift = torch.full((classes, *size), -math.inf, device=device)  # running max of log(w p) (no grad)
    weight_sum = torch.zeros(size, device=device)
    with _no_autocast(device):
        for start in range(0, len(windows), max(1, int(batch_size))):
            group = windows[start:start + max(1, int(batch_size))]
            batch = torch.cat([x[(slice(None), slice(None)) + tuple(w)] for w in group])
            if use_checkpoint:
                out = torch.utils.checkpoint.checkpoint(model, batch, use_reentrant=False)
            else:
                out = model(batch)
            out = out.float()
            for i, window in enumerate(group):
                where = (slice(None),) + tuple(window)
                weight_sum[tuple(window)] += weights
                if average == "logits":
                    total[where] = total[where] + weights * out[i]
                    continue
                value = log_weights + torch.log_softmax(out[i], dim=0)
                old = shift[where]
                new = torch.maximum(old, value.detach())
                total[where] = total[where] * torch.exp(old - new) + torch.exp(value - new)
                shift[where] = new
    if average == "logits":
        logits = total / weight_sum
    else:
        logits = torch.log(total) + shift - torch.log(weight_sum)
    return logits[(slice(None),) + region][None]


class SlidingWindowSegmenter(torch.nn.Module):
    """A ROG network as a whole-volume segmenter: ``forward(x)`` maps normalised volumes
    ``(B, C, D, H, W)`` to per-voxel logits ``(B, K, D, H, W)`` through :func:`volume_logits`, so
    any attack that takes an ``nn.Module`` attacks the full sliding-window segmentation."""

    def __init__(self, model: torch.nn.Module, plan: Plan, overlap: float = 0.5, batch_size: int = 2,
                 average: str = "probabilities", checkpoint: Optional[bool] = None):
        super().__init__()
        if average not in AVERAGES:
            raise ValueError(f"average must be one of {AVERAGES}, got {average!r}")
        self.model, self.plan = model, plan
        self.overlap, self.batch_size, self.average, self.checkpoint = overlap, batch_size, average, checkpoint

    @classmethod
    def from_checkpoint(cls, source: Union[str, Path, Checkpoint, RogModel], device: DeviceLike = "cpu",
                        **kwargs: Any) -> "SlidingWindowSegmenter":
        """Load a ROG checkpoint into an eval-mode segmenter on ``device``."""
        rog = load_rog(source, device)
        return cls(rog.model, rog.plan, **kwargs).eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 5:
            raise InputError(f"expected normalised volumes (B, C, D, H, W), got {tuple(x.shape)}")
        return torch.cat([volume_logits(self.model, x[i:i + 1], self.plan, overlap=self.overlap,
                                        batch_size=self.batch_size, average=self.average,
                                        checkpoint=self.checkpoint) for i in range(x.shape[0])])


@dataclass
class PreparedCase:
    """A case on the network's grid: what attacks and the robustness benchmark work on."""

    image: torch.Tensor             # (1, C, D, H, W) float32, normalised, target spacing
    label: Optional[torch.Tensor]   # (1, D, H, W) int64 class indices (class i = plan.labels[i]), or None
    grid: Grid                      # the original grid (restore_labels maps predictions back)
    resampled: bool


CaseInput = Union[str, Path, Image, np.ndarray, Sequence[Union[str, Path, Image, np.ndarray]]]


def _case_images(image: CaseInput, spacing: Optional[Sequence[float]], plan: Plan) -> List[Image]:
    """Image file(s), Image(s) or (z, y, x) / (C, z, y, x) arrays -> one Image per channel."""
    from .preprocess import read_channels

    geometry = tuple(float(s) for s in (spacing if spacing is not None else plan.target_spacing_zyx[::-1]))
    items = [image] if isinstance(image, (str, Path, Image, np.ndarray)) else list(image)
    out: List[Image] = []
    for item in items:
        if isinstance(item, (str, Path)):
            out.extend(read_channels(item))
        elif isinstance(item, Image):
            out.append(item)
        else:
            arr = np.asarray(item)
            out.extend(Image(a, geometry) for a in (arr if arr.ndim == 4 else [arr]))
    return out


def prepare_case(image: CaseInput, plan: Plan, label: Union[str, Path, Image, np.ndarray, None] = None, *,
                 spacing: Optional[Sequence[float]] = None, device: DeviceLike = "cpu") -> PreparedCase:
    """Preprocess a held-out case exactly as training and prediction do (same code) into tensors.

    ``image``: a file (a 4-D file gives one channel per volume), one file per channel, an
    :class:`Image` (or one per channel), or arrays (z, y, x) / (C, z, y, x) with ``spacing``
    (x, y, z mm; default: the plan's target spacing, i.e. no resampling).  ``label``: a label map
    (file, Image on the image's grid, or array) with the plan's label values, or None.
    """
    from deepimaging.core.imageio import read_image

    from .preprocess import needs_resampling, preprocess_labelled

    images = as_channels(_case_images(image, spacing, plan), plan)
    grid = Grid.of(images[0])
    dev = select_device(device)
    classes = None
    if label is None:
        array = preprocess_image(images, plan).array
    else:
        if isinstance(label, (str, Path)):
            label_image = read_image(label)
        elif isinstance(label, Image):
            label_image = label
        else:
            label_image = images[0].with_array(np.asarray(label))
        array, cls = preprocess_labelled(images, label_image, plan)
        classes = torch.from_numpy(np.ascontiguousarray(cls).astype(np.int64))[None].to(dev)
    tensor = torch.from_numpy(np.ascontiguousarray(array, np.float32))[None].to(dev)
    return PreparedCase(tensor, classes, grid, needs_resampling(grid.spacing_zyx, plan))
