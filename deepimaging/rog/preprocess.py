"""ROG preprocessing, shared verbatim by training and inference, and its inverse.

Forward (per case): check the volume, z-score each channel with the plan's statistics (MRI-like
channels are min-max scaled per image first, clipping to the plan's [0.5, 99.5] foreground
percentiles), then resample to the plan's target spacing (linear or B-spline for intensities,
nearest neighbour for labels) and map label values to network class indices.  Inverse:
probabilities (linear) or labels (nearest) from the resampled grid back onto the original one.

Why this order: the plan's percentiles and mean/std were measured on the original grid, so
normalising there reproduces them exactly, and linear resampling of clipped values cannot
overshoot the clip range.  Resampling works in index space (identity direction, voxel corners
aligned at the first voxel), so the inverse lands exactly on the input grid whatever its
origin and direction; the physical geometry is carried separately in a :class:`Grid`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import SimpleITK as sitk

from deepimaging.core.errors import GeometryMismatchError, InputError
from deepimaging.core.image import Image

from .plan import ChannelInfo, Plan

SPACING_RTOL = 1e-3  # spacings this close to the target are not resampled (saves time, exact)
ImageInput = Union[Image, Sequence[Image]]


@dataclass(frozen=True)
class Grid:
    """The voxel grid a case came from: (z, y, x) shape, plus x, y, z spacing/origin and LPS direction."""

    shape: Tuple[int, int, int]
    spacing: Tuple[float, float, float]
    origin: Tuple[float, float, float]
    direction: Tuple[float, ...]

    @classmethod
    def of(cls, image: Image) -> "Grid":
        return cls(tuple(image.shape), tuple(image.spacing), tuple(image.origin),
                   tuple(float(v) for v in image.direction.ravel()))

    @property
    def spacing_zyx(self) -> Tuple[float, float, float]:
        return (self.spacing[2], self.spacing[1], self.spacing[0])

    def image(self, array: np.ndarray) -> Image:
        """An :class:`Image` of ``array`` (this grid's shape) with this grid's geometry."""
        if tuple(array.shape) != self.shape:
            raise GeometryMismatchError(f"array shape {array.shape} does not match the grid {self.shape}")
        return Image(array, self.spacing, self.origin, np.asarray(self.direction).reshape(3, 3))


@dataclass
class PreprocessedImage:
    """Network-ready channels (C, z, y, x) float32 on the target grid, and where they came from."""

    array: np.ndarray
    grid: Grid
    resampled: bool


# -- checks -------------------------------------------------------------------------------------
def as_channels(image: ImageInput, plan: Plan) -> List[Image]:
    """Validate a volume (one :class:`Image` or one per channel) against the plan -> list of channels."""
    images = [image] if isinstance(image, Image) else list(image)
    if not images or not all(isinstance(i, Image) for i in images):
        raise InputError("expected an Image or a list of Images (one per channel)")
    for img in images:
        if img.is_2d or 1 in img.shape:
            raise InputError(f"ROG needs 3-D volumes; got a 2-D image of shape {img.shape} (z, y, x)")
        img.require_finite()
    if len(images) != len(plan.channels):
        names = [c.name for c in plan.channels]
        raise InputError(f"the model expects {len(names)} channel(s) {names}, got {len(images)} volume(s)")
    for i, img in enumerate(images[1:], start=2):
        img.require_same_grid(images[0], what=f"channel {i}", of="first channel")
    return images


def read_channels(path: Union[str, Path]) -> List[Image]:
    """Read a volume file; a 4-D file (MSD multi-modal) gives one :class:`Image` per 4th-axis index."""
    from deepimaging.core.imageio import from_sitk, read_image

    path = Path(path)
    if not path.is_file():
        raise InputError(f"image file not found: {path}")
    try:
        img = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise InputError(f"could not read image {path}: {str(exc).strip().splitlines()[-1]}") from exc
    if img.GetDimension() == 4:
        size = list(img.GetSize())
        out = []
        for t in range(size[3]):
            vol = sitk.Extract(img, size[:3] + [0], [0, 0, 0, t])
            out.append(from_sitk(vol))
        return out
    if img.GetNumberOfComponentsPerPixel() > 1:
        return [from_sitk(sitk.VectorIndexSelectionCast(img, c))
                for c in range(img.GetNumberOfComponentsPerPixel())]
    return [read_image(path)]


# -- intensities and labels ---------------------------------------------------------------------
def normalize_channel(array: np.ndarray, info: ChannelInfo) -> np.ndarray:
    """Plan normalisation of one channel on its original grid (float32)."""
    x = np.asarray(array, dtype=np.float32)
    if info.normalization == "minmax_clip_zscore":
        lo, hi = float(x.min()), float(x.max())
        x = (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)
    elif info.normalization != "clip_zscore":
        raise InputError(f"unknown normalisation {info.normalization!r} in the plan")
    return info.clip_zscore(x)


def pad_values(plan: Plan) -> np.ndarray:
    """Per-channel value for voxels outside an image: the normalised clip floor ("darkest"),
    i.e. the low end of :meth:`Plan.input_range`."""
    return np.asarray(plan.input_range()[0], np.float32)


def class_values(plan: Plan) -> np.ndarray:
    """Label value of each network class (class i -> ``plan.labels[i].value``)."""
    return np.asarray([lb.value for lb in plan.labels], np.int64)


def labels_to_classes(label: np.ndarray, plan: Plan, what: str = "label map") -> np.ndarray:
    """Label values -> class indices (uint8); values the plan does not know are an :class:`InputError`."""
    label = np.asarray(label)
    if label.dtype.kind == "f":
        if not np.all(np.isfinite(label)) or np.any(label != np.round(label)):
            raise InputError(f"the {what} has non-integer values; expected integer label values")
        label = label.astype(np.int64)
    values = class_values(plan)
    present = np.unique(label)
    unknown = sorted(int(v) for v in np.setdiff1d(present, values))
    if unknown:
        known = {lb.value: lb.name for lb in plan.labels}
        raise InputError(f"the {what} has label value(s) {unknown} that are not in the plan {known}")
    lut = np.zeros(int(max(values.max(), present.max())) + 1, np.uint8)
    lut[values] = np.arange(len(values), dtype=np.uint8)
    return lut[label]


def classes_to_labels(classes: np.ndarray, plan: Plan) -> np.ndarray:
    """Class indices -> label values (the smallest unsigned type that holds them)."""
    values = class_values(plan)
    dtype = np.uint8 if values.max() < 256 else np.uint16 if values.max() < 65536 else np.uint32
    return values.astype(dtype)[np.asarray(classes, np.int64)]


# -- resampling ---------------------------------------------------------------------------------
def needs_resampling(spacing_zyx: Sequence[float], plan: Plan) -> bool:
    return not np.allclose(spacing_zyx, plan.target_spacing_zyx, rtol=SPACING_RTOL, atol=0)


def resampled_shape(shape: Sequence[int], spacing_zyx: Sequence[float], target_zyx: Sequence[float]) -> Tuple[int, ...]:
    return tuple(max(1, int(round(n * s / t))) for n, s, t in zip(shape, spacing_zyx, target_zyx))


def _interpolator(kind: str) -> int:
    table = {"linear": sitk.sitkLinear, "bspline": sitk.sitkBSpline, "nearest": sitk.sitkNearestNeighbor}
    if kind not in table:
        raise ValueError(f"interpolation must be one of {sorted(table)}, got {kind!r}")
    return table[kind]


def resample_array(array: np.ndarray, spacing_zyx: Sequence[float], out_spacing_zyx: Sequence[float],
                   out_shape: Sequence[int], interpolation: str = "linear",
                   offset_zyx: Optional[Sequence[float]] = None) -> np.ndarray:
    """Resample a (z, y, x) array between two index-space grids whose first voxel corners coincide.

    ``offset_zyx`` overrides where the output's first voxel centre lies relative to the input's
    (mm); by default corners align, i.e. ``(out_spacing - spacing) / 2``.  Outside the input the
    nearest voxel is repeated, so borders never fade to zero.
    """
    src = sitk.GetImageFromArray(np.ascontiguousarray(array))
    src.SetSpacing(tuple(float(s) for s in spacing_zyx[::-1]))
    offset = (np.asarray(out_spacing_zyx, float) - np.asarray(spacing_zyx, float)) / 2 \
        if offset_zyx is None else np.asarray(offset_zyx, float)
    f = sitk.ResampleImageFilter()
    f.SetOutputSpacing(tuple(float(s) for s in out_spacing_zyx[::-1]))
    f.SetOutputOrigin(tuple(float(o) for o in offset[::-1]))
    f.SetSize([int(n) for n in out_shape[::-1]])
    f.SetInterpolator(_interpolator(interpolation))
    f.SetUseNearestNeighborExtrapolator(True)
    f.SetOutputPixelType(src.GetPixelID())
    out = sitk.GetArrayFromImage(f.Execute(src))
    if interpolation == "bspline":  # B-splines overshoot; keep the input's value range
        out = np.clip(out, array.min(), array.max())
    return out


def to_target(array: np.ndarray, spacing_zyx: Sequence[float], plan: Plan, interpolation: str) -> np.ndarray:
    """One (z, y, x) array from its spacing to the plan's target spacing (no-op when already there)."""
    if not needs_resampling(spacing_zyx, plan):
        return array
    shape = resampled_shape(array.shape, spacing_zyx, plan.target_spacing_zyx)
    return resample_array(array, spacing_zyx, plan.target_spacing_zyx, shape, interpolation)


def from_target(array: np.ndarray, grid: Grid, plan: Plan, interpolation: str) -> np.ndarray:
    """Inverse of :func:`to_target`: a target-grid (z, y, x) array back onto ``grid``."""
    if not needs_resampling(grid.spacing_zyx, plan):
        if tuple(array.shape) != grid.shape:
            raise GeometryMismatchError(f"array {array.shape} does not match the original grid {grid.shape}")
        return array
    target, original = np.asarray(plan.target_spacing_zyx, float), np.asarray(grid.spacing_zyx, float)
    return resample_array(array, target, original, grid.shape, interpolation, offset_zyx=(original - target) / 2)


# -- whole cases --------------------------------------------------------------------------------
def preprocess_arrays(channels: Sequence[np.ndarray], spacing_zyx: Sequence[float], plan: Plan,
                      label: Optional[np.ndarray] = None, interpolation: str = "linear"
                      ) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """(C, z, y, x) float32 and optional (z, y, x) uint8 class indices on the target grid."""
    if len(channels) != len(plan.channels):
        raise InputError(f"the plan has {len(plan.channels)} channel(s), got {len(channels)}")
    shape = np.shape(channels[0])
    if len(shape) != 3 or 1 in shape:
        raise InputError(f"ROG needs 3-D volumes; got an array of shape {shape}")
    if label is not None and np.shape(label) != shape:
        raise GeometryMismatchError(f"label map shape {np.shape(label)} does not match the image {shape}")
    out = np.stack([to_target(normalize_channel(arr, info), spacing_zyx, plan, interpolation)
                    for arr, info in zip(channels, plan.channels)])
    classes = None
    if label is not None:
        classes = to_target(labels_to_classes(label, plan), spacing_zyx, plan, "nearest")
    return out, classes


def preprocess_image(image: ImageInput, plan: Plan, interpolation: str = "linear") -> PreprocessedImage:
    """Inference-side preprocessing of an :class:`Image` (or one per channel)."""
    images = as_channels(image, plan)
    grid = Grid.of(images[0])
    array, _ = preprocess_arrays([i.array for i in images], grid.spacing_zyx, plan, interpolation=interpolation)
    return PreprocessedImage(array, grid, needs_resampling(grid.spacing_zyx, plan))


def preprocess_labelled(image: ImageInput, label: Image, plan: Plan,
                        interpolation: str = "linear") -> Tuple[np.ndarray, np.ndarray]:
    """Training-side preprocessing of an image and its label map, which must share one grid."""
    images = as_channels(image, plan)
    label.require_same_grid(images[0], what="label map", of="image")
    array, classes = preprocess_arrays([i.array for i in images], images[0].spacing_zyx, plan, label.array,
                                       interpolation)
    return array, classes  # type: ignore[return-value]


def restore_labels(classes: np.ndarray, grid: Grid, plan: Plan) -> Image:
    """Class indices on the target grid -> label-value :class:`Image` on the original grid (nearest)."""
    restored = from_target(np.asarray(classes, np.uint8), grid, plan, "nearest")
    return grid.image(classes_to_labels(restored, plan))


def restore_probabilities(probabilities: np.ndarray, grid: Grid, plan: Plan) -> np.ndarray:
    """(C, z, y, x) probabilities on the target grid -> (C, *grid.shape) float32 (linear)."""
    return np.stack([from_target(np.asarray(p, np.float32), grid, plan, "linear") for p in probabilities])
