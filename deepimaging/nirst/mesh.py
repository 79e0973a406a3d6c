"""2D triangular mesh of the circular NIRST imaging plane, optode layout and pixel-grid transfer.

The physics lives on an unstructured P1 mesh of the disk; phantoms, MRI images and network
outputs live on a square pixel grid (100 x 100 over the disk's bounding square, as in the
Z-Net paper).  This module builds the mesh (Delaunay triangulation of concentric rings, so the
rim is an exact polygon inscribed in the circle and nodes are evenly spread), places optodes
on the rim, and provides the two sparse transfer matrices pixel grid <-> mesh nodes.  The
default 1 mm elements give 5729 nodes for the 82 mm disk: model error < 1 % (see forward.py).

Coordinates are millimetres with the disk centred at the origin.  Optode ``i`` of ``N`` sits at
angle ``offset + s * 2*pi*i/N`` from +x, ``s = +1`` for the counter-clockwise winding (from +x
towards +y) and ``-1`` for clockwise; the default (the training simulator's placement) is offset 0,
counter-clockwise: optode 0 on +x, optode 1 at 360/N degrees towards +y.  Pixel arrays are
indexed ``[row, col]`` with ``col`` along +x and ``row`` along +y (row 0 at y = -R): show them
with ``origin="lower"``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Tuple

import numpy as np
import scipy.sparse as sp
from scipy.spatial import Delaunay

DEFAULT_DIAMETER_MM = 82.0
DEFAULT_ELEMENT_SIZE_MM = 1.0
DEFAULT_GRID_SIZE = 100


@dataclass
class DiskMesh:
    """A P1 triangle mesh of a disk.

    ``nodes`` (n, 2) mm; ``elements`` (m, 3) node indices, counter-clockwise;
    ``boundary_nodes`` the rim nodes ordered by angle (they lie exactly on the circle).
    """

    nodes: np.ndarray
    elements: np.ndarray
    boundary_nodes: np.ndarray
    radius: float
    element_size: float
    _buckets: Optional["_ElementBuckets"] = field(repr=False, compare=False, default=None)

    @property
    def n_nodes(self) -> int:
        return int(self.nodes.shape[0])

    @property
    def areas(self) -> np.ndarray:
        corners = self.nodes[self.elements]
        return 0.5 * _cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])

    @property
    def boundary_edges(self) -> np.ndarray:
        """Rim edges (k, 2) as consecutive pairs of ``boundary_nodes`` (closed loop)."""
        return np.stack([self.boundary_nodes, np.roll(self.boundary_nodes, -1)], axis=1)

    def locate(self, points: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """Element index and barycentric weights (p, 3) of each point; index -1 outside.

        A uniform bucket grid over element bounding boxes limits each point to a handful of
        candidate triangles (scipy's ``Delaunay.find_simplex`` was seconds slow on these
        co-circular point sets).
        """
        points = np.asarray(points, dtype=float).reshape(-1, 2)
        if self._buckets is None:
            self._buckets = _ElementBuckets(self.nodes, self.elements, 2.0 * self.element_size)
        return self._buckets.locate(points)

    def interpolation_matrix(self, points: np.ndarray) -> sp.csr_matrix:
        """Sparse (p, n_nodes) matrix that evaluates a nodal P1 field at ``points``.

        Points between the rim polygon and the true circle are pulled radially onto the
        polygon so that every point inside the disk gets a value.
        """
        points = np.asarray(points, dtype=float).reshape(-1, 2)
        element, weights = self.locate(points)
        outside = np.flatnonzero(element < 0)
        if len(outside):
            pulled = points[outside] * (self.rim_radius_at(points[outside]) * (1.0 - 1e-12))[:, None]
            pulled /= np.maximum(np.hypot(pulled[:, 0], pulled[:, 1]), 1e-300)[:, None]
            element[outside], weights[outside] = self.locate(pulled)
        if np.any(element < 0):
            raise ValueError("some points could not be located in the mesh")
        rows = np.repeat(np.arange(len(points)), 3)
        cols = self.elements[element].ravel()
        return sp.csr_matrix((weights.ravel(), (rows, cols)), shape=(len(points), self.n_nodes))

    def rim_radius_at(self, points: np.ndarray) -> np.ndarray:
        """Distance from the centre to the rim polygon along the ray through each point."""
        rim = self.nodes[self.boundary_nodes]
        rim_angles = np.mod(np.arctan2(rim[:, 1], rim[:, 0]), 2.0 * np.pi)
        angles = np.mod(np.arctan2(points[:, 1], points[:, 0]), 2.0 * np.pi)
        segment = np.searchsorted(np.append(rim_angles, 2.0 * np.pi), angles, side="right") - 1
        start, stop = rim[segment % len(rim)], rim[(segment + 1) % len(rim)]
        edge = stop - start
        direction = np.column_stack([np.cos(angles), np.sin(angles)])
        return _cross(start, edge) / _cross(direction, edge)


class _ElementBuckets:
    """Point location in a triangle mesh through a uniform grid of element buckets."""

    def __init__(self, nodes: np.ndarray, elements: np.ndarray, cell_size: float) -> None:
        self.corners = nodes[elements]  # (m, 3, 2)
        self.origin = nodes.min(axis=0) - 1e-9
        self.cell = float(cell_size)
        self.shape = (np.floor((nodes.max(axis=0) - self.origin) / self.cell).astype(int) + 1)
        low = np.floor((self.corners.min(axis=1) - self.origin) / self.cell).astype(int)
        high = np.floor((self.corners.max(axis=1) - self.origin) / self.cell).astype(int)
        span = int((high - low).max()) + 1
        cells, owners = [], []
        for dx in range(span):
            for dy in range(span):
                cx, cy = low[:, 0] + dx, low[:, 1] + dy
                ok = (cx <= high[:, 0]) & (cy <= high[:, 1])
                cells.append(cx[ok] * self.shape[1] + cy[ok])
                owners.append(np.flatnonzero(ok))
        cells, owners = np.concatenate(cells), np.concatenate(owners)
        order = np.argsort(cells, kind="stable")
        self.owners = owners[order]
        self.start = np.searchsorted(cells[order], np.arange(self.shape[0] * self.shape[1] + 1))

    def locate(self, points: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        index = np.floor((points - self.origin) / self.cell).astype(int)
        valid = np.all((index >= 0) & (index < self.shape), axis=1)
        cell = np.where(valid, index[:, 0] * self.shape[1] + index[:, 1], 0)
        counts = np.where(valid, self.start[cell + 1] - self.start[cell], 0)
        point_of = np.repeat(np.arange(len(points)), counts)
        offsets = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
        candidate = self.owners[self.start[cell][point_of] + offsets]
        weights = _barycentric(self.corners[candidate], points[point_of])
        score = weights.min(axis=1)
        element = np.full(len(points), -1)
        best = np.full(len(points), -np.inf)
        np.maximum.at(best, point_of, score)
        winner = (score == best[point_of]) & (score >= -1e-9)
        element[point_of[winner]] = candidate[winner]
        result = np.zeros((len(points), 3))
        result[point_of[winner]] = weights[winner]
        return element, result


def _cross(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """z component of the cross product of rows of two (p, 2) arrays."""
    return u[:, 0] * v[:, 1] - u[:, 1] * v[:, 0]


def _barycentric(corners: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Barycentric coordinates (p, 3) of points in triangles given as (p, 3, 2)."""
    v0 = corners[:, 1] - corners[:, 0]
    v1 = corners[:, 2] - corners[:, 0]
    v2 = points - corners[:, 0]
    det = v0[:, 0] * v1[:, 1] - v0[:, 1] * v1[:, 0]
    l1 = (v2[:, 0] * v1[:, 1] - v2[:, 1] * v1[:, 0]) / det
    l2 = (v0[:, 0] * v2[:, 1] - v0[:, 1] * v2[:, 0]) / det
    return np.column_stack([1.0 - l1 - l2, l1, l2])


