"""One reconstruction: measurement vector + MRI slice -> maps on the MRI's grid, by Z-Net or DRI.

Steps (the CLI ``deepimaging nirst reconstruct`` and the NIRSTRecon module both call
:func:`reconstruct`):

1. the user's optode ring (:class:`~deepimaging.nirst.geometry.OptodeGeometry`): the network's for
   Z-Net, the documented default for DRI, with any field overridden; the optode count is read off
   the number of values (``W * N * (N - 1)``, e.g. 2160 for 16 optodes, 504 for 8);
2. optional calibration (:mod:`deepimaging.nirst.calibration`), then the scale check that refuses
   uncalibrated data far off the model's scale;
3. the disk's frame in the MRI plane (physical centre, physical axes, :mod:`~.geometry`) and the
   MRI resampled onto the grid;
4. Z-Net: the user's channels re-ordered onto the network's ring (8 optodes on a 16-optode
   network: the missing pairs interpolated in source and detector angle, as in the evaluation);
   DRI: a mesh and forward model built for the user's ring, fitted relative to the simulator's
   homogeneous model (seconds; progress and cancel);
5. Z-Net: the data-consistency check (:mod:`~.consistency`): the maps go through the forward
   model and a misfit far above the noise warns that the MRI prior and the optics disagree;
6. the maps written back on the MRI's grid.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from deepimaging.core.errors import InputError
from deepimaging.core.image import Image
from deepimaging.core.progress import CancelToken, ProgressCallback, check_cancel, report, sub_progress

from .consistency import EXPECTED_NOISE, data_misfit, misfit_verdict, reference_misfit
from .calibration import DEFAULT_MEDIUM, Calibration, calibrate, check_scale, homogeneous_amplitudes
from .geometry import (DiskFrame, OptodeGeometry, disk_frame, infer_n_optodes, maps_to_image, match_geometry,
                       resample_mri)
from .mesh import DEFAULT_GRID_SIZE, disk_mask
from .optics import WAVELENGTHS_NM

METHODS = ("znet", "znet-paper", "dri")  # the shipped networks (recon.SHIPPED_NETWORKS) and DRI
DEFAULT_DRI_ELEMENT_SIZE_MM = 2.5
DEFAULT_DRI_ITERATIONS = 6


@dataclass
class ReconstructionOutput:
    """Maps on the MRI's grid, the same on the method's grid, the ring used and notes for the user."""

    maps: Dict[str, Image]
    grid_maps: Dict[str, np.ndarray]
    method: str
    geometry: OptodeGeometry
    frame: DiskFrame
    notes: List[str] = field(default_factory=list)
    misfit: Optional[float] = None  # Z-Net: RMS log data misfit of its maps (consistency.data_misfit)


def check_amplitudes(values: np.ndarray, expected: int, layout: str) -> np.ndarray:
    """A flat vector of ``expected`` finite positive amplitudes, else a clear :class:`InputError`."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1:
        values = values.squeeze()
    if values.ndim != 1:
        raise InputError(f"measurements must be a flat vector, got an array of shape {np.shape(values)}")
    if values.size != expected:
        raise InputError(f"expected {expected} measurements ({layout}) but got {values.size}")
    if not np.all(np.isfinite(values)):
        raise InputError(f"{int(np.sum(~np.isfinite(values)))} measurement(s) are NaN or infinite")
    bad = np.flatnonzero(values <= 0)
    if bad.size:
        raise InputError(f"{bad.size} amplitude(s) are zero or negative (first at index {bad[0]}); "
                         "raw positive CW amplitudes are needed, not log data")
    return values


def resolve_geometry(base: OptodeGeometry, count: int, n_wavelengths: int, diameter_mm: Optional[float] = None,
                     n_optodes: Optional[int] = None, angle_offset_deg: Optional[float] = None,
                     winding: Optional[str] = None) -> OptodeGeometry:
    """``base`` with the given fields replaced; the optode count, unless given, from ``count``."""
    if n_optodes is None:
        n_optodes = infer_n_optodes(count, n_wavelengths) or base.n_optodes
    return base.with_changes(diameter_mm=diameter_mm, n_optodes=int(n_optodes), angle_offset_deg=angle_offset_deg,
                             winding=winding)


def _layout(geometry: OptodeGeometry, n_wavelengths: int, note: str = "") -> str:
    n = geometry.n_optodes
    return f"{n_wavelengths} wavelengths x {n} sources x {n - 1} detectors{note}"


