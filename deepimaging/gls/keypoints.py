"""GLS keypoints: Gaussian heatmap targets, heatmap argmax, keypoints derived from masks, CSV files.

Conventions: a keypoint is ``(x, y)`` in pixels = (column, row) of the 2D image, pixel centres at
integer coordinates; arrays of keypoints are ``(K, 2)`` with ``k = 0 .. K-1``.

Rules that derive keypoints from a binary mask (:func:`keypoints_from_mask`):

``"iris-tails"`` (default; AS-OCT iris, K = 2)
    Label the mask's 8-connected components and keep the ``k`` largest (equal sizes: the one
    found first in row-major order wins); order them left to right by centroid x.  For each, the
    keypoint is its *ciliary-side tail tip*: the column of the component farthest from the image's
    vertical centre line ``x = (W - 1) / 2`` (the leftmost column for a wing left of the centre,
    the rightmost for one right of it; a component reaching equally far on both sides takes the
    side of its centroid).  Within that column, y is the component's pixel nearest to the mean
    row of the component's pixels in the column (ties: the upper one), so the keypoint always
    lies on the mask.
``"extremes-x"`` (one structure, K = 2)
    The leftmost and the rightmost column of the whole foreground (all components together),
    each with y chosen as above; left point first.
``"lv-apex"`` (CAMUS left ventricle, K = 1)
    In echocardiography the probe, hence the LV apex, is at the top of the image: the keypoint is
    the top-most pixel (smallest y) of the largest 8-connected component (a stray speck elsewhere
    cannot become the apex); within that row, x is the pixel nearest the row's mean x.

A mask without foreground, or with fewer components than the rule needs, raises
:class:`~deepimaging.core.errors.InputError` saying what was found.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Dict, List, Sequence, Tuple, Union

import numpy as np
import torch
from scipy import ndimage

from deepimaging.core.errors import InputError
from deepimaging.core.imageio import PathLike, atomic_output

KEYPOINT_RULES = ("iris-tails", "extremes-x", "lv-apex")
CSV_COLUMNS = ("name", "k", "x", "y")
_EIGHT = np.ones((3, 3), dtype=bool)


# -- heatmaps ---------------------------------------------------------------------------------------

def _as_points(points, what: str = "points") -> np.ndarray:
    pts = np.asarray(points, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] != 2:
        raise InputError(f"{what} must be (K, 2) (x, y), got shape {pts.shape}")
    return pts


def _check_shape_sigma(shape: Sequence[int], sigma: float) -> Tuple[int, int]:
    if len(tuple(shape)) != 2 or min(int(s) for s in shape) < 1:
        raise InputError(f"heatmap shape must be (H, W) with positive sizes, got {tuple(shape)}")
    if not (math.isfinite(float(sigma)) and float(sigma) > 0):
        raise InputError(f"heatmap sigma must be a positive number of pixels, got {sigma}")
    return int(shape[0]), int(shape[1])


def gaussian_heatmaps(points, shape: Sequence[int], sigma: float) -> np.ndarray:
    """One Gaussian map per keypoint: ``(K, 2)`` xy -> float32 ``(K, H, W)``.

    ``map_k[y, x] = exp(-((x - x_k)^2 + (y - y_k)^2) / (2 sigma^2))``: the value is 1 at the point
    itself, so at a pixel centre for integer points and slightly below 1 at the nearest pixel for
    sub-pixel points.  A point outside the image (its nearest pixel, rounding half up, is not in
    the image, i.e. outside ``[-0.5, W - 0.5) x [-0.5, H - 0.5)``) or NaN (a missing keypoint)
    gives an all-zero map.
    """
    pts = _as_points(points)
    height, width = _check_shape_sigma(shape, sigma)
    valid = _inside(pts[:, 0], pts[:, 1], height, width)
    safe = np.where(valid[:, None], pts, 0.0)
    gx = np.exp(-((np.arange(width)[None, :] - safe[:, :1]) ** 2) / (2.0 * sigma ** 2))
    gy = np.exp(-((np.arange(height)[None, :] - safe[:, 1:]) ** 2) / (2.0 * sigma ** 2))
    maps = gy[:, :, None] * gx[:, None, :]
    maps[~valid] = 0.0
    return maps.astype(np.float32)


def _inside(x, y, height: int, width: int):
    """Points whose nearest pixel is in the image (NaN -> False); works for numpy and torch."""
    return (x >= -0.5) & (x < width - 0.5) & (y >= -0.5) & (y < height - 0.5)


def gaussian_heatmaps_torch(points: torch.Tensor, shape: Sequence[int], sigma: float) -> torch.Tensor:
    """Batched torch version of :func:`gaussian_heatmaps`: ``(..., K, 2)`` -> ``(..., K, H, W)``.

    Same rules (outside or NaN points give zero maps); runs on the points' device and dtype
    (float32 for integer input).
    """
    height, width = _check_shape_sigma(shape, sigma)
    if points.dim() < 2 or points.shape[-1] != 2:
        raise InputError(f"points must be (..., K, 2) (x, y), got shape {tuple(points.shape)}")
    pts = points if points.is_floating_point() else points.float()
    x, y = pts[..., 0], pts[..., 1]
    valid = _inside(x, y, height, width)
    x = torch.where(valid, x, torch.zeros_like(x))
    y = torch.where(valid, y, torch.zeros_like(y))
    cols = torch.arange(width, device=pts.device, dtype=pts.dtype)
    rows = torch.arange(height, device=pts.device, dtype=pts.dtype)
    gx = torch.exp(-((cols - x[..., None]) ** 2) / (2.0 * sigma ** 2))
    gy = torch.exp(-((rows - y[..., None]) ** 2) / (2.0 * sigma ** 2))
    maps = gy[..., :, None] * gx[..., None, :]
    return maps * valid[..., None, None].to(pts.dtype)


def heatmap_argmax(heatmaps, threshold: float = 0.0, empty: str = "nan"):
    """Location of each map's maximum: ``(..., K, H, W)`` -> ``(..., K, 2)`` xy (float).

    Works on numpy arrays and torch tensors (returns the same kind; float64 for numpy, the map's
    float dtype for torch).  Ties go to the first maximum in row-major order (smallest y, then
    smallest x).  NaN values are ignored.  A map whose maximum is not above ``threshold`` (all
    zeros, as for an outside keypoint) or that has no finite value is *empty*: its point is NaN
    (``empty="nan"``) or the image centre ``((W - 1) / 2, (H - 1) / 2)`` (``empty="centre"``).
    """
    if empty not in ("nan", "centre"):
        raise InputError(f"empty must be 'nan' or 'centre', got {empty!r}")
    if heatmaps.ndim < 3:
        raise InputError(f"heatmaps must be (..., K, H, W), got shape {tuple(heatmaps.shape)}")
    height, width = int(heatmaps.shape[-2]), int(heatmaps.shape[-1])
    if height < 1 or width < 1:
        raise InputError(f"heatmaps must have a positive size, got shape {tuple(heatmaps.shape)}")
    centre = ((width - 1) / 2.0, (height - 1) / 2.0)
    if isinstance(heatmaps, torch.Tensor):
        maps = heatmaps.detach()
        maps = maps if maps.is_floating_point() else maps.float()
        flat = torch.nan_to_num(maps.flatten(-2), nan=-math.inf, posinf=math.inf, neginf=-math.inf)
        index = flat.argmax(dim=-1)
        peak = flat.gather(-1, index[..., None])[..., 0]
        rows = torch.div(index, width, rounding_mode="floor")
        xy = torch.stack(((index % width).to(maps.dtype), rows.to(maps.dtype)), -1)
        bad = ~(peak > threshold) | ~torch.isfinite(peak)
        fill = torch.tensor([math.nan, math.nan] if empty == "nan" else centre, dtype=maps.dtype, device=maps.device)
        return torch.where(bad[..., None], fill, xy)
    maps = np.asarray(heatmaps, dtype=np.float64)
    flat = np.nan_to_num(maps.reshape(maps.shape[:-2] + (-1,)), nan=-np.inf, posinf=np.inf, neginf=-np.inf)
    index = np.argmax(flat, axis=-1)
    peak = np.take_along_axis(flat, index[..., None], axis=-1)[..., 0]
    xy = np.stack([index % width, index // width], axis=-1).astype(np.float64)
    bad = ~(peak > threshold) | ~np.isfinite(peak)
    xy[bad] = (math.nan, math.nan) if empty == "nan" else centre
    return xy


# -- keypoints from masks -----------------------------------------------------------------------------

def _as_mask(mask) -> np.ndarray:
    m = np.asarray(mask)
    if m.ndim == 3 and m.shape[0] == 1:
        m = m[0]
    if m.ndim != 2:
        raise InputError(f"keypoints need a 2D mask (H, W) or (1, H, W), got shape {m.shape}")
    return m > 0


def _point_in_column(rows: np.ndarray, column: int) -> np.ndarray:
    """(x, y) at ``column`` with y the pixel nearest the mean of ``rows`` (ties: smaller y)."""
    rows = np.sort(rows)
    y = rows[np.argmin(np.abs(rows - rows.mean()))]  # argmin takes the first, i.e. the smaller y
    return np.array([float(column), float(y)])


def _extreme_point(ys: np.ndarray, xs: np.ndarray, side: str) -> np.ndarray:
    column = xs.min() if side == "left" else xs.max()
    return _point_in_column(ys[xs == column], int(column))


def keypoints_from_mask(mask, k: int = 2, rule: str = "iris-tails") -> np.ndarray:
    """Keypoints ``(k, 2)`` xy derived from a binary mask by ``rule`` (see the module docstring)."""
    if rule not in KEYPOINT_RULES:
        raise InputError(f"unknown keypoint rule {rule!r}; choose one of {', '.join(KEYPOINT_RULES)}")
    k = int(k)
    needed = {"extremes-x": 2, "lv-apex": 1}.get(rule)
    if needed is not None and k != needed:
        raise InputError(f"keypoint rule {rule!r} gives {needed} keypoint(s), but k = {k} were asked for")
    if k < 1:
        raise InputError(f"k must be at least 1, got {k}")
    m = _as_mask(mask)
    if not m.any():
        raise InputError(f"the mask ({m.shape[0]}x{m.shape[1]}) has no foreground pixel; no keypoint can be derived")
    if rule == "extremes-x":
        ys, xs = np.nonzero(m)
        return np.stack([_extreme_point(ys, xs, "left"), _extreme_point(ys, xs, "right")])
    labels, count = ndimage.label(m, structure=_EIGHT)
    sizes = np.bincount(labels.ravel())[1:]
    if count < k:
        raise InputError(f"keypoint rule {rule!r} needs {k} separate structures, but the mask has {count} "
                         f"connected component(s) (8-connectivity)")
    keep = np.argsort(-sizes, kind="stable")[:k] + 1  # labels of the k largest
    if rule == "lv-apex":
        ys, xs = np.nonzero(labels == keep[0])
        top = ys.min()
        cols = np.sort(xs[ys == top])
        x = cols[np.argmin(np.abs(cols - cols.mean()))]
        return np.array([[float(x), float(top)]])
    centre = (m.shape[1] - 1) / 2.0
    points: List[Tuple[float, np.ndarray]] = []
    for lab in keep:
        ys, xs = np.nonzero(labels == lab)
        reach_left, reach_right = centre - xs.min(), xs.max() - centre
        if reach_left == reach_right:
            side = "left" if xs.mean() < centre else "right"
        else:
            side = "left" if reach_left > reach_right else "right"
        points.append((float(xs.mean()), _extreme_point(ys, xs, side)))
    points.sort(key=lambda item: item[0])
    return np.stack([p for _, p in points])


# -- CSV -------------------------------------------------------------------------------------------------

def read_keypoints_csv(path: PathLike) -> Dict[str, np.ndarray]:
    """Read ``name,k,x,y`` rows -> ``{name: (K, 2) float64 xy}`` (k = 0 .. K-1 per name).

    Extra columns are ignored.  Errors (:class:`InputError`, with the line number) for a missing
    file or column, an empty name, a k that is not a non-negative integer, an x or y that is not
    a finite number, a repeated ``(name, k)``, and gaps in k (e.g. k = 0 and 2 without 1).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"keypoints file not found: {path}")
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        header = [h.strip() for h in (reader.fieldnames or [])]
        missing = [c for c in CSV_COLUMNS if c not in header]
        if missing:
            raise InputError(f"{path.name}: missing column(s) {', '.join(missing)}; the header must contain "
                             f"{','.join(CSV_COLUMNS)} (found: {','.join(header) or 'nothing'})")
        reader.fieldnames = header
        table: Dict[str, Dict[int, Tuple[float, float]]] = {}
        for line, row in enumerate(reader, start=2):
            name = (row.get("name") or "").strip()
            if not name:
                raise InputError(f"{path.name} line {line}: empty name")
            k = _parse_index(row.get("k"), path.name, line)
            x, y = (_parse_coordinate(row.get(c), c, path.name, line) for c in ("x", "y"))
            entry = table.setdefault(name, {})
            if k in entry:
                raise InputError(f"{path.name} line {line}: keypoint k={k} of {name!r} appears twice")
            entry[k] = (x, y)
    result: Dict[str, np.ndarray] = {}
    for name, entry in table.items():
        gaps = sorted(set(range(max(entry) + 1)) - set(entry))
        if gaps:
            raise InputError(f"{path.name}: {name!r} has keypoints k={sorted(entry)} but lacks k={gaps}; "
                             "k must run 0, 1, ... without gaps")
        result[name] = np.array([entry[i] for i in range(len(entry))], dtype=np.float64)
    return result