def _ring_points(radius: float, element_size: float, rim_multiple: int) -> np.ndarray:
    """Centre node plus concentric rings ~``element_size`` apart, alternate rings staggered.

    Every ring holds a multiple of ``rim_multiple`` nodes, so the mesh is
    ``rim_multiple``-fold rotationally symmetric: all optodes see identical elements around
    them, which removes optode-to-optode discretisation scatter and keeps reciprocity exact.
    """
    n_rings = max(2, int(np.ceil(radius / element_size)))
    points = [np.zeros((1, 2))]
    for ring in range(1, n_rings + 1):
        ring_radius = radius * ring / n_rings
        count = max(6, int(round(2.0 * np.pi * ring_radius / element_size)))
        count = int(np.ceil(count / rim_multiple) * rim_multiple)
        offset = ((n_rings - ring) % 2) * np.pi / count  # the rim ring starts at angle 0
        angles = offset + 2.0 * np.pi * np.arange(count) / count
        points.append(ring_radius * np.column_stack([np.cos(angles), np.sin(angles)]))
    return np.concatenate(points)


def make_disk_mesh(
    diameter_mm: float = DEFAULT_DIAMETER_MM,
    element_size_mm: float = DEFAULT_ELEMENT_SIZE_MM,
    refinement: int = 0,
    rim_multiple: int = 16,
) -> DiskMesh:
    """Mesh a disk with roughly uniform triangles.

    ``refinement`` halves the element size that many times (for convergence studies).
    Ring node counts are multiples of ``rim_multiple`` so that 16 (or 8, 4, ...) optodes
    fall exactly on rim nodes with identical surroundings; other optode counts are
    interpolated along the rim.
    """
    radius = 0.5 * float(diameter_mm)
    element_size = float(element_size_mm) / (2 ** int(refinement))
    points = _ring_points(radius, element_size, max(1, int(rim_multiple)))
    triangulation = Delaunay(points)
    elements = triangulation.simplices.astype(np.int64).copy()
    corners = points[elements]
    signed = _cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])
    flip = signed < 0
    elements[flip] = elements[flip][:, [0, 2, 1]]
    if np.min(np.abs(signed)) <= 1e-12 * element_size**2:
        raise RuntimeError("degenerate triangle in the disk mesh")
    radii = np.hypot(points[:, 0], points[:, 1])
    rim = np.flatnonzero(np.isclose(radii, radius, rtol=1e-9, atol=0.0))
    rim = rim[np.argsort(np.mod(np.arctan2(points[rim, 1], points[rim, 0]), 2.0 * np.pi))]
    return DiskMesh(points, elements, rim, radius, element_size)


