"""The zero level set as geometry: closed contours (2D) and triangle surfaces (3D) in mm.

Sub-pixel boundaries are what level sets give beyond a voxel mask.  Marching squares/cubes
come from scikit-image; the level set is padded with a negative border first so every contour
is closed, and vertices are mapped through the image's voxel-to-physical (LPS) matrix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import numpy as np

from ..core.image import Image
from ..core.optional import import_optional


@dataclass
class SurfaceMesh:
    """Triangle mesh of the zero level set: vertices (N, 3) in LPS mm, faces (M, 3) indices."""

    vertices: np.ndarray
    faces: np.ndarray


def _to_physical(ijk: np.ndarray, geometry: Optional[Image]) -> np.ndarray:
    if geometry is None:
        return ijk
    m = geometry.ijk_to_lps()
    return ijk @ m[:3, :3].T + m[:3, 3]


def zero_contours(phi: np.ndarray, geometry: Optional[Image] = None) -> List[np.ndarray]:
    """Closed contours of phi = 0 on a 2D level set ((y, x) or (1, y, x)).

    Returns a list of (N, 3) arrays of points — LPS mm if ``geometry`` is given, else
    (i, j, k) voxel coordinates — each closed (first point == last point).
    """
    measure = import_optional("skimage.measure", "scikit-image", "Contours and surfaces of the level set")

    phi = np.asarray(phi, dtype=np.float64)
    if phi.ndim == 3 and phi.shape[0] == 1:
        phi = phi[0]
    if phi.ndim != 2:
        raise ValueError(f"zero_contours needs a 2D level set, got shape {phi.shape}")
    floor = min(float(phi.min()), 0.0) - 1.0
    padded = np.pad(phi, 1, constant_values=floor)
    contours = []
    for c in measure.find_contours(padded, 0.0):
        yx = c - 1.0
        ijk = np.column_stack([yx[:, 1], yx[:, 0], np.zeros(len(yx))])
        contours.append(_to_physical(ijk, geometry))
    return contours


def zero_surface(phi: np.ndarray, geometry: Optional[Image] = None) -> SurfaceMesh:
    """Marching-cubes surface of phi = 0 on a 3D (z, y, x) level set."""
    measure = import_optional("skimage.measure", "scikit-image", "Contours and surfaces of the level set")

    phi = np.asarray(phi, dtype=np.float32)
    if phi.ndim != 3:
        raise ValueError(f"zero_surface needs a 3D level set, got shape {phi.shape}")
    floor = min(float(phi.min()), 0.0) - 1.0
    padded = np.pad(phi, 1, constant_values=floor)
    verts, faces, _, _ = measure.marching_cubes(padded, 0.0)
    zyx = verts - 1.0
    ijk = zyx[:, ::-1]
    return SurfaceMesh(_to_physical(ijk, geometry), faces.astype(np.int64))
