"""Training data for Z-Net / Y-Net: a simulated dataset as tensors, its split and normalisation.

Everything a network sees is normalised here, and every statistic is stored in the checkpoint
(:meth:`Normalisation.tensors`), so inference applies exactly the training transform:

* measurements -- :class:`~deepimaging.nirst.znet.MeasurementNormalizer`: log amplitude minus
  the log amplitude of the homogeneous reference medium (the simulator's noise-free disk at the
  middle background levels, :func:`~deepimaging.nirst.dri.reference_amplitudes`, on the data's
  own mesh size -- the NIRFAST-style calibration), then per-wavelength standardisation with
  training-split statistics;
* MRI -- per image, divided by its median grey value inside the disk, minus 1 (background ~0,
  inclusion ~+0.6, outside the disk -1): invariant to the scanner's arbitrary intensity scale,
  which the paper's fixed grey levels 50/80 are not;
* targets -- each chromophore divided by its mean over the disk pixels of the training split
  (``target_scale``, so HbO uM, Hb uM and water % all have background ~1 and MSE weighs them
  alike); network output x ``target_scale`` = physical units.

Split: 70/20/10 train/validation/test by a fixed-seed permutation of the dataset order
(:func:`split_indices`); the seed is stored in the checkpoint so evaluation finds the same test set.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from deepimaging.core.errors import InputError

from .dri import REFERENCE_VALUES, reference_amplitudes
from .mesh import DEFAULT_DIAMETER_MM, DEFAULT_ELEMENT_SIZE_MM, DEFAULT_GRID_SIZE, disk_mask
from .optics import WAVELENGTHS_NM
from .phantoms import CHROMOPHORES
from .simulate import load_dataset
from .znet import MeasurementNormalizer

SPLIT_FRACTIONS = (0.7, 0.2, 0.1)
DEFAULT_SPLIT_SEED = 0
MRI_NORMALISATION = "mri / median(mri inside the disk) - 1, outside the disk -1"
TARGET_NORMALISATION = "map / target_scale (per-chromophore mean over training disk pixels)"

DatasetLike = Union[str, Path, Dict[str, Any]]


def as_dataset(data: DatasetLike) -> Dict[str, Any]:
    """A loaded dataset dict (from :func:`~deepimaging.nirst.simulate.load_dataset`) or a path to one."""
    if isinstance(data, dict):
        dataset = data
    else:
        path = Path(data)
        if not path.exists():
            raise InputError(f"dataset not found: {path}")
        dataset = load_dataset(path)
    for key in ("measurements", "mri", "maps"):
        if key not in dataset:
            raise InputError(f"the dataset has no {key!r} array; make it with `deepimaging nirst simulate`")
    if len(dataset["measurements"]) < 3:
        raise InputError(f"the dataset holds {len(dataset['measurements'])} phantoms; at least 3 are needed to split")
    return dataset


def split_indices(n: int, seed: int = DEFAULT_SPLIT_SEED,
                  fractions: Sequence[float] = SPLIT_FRACTIONS) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Train/validation/test positions (70/20/10 by default) of a random permutation by ``seed``.

    Every part gets at least one phantom when ``n >= 3``.
    """
    order = np.random.default_rng(int(seed)).permutation(int(n))
    n_val = max(1, int(round(fractions[1] * n)))
    n_test = max(1, int(round(fractions[2] * n)))
    n_train = n - n_val - n_test
    if n_train < 1:
        raise InputError(f"cannot split {n} phantoms into train/validation/test")
    return np.sort(order[:n_train]), np.sort(order[n_train:n_train + n_val]), np.sort(order[n_train + n_val:])


def normalise_mri(mri: np.ndarray) -> np.ndarray:
    """(..., H, W) grey values on the disk's bounding square -> network input (module docstring)."""
    mri = np.asarray(mri, dtype=np.float32)
    size = mri.shape[-1]
    disk = disk_mask(0.5 * DEFAULT_DIAMETER_MM, size)  # the pixel mask does not depend on the radius
    flat = mri.reshape(-1, size * size)
    inside = flat[:, disk.ravel()]
    median = np.median(inside, axis=1)
    if np.any(~np.isfinite(median)) or np.any(median <= 0):
        raise InputError("the MRI has no positive signal inside the imaging disk")
    out = np.where(disk.ravel()[None, :], flat / median[:, None] - 1.0, -1.0)
    return out.reshape(mri.shape).astype(np.float32)