def _parse_index(text, file: str, line: int) -> int:
    try:
        value = float((text or "").strip())
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0 and value == int(value)):
        raise InputError(f"{file} line {line}: k must be a non-negative integer, got {text!r}")
    return int(value)


def _parse_coordinate(text, column: str, file: str, line: int) -> float:
    try:
        value = float((text or "").strip())
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise InputError(f"{file} line {line}: {column} must be a finite number (pixels), got {text!r}")
    return value


def write_keypoints_csv(path: PathLike, keypoints: Dict[str, Union[np.ndarray, Sequence]]) -> Path:
    """Write ``{name: (K, 2) xy}`` as ``name,k,x,y`` rows (atomically); returns the path.

    NaN keypoints (missing) cannot be written: they raise :class:`InputError`.
    """
    path = Path(path)
    rows = []
    for name, points in keypoints.items():
        if not str(name).strip() or "\n" in str(name):
            raise InputError(f"keypoint names must be non-empty single-line strings, got {name!r}")
        pts = _as_points(points, f"keypoints of {name!r}")
        if not np.all(np.isfinite(pts)):
            raise InputError(f"keypoints of {name!r} contain NaN or infinite values; leave the name out instead")
        rows.extend((str(name), i, format(float(x), ".10g"), format(float(y), ".10g")) for i, (x, y) in enumerate(pts))
    with atomic_output(path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(CSV_COLUMNS)
            writer.writerows(rows)
    return path
