"""The one image type used everywhere: a voxel array plus its physical geometry.

Conventions (shared with SimpleITK/ITK and the files on disk):

* ``array`` is indexed (z, y, x) = (k, j, i), like ``slicer.util.arrayFromVolume``;
  a 2D image is stored as (1, y, x).
* ``spacing`` and ``origin`` are given in (x, y, z) = (i, j, k) order, in millimetres.
* ``direction`` is a 3x3 matrix whose columns are the i, j, k axis directions in **LPS**
  physical space (ITK's convention).  Slicer works in RAS; :meth:`Image.ijk_to_ras` and
  :meth:`Image.from_ijk_to_ras` do the sign flip so the Slicer side never has to.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence, Tuple

import numpy as np

from .errors import GeometryMismatchError, InputError

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


@dataclass
class Image:
    """A (z, y, x) array with spacing/origin (x, y, z order, mm) and an LPS direction matrix."""

    array: np.ndarray
    spacing: Tuple[float, float, float] = (1.0, 1.0, 1.0)
    origin: Tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: np.ndarray = field(default_factory=lambda: np.eye(3))

    def __post_init__(self) -> None:
        self.array = np.asarray(self.array)
        if self.array.ndim == 2:
            self.array = self.array[np.newaxis]
        if self.array.ndim != 3:
            raise InputError(
                f"expected a 2D (y, x) or 3D (z, y, x) image, got an array of shape {self.array.shape} "
                f"({self.array.ndim}-D); split multi-component/4-D data into separate volumes first")
        self.spacing = tuple(float(s) for s in self.spacing)
        self.origin = tuple(float(o) for o in self.origin)
        self.direction = np.asarray(self.direction, dtype=float).reshape(3, 3)
        if len(self.spacing) != 3 or len(self.origin) != 3:
            raise InputError("spacing and origin need three values (x, y, z)")
        if any(not np.isfinite(s) or s <= 0 for s in self.spacing):
            raise InputError(f"spacing must be positive, got {self.spacing}")

    # -- shape helpers -------------------------------------------------------------------------
    @property
    def shape(self) -> Tuple[int, int, int]:
        return tuple(self.array.shape)  # type: ignore[return-value]

    @property
    def is_2d(self) -> bool:
        """True for a single slice (1, y, x)."""
        return self.array.shape[0] == 1

    @property
    def spacing_zyx(self) -> Tuple[float, float, float]:
        """Spacing in array-axis order, for array maths (distance transforms, gradients)."""
        return (self.spacing[2], self.spacing[1], self.spacing[0])

    def with_array(self, array: np.ndarray) -> "Image":
        """A new image on the same grid (the array must have the same shape)."""
        array = np.asarray(array)
        if array.ndim == 2:
            array = array[np.newaxis]
        if array.shape != self.array.shape:
            raise GeometryMismatchError(f"array shape {array.shape} does not match image shape {self.array.shape}")
        return Image(array, self.spacing, self.origin, self.direction.copy())

    # -- geometry -------------------------------------------------------------------------------
    def ijk_to_lps(self) -> np.ndarray:
        """4x4 matrix mapping voxel (i, j, k, 1) to LPS millimetres."""
        m = np.eye(4)
        m[:3, :3] = self.direction @ np.diag(self.spacing)
        m[:3, 3] = self.origin
        return m

    def ijk_to_ras(self) -> np.ndarray:
        """4x4 matrix mapping voxel (i, j, k, 1) to RAS millimetres (Slicer's IJKToRAS)."""
        m = self.ijk_to_lps()
        flip = np.eye(4)
        flip[:3, :3] = _LPS_TO_RAS
        return flip @ m

    @classmethod
    def from_ijk_to_ras(cls, array: np.ndarray, ijk_to_ras: np.ndarray) -> "Image":
        """Build an image from an array and a Slicer IJKToRAS matrix (4x4)."""
        m = np.asarray(ijk_to_ras, dtype=float).reshape(4, 4)
        lps = _LPS_TO_RAS @ m[:3, :3]
        spacing = np.linalg.norm(lps, axis=0)
        if np.any(spacing <= 0):
            raise InputError("IJK-to-RAS matrix has a zero-length axis")
        direction = lps / spacing
        origin = _LPS_TO_RAS @ m[:3, 3]
        return cls(array, tuple(spacing), tuple(origin), direction)

    def same_grid(self, other: "Image", rtol: float = 1e-4, atol_mm: float = 1e-3) -> bool:
        return not self.grid_differences(other, rtol, atol_mm)

    def grid_differences(self, other: "Image", rtol: float = 1e-4, atol_mm: float = 1e-3) -> list:
        """Human-readable list of what differs between two voxel grids (empty if none)."""
        diffs = []
        if self.shape != other.shape:
            diffs.append(f"size {self.shape[::-1]} vs {other.shape[::-1]} (x, y, z)")
        if not np.allclose(self.spacing, other.spacing, rtol=rtol, atol=0):
            diffs.append(f"spacing {_fmt(self.spacing)} vs {_fmt(other.spacing)}")
        if not np.allclose(self.origin, other.origin, rtol=0, atol=atol_mm + rtol * max(self.spacing)):
            diffs.append(f"origin {_fmt(self.origin)} vs {_fmt(other.origin)}")
        if not np.allclose(self.direction, other.direction, atol=1e-4):
            diffs.append("direction matrices differ")
        return diffs

    def require_same_grid(self, other: "Image", what: str = "mask", of: str = "image") -> None:
        """Raise :class:`GeometryMismatchError` naming the differences, if any."""
        diffs = self.grid_differences(other)
        if diffs:
            raise GeometryMismatchError(f"the {what}'s geometry differs from the {of}'s: " + "; ".join(diffs))

    def require_finite(self, what: str = "image") -> None:
        if np.issubdtype(self.array.dtype, np.floating) and not np.all(np.isfinite(self.array)):
            bad = int(np.size(self.array) - np.count_nonzero(np.isfinite(self.array)))
            raise InputError(f"the {what} has {bad} NaN or infinite voxel(s); fix or mask them first")


def _fmt(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"
