"""GLS data: 2D image/mask folders, the CAMUS layout, training arrays and B-scan stacks.

Folder layout (:func:`load_folder`)::

    DIR/images/NAME.png|.nrrd|.nii.gz|...   2D images (RGB/RGBA are converted to grey by luminance)
    DIR/masks/NAME.*                         same NAME stems; values 0/1 or 0/255
    DIR/keypoints.csv                        optional: name,k,x,y (pixels, k from 0)

Keypoints come from ``keypoints.csv`` where it lists a sample, otherwise they are derived from
the mask with a rule of :func:`deepimaging.gls.keypoints.keypoints_from_mask`.

CAMUS layout (:func:`load_camus`): ``ROOT/patientNNNN/patientNNNN_{2CH|4CH}_{ED|ES}.mhd`` (+ .raw)
and the ``..._gt.mhd`` label maps (1 = LV endocardium, 2 = myocardium, 3 = left atrium); the
2023 release's ``.nii.gz`` files are read too.
"""

from __future__ import annotations

import logging
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from deepimaging.core.errors import GeometryMismatchError, InputError
from deepimaging.core.image import Image
from deepimaging.core.imageio import PathLike, file_extension, from_sitk

from .keypoints import KEYPOINT_RULES, keypoints_from_mask, read_keypoints_csv

log = logging.getLogger(__name__)

FOLDER_EXTENSIONS = (".png", ".bmp", ".tif", ".tiff", ".jpg", ".jpeg",
                     ".nrrd", ".nhdr", ".nii", ".nii.gz", ".mha", ".mhd")
LUMINANCE = (0.299, 0.587, 0.114)  # ITU-R BT.601 weights of R, G, B
NORMALISATIONS = ("minmax", "zscore")


@dataclass
class Sample:
    """One 2D sample: image (1, H, W) float32 with its file geometry, optional mask and keypoints."""

    name: str
    image: Image
    mask: Optional[np.ndarray] = None  # (H, W) uint8 0/1
    keypoints: Optional[np.ndarray] = None  # (K, 2) xy pixels

    @property
    def shape(self) -> Tuple[int, int]:
        """(H, W) of the image."""
        return int(self.image.array.shape[1]), int(self.image.array.shape[2])


# -- reading single files -------------------------------------------------------------------------