def reconstruct(measurements: np.ndarray, mri: Image, method: str = "znet", checkpoint: Any = None,
                device: Any = None, reconstructor: Any = None, geometry: Optional[OptodeGeometry] = None,
                diameter_mm: Optional[float] = None, n_optodes: Optional[int] = None,
                angle_offset_deg: Optional[float] = None, winding: Optional[str] = None,
                disk_centre_lps: Optional[Sequence[float]] = None, disk_centre_ijk: Optional[Sequence[float]] = None,
                calibration: Optional[Calibration] = None, scale_check: bool = True,
                wavelengths: Sequence[int] = WAVELENGTHS_NM,
                dri_element_size_mm: float = DEFAULT_DRI_ELEMENT_SIZE_MM, dri_iterations: int = DEFAULT_DRI_ITERATIONS,
                expected_noise: float = EXPECTED_NOISE, progress: Optional[ProgressCallback] = None, cancel: Optional[CancelToken] = None
                ) -> ReconstructionOutput:
    """Reconstruct HbO/Hb/water/HbT/StO2 on the grid of ``mri`` (2D or a single slice).

    ``method``: ``"znet"`` (``checkpoint``, default the shipped Z-Net trained on the robust
    distribution), ``"znet-paper"`` (the shipped Z-Net trained on the paper-style distribution)
    or ``"dri"``; ``reconstructor`` (a loaded network) overrides the first two.

    ``geometry`` and the single fields after it describe the user's optode ring (module
    docstring); ``disk_centre_lps`` is a physical point (LPS mm) or ``disk_centre_ijk`` a pixel
    (i, j) of the slice (default: its centre).  ``scale_check=False`` skips the refusal of data
    far off the model's scale.  Z-Net maps that leave a data misfit above
    ``consistency.WARNING_RATIO`` x ``expected_noise`` raise a ``UserWarning`` (MRI and optics
    disagree; check with DRI); ``expected_noise=0`` skips that check.
    """
    if method not in METHODS:
        raise InputError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if not isinstance(mri, Image):
        raise InputError("the MRI must be a deepimaging Image (array + geometry)")
    wavelengths = tuple(int(w) for w in wavelengths)
    n_w = len(wavelengths)
    raw = np.asarray(measurements, dtype=np.float64).ravel()
    report(progress, 0.0, "checking the inputs")
    rec = None
    if method != "dri":
        from .recon import load_reconstructor

        rec = reconstructor or load_reconstructor(checkpoint or method, device, wavelengths=wavelengths)
        base = rec.geometry
    else:
        base = geometry or OptodeGeometry()
    if geometry is not None:
        base = geometry
    user = resolve_geometry(base, raw.size, n_w, diameter_mm, n_optodes, angle_offset_deg, winding)
    expected = n_w * user.n_optodes * (user.n_optodes - 1)
    if rec is not None and raw.size != expected:
        rec.check_measurements(raw)  # the network's own layout message
    values = check_amplitudes(raw, expected, _layout(user, n_w))
    notes: List[str] = [f"optodes: {user.describe()}"]
    if calibration is not None:
        result = calibrate(values, calibration, user, wavelengths)
        values = result.data
        notes.append(result.summary)
    if scale_check:
        check_scale(values, user, wavelengths, calibrated=calibration is not None)
    centre = disk_centre_lps
    if centre is None and disk_centre_ijk is not None:
        i, j = (float(c) for c in disk_centre_ijk)
        centre = (mri.ijk_to_lps() @ [i, j, 0.0, 1.0])[:3]
    check_cancel(cancel)
    misfit = None
    if rec is not None:
        grid_maps, frame, misfit = _znet(rec, values, mri, user, centre, wavelengths, notes, expected_noise)
    else:
        grid_maps, frame = _dri(values, mri, user, centre, wavelengths, dri_element_size_mm, dri_iterations,
                                sub_progress(progress, 0.05, 0.95), cancel)
    from .recon import derived_maps

    maps = derived_maps(grid_maps)
    images = maps_to_image(maps, mri, frame, user.diameter_mm)
    report(progress, 1.0, "done")
    return ReconstructionOutput(images, maps, method, user, frame, notes, misfit)


