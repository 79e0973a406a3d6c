"""Training/evaluation data for the learned refiner: folders of (image, truth, optional coarse)
and the per-ROI network inputs and targets.

Folder layout::

    DIR/images/NAME.nrrd|.nii.gz|.png|...   2D ((1, y, x) or a PNG) or 3D images
    DIR/masks/NAME.*                         true segment (any non-zero value is inside)
    DIR/coarse/NAME.*                        optional coarse segment (else corruptions are drawn)

Network input on the grid (see :mod:`.model`): [image normalised in the ROI, coarse TSDF
(truncated at ``config.truncation`` of the grid) or zeros, has-mask flag].  Target: the TSDF
of the true mask on the same grid, truncated alike, and the mask itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from ...core.errors import InputError
from ...core.image import Image
from ...core.imageio import file_extension, from_sitk
from ..tsdf import truncated_sdf
from .corruption import corrupt_mask
from .model import RefinerConfig
from .roi import RoiBox, box_around, box_from_mask, crop_image, crop_mask, normalise_crop, spatial_view

EXTENSIONS = (".nrrd", ".nhdr", ".nii", ".nii.gz", ".mha", ".mhd", ".png", ".tif", ".tiff", ".bmp", ".jpg", ".jpeg")


@dataclass
class RefineSample:
    """One case: image, true mask and (optionally) a given coarse mask, all (z, y, x) on one grid."""

    name: str
    image: Image
    truth: np.ndarray
    coarse: Optional[np.ndarray] = None


def read_any(path: Path) -> Image:
    """Read an image file of :data:`EXTENSIONS` (colour PNGs: first channel) as an :class:`Image`."""
    import SimpleITK as sitk

    try:
        itk = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise InputError(f"could not read {path}: {str(exc).strip().splitlines()[-1]}") from exc
    if itk.GetNumberOfComponentsPerPixel() > 1:
        itk = sitk.VectorIndexSelectionCast(itk, 0)
    return from_sitk(itk)


def _index(folder: Path) -> Dict[str, Path]:
    found: Dict[str, Path] = {}
    if folder.is_dir():
        for path in sorted(folder.iterdir()):
            ext = file_extension(path)
            if path.is_file() and not path.name.startswith(".") and ext in EXTENSIONS:
                found[path.name[: len(path.name) - len(ext)]] = path
    return found


def load_refine_folder(root: Union[str, Path]) -> List[RefineSample]:
    """Load ``root/images``, ``root/masks`` and optional ``root/coarse`` (matched by file stem)."""
    root = Path(root)
    images, masks, coarse = _index(root / "images"), _index(root / "masks"), _index(root / "coarse")
    if not images:
        raise InputError(f"no images found in {root / 'images'} (expected images/NAME.*, masks/NAME.*)")
    missing = sorted(set(images) - set(masks))
    if missing:
        raise InputError(f"{len(missing)} image(s) have no mask in {root / 'masks'}: {', '.join(missing[:5])}")
    samples = []
    for name, path in images.items():
        image = read_any(path)
        image = Image(image.array.astype(np.float32), image.spacing, image.origin, image.direction)
        truth = read_any(masks[name]).array != 0
        rough = read_any(coarse[name]).array != 0 if name in coarse else None
        for what, arr in (("mask", truth), ("coarse mask", rough)):
            if arr is not None and arr.shape != image.shape:
                raise InputError(f"{name}: {what} shape {arr.shape} differs from the image's {image.shape}")
        if not truth.any():
            raise InputError(f"{name}: the true mask is empty")
        samples.append(RefineSample(name, image, truth, rough))
    return samples


def as_samples(data: Union[str, Path, Sequence[RefineSample]]) -> List[RefineSample]:
    """A folder path or a list of samples -> list of samples."""
    if isinstance(data, (str, Path)):
        return load_refine_folder(data)
    samples = list(data)
    if not samples or not all(isinstance(s, RefineSample) for s in samples):
        raise InputError("data must be a folder or a non-empty list of RefineSample")
    return samples


def model_spacing(image: Image, dim: int) -> Tuple[float, ...]:
    """Spacing along the model's axes ((y, x) or (z, y, x))."""
    return image.spacing_zyx[1:] if dim == 2 else image.spacing_zyx


def grid_tsdf(mask: np.ndarray, truncation_px: float) -> np.ndarray:
    """Truncated signed distance of a grid mask in [-1, 1] (empty -> -1, full -> +1)."""
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return -np.ones(mask.shape, np.float32)
    if mask.all():
        return np.ones(mask.shape, np.float32)
    return truncated_sdf(mask, truncation_px)


def roi_input(image: np.ndarray, coarse: Optional[np.ndarray], box: RoiBox, config: RefinerConfig) -> np.ndarray:
    """Network input (3, *grid) for one ROI of a model-axes image; ``coarse=None`` = ROI mode."""
    grid = config.grid_shape
    img = normalise_crop(crop_image(image, box, grid))
    if coarse is None:
        prior, flag = np.zeros(grid, np.float32), 0.0
    else:
        prior, flag = grid_tsdf(crop_mask(coarse, box, grid), config.truncation_px), 1.0
    return np.stack([img, prior, np.full(grid, flag, np.float32)]).astype(np.float32)


def make_item(sample: RefineSample, config: RefinerConfig, rng: np.random.Generator, *, mask_free: bool = False,
              given_coarse_share: float = 0.5, augment: bool = True) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One training/validation item (input (3, *grid), target TSDF (*grid), target mask (*grid)).

    The coarse mask is the folder's (with probability ``given_coarse_share`` when there is one) or
    a fresh :func:`corrupt_mask`; ROI mode (``mask_free``) uses the true box jittered by +-10 %.
    """
    dim = int(config.dim)
    image = spatial_view(sample.image.array, dim)
    truth = spatial_view(sample.truth, dim)
    spacing = model_spacing(sample.image, dim)
    margin = float(config.margin) * (rng.uniform(0.8, 1.25) if augment else 1.0)
    if mask_free:
        coords = np.argwhere(truth)
        lo, hi = coords.min(axis=0).astype(float), coords.max(axis=0) + 1.0
        ext = hi - lo
        jitter = rng.uniform(-0.1, 0.1, size=(2, dim)) * ext if augment else np.zeros((2, dim))
        box = box_around(lo + jitter[0], np.maximum(hi + jitter[1], lo + jitter[0] + 1), spacing, margin=margin,
                         min_side=config.min_side)
        coarse = None
    else:
        if sample.coarse is not None and sample.coarse.any() and rng.random() < given_coarse_share:
            coarse = spatial_view(sample.coarse, dim)
        else:
            coarse = corrupt_mask(truth, rng)
        box = box_from_mask(coarse, spacing, margin=margin, min_side=config.min_side)
    x = roi_input(image, coarse, box, config)
    mask = crop_mask(truth, box, config.grid_shape)
    if augment:
        for axis in range(dim):
            if rng.random() < 0.5:
                x, mask = np.flip(x, axis + 1), np.flip(mask, axis)
        order = rng.permutation(dim)
        x, mask = np.transpose(x, [0] + [a + 1 for a in order]), np.transpose(mask, order)
        x = np.ascontiguousarray(x)
        mask = np.ascontiguousarray(mask)
    return x, grid_tsdf(mask, config.truncation_px), mask.astype(np.float32)
