"""GLS inference: load a checkpoint of any architecture, segment a B-scan or a stack of B-scans.

:func:`predict_image` takes an :class:`~deepimaging.core.image.Image` that is one 2D B-scan
``(1, H, W)`` or a stack of them ``(S, H, W)`` (slices along the array's first axis, split by
:func:`~deepimaging.gls.data.bscans_from_volume`).  Every slice goes through the training
preprocessing stored in the checkpoint header (linear resize to the network size, per-image
min-max normalisation), the network, and back: the probability map is resized (linearly) to
the slice's own size and thresholded there, so ``mask`` and ``probabilities`` lie on the
input grid.

Which output is the segmentation: for ``arch="gls"`` the fused output of the full GLS network
(global + keypoint-guided local + fusion) once training reached stage 3; a checkpoint written
before stage 3 (an interrupted run) segments with the global branch and says so in a warning
and in :attr:`GLSPrediction.source`.  ``global`` uses the global branch, the baselines their
single output.

Keypoints (``gls`` and ``global``, whose keypoint decoder predicts K Gaussian heatmaps): the
argmax of each heatmap on the network grid, mapped to the slice's pixel grid with the same
pixel-area convention as the resize (:func:`~deepimaging.gls.data.scale_keypoints`), so they
are sub-pixel floats.  ``keypoints_px[s, k] = (x, y)`` = (column, row) in slice ``s``;
``keypoints_lps[s, k]`` is the **physical position in LPS millimetres** of voxel index
``(i, j, k) = (x, y, s)`` through the input image's geometry (origin + direction @ (spacing *
index)), the convention of :class:`Image` and ITK; Slicer shows RAS, i.e. x and y negated.
Architectures without a keypoint head return NaN keypoints.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn as nn

from deepimaging.core.checkpoint import Checkpoint, load_checkpoint
from deepimaging.core.device import DeviceLike, select_device
from deepimaging.core.errors import CheckpointError, InputError
from deepimaging.core.image import Image
from deepimaging.core.metrics import dice
from deepimaging.core.progress import CancelToken, ProgressCallback, check_cancel, report
from deepimaging.core.segfile import Segmentation

from .baselines import build_baseline
from .crops import heatmap_argmax
from .data import bscans_from_volume, normalise_image, resize_2d, scale_keypoints
from .model import DEFAULT_WIDTHS, GlobalOnly, GLSNet

log = logging.getLogger(__name__)

ARCHS = ("gls", "global", "unet", "unetpp", "cenet")
KEYPOINT_ARCHS = ("gls", "global")
SIZE_DIVISORS = {"gls": 16, "global": 16, "unet": 16, "unetpp": 16, "cenet": 32}
SEGMENT_NAME = "foreground"
SEGMENT_COLOR = (0.95, 0.75, 0.30)
OOM_ERRORS = tuple({getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError), torch.cuda.OutOfMemoryError})


def check_arch(arch: str) -> str:
    """Normalised architecture name, or :class:`InputError` listing the choices."""
    key = str(arch).lower().strip()
    if key not in ARCHS:
        raise InputError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHS)}")
    return key


def build_network(arch: str, config: Mapping[str, Any]) -> nn.Module:
    """The network of ``arch`` from its header config; all return logits from their forward pass."""
    arch = check_arch(arch)
    cfg = dict(config)
    if arch == "gls":
        return GLSNet.from_config(cfg)
    if arch == "global":
        return GlobalOnly(logits=True, in_channels=int(cfg.get("in_channels", 1)),
                          keypoints=int(cfg.get("keypoints", 2)), widths=tuple(cfg.get("widths", DEFAULT_WIDTHS)))
    return build_baseline(arch, int(cfg.get("in_channels", 1)), 1, tuple(cfg.get("widths", DEFAULT_WIDTHS)),
                          float(cfg.get("width_scale", 1.0)), logits=True)


def forward_outputs(network: nn.Module, arch: str, x: torch.Tensor,
                    fused: bool = True) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """``x`` (B, 1, H, W) -> (mask probability (B, 1, H, W), heatmaps (B, K, H, W) or None,
    GLS crop keypoints (B, K, 2) or None).  For ``gls``, ``fused=False`` returns the global output."""
    if arch == "gls":
        if fused:
            out = network(x)
            return out["fused"], out["heatmaps"], out["keypoints"]
        mask, heat = network.forward_global(x)
        return mask, heat, None
    if arch == "global":
        mask, heat = network.forward_global(x)
        return mask, heat, None
    return torch.sigmoid(network(x)), None, None


def validate_arrays(network: nn.Module, arch: str, images: np.ndarray, masks: np.ndarray, keypoints: np.ndarray,
                    device: torch.device, stage: int = 3, batch: int = 4) -> Dict[str, float]:
    """Mean per-image Dice (threshold 0.5) and keypoint error (px) on the network grid (training's validation).

    ``images``/``masks`` (N, 1, H, W), ``keypoints`` (N, K, 2) xy (NaN: none).  ``val_dice`` is the
    final output of ``arch`` at ``stage`` (GLS: fused in stage 3, else the global branch); GLS and
    global add ``val_dice_global`` and ``val_keypoint_error_px`` (distance of each heatmap's argmax
    to its keypoint, mean over samples with keypoints), GLS in stage 3 ``val_dice_fused``.
    Leaves the network in eval mode.
    """
    network.eval()
    fused = arch == "gls" and stage == 3
    scores: Dict[str, list] = {"val_dice": [], "val_dice_global": [], "val_keypoint_error_px": []}
    with torch.no_grad():
        for i in range(0, len(images), batch):
            x = torch.from_numpy(images[i:i + batch]).to(device)
            truth = masks[i:i + batch, 0] > 0.5
            prob, heat, _ = forward_outputs(network, arch, x, fused)
            outputs = [("val_dice", prob)]
            if heat is not None:
                outputs.append(("val_dice_global", network.forward_global(x)[0] if fused else prob))
                found = heatmap_argmax(heat.float()).cpu().numpy().astype(np.float64)
                dist = np.linalg.norm(found - keypoints[i:i + batch], axis=-1)
                scores["val_keypoint_error_px"] += dist[np.all(np.isfinite(dist), axis=1)].ravel().tolist()
            for key, p in outputs:
                scores[key] += [dice(a, b) for a, b in zip(p[:, 0].float().cpu().numpy() >= 0.5, truth)]
    metrics = {key: float(np.mean(values)) for key, values in scores.items() if values}
    if fused:
        metrics["val_dice_fused"] = metrics["val_dice"]
    return metrics


@dataclass
class GLSModel:
    """A trained network with its architecture and checkpoint header (all inference needs)."""

    arch: str
    network: nn.Module
    header: Dict[str, Any]

    @property
    def size(self) -> Tuple[int, int]:
        """(H, W) the network was trained at."""
        h, w = self.header["preprocessing"]["size"]
        return int(h), int(w)

    @property
    def normalisation(self) -> str:
        return str(self.header["preprocessing"].get("normalisation", "minmax"))

    @property
    def keypoints(self) -> int:
        """K for architectures with a keypoint head, else 0."""
        return int(self.header["config"].get("keypoints", 0)) if self.arch in KEYPOINT_ARCHS else 0

    @property
    def crop_size(self) -> Optional[Tuple[int, int]]:
        """GLS local crop (h, w) on the network grid; None for other architectures."""
        crop = self.header["config"].get("crop_size") if self.arch == "gls" else None
        return (int(crop[0]), int(crop[1])) if crop else None

    @property
    def stage(self) -> int:
        """Training stage the weights reached (3 for finished GLS and for every other architecture)."""
        return int(self.header.get("stage_reached") or 3)

    @property
    def uses_fusion(self) -> bool:
        """True when the segmentation is GLS's fused output (stage 3 reached)."""
        return self.arch == "gls" and self.stage >= 3


def read_gls_checkpoint(path: Union[str, Path]) -> Checkpoint:
    """A GLS checkpoint (any architecture), or :class:`CheckpointError` in plain words."""
    try:
        return load_checkpoint(path, method="gls")
    except CheckpointError as exc:
        if not str(exc).startswith("cannot read checkpoint"):
            raise
        message = str(exc)
    raise CheckpointError(f"{message}; use a best.pt or last.pt written by deepimaging gls train")


def load_gls(source: Union[str, Path, Checkpoint, GLSModel], device: DeviceLike = None) -> GLSModel:
    """Load a GLS checkpoint (path or :class:`Checkpoint`) onto ``device`` (default: the best one)."""
    if isinstance(source, GLSModel):
        return GLSModel(source.arch, source.network.to(select_device(device)).eval(), source.header)
    ckpt = source if isinstance(source, Checkpoint) else read_gls_checkpoint(source)
    if ckpt.method != "gls":
        raise CheckpointError(f"this is a checkpoint of method {ckpt.method!r}, but a 'gls' checkpoint is needed")
    try:
        arch = check_arch(ckpt.header["arch"])
        network = build_network(arch, ckpt.config)
        network.load_state_dict(ckpt.state_dict)
        size = ckpt.header["preprocessing"]["size"]
        if len(size) != 2:
            raise ValueError(f"preprocessing size {size} is not (H, W)")
    except (KeyError, TypeError, ValueError, RuntimeError, InputError) as exc:
        raise CheckpointError(f"the GLS checkpoint is incomplete or does not match its network: {exc}") from exc
    return GLSModel(arch, network.to(select_device(device)).eval(), dict(ckpt.header))


@dataclass
class GLSPrediction:
    """Result of :func:`predict_image` (module docstring: coordinates and outputs).

    ``mask``: uint8 0/1 :class:`Image` on the input grid; ``probabilities``: float32 array of
    the input's shape (S, H, W); ``keypoints_px``: (S, K, 2) xy pixels of each slice (NaN
    without a keypoint head); ``keypoints_lps``: (S, K, 3) LPS mm; ``keypoint_scores``: (S, K)
    heatmap peak values (NaN without a head); ``arch``; ``source``: which output segmented
    (``fused``, ``global`` or ``network``).
    """

    mask: Image
    probabilities: np.ndarray
    keypoints_px: np.ndarray
    keypoints_lps: np.ndarray
    keypoint_scores: np.ndarray
    arch: str
    source: str

    def to_segmentation(self, name: str = SEGMENT_NAME) -> Segmentation:
        """The mask as a one-segment :class:`Segmentation` (``.seg.nrrd`` via ``write_segmentation``)."""
        seg = Segmentation(self.mask.with_array(np.zeros(self.mask.shape, np.uint8)))
        seg.add(name, self.mask.array > 0, SEGMENT_COLOR)
        return seg

    def keypoint_records(self) -> list:
        """``[{"slice", "k", "x_px", "y_px", "position_lps", "score"}]`` for every finite keypoint."""
        records = []
        for s in range(self.keypoints_px.shape[0]):
            for k in range(self.keypoints_px.shape[1]):
                x, y = (float(v) for v in self.keypoints_px[s, k])
                if np.isfinite(x) and np.isfinite(y):
                    records.append({"slice": s, "k": k, "x_px": x, "y_px": y,
                                    "position_lps": [float(v) for v in self.keypoints_lps[s, k]],
                                    "score": float(self.keypoint_scores[s, k])})
        return records


def pixel_to_lps(image: Image, points_px: np.ndarray) -> np.ndarray:
    """(S, K, 2) xy pixels of slice s -> (S, K, 3) LPS mm of index (x, y, s) in ``image``."""
    pts = np.asarray(points_px, dtype=np.float64)
    s_index = np.broadcast_to(np.arange(pts.shape[0], dtype=np.float64)[:, None], pts.shape[:2])
    ijk1 = np.stack([pts[..., 0], pts[..., 1], s_index, np.ones(pts.shape[:2])], axis=-1)
    return (ijk1 @ image.ijk_to_lps().T)[..., :3]


def _check_input(image: Image, model: GLSModel) -> list:
    """The slices of ``image`` to segment, after the input checks (module docstring)."""
    if not isinstance(image, Image):
        raise InputError(f"predict_image needs a deepimaging Image (array + geometry), got {type(image).__name__}")
    if not np.issubdtype(image.array.dtype, np.number) or np.iscomplexobj(image.array):
        raise InputError(f"the image has non-numeric voxels ({image.array.dtype}); a scalar image is needed")
    z, h, w = image.shape
    if z > 1 and w in (3, 4) and h > 8:
        raise InputError(f"the image looks like an RGB(A) picture (shape {image.shape}, colour last); GLS needs a "
                         "scalar image - convert it to grey first (deepimaging.gls.data.read_2d does so for files)")
    image.require_finite("image")
    slices = [image] if z == 1 else bscans_from_volume(image)
    crop = model.crop_size
    if crop is not None and (h < crop[0] or w < crop[1]):
        raise InputError(f"the image is {w}x{h} pixels (x by y), smaller than this GLS model's {crop[1]}x{crop[0]} "
                         f"local crop; it needs B-scans of at least {crop[1]}x{crop[0]} pixels")
    return slices


def _run_network(model: GLSModel, x: torch.Tensor, device: torch.device) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    with torch.no_grad():
        prob, heat, _ = forward_outputs(model.network, model.arch, x.to(device), model.uses_fusion)
    return prob[0, 0].float().cpu().numpy(), None if heat is None else heat[0].float().cpu().numpy()


def predict_image(image: Image, model: Union[str, Path, Checkpoint, GLSModel], device: DeviceLike = None,
                  threshold: float = 0.5, progress: Optional[ProgressCallback] = None,
                  cancel: Optional[CancelToken] = None) -> GLSPrediction:
    """Segment a 2D B-scan ``(1, H, W)`` or a B-scan stack ``(S, H, W)`` slice by slice.

    ``model``: a :class:`GLSModel` or a checkpoint path.  Runs on ``device`` (default: CUDA >
    MPS > CPU); a GPU out-of-memory error moves the job to the CPU with a warning.  Bad input
    (RGB, NaN voxels, smaller than the GLS crop, a 3D volume that is not a B-scan stack) is an
    :class:`InputError`.  See :class:`GLSPrediction` for the outputs.
    """
    if not 0.0 < float(threshold) < 1.0:
        raise InputError(f"threshold must lie between 0 and 1, got {threshold}")
    dev = select_device(device)
    gls = load_gls(model, device=dev)
    if gls.arch == "gls" and not gls.uses_fusion:
        warnings.warn(f"this GLS checkpoint stopped in training stage {gls.stage} (before the fusion stage); "
                      "it segments with the global branch", RuntimeWarning, stacklevel=2)
    slices = _check_input(image, gls)
    k = gls.keypoints
    shape = image.shape
    probs = np.zeros(shape, np.float32)
    points = np.full((shape[0], k, 2), np.nan)
    scores = np.full((shape[0], k), np.nan)
    for s, piece in enumerate(slices):
        check_cancel(cancel)
        report(progress, s / len(slices), f"slice {s + 1}/{len(slices)}")
        array = piece.array[0].astype(np.float32)
        net_in = normalise_image(resize_2d(array, gls.size, 1), gls.normalisation)
        x = torch.from_numpy(np.ascontiguousarray(net_in))[None, None]
        try:
            prob, heat = _run_network(gls, x, dev)
        except Exception as exc:  # noqa: BLE001 - only GPU out-of-memory is retried (on the CPU)
            if dev.type == "cpu" or not (isinstance(exc, OOM_ERRORS) or "out of memory" in str(exc).lower()):
                raise
            warnings.warn(f"out of memory on {dev}; continuing on the CPU", RuntimeWarning, stacklevel=2)
            dev = torch.device("cpu")
            gls.network.to(dev)
            prob, heat = _run_network(gls, x, dev)
        probs[s] = np.clip(resize_2d(prob, array.shape, 1), 0.0, 1.0)
        if heat is not None:
            flat = heat.reshape(k, -1).argmax(axis=1)
            net_xy = np.stack([flat % gls.size[1], flat // gls.size[1]], axis=-1).astype(np.float64)
            points[s] = scale_keypoints(net_xy, gls.size, array.shape)
            scores[s] = heat.reshape(k, -1).max(axis=1)
    report(progress, 1.0, f"{len(slices)} slice(s) segmented")
    mask = image.with_array((probs >= float(threshold)).astype(np.uint8))
    source = "fused" if gls.uses_fusion else "global" if gls.arch in KEYPOINT_ARCHS else "network"
    return GLSPrediction(mask, probs, points, pixel_to_lps(image, points), scores, gls.arch, source)


def model_info(model: GLSModel, path: Optional[Union[str, Path]] = None) -> Dict[str, Any]:
    """JSON-able summary of a model (for the keypoints JSON and reports)."""
    info = {"arch": model.arch, "stage_reached": model.stage, "size": list(model.size),
            "keypoints": model.keypoints, "keypoint_rule": model.header.get("keypoint_rule"),
            "crop_size": list(model.crop_size) if model.crop_size else None,
            "metrics": model.header.get("metrics", {}), "package_version": model.header.get("package_version")}
    if path is not None:
        info["checkpoint"] = str(path)
    return info


def keypoints_document(prediction: GLSPrediction, model: GLSModel, checkpoint: Optional[Union[str, Path]] = None,
                       image: Optional[Union[str, Path]] = None) -> Dict[str, Any]:
    """The keypoints JSON (``deepimaging gls predict --keypoints-out``): records in pixels and LPS mm + model info."""
    return {"image": str(image) if image is not None else None, "slices": int(prediction.mask.shape[0]),
            "model": model_info(model, checkpoint),
            "coordinates": {"x_px, y_px": "column, row in the slice's pixel grid (pixel centres at integers)",
                            "slice": "index along the image's third axis (k); 0 for a 2D image",
                            "position_lps": "physical position in millimetres, LPS (ITK/DICOM convention: origin + "
                                            "direction @ (spacing * (x_px, y_px, slice))); Slicer's RAS negates the "
                                            "first two values"},
            "keypoints": prediction.keypoint_records()}
