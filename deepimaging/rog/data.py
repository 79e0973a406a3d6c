"""ROG training data: preprocessed cases, foreground-aware patch sampling, augmentation.

:class:`RogDataset` preprocesses every case once (``preprocess.py``, the same code inference
runs) and keeps the arrays in memory, or as ``.npy`` files in a cache folder that are
memory-mapped back (so a large dataset costs disk, not RAM, and a second run skips the work).

:class:`PatchSampler` is our own rather than MONAI's ``RandCropByPosNegLabeld``: per-class
foreground voxel lists are computed once per case instead of per call, the foreground class is
drawn uniformly first (small lesions get as many patches as big organs), out-of-image parts are
padded with the plan's "darkest" value (the same padding inference uses), and the crop is
enlarged just enough for the rotation/scaling that follows, so augmented patches have no empty
corners.  The augmentations themselves are MONAI's: ``Affine`` (rotation + isotropic scaling in
one resampling), ``RandFlipd`` (mirroring per axis) and ``RandAdjustContrastd`` (gamma).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from monai.transforms import Affine, Compose, RandAdjustContrastd, RandFlipd
from monai.transforms.utils import create_rotate, create_scale

from deepimaging.core.errors import InputError
from deepimaging.core.image import Image
from deepimaging.core.progress import CancelToken, ProgressCallback, check_cancel, report

from .plan import DatasetSpec, Plan, _to_spec, read_case
from .preprocess import pad_values, preprocess_arrays, preprocess_labelled

MAX_INDICES_PER_CLASS = 50_000  # foreground voxels remembered per class and case (random subset)
PathLike = Union[str, Path]


@dataclass(frozen=True)
class Augmentation:
    """Augmentation probabilities and ranges (spatial ones share one resampling)."""

    spatial_probability: float = 0.3   # rotation + scaling together
    rotation_degrees: float = 15.0     # uniform in +-degrees about each axis
    scale_range: Tuple[float, float] = (0.85, 1.25)  # isotropic zoom factor
    mirror_probability: float = 0.5    # per axis
    gamma_probability: float = 0.3
    gamma_range: Tuple[float, float] = (0.7, 1.5)


@dataclass
class RogCase:
    """One preprocessed case: (C, z, y, x) float32 image, (z, y, x) uint8 class map."""

    name: str
    image: np.ndarray
    label: np.ndarray
    foreground: List[np.ndarray] = field(default_factory=list)  # flat indices, one array per class >= 1

    def __post_init__(self) -> None:
        if not self.foreground:
            rng = np.random.default_rng(0)
            flat = np.asarray(self.label).ravel()
            for k in range(1, int(flat.max(initial=0)) + 1):
                idx = np.flatnonzero(flat == k)
                if idx.size > MAX_INDICES_PER_CLASS:
                    idx = np.sort(rng.choice(idx, MAX_INDICES_PER_CLASS, replace=False))
                self.foreground.append(idx)

    @property
    def has_foreground(self) -> bool:
        return any(idx.size for idx in self.foreground)


def _cache_key(images: Sequence[Path], label: Path, plan: Plan) -> str:
    """Changes when a file or the plan's preprocessing changes."""
    stats = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in (*images, label)]
    prep = {"channels": [c.__dict__ for c in plan.channels], "labels": [lb.value for lb in plan.labels],
            "spacing": plan.target_spacing_zyx}
    return hashlib.sha1(json.dumps([stats, prep], sort_keys=True).encode()).hexdigest()[:16]


