"""Reconstruction API of NIRSTRecon: measurement file + MRI -> HbO, Hb, water, HbT, StO2 maps.

This is what the Slicer module, the CLI and the demo call.  Conventions:

* Measurements: raw CW amplitudes (positive, not logarithms), ``W * N * (N - 1)`` values --
  2160 for the 9 paper wavelengths and 16 optodes -- in the order wavelength, source, detector
  (source-major; for each source the other optodes in increasing index; see
  :mod:`deepimaging.nirst.forward`).  Optode 0 sits on the +x (image i) axis from the disk
  centre, numbered counter-clockwise towards +y (image j).
* Network grid: 100 x 100 pixels over the disk's bounding square (82 mm -> 0.82 mm pixels),
  row = +y, col = +x.  :func:`reconstruct_image` (:mod:`deepimaging.nirst.pipeline`) resamples any
  2D MRI (or one slice) onto it in physical space -- the disk centred on the slice centre unless
  told otherwise -- and maps the results back onto the MRI's own grid (zero outside the disk);
  :mod:`deepimaging.nirst.geometry` defines the frame.  A checkpoint's ring comes from its config
  (``diameter_mm``, ``n_optodes``, ``optode_angle_offset_deg``, ``optode_winding``; the last two
  default to 0 and ``"ccw"``, the simulator's placement).
* Outputs: HbO and Hb in uM, water in %, HbT = HbO + Hb in uM, StO2 = 100 HbO / HbT in %;
  concentrations are clipped at 0 (a physical bound the linear output layer does not know).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from deepimaging.core.checkpoint import Checkpoint, load_checkpoint
from deepimaging.core.device import DeviceLike, select_device
from deepimaging.core.errors import CheckpointError, InputError
from deepimaging.core.image import Image

from .data import Normalisation
from .geometry import OptodeGeometry, extract_slice, maps_to_image, resample_mri
from .mesh import DEFAULT_DIAMETER_MM, DEFAULT_GRID_SIZE, disk_mask
from .optics import WAVELENGTHS_NM
from .train import METHODS, build_network

WEIGHTS = Path(__file__).resolve().parent / "weights"
DEFAULT_CHECKPOINT = WEIGHTS / "znet_default.pt"  # trained on the robust distribution (README)
PAPER_CHECKPOINT = WEIGHTS / "znet_paper.pt"  # trained on the paper-style distribution
SHIPPED_NETWORKS = ("znet", "znet-paper")  # names for the two files above
OUTPUT_NAMES = ("HbO", "Hb", "water", "HbT", "StO2")
OUTPUT_UNITS = {"HbO": "uM", "Hb": "uM", "water": "%", "HbT": "uM", "StO2": "%"}
PathLike = Union[str, Path]


def read_measurements(path: PathLike) -> np.ndarray:
    """Amplitudes from a file as a flat float64 vector, in the file's reading order.

    * ``.csv`` / ``.txt``: numbers separated by commas, semicolons, tabs or spaces; one value per
      line, one row of values, or any table -- read row by row, left to right, which must give
      the wavelength, source, detector order (e.g. 2160 lines, or 144 rows = 9 wavelengths x 16
      sources of 15 detector columns).  Non-numeric lines (a header) are skipped.
    * ``.npz``: the array under the key ``amplitudes`` (any shape, flattened in C order);
      ``.npy``: the array itself.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"measurement file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".npz":
        with np.load(path, allow_pickle=False) as archive:
            if "amplitudes" not in archive.files:
                raise InputError(f"{path} has no 'amplitudes' array (keys: {', '.join(archive.files) or 'none'})")
            values = np.asarray(archive["amplitudes"], dtype=np.float64).ravel()
    elif suffix == ".npy":
        values = np.asarray(np.load(path, allow_pickle=False), dtype=np.float64).ravel()
    elif suffix in (".csv", ".txt", ".tsv"):
        values = _read_text_table(path)
    else:
        raise InputError(f"cannot read measurements from {path.name}: use .csv, .txt, .npz (key 'amplitudes') or .npy")
    if values.size == 0:
        raise InputError(f"{path} holds no measurements")
    if not np.all(np.isfinite(values)):
        raise InputError(f"{path} holds {int(np.sum(~np.isfinite(values)))} non-finite value(s)")
    return values


