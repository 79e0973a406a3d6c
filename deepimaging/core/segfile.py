"""Segmentations on disk: Slicer ``.seg.nrrd`` files (with segment names and colours) and label maps.

A :class:`Segmentation` is a reference grid plus named binary segments.  ``.seg.nrrd`` is read
and written with ``slicerio`` (Kitware's reader of Slicer's segmentation format; it keeps
segment names, colours and overlapping layers); label maps (NRRD/NIfTI/MHA) through
:mod:`deepimaging.core.imageio`, where each non-zero value becomes a segment.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np

from .errors import InputError
from .image import Image
from .imageio import IMAGE_EXTENSIONS, PathLike, atomic_output, read_image, require_extension, write_image
from .optional import import_optional

SEGMENTATION_EXTENSIONS = (".seg.nrrd",) + IMAGE_EXTENSIONS

# Distinct default colours (RGB 0-1) for segments that come without one.
DEFAULT_COLORS: Tuple[Tuple[float, float, float], ...] = (
    (0.95, 0.35, 0.25), (0.30, 0.70, 0.35), (0.25, 0.45, 0.90), (0.95, 0.80, 0.25),
    (0.70, 0.35, 0.80), (0.25, 0.80, 0.85), (0.95, 0.55, 0.75), (0.60, 0.45, 0.30))


@dataclass
class Segment:
    """One named binary segment on the segmentation's grid; ``mask`` is (z, y, x) bool."""

    name: str
    mask: np.ndarray
    color: Optional[Tuple[float, float, float]] = None


@dataclass
class Segmentation:
    """Named segments on one reference grid (``geometry.array`` is not used for voxels)."""

    geometry: Image
    segments: List[Segment] = field(default_factory=list)

    def names(self) -> List[str]:
        return [s.name for s in self.segments]

    def segment(self, name: Optional[str] = None) -> Segment:
        """The segment called ``name``; with ``None``, the only segment (error if several)."""
        if not self.segments:
            raise InputError("the segmentation has no segments")
        if name is None:
            if len(self.segments) > 1:
                raise InputError(f"the segmentation has several segments {self.names()}; choose one by name")
            return self.segments[0]
        for seg in self.segments:
            if seg.name == name:
                return seg
        raise InputError(f"no segment named {name!r}; the segmentation has {self.names()}")

    def add(self, name: str, mask: np.ndarray, color: Optional[Sequence[float]] = None) -> Segment:
        mask = np.asarray(mask, dtype=bool)
        if mask.ndim == 2:
            mask = mask[np.newaxis]
        if mask.shape != self.geometry.shape:
            raise InputError(f"segment mask shape {mask.shape} does not match the segmentation grid {self.geometry.shape}")
        if color is None:
            color = DEFAULT_COLORS[len(self.segments) % len(DEFAULT_COLORS)]
        seg = Segment(name, mask, tuple(float(c) for c in color))
        self.segments.append(seg)
        return seg

    def to_labelmap(self) -> Image:
        """Collapse to one label image (segment i -> value i + 1; later segments win overlaps)."""
        labels = np.zeros(self.geometry.shape, dtype=np.uint16 if len(self.segments) > 255 else np.uint8)
        for i, seg in enumerate(self.segments):
            labels[seg.mask] = i + 1
        return self.geometry.with_array(labels)


def read_segmentation(path: PathLike) -> Segmentation:
    """Read a ``.seg.nrrd`` (segment names kept) or a label map (``Label N`` per value)."""
    path = Path(path)
    ext = require_extension(path, SEGMENTATION_EXTENSIONS, "segmentation")
    if not path.is_file():
        raise InputError(f"segmentation file not found: {path}")
    if ext == ".seg.nrrd":
        return _read_seg_nrrd(path)
    labels = read_image(path)
    values = labels.array
    if np.issubdtype(values.dtype, np.floating):
        if not np.all(np.isfinite(values)) or not np.all(values == np.round(values)):
            raise InputError(f"label map {path} has non-integer values; expected integer labels")
    seg = Segmentation(labels.with_array(np.zeros(labels.shape, np.uint8)))
    for value in np.unique(values):
        if value != 0:
            seg.add(f"Label {int(value)}", values == value)
    return seg


def _read_seg_nrrd(path: Path) -> Segmentation:
    slicerio = import_optional("slicerio", "slicerio", "Reading and writing .seg.nrrd files")

    try:
        data = slicerio.read_segmentation(str(path))
    except Exception as exc:  # slicerio raises plain exceptions for unreadable headers
        raise InputError(f"could not read Slicer segmentation {path}: {exc}") from exc
    voxels = np.asarray(data["voxels"])
    spatial = voxels.shape[-3:]
    ijk_to_lps = np.asarray(data["ijkToLPS"], dtype=float)
    spacing = np.linalg.norm(ijk_to_lps[:3, :3], axis=0)
    geometry = Image(np.zeros(spatial[::-1], np.uint8), tuple(spacing), tuple(ijk_to_lps[:3, 3]),
                     ijk_to_lps[:3, :3] / spacing)
    seg = Segmentation(geometry)
    for s in data.get("segments", []):
        mask_ijk = slicerio.segment_mask(data, s["id"])
        seg.add(s.get("name") or s["id"], np.transpose(mask_ijk, (2, 1, 0)), s.get("color"))
    return seg


def write_segmentation(segmentation: Segmentation, path: PathLike) -> Path:
    """Write as ``.seg.nrrd`` (names, colours, overlaps kept) or as a label map, by extension."""
    path = Path(path)
    ext = require_extension(path, SEGMENTATION_EXTENSIONS, "segmentation")
    if ext != ".seg.nrrd":
        return write_image(segmentation.to_labelmap(), path)
    slicerio = import_optional("slicerio", "slicerio", "Reading and writing .seg.nrrd files")

    geometry = segmentation.geometry
    data = slicerio.create_segmentation(geometry.shape[::-1], geometry.ijk_to_lps())
    for i, seg in enumerate(segmentation.segments):
        color = seg.color or DEFAULT_COLORS[i % len(DEFAULT_COLORS)]
        slicerio.add_segment(data, np.transpose(seg.mask, (2, 1, 0)),
                             {"id": f"Segment_{i + 1}", "name": seg.name, "color": list(color)})
    with atomic_output(path) as tmp:
        slicerio.write_segmentation(str(tmp), data)
    return path