def read_2d(path: PathLike, what: str = "image") -> Image:
    """Read a 2D image (or a 3D file with one slice) as ``Image`` (1, H, W).

    Multi-channel images: for ``what="image"`` RGB/RGBA become grey by luminance (0.299 R +
    0.587 G + 0.114 B, alpha ignored; grey+alpha keeps the grey); for masks and label maps the
    colour channels must be equal (else a colour/palette mask is refused).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{what} file not found: {path}")
    try:
        itk = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise InputError(f"could not read {what} {path}: {str(exc).strip().splitlines()[-1]}") from exc
    channels = itk.GetNumberOfComponentsPerPixel()
    if channels > 1:
        array = sitk.GetArrayFromImage(itk)
        colour = array[..., :3] if channels >= 3 else array[..., :1]
        if what != "image":
            if not np.all(colour == colour[..., :1]):
                raise InputError(f"{what} {path} has {channels} colour channels that differ (a colour or palette "
                                 "mask?); save it as a single-channel image with values 0/1 or 0/255")
            grey = colour[..., 0]
        elif channels >= 3:
            grey = (colour.astype(np.float64) @ np.asarray(LUMINANCE)).astype(np.float32)
            log.info("%s: %d-channel image converted to grey by luminance (0.299 R + 0.587 G + 0.114 B)",
                     path.name, channels)
        else:
            grey = colour[..., 0]
        scalar = sitk.GetImageFromArray(np.ascontiguousarray(grey))
        scalar.CopyInformation(itk)
        itk = scalar
    image = from_sitk(itk)
    if image.shape[0] != 1:
        raise InputError(f"{what} {path} is a 3D volume with {image.shape[0]} slices; GLS segments 2D B-scans "
                         "(split a stack of B-scans with deepimaging.gls.data.bscans_from_volume)")
    return image


def binary_mask(array: np.ndarray, source: str = "mask") -> np.ndarray:
    """0/1 or 0/255 values -> uint8 0/1; any other value is an :class:`InputError`."""
    values = np.unique(array)
    if np.all(np.isin(values, (0, 1))):
        return (np.asarray(array) == 1).astype(np.uint8)
    if np.all(np.isin(values, (0, 255))):
        return (np.asarray(array) == 255).astype(np.uint8)
    shown = ", ".join(f"{v:g}" for v in values[:8]) + (", ..." if len(values) > 8 else "")
    raise InputError(f"{source}: mask values must be 0/1 or 0/255, found {len(values)} values ({shown}); "
                     "threshold it or pick one label first")


def _stem(path: Path) -> str:
    return path.name[: len(path.name) - len(file_extension(path))]


def _index_folder(folder: Path) -> Dict[str, Path]:
    """{stem: path} of the readable files in ``folder``; two files with one stem are an error."""
    found: Dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.name.startswith(".") or file_extension(path) not in FOLDER_EXTENSIONS:
            continue
        stem = _stem(path)
        if stem in found:
            raise InputError(f"{folder} holds two files named {stem!r} ({found[stem].name}, {path.name}); keep one")
        found[stem] = path
    return found


def _preview(names: Sequence[str], count: int = 5) -> str:
    return ", ".join(names[:count]) + (f" and {len(names) - count} more" if len(names) > count else "")


# -- folders ------------------------------------------------------------------------------------------

def load_folder(root: PathLike, keypoints: int = 2, keypoint_rule: str = "iris-tails",
                require_foreground: bool = False, require_masks: bool = True) -> List[Sample]:
    """Load ``root/images`` + ``root/masks`` (+ ``root/keypoints.csv``) as samples sorted by name.

    Each image needs a mask with the same stem and the same size (else :class:`InputError` /
    :class:`GeometryMismatchError` naming the files); with ``require_masks=False`` images
    without a mask get ``mask=None`` (inference folders).  Where mask and image geometry
    (spacing/origin) differ, the image's is used and a warning is logged.  ``keypoints`` = K
    (0: none): taken from ``keypoints.csv`` when it lists the sample (it must have K points inside
    the image), else derived from the mask with ``keypoint_rule``.  A mask without foreground is
    kept with ``keypoints=None`` and a ``RuntimeWarning``, or refused with ``require_foreground``.
    """
    root = Path(root)
    images_dir, masks_dir = root / "images", root / "masks"
    if not images_dir.is_dir():
        raise InputError(f"{root} has no images/ folder; expected DIR/images/NAME.png, DIR/masks/NAME.png "
                         "and optionally DIR/keypoints.csv")
    if keypoint_rule not in KEYPOINT_RULES:
        raise InputError(f"unknown keypoint rule {keypoint_rule!r}; choose one of {', '.join(KEYPOINT_RULES)}")
    if int(keypoints) < 0:
        raise InputError(f"keypoints must be 0 or more, got {keypoints}")
    images = _index_folder(images_dir)
    if not images:
        raise InputError(f"{images_dir} holds no image files ({', '.join(FOLDER_EXTENSIONS)})")
    if not masks_dir.is_dir() and require_masks:
        raise InputError(f"{root} has no masks/ folder; every images/NAME.* needs a masks/NAME.* "
                         "(pass require_masks=False to load images only)")
    masks = _index_folder(masks_dir) if masks_dir.is_dir() else {}
    missing = sorted(set(images) - set(masks))
    if missing and require_masks:
        raise InputError(f"no mask in {masks_dir} for {len(missing)} image(s): {_preview(missing)}; "
                         "each images/NAME.* needs a masks/NAME.* with the same NAME")
    orphans = sorted(set(masks) - set(images))
    if orphans:
        log.warning("%d mask(s) in %s have no image and are ignored: %s", len(orphans), masks_dir, _preview(orphans))
    csv_path = root / "keypoints.csv"
    table = read_keypoints_csv(csv_path) if csv_path.is_file() else {}
    unknown = sorted(set(table) - set(images))
    if unknown:
        log.warning("keypoints.csv lists %d name(s) without an image: %s", len(unknown), _preview(unknown))
    samples, derived = [], 0
    for name in sorted(images):
        image = read_2d(images[name], "image")
        image = Image(image.array.astype(np.float32), image.spacing, image.origin, image.direction)
        image.require_finite(f"image {images[name]}")
        mask = None
        if name in masks:
            mask = _load_mask(masks[name], images[name], image)
            if require_foreground and not mask.any():
                raise InputError(f"mask {masks[name]} has no foreground pixel (require_foreground=True)")
        points = None
        if int(keypoints) > 0 and name in table:
            points = _checked_points(table[name], int(keypoints), name, image.array.shape[1:])
        elif int(keypoints) > 0 and mask is not None:
            points = _derive(mask, int(keypoints), keypoint_rule, str(masks[name]))
            derived += points is not None
        samples.append(Sample(name, image, mask, points))
    if int(keypoints) > 0:
        log.info("%s: %d sample(s), keypoints from keypoints.csv for %d, derived by rule %r for %d",
                 root, len(samples), sum(n in table for n in images), keypoint_rule, derived)
    return samples


def _load_mask(mask_path: Path, image_path: Path, image: Image) -> np.ndarray:
    mask_image = read_2d(mask_path, "mask")
    if mask_image.shape != image.shape:
        raise GeometryMismatchError(
            f"mask {mask_path} is {mask_image.shape[2]}x{mask_image.shape[1]} pixels but image {image_path} is "
            f"{image.shape[2]}x{image.shape[1]} (width x height); they must match")
    diffs = image.grid_differences(mask_image)
    if diffs:
        log.warning("mask %s: %s; the image's geometry is used", mask_path.name, "; ".join(diffs))
    return binary_mask(mask_image.array[0], f"mask {mask_path}")


def _checked_points(points: np.ndarray, k: int, name: str, shape: Sequence[int]) -> np.ndarray:
    if len(points) != k:
        raise InputError(f"keypoints.csv has {len(points)} keypoint(s) for {name!r}, expected {k}")
    height, width = int(shape[0]), int(shape[1])
    outside = ~((points[:, 0] >= -0.5) & (points[:, 0] < width - 0.5)
                & (points[:, 1] >= -0.5) & (points[:, 1] < height - 0.5))
    if outside.any():
        raise InputError(f"keypoints.csv: keypoint k={int(np.argmax(outside))} of {name!r} "
                         f"{tuple(points[int(np.argmax(outside))])} lies outside the {width}x{height} image")
    return points.astype(np.float64)


def _derive(mask: np.ndarray, k: int, rule: str, source: str) -> Optional[np.ndarray]:
    if not mask.any():
        warnings.warn(f"{source} has no foreground: the sample is kept without keypoints", RuntimeWarning, stacklevel=3)
        return None
    try:
        return keypoints_from_mask(mask, k, rule)
    except InputError as exc:
        raise InputError(f"{source}: {exc}") from exc


def load_camus(root: PathLike, views: Sequence[str] = ("2CH", "4CH"), phases: Sequence[str] = ("ED", "ES"),
               label: int = 1, require_foreground: bool = False) -> List[Sample]:
    """Load CAMUS ``patientNNNN`` folders: one sample per patient, view and phase.

    mask = (label map == ``label``) (1 = LV endocardium); keypoint (K = 1) = the LV apex by rule
    ``"lv-apex"``.  A missing image or ``_gt`` file is an :class:`InputError` naming it; a label
    absent from a label map gives ``keypoints=None`` and a warning (or an error with
    ``require_foreground``).  Samples are named ``patientNNNN_VIEW_PHASE``.
    """
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"CAMUS folder not found: {root}")
    if not views or not phases:
        raise InputError("load_camus needs at least one view (2CH, 4CH) and one phase (ED, ES)")
    if int(label) < 1:
        raise InputError(f"label must be a positive label value (1 = LV endocardium), got {label}")
    patients = sorted(p for p in root.iterdir() if p.is_dir() and re.fullmatch(r"patient\d+", p.name))
    if not patients:
        raise InputError(f"{root} holds no patientNNNN folders (CAMUS layout: "
                         "ROOT/patient0001/patient0001_2CH_ED.mhd and patient0001_2CH_ED_gt.mhd)")
    samples = []
    for patient in patients:
        for view in views:
            for phase in phases:
                stem = f"{patient.name}_{view}_{phase}"
                image_path = _camus_file(patient, stem, "image")
                gt_path = _camus_file(patient, stem + "_gt", "ground-truth label map")
                image = read_2d(image_path, "image")
                image = Image(image.array.astype(np.float32), image.spacing, image.origin, image.direction)
                gt = read_2d(gt_path, "label map")
                if gt.shape != image.shape:
                    raise GeometryMismatchError(f"label map {gt_path} is {gt.shape[2]}x{gt.shape[1]} pixels but "
                                                f"image {image_path} is {image.shape[2]}x{image.shape[1]}")
                mask = (np.rint(gt.array[0]) == int(label)).astype(np.uint8)
                if require_foreground and not mask.any():
                    raise InputError(f"label map {gt_path} has no pixel of label {label}")
                samples.append(Sample(stem, image, mask, _derive(mask, 1, "lv-apex", f"label {label} of {gt_path}")))
    return samples


def _camus_file(patient: Path, stem: str, what: str) -> Path:
    for ext in (".mhd", ".nii.gz", ".nii", ".nrrd"):
        if (patient / (stem + ext)).is_file():
            return patient / (stem + ext)
    hint = " (the CAMUS test set ships without ground truth)" if stem.endswith("_gt") else ""
    raise InputError(f"CAMUS {what} {patient / stem}.mhd (or .nii.gz) not found{hint}")


# -- arrays for training/inference --------------------------------------------------------------------

def resize_2d(array: np.ndarray, size: Sequence[int], order: int = 1) -> np.ndarray:
    """Resize (H, W) to ``size`` with ``scipy.ndimage.zoom`` (order 1 linear, 0 nearest).

    Pixel-area convention (``grid_mode=True``): output pixel centre o maps to input
    ``(o + 0.5) * H / H' - 0.5``, the same mapping :func:`scale_keypoints` applies.
    """
    array = np.asarray(array)
    target = (int(size[0]), int(size[1]))
    if array.shape == target:
        return array.copy()
    factors = (target[0] / array.shape[0], target[1] / array.shape[1])
    out = ndimage.zoom(array, factors, order=order, mode="nearest", grid_mode=True)
    if out.shape != target:  # guard against rounding in zoom's output shape
        raise InputError(f"resizing {array.shape} to {target} gave {out.shape}")
    return out


def scale_keypoints(points: np.ndarray, source_hw: Sequence[int], target_hw: Sequence[int]) -> np.ndarray:
    """Map (..., 2) xy pixels from a ``source_hw`` grid to a ``target_hw`` grid (NaN stays NaN)."""
    pts = np.asarray(points, dtype=np.float64)
    sx = target_hw[1] / source_hw[1]
    sy = target_hw[0] / source_hw[0]
    return np.stack([(pts[..., 0] + 0.5) * sx - 0.5, (pts[..., 1] + 0.5) * sy - 0.5], axis=-1)


def normalise_image(array: np.ndarray, method: str = "minmax") -> np.ndarray:
    """Per-image intensity normalisation: ``"minmax"`` to [0, 1] or ``"zscore"``; a constant image gives zeros."""
    if method not in NORMALISATIONS:
        raise InputError(f"normalisation must be one of {', '.join(NORMALISATIONS)}, got {method!r}")
    a = np.asarray(array, dtype=np.float32)
    if method == "minmax":
        lo, hi = float(a.min()), float(a.max())
        return (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
    std = float(a.std())
    return (a - float(a.mean())) / std if std > 0 else np.zeros_like(a)


def to_arrays(samples: Sequence[Sample], size: Sequence[int] = (256, 256), normalise: str = "minmax",
              snap_distance: float = 3.0) -> Tuple[np.ndarray, Optional[np.ndarray], Optional[np.ndarray]]:
    """Stack samples on one ``size`` grid: images, masks, keypoints.

    * images ``(N, 1, H, W)`` float32: linear resize, then :func:`normalise_image` per image
      (default min-max to [0, 1]; the same call must be used at inference);
    * masks ``(N, 1, H, W)`` uint8 0/1 (nearest resize), or None when no sample has a mask
      (some with and some without is an error);
    * keypoints ``(N, K, 2)`` float32 xy on the new grid (:func:`scale_keypoints`; NaN rows
      for samples without keypoints), or None when none has keypoints.  A keypoint that lay on
      its mask but whose rounded position misses the resized mask (thin tails shrink when
      downsizing) is moved to the nearest foreground pixel of the resized mask when that is at
      most ``snap_distance`` pixels away, so heatmap targets stay on the structure.
    """
    if not samples:
        raise InputError("to_arrays needs at least one sample")
    target = (int(size[0]), int(size[1]))
    if min(target) < 1:
        raise InputError(f"size must be positive (H, W), got {tuple(size)}")
    with_mask = [s.mask is not None for s in samples]
    if any(with_mask) and not all(with_mask):
        raise InputError(f"sample {samples[with_mask.index(False)].name!r} has no mask but others do")
    counts = sorted({len(s.keypoints) for s in samples if s.keypoints is not None})
    if len(counts) > 1:
        raise InputError(f"samples have different numbers of keypoints ({counts}); use one K for all")
    images = np.zeros((len(samples), 1) + target, np.float32)
    masks = np.zeros((len(samples), 1) + target, np.uint8) if all(with_mask) else None
    points = np.full((len(samples), counts[0], 2), np.nan, np.float32) if counts else None
    for i, sample in enumerate(samples):
        images[i, 0] = normalise_image(resize_2d(sample.image.array[0].astype(np.float32), target, 1), normalise)
        if masks is not None:
            if sample.mask.shape != sample.shape:
                raise GeometryMismatchError(f"sample {sample.name!r}: mask {sample.mask.shape} vs image {sample.shape}")
            masks[i, 0] = resize_2d(sample.mask.astype(np.uint8), target, 0)
        if points is not None and sample.keypoints is not None:
            scaled = scale_keypoints(sample.keypoints, sample.shape, target)
            if masks is not None:
                scaled = _snap(scaled, sample.keypoints, sample.mask, masks[i, 0], snap_distance)
            points[i] = scaled
    return images, masks, points


def _pixel(points: np.ndarray, shape: Sequence[int]) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rounded (row, col) of xy points and whether they lie in the image (NaN -> False)."""
    finite = np.all(np.isfinite(points), axis=-1)
    safe = np.where(finite[:, None], points, -1.0)
    col, row = np.floor(safe[:, 0] + 0.5).astype(int), np.floor(safe[:, 1] + 0.5).astype(int)
    ok = finite & (row >= 0) & (row < shape[0]) & (col >= 0) & (col < shape[1])
    return row, col, ok