@dataclass
class Normalisation:
    """The statistics that turn raw data into network inputs/targets and back."""

    normalizer: MeasurementNormalizer
    target_scale: np.ndarray  # (3,) HbO uM, Hb uM, water %

    @classmethod
    def fit(cls, dataset: Dict[str, Any], train: np.ndarray) -> "Normalisation":
        meta = dataset.get("meta", {})
        n_optodes = int(meta.get("n_optodes", 16))
        wavelengths = tuple(meta.get("wavelengths_nm", WAVELENGTHS_NM))
        reference = reference_amplitudes(REFERENCE_VALUES, n_optodes,
                                         float(meta.get("element_size_mm", DEFAULT_ELEMENT_SIZE_MM)), wavelengths,
                                         float(meta.get("diameter_mm", DEFAULT_DIAMETER_MM)))
        normalizer = MeasurementNormalizer(n_optodes, len(wavelengths)).fit(
            torch.from_numpy(np.asarray(dataset["measurements"][train], dtype=np.float64)), torch.from_numpy(reference))
        maps = dataset["maps"]
        disk = disk_mask(0.5 * float(meta.get("diameter_mm", DEFAULT_DIAMETER_MM)), maps.shape[-1])
        sums = np.zeros(3)
        for start in range(0, len(train), 1024):  # chunked: avoids a float64 copy of 20,000 maps
            sums += maps[train[start:start + 1024]][:, :, disk].sum(axis=(0, 2), dtype=np.float64)
        scale = sums / (len(train) * disk.sum())
        if np.any(scale <= 0):
            raise InputError("a chromophore map is zero over the whole training split")
        return cls(normalizer, scale.astype(np.float64))

    def tensors(self) -> Dict[str, Tensor]:
        """Checkpoint ``extra_tensors``: the normaliser state (``normalizer.*``) and ``target_scale``."""
        extra = {f"normalizer.{k}": v for k, v in self.normalizer.state_dict().items()}
        extra["target_scale"] = torch.as_tensor(self.target_scale, dtype=torch.float64)
        return extra

    @classmethod
    def from_tensors(cls, extra: Dict[str, Tensor]) -> "Normalisation":
        prefix = "normalizer."
        state = {k[len(prefix):]: v for k, v in extra.items() if k.startswith(prefix)}
        if not state or "target_scale" not in extra:
            raise KeyError("normalizer.* / target_scale")
        return cls(MeasurementNormalizer.from_state_dict(state), extra["target_scale"].double().numpy())

    def inputs(self, measurements: np.ndarray, mri: np.ndarray) -> Tuple[Tensor, Tensor]:
        """Raw amplitudes (B, n_meas) and MRI (B, H, W) -> float32 tensors (B, n_meas), (B, 1, H, W)."""
        signal = self.normalizer.transform(torch.from_numpy(np.asarray(measurements, dtype=np.float64)))
        image = torch.from_numpy(normalise_mri(mri)).unsqueeze(1)
        return signal, image

    def targets(self, maps: np.ndarray) -> Tensor:
        scale = self.target_scale.astype(np.float32)[None, :, None, None]
        return torch.from_numpy(np.asarray(maps, dtype=np.float32) / scale)

    def to_physical(self, output: Tensor) -> np.ndarray:
        """Network output (B, 3, H, W) -> maps in uM / uM / % (float32 numpy)."""
        scale = torch.as_tensor(self.target_scale, dtype=torch.float32, device=output.device)
        return (output.float() * scale[None, :, None, None]).cpu().numpy()


class NirstDataset(torch.utils.data.Dataset):
    """Normalised (signal, MRI, target) tensors of some dataset rows, held in memory.

    Built once (normalisation is vectorised), so training can also move the three tensors to
    the GPU in one go (:meth:`tensors`) instead of iterating item by item.
    """

    def __init__(self, dataset: Dict[str, Any], rows: np.ndarray, normalisation: Normalisation,
                 chunk: int = 2048) -> None:
        self.rows = np.asarray(rows)
        signals, images, targets = [], [], []
        for start in range(0, len(self.rows), chunk):
            part = self.rows[start:start + chunk]
            signal, image = normalisation.inputs(dataset["measurements"][part], dataset["mri"][part])
            signals.append(signal)
            images.append(image)
            targets.append(normalisation.targets(dataset["maps"][part]))
        self.signals = torch.cat(signals) if signals else torch.zeros(0)
        self.images = torch.cat(images) if images else torch.zeros(0)
        self.targets = torch.cat(targets) if targets else torch.zeros(0)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, item: int) -> Tuple[Tensor, Tensor, Tensor]:
        return self.signals[item], self.images[item], self.targets[item]

    def tensors(self) -> Tuple[Tensor, Tensor, Tensor]:
        return self.signals, self.images, self.targets

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())


def dataset_summary(dataset: Dict[str, Any]) -> Dict[str, Any]:
    """JSON-able facts about the training data for the checkpoint header."""
    meta = dataset.get("meta", {})
    return {"n_phantoms": int(len(dataset["measurements"])), "seed": meta.get("seed"),
            "element_size_mm": meta.get("element_size_mm"), "noise": meta.get("noise"),
            "mri_noise": meta.get("mri_noise"), "shards": meta.get("shards"),
            "grid_size": int(dataset["maps"].shape[-1]) if len(dataset["maps"]) else DEFAULT_GRID_SIZE,
            "chromophores": list(CHROMOPHORES)}
