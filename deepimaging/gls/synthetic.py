"""Built-in synthetic anterior-segment OCT B-scans for GLS's demo, tests and comparison table.

Each image (default 256 x 256, float32 in [0, 1]) is drawn in an "eye frame" rotated by a small
random angle about a randomly placed centre, and contains:

* **cornea**: a bright dome-shaped band near the top with a brighter epithelium line; it
  thickens and brightens into the sclera towards the image sides;
* **iris wings** (the foreground, mask = 1): two elongated bright structures left and right of
  the pupil.  Along each wing, from its peripheral *tail tip* to the pupil, the thickness rises
  from a point (at least ~1.5 px) to its maximum in the inner half and tapers slightly to a
  rounded pupillary end; a brighter posterior layer and a slow thickness ripple add texture;
* **ciliary region**: a mid-grey blob below/outside each tail tip;
* the **tails** (peripheral ends) are low-contrast: their intensity ramps from 12-35 % of the
  core's at the tip up to 100 % over the outer 40 % of the wing, and the image is blurred around
  each tip (Gaussian sigma 1.5-3 px, blended in over a 9-15 px radius), so the tail melts into the
  ciliary blob - what a global network gets wrong and GLS's local branch fixes;
* **lens**: a faint convex-up curved band (anterior lens surface) between the wings;
* **speckle**: multiplicative gamma noise (2.5-6 looks, slightly correlated) plus weak additive
  noise, then a random gain and gamma.

Keypoints (K = 2, left wing first) are the ciliary-side tail tips, ``(x, y)`` pixels; each is the
wing pixel nearest the analytic tip, so it lies on the mask.  Everything is a function of the
seed; a 256 x 256 image takes about 10 ms on one CPU core.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Sequence, Tuple

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from deepimaging.core.errors import InputError
from deepimaging.core.image import Image
from deepimaging.core.imageio import PathLike, atomic_output, file_extension, write_image

from .keypoints import write_keypoints_csv

SYNTHETIC_FORMATS: Dict[str, str] = {"png": ".png", "nrrd": ".nrrd", "nii.gz": ".nii.gz"}
_OWN_EXTENSIONS = (".png", ".nrrd", ".nii.gz")
_EIGHT = np.ones((3, 3), dtype=bool)


@dataclass
class BScan:
    """One synthetic B-scan: image (H, W) float32 in [0, 1], mask (H, W) uint8 0/1, keypoints (2, 2) xy."""

    image: np.ndarray
    mask: np.ndarray
    keypoints: np.ndarray
    params: Dict[str, float] = field(default_factory=dict)


def _check_size(size: Sequence[int]) -> Tuple[int, int]:
    values = tuple(int(s) for s in size)
    if len(values) != 2 or min(values) < 64:
        raise InputError(f"synthetic B-scan size must be (H, W) with both at least 64 pixels, got {tuple(size)}")
    return values[0], values[1]


def _smoothstep(t: np.ndarray) -> np.ndarray:
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _band(distance: np.ndarray, thickness) -> np.ndarray:
    """Soft (1 px ramp) indicator of 0 <= distance <= thickness."""
    return np.clip(distance + 0.5, 0.0, 1.0) * np.clip(thickness - distance + 0.5, 0.0, 1.0)


def _wing(xr: np.ndarray, yr: np.ndarray, tail: Tuple[float, float], pupil: Tuple[float, float],
          hmax: float, bow: float, ripple: Tuple[float, float, float]):
    """Hard mask, soft coverage, position u (0 tail .. 1 pupil) and normalised depth of one wing."""
    ex, ey = pupil[0] - tail[0], pupil[1] - tail[1]
    length = math.hypot(ex, ey)
    ex, ey = ex / length, ey / length
    nx, ny = (-ey, ex) if ex > 0 else (ey, -ex)  # the normal that points down (+y) in the eye frame
    rx, ry = xr - tail[0], yr - tail[1]
    u = (rx * ex + ry * ey) / length
    v = rx * nx + ry * ny - bow * 4.0 * u * (1.0 - u)
    uc = np.clip(u, 0.0, 1.0)
    profile = np.clip(uc / 0.5, 0.0, 1.0) ** 0.75
    profile = profile * np.sqrt(1.0 - 0.92 * np.clip((uc - 0.75) / 0.25, 0.0, 1.0) ** 2)  # rounded pupil end
    amp, freq, phase = ripple
    h = np.maximum(hmax * profile * (1.0 + amp * np.sin(2 * math.pi * freq * uc + phase)), 0.75)
    inside = (u >= 0) & (u <= 1) & (np.abs(v) <= h)
    soft = (np.clip(h - np.abs(v) + 0.5, 0.0, 1.0) * np.clip(u * length + 0.5, 0.0, 1.0)
            * np.clip((1.0 - u) * length + 0.5, 0.0, 1.0))
    return inside, soft, u, v / h


def _largest_component(mask: np.ndarray) -> np.ndarray:
    labels, count = ndimage.label(mask, structure=_EIGHT)
    if count <= 1:
        return mask
    sizes = np.bincount(labels.ravel())[1:]
    return labels == (int(np.argmax(sizes)) + 1)


def make_bscan(seed: int, size: Sequence[int] = (256, 256)) -> BScan:
    """Draw the synthetic AS-OCT B-scan of ``seed`` (see the module docstring); deterministic."""
    height, width = _check_size(size)
    rng = np.random.default_rng(int(seed))
    u01 = rng.uniform
    theta = math.radians(u01(-5.0, 5.0))
    cx, cy = width * (0.5 + u01(-0.04, 0.04)), height * u01(0.50, 0.60)
    cos, sin = math.cos(theta), math.sin(theta)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    xr = cos * (xx - cx) + sin * (yy - cy)  # eye-frame coordinates (rotated by theta about the centre)
    yr = -sin * (xx - cx) + cos * (yy - cy)

    def to_image(a: float, b: float) -> Tuple[float, float]:
        return cos * a - sin * b + cx, sin * a + cos * b + cy

    # -- iris wings: geometry and mask -----------------------------------------------------------
    iris_amp = u01(0.35, 0.55)
    wings = []
    for side in (-1.0, 1.0):
        reach = width * u01(0.33, 0.41)
        y_tail = height * u01(-0.03, 0.03)
        tail = (side * reach, y_tail)
        pupil = (side * width * u01(0.07, 0.12), y_tail - height * u01(0.0, 0.06))
        hmax = height * u01(0.025, 0.037)
        ripple = (u01(0.0, 0.12), u01(2.0, 4.0), u01(0.0, 2 * math.pi))
        inside, soft, u, depth = _wing(xr, yr, tail, pupil, hmax, height * u01(-0.015, 0.02), ripple)
        inside = _largest_component(inside)
        contrast = u01(0.12, 0.35)
        value = iris_amp * (contrast + (1.0 - contrast) * _smoothstep(u / 0.4)) * (1.0 + 0.25 * (depth > 0.45))
        wings.append(dict(side=side, tail=tail, mask=inside, value=value * soft, contrast=contrast, hmax=hmax))
    mask = (wings[0]["mask"] | wings[1]["mask"]).astype(np.uint8)

    # -- background, lens, ciliary region, cornea ---------------------------------------------------
    image = u01(0.02, 0.06) + 0.03 * (yy / height)
    y_pupil = 0.5 * (wings[0]["tail"][1] + wings[1]["tail"][1]) - height * 0.03
    lens_y = y_pupil + height * u01(0.01, 0.05) + height * u01(0.25, 0.45) * (xr / (0.5 * width)) ** 2
    lens_fade = np.exp(-(xr / (0.3 * width)) ** 2)
    image = image + u01(0.12, 0.25) * lens_fade * _band(yr - lens_y, u01(1.5, 2.5)) + 0.03 * (yr > lens_y) * lens_fade
    ciliary_amp = u01(0.28, 0.42)
    for wing in wings:
        bx = wing["tail"][0] + wing["side"] * width * u01(0.0, 0.03)
        by = wing["tail"][1] + height * u01(0.02, 0.05)
        sx, sy = width * u01(0.04, 0.06), height * u01(0.05, 0.08)
        image = image + ciliary_amp * np.exp(-0.5 * (((xr - bx) / sx) ** 2 + ((yr - by) / sy) ** 2))
    reach = 0.5 * (abs(wings[0]["tail"][0]) + abs(wings[1]["tail"][0]))
    apex = -height * u01(0.24, 0.32)  # posterior corneal surface: a parabola passing above the tail tips
    curvature = (y_pupil + height * 0.03 - height * u01(0.05, 0.08) - apex) / reach ** 2
    slope = 2.0 * curvature * xr
    dist = (apex + curvature * xr ** 2 - yr) / np.sqrt(1.0 + slope ** 2)  # > 0 above (outside) the surface
    sclera = _smoothstep((np.abs(xr) - 0.8 * reach) / (0.6 * reach))
    thick = height * u01(0.035, 0.05) * (1.0 + 0.3 * (xr / reach) ** 2) * (1.0 + 0.6 * sclera)
    cornea = u01(0.45, 0.65) * (1.0 + 0.15 * sclera) * _band(dist, thick) + 0.2 * _band(dist - thick + 1.5, 1.5)
    image = np.maximum(image, cornea) + wings[0]["value"] + wings[1]["value"]

    # -- blur around the tail tips, speckle, gain -----------------------------------------------------
    blur_sigma = u01(1.5, 3.0)
    radius = width * u01(0.035, 0.06)
    weight = np.zeros_like(image)
    tips = []
    for wing in wings:
        tx, ty = to_image(*wing["tail"])
        weight = np.maximum(weight, np.exp(-((xx - tx) ** 2 + (yy - ty) ** 2) / (2.0 * radius ** 2)))
        ys, xs = np.nonzero(wing["mask"])
        nearest = int(np.argmin((xs - tx) ** 2 + (ys - ty) ** 2))
        tips.append((float(xs[nearest]), float(ys[nearest])))
    image = image + weight * (ndimage.gaussian_filter(image, blur_sigma) - image)
    looks = u01(2.5, 6.0)
    speckle = ndimage.gaussian_filter(rng.gamma(looks, 1.0 / looks, size=(height, width)), 0.6)
    image = image * speckle + rng.normal(0.0, u01(0.005, 0.02), size=(height, width))
    gain, gamma = u01(0.9, 1.2), u01(0.85, 1.15)
    image = np.clip(image * gain, 0.0, 1.0) ** gamma
    params = {"rotation_deg": math.degrees(theta), "tail_contrast_left": wings[0]["contrast"],
              "tail_contrast_right": wings[1]["contrast"], "tail_blur_sigma": blur_sigma,
              "tail_blur_radius": radius, "speckle_looks": looks, "iris_half_thickness_left": wings[0]["hmax"],
              "iris_half_thickness_right": wings[1]["hmax"], "gain": gain, "gamma": gamma}
    return BScan(image.astype(np.float32), mask, np.array(tips, dtype=np.float64), params)


def write_synthetic_dataset(root: PathLike, n: int = 16, size: Sequence[int] = (256, 256), seed: int = 0,
                            fmt: str = "png", overwrite: bool = False) -> Path:
    """Write ``n`` B-scans (seeds ``seed .. seed + n - 1``) in GLS's folder layout; returns ``root``.

    Layout: ``root/images/bscan_SSSSS.<ext>``, ``root/masks/bscan_SSSSS.<ext>`` (SSSSS = the seed)
    and ``root/keypoints.csv`` (``name,k,x,y``).  ``fmt`` ``"png"`` writes 8-bit images and 0/255
    masks; ``"nrrd"`` / ``"nii.gz"`` write float32 images and 0/1 uint8 masks.  Existing files
    in ``images/`` or ``masks/`` are an error unless ``overwrite=True``, which first deletes the
    image files (.png/.nrrd/.nii.gz) there.
    """
    if fmt not in SYNTHETIC_FORMATS:
        raise InputError(f"synthetic dataset format must be one of {', '.join(SYNTHETIC_FORMATS)}, got {fmt!r}")
    if int(n) < 1:
        raise InputError(f"n must be at least 1, got {n}")
    _check_size(size)
    root = Path(root)
    folders = (root / "images", root / "masks")
    for folder in folders:
        existing = ([p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")]
                    if folder.is_dir() else [])
        if existing and not overwrite:
            raise InputError(f"{folder} already holds {len(existing)} file(s); use an empty folder or overwrite=True")
        for path in existing:
            if file_extension(path) in _OWN_EXTENSIONS:
                path.unlink()
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
    ext = SYNTHETIC_FORMATS[fmt]
    keypoints = {}
    for i in range(int(n)):
        scan = make_bscan(int(seed) + i, size)
        name = f"bscan_{int(seed) + i:05d}"
        if fmt == "png":
            _write_png(np.round(scan.image * 255.0).astype(np.uint8), folders[0] / (name + ext))
            _write_png(scan.mask * np.uint8(255), folders[1] / (name + ext))
        else:
            write_image(Image(scan.image[np.newaxis]), folders[0] / (name + ext))
            write_image(Image(scan.mask[np.newaxis]), folders[1] / (name + ext))
        keypoints[name] = scan.keypoints
    write_keypoints_csv(root / "keypoints.csv", keypoints)
    return root


def _write_png(array: np.ndarray, path: Path) -> None:
    with atomic_output(path) as tmp:
        sitk.WriteImage(sitk.GetImageFromArray(np.ascontiguousarray(array)), str(tmp))