def write_measurements(path: PathLike, measurements: np.ndarray, n_wavelengths: int = len(WAVELENGTHS_NM),
                       n_optodes: int = 16) -> Path:
    """Write amplitudes as the CSV :func:`read_measurements` reads: one row per (wavelength,
    source), wavelength-major, the other optodes' amplitudes (ascending index) as columns."""
    values = np.asarray(measurements, dtype=np.float64).ravel()
    columns = n_optodes - 1
    if values.size != n_wavelengths * n_optodes * columns:
        raise InputError(f"expected {n_wavelengths * n_optodes * columns} measurements "
                         f"({n_wavelengths} wavelengths x {n_optodes} sources x {columns} detectors), got {values.size}")
    path = Path(path)
    header = (f"NIRST CW amplitudes: {n_wavelengths} wavelengths x {n_optodes} sources (rows, wavelength-major) "
              f"x {columns} detectors (columns, ascending optode index, source skipped)")
    np.savetxt(path, values.reshape(n_wavelengths * n_optodes, columns), fmt="%.17g", delimiter=",", header=header)
    return path


def _read_text_table(path: Path) -> np.ndarray:
    values = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        fields = [f for f in line.replace(",", " ").replace(";", " ").split() if f]
        if not fields:
            continue
        try:
            values.extend(float(f) for f in fields)
        except ValueError:
            if values:  # text after numbers is not a header: refuse rather than guess
                raise InputError(f"{path}:{number}: not a number in {line.strip()!r}") from None
    return np.asarray(values, dtype=np.float64)


