"""Keypoint-centred fixed-size crops and their exact paste-back (GLS local branch).

Conventions (all 2D, tensors ``(B, C, H, W)``; points are ``(x, y)`` = (column, row)):

* A crop of size ``(h, w)`` centred at pixel ``(cx, cy)`` covers rows ``cy - h // 2`` ..
  ``cy - h // 2 + h - 1`` and columns ``cx - w // 2`` .. ``cx - w // 2 + w - 1``, so the centre
  pixel lands at crop pixel ``(h // 2, w // 2)``.
* **Borders: the window is shifted, never padded.**  Near a border the top-left corner is
  clamped to ``[0, H - h] x [0, W - w]``, so every crop holds only real image pixels and has
  the full size; the centre then sits off the crop's middle.  A crop larger than the image in
  either axis cannot be placed this way and raises :class:`InputError`.
* **Paste-back** puts each crop at its window on a blank (zero) canvas of the image size.
  Overlapping crops are combined by ``"max"`` (default: order-independent, keeps the most
  confident foreground; meant for probabilities >= 0, not logits) or ``"mean"`` (average over
  the crops that cover a pixel).  Pixels no crop covers are 0.  Because windows never leave
  the image, pasting a crop of ones gives exactly the window's indicator.

Everything is vectorised (gather / index-put), differentiable w.r.t. the crop values, and
runs on any device.
"""

from __future__ import annotations

import math
from typing import Sequence, Tuple, Union

import torch

from deepimaging.core.errors import InputError

from .keypoints import heatmap_argmax as argmax_xy

Size = Union[int, Sequence[int]]

PASTE_REDUCTIONS = ("max", "mean")


def as_hw(size: Size, what: str = "crop size") -> Tuple[int, int]:
    """``int`` or ``(h, w)`` -> ``(h, w)`` of positive ints."""
    if isinstance(size, int):
        hw = (size, size)
    else:
        values = tuple(int(v) for v in size)
        if len(values) != 2:
            raise InputError(f"{what} must be one int or (height, width), got {tuple(size)}")
        hw = (values[0], values[1])
    if hw[0] < 1 or hw[1] < 1:
        raise InputError(f"{what} must be positive, got {hw}")
    return hw


def check_crop_fits(image_hw: Sequence[int], crop_hw: Size) -> Tuple[int, int]:
    """Raise :class:`InputError` when a ``crop_hw`` window cannot lie inside ``image_hw``."""
    h, w = as_hw(crop_hw)
    height, width = int(image_hw[0]), int(image_hw[1])
    if h > height or w > width:
        raise InputError(
            f"crop size {h}x{w} is larger than the image ({height}x{width}); crops are shifted inside "
            f"the image, never padded, so use a crop size of at most {height}x{width} or a larger image")
    return h, w


def heatmap_argmax(heatmaps: torch.Tensor) -> torch.Tensor:
    """Pixel of each heatmap's maximum: ``(B, K, H, W)`` -> ``(B, K, 2)`` long ``(x, y)``, for crop centres.

    :func:`deepimaging.gls.keypoints.heatmap_argmax` rounded to pixels: ties go to the first pixel
    in row-major order, a map without a finite value gives the image centre; not differentiable.
    """
    if heatmaps.dim() != 4:
        raise InputError(f"heatmaps must be (B, K, H, W), got shape {tuple(heatmaps.shape)}")
    return argmax_xy(heatmaps, threshold=-math.inf, empty="centre").round().long()


