"""NIRST geometry in physical space: optode ring, the disk's frame in the MRI plane, resampling.

**Optode ring** (:class:`OptodeGeometry`): ``n_optodes`` evenly spaced optodes on the rim of a
disk of ``diameter_mm``; optode ``k`` sits at angle ``offset + s * 360 k / N`` degrees, ``s = +1``
for the ``"ccw"`` winding and ``-1`` for ``"cw"``.  Default (the training simulator's placement and
the shipped Z-Net's): 82 mm, 16 optodes, offset 0, ``"ccw"``.

**Frame of the disk in the MRI plane** (:class:`DiskFrame`): angles are measured in the slice
plane from the in-plane axis ``u`` towards the in-plane axis ``v``, both fixed by *physical*
directions, never by pixel order, so a flipped or rotated copy of the same MRI gives the same
frame.  ``u`` and ``v`` are the two LPS axes most parallel to the plane (in x, y, z order),
projected onto it: for an axial slice ``u`` = +x LPS (towards the patient's **left**) and ``v`` =
+y LPS (towards **posterior**); coronal: ``u`` = left, ``v`` = superior; sagittal: ``u`` =
posterior, ``v`` = superior.  So with the default ring on an axial slice optode 0 is on the
patient's left of the disk centre and the numbering runs from left towards posterior ("ccw" in a
plot with ``u`` to the right and ``v`` up; *clockwise* on Slicer's axial view, which shows the
patient's left on the right and anterior at the top).  The disk centre is a physical (LPS) point
in the plane; default: the centre of the slice.

**Networks** are trained on a ``grid_size``-square pixel grid over the disk's bounding square,
columns along the frame's angle-0 axis, rows along the 90-degree axis.  :func:`match_geometry`
maps a user's ring onto a network's: optode numbers are permuted (another winding, or an offset
that differs by whole optode spacings) and any remaining offset is absorbed by rotating the grid
in the plane -- exact, as the disk is rotationally symmetric.  A user ring with a divisor of the
network's optode count (8 on a 16-optode network) maps onto every ``step``-th network optode.
A different diameter cannot be mapped.

**Resampling** (:func:`resample_mri`, :func:`maps_to_image`) is bilinear in physical space; the
values inside the disk are first extended outwards (nearest inside pixel), so the rim never mixes
in the zeros or foreign tissue outside the disk.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage

from deepimaging.core.errors import InputError
from deepimaging.core.image import Image

from .mesh import (DEFAULT_ANGLE_OFFSET_DEG, DEFAULT_DIAMETER_MM, DEFAULT_GRID_SIZE, DEFAULT_WINDING, WINDINGS,
                   disk_mask, optode_angles, winding_sign)

DEFAULT_N_OPTODES = 16


@dataclass(frozen=True)
class OptodeGeometry:
    """The optode ring: diameter (mm), optode count, optode 0's angle (degrees) and winding."""

    diameter_mm: float = DEFAULT_DIAMETER_MM
    n_optodes: int = DEFAULT_N_OPTODES
    angle_offset_deg: float = DEFAULT_ANGLE_OFFSET_DEG
    winding: str = DEFAULT_WINDING

    def __post_init__(self) -> None:
        if not np.isfinite(self.diameter_mm) or self.diameter_mm <= 0:
            raise InputError(f"the ring diameter must be positive, got {self.diameter_mm} mm")
        if int(self.n_optodes) < 3:
            raise InputError(f"at least 3 optodes are needed, got {self.n_optodes}")
        if self.winding not in WINDINGS:
            raise InputError(f"optode winding must be 'ccw' or 'cw', got {self.winding!r}")
        if not np.isfinite(self.angle_offset_deg):
            raise InputError("the optode angle offset must be a finite number of degrees")

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "OptodeGeometry":
        """A checkpoint config's geometry (keys ``diameter_mm``, ``n_optodes``,
        ``optode_angle_offset_deg``, ``optode_winding``; missing keys take the defaults)."""
        return cls(float(config.get("diameter_mm", DEFAULT_DIAMETER_MM)),
                   int(config.get("n_optodes", DEFAULT_N_OPTODES)),
                   float(config.get("optode_angle_offset_deg", DEFAULT_ANGLE_OFFSET_DEG)),
                   str(config.get("optode_winding", DEFAULT_WINDING)))

    def with_changes(self, **changes: Any) -> "OptodeGeometry":
        """A copy with some fields replaced (``None`` values are ignored)."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    def angles(self) -> np.ndarray:
        """Optode angles in radians, from the frame's angle-0 axis."""
        return optode_angles(self.n_optodes, self.angle_offset_deg, self.winding)

    def describe(self) -> str:
        return (f"{self.diameter_mm:g} mm ring, {self.n_optodes} optodes, optode 0 at {self.angle_offset_deg:g} deg, "
                f"{self.winding}")