class RogDataset:
    """Preprocessed cases of one plan, indexable; build with :meth:`from_files` or :meth:`from_images`."""

    def __init__(self, cases: Sequence[RogCase], plan: Plan):
        if not cases:
            raise InputError("the dataset is empty: no (image, label) cases to train on")
        self.cases, self.plan = list(cases), plan

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, index: int) -> RogCase:
        return self.cases[index]

    @classmethod
    def from_files(cls, dataset: Union[PathLike, DatasetSpec, Sequence[Tuple[Any, Any]]], plan: Plan,
                   cache_dir: Optional[PathLike] = None, progress: Optional[ProgressCallback] = None,
                   cancel: Optional[CancelToken] = None) -> "RogDataset":
        """Read and preprocess an MSD folder, a :class:`DatasetSpec` or (image(s), label) path pairs."""
        spec = _to_spec(dataset, None, None)
        cache = Path(cache_dir) if cache_dir else None
        if cache:
            cache.mkdir(parents=True, exist_ok=True)
        cases = []
        for i, (images, label) in enumerate(spec.cases):
            check_cancel(cancel)
            report(progress, i / len(spec.cases), f"preprocessing case {i + 1}/{len(spec.cases)}: {label.name}")
            name = label.name.split(".")[0]
            files = None
            if cache:
                key = _cache_key(images, label, plan)
                files = (cache / f"{name}_{key}_image.npy", cache / f"{name}_{key}_label.npy")
            if files and files[0].is_file() and files[1].is_file():
                image, classes = np.load(files[0], mmap_mode="r"), np.load(files[1], mmap_mode="r")
            else:
                arrays, lab, spacing = read_case(images, label, len(plan.channels))
                try:
                    image, classes = preprocess_arrays(arrays, spacing, plan, lab)
                except InputError as exc:
                    raise InputError(f"case {label.name}: {exc}") from exc
                if files:
                    for path, arr in zip(files, (image, classes)):
                        tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npy")  # ranks may race
                        np.save(tmp, arr)
                        tmp.replace(path)
                    image, classes = np.load(files[0], mmap_mode="r"), np.load(files[1], mmap_mode="r")
            cases.append(RogCase(name, image, classes))
        report(progress, 1.0, "dataset ready")
        return cls(cases, plan)

    @classmethod
    def from_images(cls, pairs: Sequence[Tuple[Union[Image, Sequence[Image]], Image]], plan: Plan,
                    names: Optional[Sequence[str]] = None) -> "RogDataset":
        """In-memory (image(s), label map) pairs, e.g. volumes and segmentations from a Slicer scene."""
        cases = []
        for i, (image, label) in enumerate(pairs):
            name = names[i] if names else f"case{i}"
            try:
                array, classes = preprocess_labelled(image, label, plan)
            except InputError as exc:
                raise type(exc)(f"case {name}: {exc}") from exc
            cases.append(RogCase(name, array, classes))
        return cls(cases, plan)

    def split(self, val_fraction: float = 0.2, seed: int = 0) -> Tuple["RogDataset", "RogDataset"]:
        """(train, validation) by a seeded shuffle; one case only validates on itself."""
        if len(self) == 1:
            return self, self
        order = np.random.default_rng(seed).permutation(len(self))
        n_val = min(len(self) - 1, max(1, int(round(val_fraction * len(self)))))
        val, train = sorted(order[:n_val]), sorted(order[n_val:])
        return (RogDataset([self.cases[i] for i in train], self.plan),
                RogDataset([self.cases[i] for i in val], self.plan))


def crop(array: np.ndarray, start: Sequence[int], size: Sequence[int], fill: Union[float, np.ndarray]) -> np.ndarray:
    """``array[..., start:start + size]`` over the last three axes, padded with ``fill`` outside.

    ``fill`` may hold one value per leading channel.
    """
    lead = array.shape[:-3]
    out = np.empty((*lead, *size), dtype=array.dtype)
    out[...] = np.reshape(fill, (-1,) + (1,) * 3) if np.ndim(fill) else fill
    src, dst = [], []
    for s, n, length in zip(start, array.shape[-3:], size):
        lo, hi = max(int(s), 0), min(int(s) + int(length), n)
        if hi <= lo:
            return out
        src.append(slice(lo, hi))
        dst.append(slice(lo - int(s), hi - int(s)))
    out[(..., *dst)] = array[(..., *src)]
    return out