class Reconstructor:
    """A loaded Z-Net / Y-Net checkpoint ready to reconstruct (see :func:`load_reconstructor`)."""

    def __init__(self, checkpoint: Checkpoint, device: DeviceLike = None, path: Optional[Path] = None) -> None:
        config = checkpoint.config
        self.path = path
        self.header = checkpoint.header
        self.method = checkpoint.method
        try:
            self.arch = str(config["arch"])
            self.n_optodes = int(config["n_optodes"])
            self.wavelengths_nm = tuple(int(w) for w in config["wavelengths_nm"])
            self.grid_size = int(config.get("grid_size", DEFAULT_GRID_SIZE))
            self.diameter_mm = float(config.get("diameter_mm", DEFAULT_DIAMETER_MM))
            self.normalisation = Normalisation.from_tensors(checkpoint.extra_tensors)
            self.geometry = OptodeGeometry.from_config(config)
        except InputError as exc:
            raise CheckpointError(f"{path or 'checkpoint'}: invalid optode ring in the config ({exc})") from exc
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{path or 'checkpoint'}: incomplete NIRST checkpoint (missing {exc})") from exc
        if self.normalisation.normalizer.n_optodes != self.n_optodes:
            raise CheckpointError(f"{path}: normaliser and config disagree on the optode count")
        self.device = select_device(device)
        try:
            self.model = build_network(self.arch, self.n_optodes, len(self.wavelengths_nm), config.get("net_config"))
            self.model.load_state_dict(checkpoint.state_dict)
        except (InputError, TypeError, RuntimeError) as exc:
            raise CheckpointError(f"{path or 'checkpoint'}: weights do not fit a {self.arch} "
                                  f"({str(exc).splitlines()[0]})") from exc
        self.model.to(self.device).float().eval()
        self.disk = disk_mask(0.5 * self.diameter_mm, self.grid_size)

    @property
    def n_measurements(self) -> int:
        return len(self.wavelengths_nm) * self.n_optodes * (self.n_optodes - 1)

    @property
    def pixel_mm(self) -> float:
        return self.diameter_mm / self.grid_size

    def check_measurements(self, measurements: np.ndarray) -> np.ndarray:
        """Validate one measurement vector: count, finiteness, positivity (clear InputErrors)."""
        from .pipeline import check_amplitudes

        return check_amplitudes(measurements, self.n_measurements,
                                f"{len(self.wavelengths_nm)} wavelengths x {self.n_optodes} sources x "
                                f"{self.n_optodes - 1} detectors, the layout this checkpoint was trained on")

    def check_mri(self, mri: np.ndarray) -> np.ndarray:
        image = np.asarray(mri, dtype=np.float32)
        if image.ndim != 2:
            raise InputError(f"the MRI must be a 2D (y, x) array, got {image.ndim}-D shape {image.shape}")
        if image.shape != (self.grid_size, self.grid_size):
            raise InputError(f"the MRI must be {self.grid_size}x{self.grid_size} on the disk's bounding square, "
                             f"got {image.shape[0]}x{image.shape[1]}; reconstruct_image resamples other grids")
        if not np.all(np.isfinite(image)):
            raise InputError("the MRI has NaN or infinite pixels")
        if not np.any(image[self.disk] > 0):
            raise InputError("the MRI has no positive signal inside the imaging disk")
        return np.where(self.disk, image, 0.0).astype(np.float32)

    def reconstruct_batch(self, measurements: np.ndarray, mri: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """(B, n_meas) amplitudes + (B, H, W) MRI -> (B, 3, H, W) HbO uM / Hb uM / water %, no checks."""
        signals, images = self.normalisation.inputs(measurements, mri)
        return self.predict_normalised(signals, images, batch_size)

    def predict_normalised(self, signals: torch.Tensor, images: torch.Tensor, batch_size: int = 64) -> np.ndarray:
        """Already-normalised inputs -> physical maps (clipped at 0, zero outside the disk)."""
        outputs = []
        # Full float32 even on CUDA: bf16 autocast moved maps by up to 0.8 % of their range on an
        # H200 (measured against the CPU), too much for quantitative maps; the network is small.
        with torch.no_grad():
            for start in range(0, len(signals), batch_size):
                s = signals[start:start + batch_size].to(self.device)
                m = images[start:start + batch_size].to(self.device)
                outputs.append(self.normalisation.to_physical(self.model(s, m)))
        maps = np.concatenate(outputs) if outputs else np.zeros((0, 3, self.grid_size, self.grid_size), np.float32)
        return np.where(self.disk, np.clip(maps, 0.0, None), 0.0).astype(np.float32)

    def reconstruct(self, measurements: np.ndarray, mri: np.ndarray) -> Dict[str, np.ndarray]:
        """One phantom/patient: amplitudes (n_meas,) + MRI (grid, grid) -> five (grid, grid) float32 maps."""
        values = self.check_measurements(measurements)
        image = self.check_mri(mri)
        maps = self.reconstruct_batch(values[None, :], image[None])[0]
        return derived_maps(maps)


def derived_maps(maps: np.ndarray) -> Dict[str, np.ndarray]:
    """(3, H, W) HbO/Hb/water -> dict with HbT and StO2 added, all float32."""
    hbo, hb, water = (np.asarray(m, dtype=np.float32) for m in maps)
    hbt = hbo + hb
    sto2 = np.where(hbt > 0, 100.0 * hbo / np.maximum(hbt, 1e-12), 0.0).astype(np.float32)
    return {"HbO": hbo, "Hb": hb, "water": water, "HbT": hbt, "StO2": sto2}


def shipped_checkpoint(network: str = "znet") -> Path:
    """The file of a shipped network: ``"znet"`` (robust training, the default) or ``"znet-paper"``."""
    if network not in SHIPPED_NETWORKS:
        raise InputError(f"unknown shipped network {network!r}; choose one of {', '.join(SHIPPED_NETWORKS)}")
    return DEFAULT_CHECKPOINT if network == "znet" else PAPER_CHECKPOINT


def load_reconstructor(checkpoint: Optional[PathLike] = None, device: DeviceLike = None,
                       wavelengths: Optional[Sequence[int]] = WAVELENGTHS_NM,
                       n_optodes: Optional[int] = None) -> Reconstructor:
    """Load a Z-Net (default: the shipped one) or Y-Net checkpoint.

    ``checkpoint``: a file, or the name of a shipped network (``"znet"``, ``"znet-paper"``;
    :data:`SHIPPED_NETWORKS`).  ``wavelengths`` / ``n_optodes``: what the user's system
    measures; a checkpoint trained for anything else raises :class:`CheckpointError`
    (``None`` accepts the checkpoint's own).
    """
    shipped = checkpoint is None or str(checkpoint) in SHIPPED_NETWORKS
    path = shipped_checkpoint(str(checkpoint or "znet")) if shipped else Path(checkpoint)
    if shipped and not path.is_file():
        raise CheckpointError(
            f"the shipped Z-Net checkpoint is not installed ({path} is missing): train one with "
            "`deepimaging nirst train --arch znet --export <file>` and copy it there, or pass a checkpoint file")
    ckpt = load_checkpoint(path)
    if ckpt.method not in METHODS.values():
        raise CheckpointError(f"{path} is a {ckpt.method!r} checkpoint; NIRST reconstruction needs one of "
                              f"{', '.join(sorted(METHODS.values()))}")
    trained = [int(w) for w in ckpt.config.get("wavelengths_nm", [])]
    if wavelengths is not None and trained != [int(w) for w in wavelengths]:
        raise CheckpointError(f"{path} was trained at wavelengths {trained} nm, but the measurements are at "
                              f"{[int(w) for w in wavelengths]} nm")
    if n_optodes is not None and int(ckpt.config.get("n_optodes", -1)) != int(n_optodes):
        raise CheckpointError(f"{path} was trained with {ckpt.config.get('n_optodes')} optodes, but the "
                              f"measurements come from {n_optodes}")
    return Reconstructor(ckpt, device, path)


def reconstruct_image(measurements: np.ndarray, mri: Image, checkpoint: Optional[PathLike] = None,
                      device: DeviceLike = None, reconstructor: Optional[Reconstructor] = None,
                      **options: Any) -> Dict[str, Image]:
    """Measurements + an MRI :class:`Image` (2D or one slice) -> HbO/Hb/water/HbT/StO2 images on its grid.

    See :func:`deepimaging.nirst.pipeline.reconstruct` for ``options`` (method, geometry, disk
    centre, calibration, progress, cancel).
    """
    from .pipeline import reconstruct

    return reconstruct(measurements, mri, checkpoint=checkpoint, device=device, reconstructor=reconstructor,
                       **options).maps


def hbt_contrast(hbt_map: Union[np.ndarray, Image], inside_mask: Union[np.ndarray, Image],
                 disk: Optional[np.ndarray] = None) -> float:
    """Mean HbT inside the mask / mean HbT in the rest of the disk (the paper's read-out).

    The disk defaults to the map's non-zero pixels (maps are zero outside the imaging disk).
    """
    hbt = np.asarray(hbt_map.array if isinstance(hbt_map, Image) else hbt_map, dtype=np.float64)
    mask = np.asarray(inside_mask.array if isinstance(inside_mask, Image) else inside_mask).astype(bool)
    if hbt.shape != mask.shape:
        raise InputError(f"the HbT map {hbt.shape} and the mask {mask.shape} must have the same shape")
    region = (hbt > 0) if disk is None else np.asarray(disk, dtype=bool).reshape(hbt.shape)
    inside, outside = mask & region, region & ~mask
    if not inside.any():
        raise InputError("the mask does not overlap the reconstructed disk")
    if not outside.any() or hbt[outside].mean() <= 0:
        raise InputError("no background left in the disk outside the mask")
    return float(hbt[inside].mean() / hbt[outside].mean())


def simulate_example(seed: int = 0) -> Tuple[np.ndarray, Image, Dict[str, np.ndarray]]:
    """A paper-style phantom to try reconstruction: (amplitudes, MRI Image, truth maps).

    The MRI is 100 x 100 with 0.82 mm pixels centred on the origin (the network grid, identity
    direction); ``truth`` holds the five maps plus ``inclusion_mask`` (bool) on that grid.
    """
    from .simulate import simulate_phantoms
    from .metrics import inclusion_masks

    data = simulate_phantoms(1, seed=int(seed), workers=1)
    pitch = DEFAULT_DIAMETER_MM / DEFAULT_GRID_SIZE
    corner = -0.5 * DEFAULT_DIAMETER_MM + 0.5 * pitch
    mri = Image(data["mri"][0][None], (pitch, pitch, pitch), (corner, corner, 0.0))
    truth = derived_maps(data["maps"][0])
    masks = inclusion_masks(data["inclusion_centres_mm"], data["inclusion_diameters_mm"],
                            data["inclusion_count"], DEFAULT_GRID_SIZE)
    truth["inclusion_mask"] = masks[0].any(axis=0)
    return data["measurements"][0].astype(np.float64), mri, truth


__all__ = ["DEFAULT_CHECKPOINT", "OUTPUT_NAMES", "OUTPUT_UNITS", "PAPER_CHECKPOINT", "Reconstructor",
           "SHIPPED_NETWORKS", "derived_maps", "extract_slice", "shipped_checkpoint",
           "hbt_contrast", "load_reconstructor", "maps_to_image", "read_measurements", "reconstruct_image",
           "resample_mri", "simulate_example"]