DEFAULT_ANGLE_OFFSET_DEG = 0.0
DEFAULT_WINDING = "ccw"
WINDINGS = ("ccw", "cw")


def winding_sign(winding: str) -> int:
    """+1 for ``"ccw"`` (from +x towards +y), -1 for ``"cw"``."""
    if winding not in WINDINGS:
        raise ValueError(f"optode winding must be 'ccw' or 'cw', got {winding!r}")
    return 1 if winding == "ccw" else -1


def optode_angles(n_optodes: int = 16, angle_offset_deg: float = DEFAULT_ANGLE_OFFSET_DEG,
                  winding: str = DEFAULT_WINDING) -> np.ndarray:
    """Angles (rad, from +x) of ``n_optodes`` evenly spaced optodes; default: optode 0 on +x, ccw."""
    steps = 2.0 * np.pi * np.arange(int(n_optodes)) / int(n_optodes)
    return np.deg2rad(float(angle_offset_deg)) + winding_sign(winding) * steps


def optode_positions(radius: float, n_optodes: int = 16, depth: float = 0.0,
                     angle_offset_deg: float = DEFAULT_ANGLE_OFFSET_DEG, winding: str = DEFAULT_WINDING) -> np.ndarray:
    """(n_optodes, 2) positions at ``depth`` mm inside the rim."""
    angles = optode_angles(n_optodes, angle_offset_deg, winding)
    return (radius - depth) * np.column_stack([np.cos(angles), np.sin(angles)])


def rim_interpolation_matrix(mesh: DiskMesh, angles: np.ndarray) -> sp.csr_matrix:
    """Sparse (k, n_nodes) matrix reading a nodal field on the rim at the given angles.

    Linear interpolation along the rim edge that spans each angle: this is the boundary
    trace of the P1 field, so detectors read exactly what the FEM solution holds there.
    """
    rim = mesh.boundary_nodes
    rim_angles = np.mod(np.arctan2(mesh.nodes[rim, 1], mesh.nodes[rim, 0]), 2.0 * np.pi)
    angles = np.mod(np.asarray(angles, dtype=float), 2.0 * np.pi)
    extended = np.append(rim_angles, rim_angles[0] + 2.0 * np.pi)
    segment = np.clip(np.searchsorted(extended, angles, side="right") - 1, 0, len(rim) - 1)
    fraction = (angles - extended[segment]) / (extended[segment + 1] - extended[segment])
    rows = np.repeat(np.arange(len(angles)), 2)
    cols = np.column_stack([rim[segment], rim[(segment + 1) % len(rim)]]).ravel()
    values = np.column_stack([1.0 - fraction, fraction]).ravel()
    return sp.csr_matrix((values, (rows, cols)), shape=(len(angles), mesh.n_nodes))