def crop_origins(centres: torch.Tensor, image_hw: Sequence[int], crop_hw: Size) -> torch.Tensor:
    """Top-left corners ``(x0, y0)`` (long, ``(B, K, 2)``) of crops centred at ``centres``.

    ``centres`` is ``(B, K, 2)`` in ``(x, y)`` pixels (floats are rounded).  Windows that would
    leave the image are shifted inside it (see the module docstring).
    """
    h, w = check_crop_fits(image_hw, crop_hw)
    if centres.dim() != 3 or centres.shape[-1] != 2:
        raise InputError(f"centres must be (B, K, 2) (x, y), got shape {tuple(centres.shape)}")
    c = centres.detach()
    c = torch.round(c).long() if c.is_floating_point() else c.long()
    x0 = (c[..., 0] - w // 2).clamp(0, int(image_hw[1]) - w)
    y0 = (c[..., 1] - h // 2).clamp(0, int(image_hw[0]) - h)
    return torch.stack((x0, y0), dim=-1)


def _window_index(origins: torch.Tensor, crop_hw: Tuple[int, int]) -> Tuple[torch.Tensor, ...]:
    """Broadcastable (batch, crop, row, col) index tensors of shape (B, K, h, w)."""
    h, w = crop_hw
    b, k = origins.shape[:2]
    dev = origins.device
    rows = origins[..., 1, None] + torch.arange(h, device=dev)  # (B, K, h)
    cols = origins[..., 0, None] + torch.arange(w, device=dev)  # (B, K, w)
    bi = torch.arange(b, device=dev).view(b, 1, 1, 1)
    ki = torch.arange(k, device=dev).view(1, k, 1, 1)
    return bi, ki, rows[..., :, None], cols[..., None, :]


def _check_origins(origins: torch.Tensor, image_hw: Sequence[int], crop_hw: Tuple[int, int]) -> None:
    """Origins must be (B, K, 2) and keep every window inside the image."""
    if origins.dim() != 3 or origins.shape[-1] != 2:
        raise InputError(f"origins must be (B, K, 2) (x0, y0), got shape {tuple(origins.shape)}")
    check_crop_fits(image_hw, crop_hw)
    if origins.numel() and (int(origins.min()) < 0 or int(origins[..., 0].max()) > int(image_hw[1]) - crop_hw[1]
                            or int(origins[..., 1].max()) > int(image_hw[0]) - crop_hw[0]):
        raise InputError("a crop window leaves the image; compute origins with crop_origins()")


def extract_crops(images: torch.Tensor, origins: torch.Tensor, crop_hw: Size) -> torch.Tensor:
    """Cut ``(B, C, H, W)`` at ``origins`` ``(B, K, 2)`` -> crops ``(B, K, C, h, w)``.

    Works for images, labels and heatmaps alike (the stage-2 label is cropped the same way).
    """
    hw = as_hw(crop_hw)
    if images.dim() != 4:
        raise InputError(f"images must be (B, C, H, W), got shape {tuple(images.shape)}")
    _check_origins(origins, images.shape[-2:], hw)
    if origins.shape[0] != images.shape[0]:
        raise InputError(f"{origins.shape[0]} crop origin sets for a batch of {images.shape[0]}")
    bi, _, rows, cols = _window_index(origins, hw)
    picked = images[bi, :, rows, cols]  # advanced indices first: (B, K, h, w, C)
    return picked.permute(0, 1, 4, 2, 3)


def paste_crops(crops: torch.Tensor, origins: torch.Tensor, image_hw: Sequence[int],
                reduce: str = "max") -> torch.Tensor:
    """Paste ``(B, K, C, h, w)`` crops onto a zero canvas ``(B, C, H, W)`` at ``origins``.

    ``reduce`` combines overlapping crops: ``"max"`` or ``"mean"`` (over covering crops).
    """
    if reduce not in PASTE_REDUCTIONS:
        raise InputError(f"paste reduce must be one of {PASTE_REDUCTIONS}, got {reduce!r}")
    if crops.dim() != 5:
        raise InputError(f"crops must be (B, K, C, h, w), got shape {tuple(crops.shape)}")
    b, k, c, h, w = crops.shape
    height, width = int(image_hw[0]), int(image_hw[1])
    _check_origins(origins, (height, width), (h, w))
    if tuple(origins.shape[:2]) != (b, k):
        raise InputError(f"origins {tuple(origins.shape)} do not match crops {tuple(crops.shape)}")
    bi, ki, rows, cols = _window_index(origins, (h, w))
    layers = crops.new_zeros((b, k, height, width, c))
    layers = layers.index_put((bi, ki, rows, cols), crops.permute(0, 1, 3, 4, 2))
    layers = layers.permute(0, 1, 4, 2, 3)  # (B, K, C, H, W)
    if reduce == "max":
        return layers.amax(dim=1)
    cover = crop_coverage(origins, (height, width), (h, w), count=True).to(crops.dtype)
    return layers.sum(dim=1) / cover.clamp(min=1.0)


def crop_coverage(origins: torch.Tensor, image_hw: Sequence[int], crop_hw: Size,
                  count: bool = False) -> torch.Tensor:
    """``(B, 1, H, W)`` map of the pixels inside any crop window (1/0), or how many cover each."""
    hw = as_hw(crop_hw)
    height, width = int(image_hw[0]), int(image_hw[1])
    _check_origins(origins, (height, width), hw)
    b, k = origins.shape[:2]
    bi, ki, rows, cols = _window_index(origins, hw)
    layers = torch.zeros((b, k, height, width), device=origins.device)
    layers[bi, ki, rows, cols] = 1.0
    out = layers.sum(dim=1, keepdim=True) if count else layers.amax(dim=1, keepdim=True)
    return out