def infer_n_optodes(count: int, n_wavelengths: int) -> Optional[int]:
    """The optode count N with ``n_wavelengths * N * (N - 1) == count``, or None."""
    if n_wavelengths <= 0 or count % n_wavelengths:
        return None
    pairs = count // n_wavelengths
    n = int(round(0.5 + np.sqrt(0.25 + pairs)))
    return n if n * (n - 1) == pairs else None


def pair_index(n_optodes: int, source: np.ndarray, detector: np.ndarray) -> np.ndarray:
    """Position of (source, detector) within one wavelength's source-major block."""
    source, detector = np.asarray(source), np.asarray(detector)
    return source * (n_optodes - 1) + np.where(detector < source, detector, detector - 1)


@dataclass(frozen=True)
class ChannelMap:
    """How a user's ring maps onto a network's (see :func:`match_geometry`)."""

    network_optode: np.ndarray  # (N_user,) network optode number of each user optode
    rotation_rad: float  # rotation of the network grid from the user's angle-0 axis
    n_network: int

    @property
    def step(self) -> int:
        return self.n_network // len(self.network_optode)

    @property
    def is_identity(self) -> bool:
        return (self.step == 1 and abs(self.rotation_rad) < 1e-12
                and np.array_equal(self.network_optode, np.arange(self.n_network)))

    def network_layout(self, values: np.ndarray, n_wavelengths: int,
                       fill: Optional[np.ndarray] = None) -> Tuple[np.ndarray, np.ndarray]:
        """User-layout amplitudes -> (network-layout vector, bool mask of the measured entries).

        Entries of network pairs that the user's ring does not measure take ``fill`` (same
        layout; default 1).
        """
        n_user, n_net = len(self.network_optode), self.n_network
        values = np.asarray(values, dtype=float).reshape(n_wavelengths, n_user * (n_user - 1))
        out = (np.ones((n_wavelengths, n_net * (n_net - 1))) if fill is None
               else np.array(fill, dtype=float).reshape(n_wavelengths, -1).copy())
        known = np.zeros(out.shape, dtype=bool)
        sources, detectors = np.meshgrid(np.arange(n_user), np.arange(n_user), indexing="ij")
        off = sources != detectors
        user_pos = pair_index(n_user, sources[off], detectors[off])
        net_pos = pair_index(n_net, self.network_optode[sources[off]], self.network_optode[detectors[off]])
        out[:, net_pos] = values[:, user_pos]
        known[:, net_pos] = True
        return out.ravel(), known.ravel()


def match_geometry(user: OptodeGeometry, network: OptodeGeometry) -> ChannelMap:
    """Map the user's optodes onto a network's ring: permutation, plus a grid rotation for the rest.

    Network optode ``m`` sits at ``o_n + s_n * d m + phi`` in the user's frame (``d`` the network's
    optode spacing, ``phi`` the grid rotation).  Raises :class:`InputError` when no mapping exists
    (another diameter, or an optode count that does not divide the network's).
    """
    if not np.isclose(user.diameter_mm, network.diameter_mm, rtol=1e-6, atol=1e-6):
        raise InputError(f"the network was trained for a {network.diameter_mm:g} mm ring but the measurements come "
                         f"from a {user.diameter_mm:g} mm ring; a network cannot be rescaled (the light transport "
                         "is not scale invariant): use --method dri, which builds its mesh for any ring")
    n_user, n_net = int(user.n_optodes), int(network.n_optodes)
    if n_net % n_user:
        raise InputError(f"the network was trained with {n_net} optodes; {n_user} optodes cannot be mapped onto "
                         f"its ring (only divisors of {n_net}, e.g. {n_net // 2}): use --method dri")
    step = n_net // n_user
    spacing = 2.0 * np.pi / n_net
    shift = np.deg2rad(user.angle_offset_deg - network.angle_offset_deg) / spacing
    whole = step * int(np.round(shift / step))
    rotation = float((shift - whole) * spacing)
    s_user, s_net = winding_sign(user.winding), winding_sign(network.winding)
    mapped = np.mod(s_net * (whole + s_user * step * np.arange(n_user)), n_net).astype(int)
    # Check: the mapped network optodes, rotated, sit exactly where the user's optodes are.
    net_angles = network.angles()[mapped] + rotation
    mismatch = np.angle(np.exp(1j * (net_angles - user.angles())))
    if np.max(np.abs(mismatch)) > 1e-9:  # pragma: no cover - guards the algebra above
        raise AssertionError("optode mapping failed")
    return ChannelMap(mapped, rotation, n_net)


