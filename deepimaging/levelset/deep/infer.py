"""Refining a segment with a trained deep Chan-Vese model: :func:`load_refiner`, :func:`refine_learned`.

The result is the same :class:`~deepimaging.levelset.refine.RefineResult` as the classic
refinement (mask and level set on the input grid, phi > 0 inside; ``iterations`` = the N
unrolled steps, ``converged`` = True: a fixed number of learned steps has no tolerance), so the
CLI, the Slicer panel and the Segment Editor effect treat both alike.  Outside the ROI phi is
``min(phi.min(), -1)`` (outside).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ...core.checkpoint import load_checkpoint
from ...core.device import DeviceLike, select_device
from ...core.errors import CheckpointError, DeepImagingError, InputError
from ...core.image import Image
from ...core.progress import CancelToken, ProgressCallback, check_cancel, report
from ..refine import RefineResult, _validated_mask
from .data import model_spacing, roi_input
from .model import METHOD, DeepChanVese, RefinerConfig
from .roi import RoiBox, box_from_mask, box_from_user, paste, spatial_view


@dataclass
class LearnedRefiner:
    """A loaded model, its config and checkpoint header, on a device (in eval mode)."""

    model: DeepChanVese
    config: RefinerConfig
    device: torch.device
    header: Dict[str, Any]


def load_refiner(path: Union[str, Path], device: DeviceLike = None) -> LearnedRefiner:
    """Load a ``levelset-deep`` checkpoint; :class:`CheckpointError` if corrupt, of another method or unusable."""
    ckpt = load_checkpoint(path, method=METHOD)
    try:
        config = RefinerConfig.from_dict(ckpt.config)
        model = DeepChanVese(config)
        model.load_state_dict(ckpt.state_dict)
    except (InputError, TypeError, KeyError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: the weights or config do not form a deep Chan-Vese model ({exc})") from exc
    dev = select_device(device)
    model.to(dev).eval()
    return LearnedRefiner(model, config, dev, ckpt.header)


def _as_refiner(model_or_path: Union[LearnedRefiner, DeepChanVese, str, Path], device: DeviceLike) -> LearnedRefiner:
    if isinstance(model_or_path, LearnedRefiner):
        return model_or_path
    if isinstance(model_or_path, DeepChanVese):
        dev = select_device(device) if device is not None else next(model_or_path.parameters()).device
        return LearnedRefiner(model_or_path.to(dev).eval(), model_or_path.config, dev, {})
    return load_refiner(model_or_path, device)


def predict_levelsets(image: Image, mask: Optional[Union[np.ndarray, Image]], refiner: LearnedRefiner, *,
                      roi: Optional[Sequence[int]] = None) -> Tuple[np.ndarray, np.ndarray, RoiBox, Dict[str, float]]:
    """(phi_0, phi_N) pasted on the image's (z, y, x) grid, the ROI box and the predicted parameters."""
    config = refiner.config
    dim = int(config.dim)
    if image.is_2d != (dim == 2):
        kind = "a 2D slice" if image.is_2d else f"a 3D volume of {image.shape[0]} slices"
        raise InputError(f"this model is {dim}D but the image is {kind}; use a {2 if image.is_2d else 3}D model")
    image.require_finite()
    arr = spatial_view(image.array, dim).astype(np.float32)
    spacing = model_spacing(image, dim)
    coarse = None if mask is None else spatial_view(_validated_mask(image, mask), dim)
    if roi is not None:
        box = box_from_user(roi, image.shape, dim, spacing, margin=config.margin, min_side=config.min_side)
    elif coarse is not None:
        box = box_from_mask(coarse, spacing, margin=config.margin, min_side=config.min_side)
    else:
        raise InputError("give a rough segment (mask) or a ROI box z0,y0,x0,z1,y1,x1 for the learned refiner")
    x = torch.from_numpy(roi_input(arr, coarse, box, config))[None].to(refiner.device)
    with torch.no_grad():
        out = refiner.model(x)
    params = {k: v[0].cpu().numpy().round(4).tolist() for k, v in out["params"].items()}
    phis = []
    for key in ("phi0", "phiN"):
        phi = paste(out[key][0].float().cpu().numpy(), box, arr.shape)
        phis.append(phi[np.newaxis] if dim == 2 else phi)
    return phis[0], phis[1], box, params


def refine_learned(image: Image, mask: Optional[Union[np.ndarray, Image]],
                   model_or_path: Union[LearnedRefiner, DeepChanVese, str, Path], *,
                   roi: Optional[Sequence[int]] = None, device: DeviceLike = None,
                   progress: Optional[ProgressCallback] = None, cancel: Optional[CancelToken] = None,
                   stage: str = "final") -> RefineResult:
    """Refine ``mask`` on ``image`` with a learned refiner (checkpoint path or loaded model).

    ``mask=None`` with ``roi=(z0, y0, x0, z1, y1, x1)`` (voxel indices, ends exclusive) is ROI
    mode: the network predicts the segment from the image crop alone.  With both, the box sets
    the ROI and the mask the prior.  ``stage="initial"`` returns phi_0 (the TSDF head alone).
    ``device`` applies when a path is given (a loaded :class:`LearnedRefiner` keeps its device).
    Raises :class:`InputError` on bad input (2D model on a volume and the reverse included) and
    :class:`DeepImagingError` instead of returning an empty segment.
    """
    if stage not in ("final", "initial"):
        raise InputError(f"stage must be 'final' or 'initial', got {stage!r}")
    check_cancel(cancel)
    report(progress, 0.0, "loading the learned refiner")
    refiner = _as_refiner(model_or_path, device)
    check_cancel(cancel)
    report(progress, 0.3, "predicting the level set")
    phi0, phin, box, _ = predict_levelsets(image, mask, refiner, roi=roi)
    phi = phin if stage == "final" else phi0
    refined = phi > 0
    if not refined.any():
        raise DeepImagingError("the learned refiner found no segment in this region; check the box or the rough "
                               "segment, or use the classic refinement")
    slices = box.clipped(phi.shape[-int(refiner.config.dim):])
    roi_slices = (slice(0, 1),) + tuple(slices) if refiner.config.dim == 2 else tuple(slices)
    report(progress, 1.0, f"refined with {refiner.config.steps} learned Chan-Vese steps")
    return RefineResult(refined, phi, int(refiner.config.steps) if stage == "final" else 0, True, roi_slices)