def _snap(scaled: np.ndarray, original: np.ndarray, mask: np.ndarray, resized: np.ndarray,
          limit: float) -> np.ndarray:
    row0, col0, ok0 = _pixel(original, mask.shape)
    row1, col1, ok1 = _pixel(scaled, resized.shape)
    was_on = ok0 & (mask[np.clip(row0, 0, mask.shape[0] - 1), np.clip(col0, 0, mask.shape[1] - 1)] > 0)
    now_on = ok1 & (resized[np.clip(row1, 0, resized.shape[0] - 1), np.clip(col1, 0, resized.shape[1] - 1)] > 0)
    todo = np.nonzero(was_on & ~now_on)[0]
    if len(todo) == 0 or not resized.any():
        return scaled
    ys, xs = np.nonzero(resized)
    out = scaled.copy()
    for k in todo:
        d2 = (xs - scaled[k, 0]) ** 2 + (ys - scaled[k, 1]) ** 2
        j = int(np.argmin(d2))
        if d2[j] <= limit ** 2:
            out[k] = (xs[j], ys[j])
    return out


# -- B-scan stacks --------------------------------------------------------------------------------------

def bscans_from_volume(image: Image, min_size: int = 32, max_slices: int = 512) -> List[Image]:
    """Split a stack of 2D B-scans into single slices ``(1, H, W)`` with their own geometry.

    Rule: the slices are always along the array's first axis (z / k); the volume is accepted
    when each slice is at least ``min_size`` pixels in y and x and there are at most
    ``max_slices`` slices (more suggests a 3D CT/MRI volume, not a B-scan series; raise the
    limit if it really is one).  Slice k keeps spacing and direction, and its origin moves by
    k slice steps along the k axis.  A 2D image (1, H, W) gives one slice.
    """
    z, height, width = image.shape
    if height < min_size or width < min_size:
        raise InputError(f"each slice of this volume is {width}x{height} pixels (x by y), below the {min_size}-pixel "
                         "minimum: it does not look like a stack of B-scans along z")
    if z > max_slices:
        raise InputError(f"the volume has {z} slices, more than the {max_slices} of a B-scan series (a 3D CT/MRI "
                         "volume?); GLS segments 2D B-scans - pass max_slices= if this really is a series")
    step = image.direction[:, 2] * image.spacing[2]
    origin = np.asarray(image.origin)
    return [Image(image.array[k:k + 1].copy(), image.spacing, tuple(origin + k * step), image.direction.copy())
            for k in range(z)]