class PatchSampler:
    """Random training patches: with ``foreground_probability`` centred on a foreground voxel.

    ``sample()`` returns ``(image (C, *patch) float32, label (*patch) int64, centred_on_foreground)``.
    """

    def __init__(self, dataset: RogDataset, patch_size: Optional[Sequence[int]] = None,
                 foreground_probability: float = 0.5, augmentation: Optional[Augmentation] = None,
                 seed: int = 0):
        self.dataset = dataset
        self.patch = np.asarray(dataset.plan.patch_size if patch_size is None else patch_size, int)
        self.p_fg = float(foreground_probability)
        self.aug = augmentation
        self.rng = np.random.default_rng(seed)
        self.fill = pad_values(dataset.plan)
        self.pixel_transforms = None
        if augmentation is not None:
            a = augmentation
            flips = [RandFlipd(["image", "label"], prob=a.mirror_probability, spatial_axis=axis) for axis in range(3)]
            gamma = RandAdjustContrastd(["image"], prob=a.gamma_probability, gamma=a.gamma_range)
            self.pixel_transforms = Compose([*flips, gamma]).set_random_state(seed=int(seed) % 2 ** 32)

    def centre(self, case: RogCase, foreground: bool) -> np.ndarray:
        """A foreground voxel of a uniformly chosen present class, or a uniform in-image patch centre."""
        shape = np.asarray(case.label.shape)
        if foreground:
            classes = [idx for idx in case.foreground if idx.size]
            idx = classes[self.rng.integers(len(classes))]
            return np.asarray(np.unravel_index(int(idx[self.rng.integers(idx.size)]), shape))
        start = np.where(shape >= self.patch, 0, (shape - self.patch) // 2)
        span = np.maximum(shape - self.patch, 0)
        return start + np.asarray([self.rng.integers(s + 1) for s in span]) + self.patch // 2

    def patch_at(self, case: RogCase, centre: np.ndarray, augment: bool = True) -> Tuple[np.ndarray, np.ndarray]:
        """Crop (and, if enabled, augment) the patch centred at ``centre``."""
        spatial = augment and self.aug is not None and self.rng.random() < self.aug.spatial_probability
        if not spatial:
            start = centre - self.patch // 2
            image = crop(case.image, start, self.patch, self.fill)
            label = crop(case.label, start, self.patch, 0)
        else:
            image, label = self._spatial(case, centre)
        if augment and self.pixel_transforms is not None:
            data = self.pixel_transforms({"image": torch.from_numpy(np.ascontiguousarray(image)),
                                          "label": torch.from_numpy(np.ascontiguousarray(label[None]))})
            image = _plain(data["image"]).numpy()
            label = _plain(data["label"]).numpy()[0]
        return np.ascontiguousarray(image, np.float32), np.ascontiguousarray(label, np.int64)

    def _spatial(self, case: RogCase, centre: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """Rotation + isotropic scaling from a crop just large enough to fill the patch."""
        a = self.aug
        angles = np.deg2rad(self.rng.uniform(-a.rotation_degrees, a.rotation_degrees, 3))
        spacing = np.asarray(self.dataset.plan.target_spacing_zyx)
        if spacing.max() > 3 * spacing.min():  # thick slices: rotate in-plane only (about the coarse axis)
            angles[np.arange(3) != int(np.argmax(spacing))] = 0.0
        zoom = float(np.exp(self.rng.uniform(*np.log(a.scale_range))))
        matrix = create_rotate(3, angles.tolist()) @ create_scale(3, [1.0 / zoom] * 3)
        half = self.patch / 2.0
        reach = np.maximum(np.abs(matrix[:3, :3]) @ half, np.abs(np.linalg.inv(matrix[:3, :3])) @ half)
        big = 2 * np.ceil(reach).astype(int) + 2
        start = centre - big // 2
        image = torch.from_numpy(crop(case.image, start, big, self.fill))
        label = torch.from_numpy(crop(case.label, start, big, 0)[None].astype(np.float32))
        affine = Affine(affine=matrix, spatial_size=self.patch.tolist(), padding_mode="border", image_only=True)
        image = _plain(affine(image, mode="bilinear")).numpy()
        label = _plain(affine(label, mode="nearest")).numpy()[0].round()
        return image, label

    def sample(self) -> Tuple[np.ndarray, np.ndarray, bool]:
        case = self.dataset[int(self.rng.integers(len(self.dataset)))]
        foreground = bool(self.rng.random() < self.p_fg) and case.has_foreground
        image, label = self.patch_at(case, self.centre(case, foreground))
        return image, label, foreground


def _plain(x: Any) -> torch.Tensor:
    """MONAI returns MetaTensors; training needs plain tensors."""
    return x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(x)


class PatchStream(torch.utils.data.IterableDataset):
    """Endless augmented patches for a DataLoader; each worker (and rank, via ``seed``) its own stream."""

    def __init__(self, dataset: RogDataset, patch_size: Optional[Sequence[int]] = None,
                 foreground_probability: float = 0.5, augmentation: Optional[Augmentation] = None, seed: int = 0):
        self.args = (dataset, patch_size, foreground_probability, augmentation)
        self.seed = int(seed)

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        sampler = PatchSampler(*self.args, seed=self.seed * 7919 + worker)
        while True:
            image, label, _ = sampler.sample()
            yield torch.from_numpy(image), torch.from_numpy(label)


def validation_patches(dataset: RogDataset, per_case: int = 2, patch_size: Optional[Sequence[int]] = None,
                       seed: int = 0) -> List[Tuple[np.ndarray, np.ndarray]]:
    """Fixed, un-augmented patches per case: the first centred on foreground, the rest at random.

    The same patches every epoch, so the validation loss moves only when the model does.
    """
    sampler = PatchSampler(dataset, patch_size, augmentation=None, seed=seed)
    out = []
    for case in dataset.cases:
        for k in range(max(1, per_case)):
            centre = sampler.centre(case, foreground=(k == 0 and case.has_foreground))
            out.append(sampler.patch_at(case, centre, augment=False))
    return out