def pixel_centres(radius: float, size: int = DEFAULT_GRID_SIZE) -> Tuple[np.ndarray, np.ndarray]:
    """(x, y) of pixel centres, each (size, size), over the square [-R, R]^2."""
    pitch = 2.0 * radius / size
    axis = -radius + (np.arange(size) + 0.5) * pitch
    x, y = np.meshgrid(axis, axis, indexing="xy")
    return x, y


def disk_mask(radius: float, size: int = DEFAULT_GRID_SIZE) -> np.ndarray:
    """Boolean (size, size) mask of pixels whose centre lies inside the disk."""
    x, y = pixel_centres(radius, size)
    return np.hypot(x, y) < radius


def node_to_pixel_matrix(mesh: DiskMesh, size: int = DEFAULT_GRID_SIZE) -> sp.csr_matrix:
    """Sparse (size*size, n_nodes) P1 interpolation onto pixel centres; zero outside the disk."""
    x, y = pixel_centres(mesh.radius, size)
    inside = np.flatnonzero(disk_mask(mesh.radius, size).ravel())
    points = np.column_stack([x.ravel()[inside], y.ravel()[inside]])
    inner = mesh.interpolation_matrix(points).tocoo()
    return sp.csr_matrix((inner.data, (inside[inner.row], inner.col)), shape=(size * size, mesh.n_nodes))


def pixel_to_node_matrix(mesh: DiskMesh, size: int = DEFAULT_GRID_SIZE) -> sp.csr_matrix:
    """Sparse (n_nodes, size*size) bilinear sampling of a pixel map at the mesh nodes.

    Only pixels inside the disk contribute (weights renormalised), so the zeros outside the
    disk in phantom maps never leak into the optical properties of rim nodes.
    """
    pitch = 2.0 * mesh.radius / size
    inside = disk_mask(mesh.radius, size).ravel()
    # Continuous pixel coordinates: pixel (r, c) centre sits at (c + 0.5, r + 0.5) * pitch - R.
    col = (mesh.nodes[:, 0] + mesh.radius) / pitch - 0.5
    row = (mesh.nodes[:, 1] + mesh.radius) / pitch - 0.5
    col0 = np.floor(col).astype(int)
    row0 = np.floor(row).astype(int)
    rows, cols, values = [], [], []
    for d_row in (0, 1):
        for d_col in (0, 1):
            r = np.clip(row0 + d_row, 0, size - 1)
            c = np.clip(col0 + d_col, 0, size - 1)
            weight = (1.0 - np.abs(row - (row0 + d_row))) * (1.0 - np.abs(col - (col0 + d_col)))
            flat = r * size + c
            rows.append(np.arange(mesh.n_nodes))
            cols.append(flat)
            values.append(np.where(inside[flat], np.clip(weight, 0.0, None), 0.0))
    rows, cols, values = np.concatenate(rows), np.concatenate(cols), np.concatenate(values)
    totals = np.bincount(rows, weights=values, minlength=mesh.n_nodes)
    orphans = np.flatnonzero(totals <= 1e-12)
    if len(orphans):
        # Nearest inside pixel: cannot happen with a rim on the circle, kept for odd grids.
        x, y = pixel_centres(mesh.radius, size)
        inside_index = np.flatnonzero(inside)
        centres = np.column_stack([x.ravel()[inside_index], y.ravel()[inside_index]])
        nearest = [inside_index[np.argmin(np.sum((centres - mesh.nodes[i]) ** 2, axis=1))] for i in orphans]
        rows, cols = np.append(rows, orphans), np.append(cols, nearest)
        values = np.append(values, np.ones(len(orphans)))
        totals[orphans] = 1.0
    return sp.csr_matrix((values / totals[rows], (rows, cols)), shape=(mesh.n_nodes, size * size))