# -- the disk's frame in the MRI plane ---------------------------------------------------------
@dataclass(frozen=True)
class DiskFrame:
    """Disk centre (LPS mm) and the in-plane unit vectors of angle 0 (``u``) and 90 degrees (``v``)."""

    centre: np.ndarray
    u: np.ndarray
    v: np.ndarray

    def to_physical(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Plane coordinates (mm) -> LPS points (..., 3)."""
        return self.centre + np.asarray(x)[..., None] * self.u + np.asarray(y)[..., None] * self.v

    def to_plane(self, points: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        relative = np.asarray(points, dtype=float) - self.centre
        return relative @ self.u, relative @ self.v

    def rotated(self, angle_rad: float) -> "DiskFrame":
        c, s = np.cos(angle_rad), np.sin(angle_rad)
        return DiskFrame(self.centre, c * self.u + s * self.v, -s * self.u + c * self.v)


def plane_axes(mri: Image) -> Tuple[np.ndarray, np.ndarray]:
    """The slice plane's reference axes (u, v) in LPS: see the module docstring."""
    normal = np.cross(mri.direction[:, 0], mri.direction[:, 1])
    normal /= np.linalg.norm(normal)
    first, second = sorted(np.argsort(np.abs(normal), kind="stable")[:2])
    axes = np.eye(3)
    u = axes[first] - (axes[first] @ normal) * normal
    u /= np.linalg.norm(u)
    v = axes[second] - (axes[second] @ normal) * normal - (axes[second] @ u) * u
    return u, v / np.linalg.norm(v)


def slice_centre_lps(mri: Image) -> np.ndarray:
    """Physical (LPS) centre of a single-slice image."""
    ny, nx = mri.array.shape[1:]
    return (mri.ijk_to_lps() @ [(nx - 1) / 2.0, (ny - 1) / 2.0, 0.0, 1.0])[:3]


def disk_frame(mri: Image, centre_lps: Optional[Sequence[float]] = None, rotation_rad: float = 0.0) -> DiskFrame:
    """The disk's frame on a single-slice MRI; ``centre_lps`` (default: slice centre) is projected
    onto the slice plane and must lie within one slice thickness of it."""
    u, v = plane_axes(mri)
    centre = slice_centre_lps(mri)
    if centre_lps is not None:
        given = np.asarray(centre_lps, dtype=float).reshape(3)
        normal = np.cross(u, v)
        distance = float((given - centre) @ normal)
        if abs(distance) > max(mri.spacing[2], 1e-3):
            raise InputError(f"the disk centre is {abs(distance):.2f} mm off the MRI slice plane; give a point "
                             "on the slice")
        centre = given - distance * normal
    return DiskFrame(centre, u, v).rotated(rotation_rad)


def _plane(mri: Image) -> np.ndarray:
    if mri.array.shape[0] != 1:
        raise InputError(f"the MRI must be 2D or a single slice (1, y, x), got {mri.array.shape[0]} slices "
                         f"(shape {mri.array.shape}); choose the slice of the NIRST plane first")
    plane = np.asarray(mri.array[0], dtype=np.float64)
    if min(plane.shape) < 8:
        raise InputError(f"the MRI slice is too small ({plane.shape[1]}x{plane.shape[0]} pixels)")
    if not np.all(np.isfinite(plane)):
        raise InputError("the MRI has NaN or infinite pixels")
    return plane


def extract_slice(image: Image, index: int) -> Image:
    """Slice ``index`` (k) of a 3D image as a single-slice image with its own origin."""
    depth = image.array.shape[0]
    if not -depth <= index < depth:
        raise InputError(f"slice {index} is outside the image's {depth} slices")
    k = index % depth
    origin = np.asarray(image.origin) + image.direction[:, 2] * image.spacing[2] * k
    return Image(image.array[k:k + 1].copy(), image.spacing, tuple(origin), image.direction.copy())


def _pixel_plane_coordinates(mri: Image, frame: DiskFrame) -> Tuple[np.ndarray, np.ndarray]:
    """Frame coordinates (x, y) mm of every pixel centre of a single-slice image, each (ny, nx)."""
    ny, nx = mri.array.shape[1:]
    j, i = np.meshgrid(np.arange(ny, dtype=float), np.arange(nx, dtype=float), indexing="ij")
    points = (mri.ijk_to_lps() @ np.stack([i.ravel(), j.ravel(), np.zeros(i.size), np.ones(i.size)]))[:3].T
    x, y = frame.to_plane(points)
    return x.reshape(ny, nx), y.reshape(ny, nx)


def extend_outside(values: np.ndarray, inside: np.ndarray, sampling: Sequence[float] = (1.0, 1.0)) -> np.ndarray:
    """Copy of a 2D array whose pixels outside ``inside`` take the value of the nearest inside pixel."""
    inside = np.asarray(inside, dtype=bool)
    if not inside.any():
        raise InputError("no pixel of the image lies inside the imaging disk")
    if inside.all():
        return np.asarray(values, dtype=np.float64)
    nearest = ndimage.distance_transform_edt(~inside, sampling=sampling, return_distances=False, return_indices=True)
    return np.asarray(values, dtype=np.float64)[nearest[0], nearest[1]]


def grid_plane_coordinates(diameter_mm: float, grid_size: int) -> Tuple[np.ndarray, np.ndarray]:
    """Frame coordinates (x = column, y = row) of the network grid's pixel centres."""
    pitch = diameter_mm / grid_size
    axis = -0.5 * diameter_mm + (np.arange(grid_size) + 0.5) * pitch
    return np.meshgrid(axis, axis, indexing="xy")


def resample_mri(mri: Image, frame: Optional[DiskFrame] = None, diameter_mm: float = DEFAULT_DIAMETER_MM,
                 grid_size: int = DEFAULT_GRID_SIZE) -> np.ndarray:
    """The MRI plane on the network grid of ``frame`` (default: centred on the slice): bilinear in
    physical space after extending the disk's values outwards; zero outside the disk."""
    plane = _plane(mri)
    frame = frame if frame is not None else disk_frame(mri)
    radius = 0.5 * diameter_mm
    px, py = _pixel_plane_coordinates(mri, frame)
    extended = extend_outside(plane, np.hypot(px, py) < radius, (mri.spacing[1], mri.spacing[0]))
    gx, gy = grid_plane_coordinates(diameter_mm, grid_size)
    disk = disk_mask(radius, grid_size)
    ijk = np.linalg.solve(mri.direction @ np.diag(mri.spacing),
                          (frame.to_physical(gx[disk], gy[disk]) - np.asarray(mri.origin)).T)
    ny, nx = plane.shape
    if ijk[0].min() < -0.5 or ijk[1].min() < -0.5 or ijk[0].max() > nx - 0.5 or ijk[1].max() > ny - 0.5:
        raise InputError(f"the {diameter_mm:g} mm imaging disk does not fit in the MRI slice "
                         f"({nx * mri.spacing[0]:.1f} x {ny * mri.spacing[1]:.1f} mm); check its spacing and the "
                         "disk centre")
    out = np.zeros((grid_size, grid_size))
    out[disk] = ndimage.map_coordinates(extended, [ijk[1], ijk[0]], order=1, mode="nearest")
    return out.astype(np.float32)


def maps_to_image(maps: Dict[str, np.ndarray], mri: Image, frame: Optional[DiskFrame] = None,
                  diameter_mm: float = DEFAULT_DIAMETER_MM) -> Dict[str, Image]:
    """Grid maps -> images on the MRI's grid and geometry: bilinear in physical space after
    extending the disk's values outwards, zero outside the disk."""
    frame = frame if frame is not None else disk_frame(mri)
    grid_size = next(iter(maps.values())).shape[-1]
    radius = 0.5 * diameter_mm
    pitch = diameter_mm / grid_size
    px, py = _pixel_plane_coordinates(mri, frame)
    inside = np.hypot(px, py) < radius
    col, row = (px + radius) / pitch - 0.5, (py + radius) / pitch - 0.5
    grid_disk = disk_mask(radius, grid_size)
    out = {}
    for name, values in maps.items():
        extended = extend_outside(np.asarray(values, dtype=np.float64), grid_disk)
        sampled = ndimage.map_coordinates(extended, [row[inside], col[inside]], order=1, mode="nearest")
        plane = np.zeros(inside.shape, dtype=np.float32)
        plane[inside] = sampled
        out[name] = mri.with_array(plane[None])
    return out


__all__ = ["ChannelMap", "DEFAULT_N_OPTODES", "DiskFrame", "OptodeGeometry", "disk_frame", "extend_outside",
           "extract_slice", "grid_plane_coordinates", "infer_n_optodes", "maps_to_image", "match_geometry",
           "pair_index", "plane_axes", "resample_mri", "slice_centre_lps"]