def _znet(rec: Any, values: np.ndarray, mri: Image, user: OptodeGeometry, centre: Optional[Sequence[float]],
          wavelengths: Sequence[int], notes: List[str], expected_noise: float = EXPECTED_NOISE):
    """Z-Net/Y-Net maps (3, grid, grid) in the network's frame, that frame and the data misfit."""
    channels = match_geometry(user, rec.geometry)
    if not channels.is_identity:
        notes.append(f"mapped onto the network's ring ({rec.geometry.describe()}): user optode k -> network optode "
                     + ", ".join(str(int(m)) for m in channels.network_optode)
                     + (f"; grid rotated by {np.rad2deg(channels.rotation_rad):.3g} deg"
                        if abs(channels.rotation_rad) > 1e-12 else ""))
    frame = disk_frame(mri, centre, channels.rotation_rad)
    image = rec.check_mri(resample_mri(mri, frame, rec.diameter_mm, rec.grid_size))
    if channels.step == 1:
        full, _ = channels.network_layout(values, len(wavelengths))
        maps = rec.reconstruct_batch(full[None], image[None])[0]
        return maps, frame, _check_consistency(full, maps, rec, wavelengths, None, expected_noise, notes)
    import torch

    from .evaluate import fill_missing_optodes
    from .znet import arrange_measurements, flatten_measurements

    placeholder = homogeneous_amplitudes(DEFAULT_MEDIUM, rec.geometry, wavelengths)
    full, known = channels.network_layout(values, len(wavelengths), placeholder)
    signals, images = rec.normalisation.inputs(full[None], image[None])
    signals = signals * torch.from_numpy(known.astype(np.float32))[None]
    grid = arrange_measurements(signals, rec.n_optodes, len(wavelengths))
    signals = flatten_measurements(fill_missing_optodes(grid, channels.step))
    notes.append(f"{user.n_optodes} optodes on a {rec.n_optodes}-optode network: the missing pairs are "
                 "interpolated in source and detector angle")
    maps = rec.predict_normalised(signals, images)[0]
    return maps, frame, _check_consistency(full, maps, rec, wavelengths, known, expected_noise, notes)


def _check_consistency(amplitudes: np.ndarray, maps: np.ndarray, rec: Any, wavelengths: Sequence[int],
                       known: Optional[np.ndarray], expected_noise: float, notes: List[str]) -> Optional[float]:
    """The data misfit of the network's maps; a note, or a UserWarning when MRI and optics disagree."""
    if not expected_noise or expected_noise <= 0:
        return None
    standard = OptodeGeometry(n_optodes=rec.n_optodes)
    if rec.geometry != standard or tuple(wavelengths) != tuple(WAVELENGTHS_NM):
        notes.append("data consistency not checked: the forward model covers the default ring and wavelengths only")
        return None
    misfit = data_misfit(amplitudes, maps, rec.n_optodes, known)
    disagrees, text = misfit_verdict(misfit, expected_noise, reference=reference_misfit(rec.header))
    if disagrees:
        warnings.warn(text, UserWarning, stacklevel=3)
    else:
        notes.append(text)
    return misfit


def _dri(values: np.ndarray, mri: Image, user: OptodeGeometry, centre: Optional[Sequence[float]],
         wavelengths: Sequence[int], element_size_mm: float, iterations: int,
         progress: Optional[ProgressCallback], cancel: Optional[CancelToken]):
    """DRI maps (3, grid, grid) for the user's ring, and the frame (no rotation)."""
    from .dri import DRIReconstructor

    frame = disk_frame(mri, centre)
    image = resample_mri(mri, frame, user.diameter_mm, DEFAULT_GRID_SIZE)
    if not np.any(image > 0):
        raise InputError("the MRI has no positive signal inside the imaging disk")
    report(progress, 0.0, "DRI: building the mesh")
    dri = DRIReconstructor(element_size_mm=element_size_mm, n_optodes=user.n_optodes, wavelengths=wavelengths,
                           diameter_mm=user.diameter_mm, iterations=iterations,
                           angle_offset_deg=user.angle_offset_deg, winding=user.winding)
    reference = homogeneous_amplitudes(DEFAULT_MEDIUM, user, wavelengths)
    result = dri.reconstruct(values, image, reference=reference, progress=progress, cancel=cancel)
    disk = disk_mask(0.5 * user.diameter_mm, DEFAULT_GRID_SIZE)
    return np.where(disk, np.clip(result.maps, 0.0, None), 0.0).astype(np.float32), frame


__all__ = ["METHODS", "ReconstructionOutput", "check_amplitudes", "reconstruct", "resolve_geometry"]
