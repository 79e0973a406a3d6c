"""Auto-configuration ("planning") of ROG for one training set.

The paper adapts ROG to each task: spacing, patch size, stem strides and head upsampling from
the median volume size/spacing and memory; intensities clipped to the [0.5, 99.5] foreground
percentiles and z-scored; organs keep their largest component, small tumour components are
merged away.  :func:`plan_dataset` derives all of that into a JSON-able :class:`Plan` for the
checkpoint header.  Every per-axis value is in (z, y, x) array order (tensor D, H, W); mm.

Decisions (and why):

* Target spacing = median spacing.  When it is strongly anisotropic (coarsest / finest > 3)
  *and* the coarse axis has few voxels (3 x its median size < the others), that axis takes the
  10th percentile of its spacings (never finer than the others), as in nnU-Net, so thin-slice
  cases are not blurred too much.
* Strides: of the five stride-2 steps (stem 1, stem 2, level 0 -> 1; 1 -> 2 and 2 -> 3 are
  always 2) an axis takes one of the first three only while its spacing is at most twice the
  finest current spacing (coarse axes are downsampled less and later) and while the median
  image still spans 4 or more voxels at the coarsest level (small images get fewer steps, like
  the reference planner).  Strides of 1 come first, so the stem reduces anisotropic axes least;
  isotropic data reach 1/32 of the input.  The head upsamples by ``stem_strides[1]``, then [0].
* Patch: the median resampled shape rounded up to the total stride, then one total stride less
  at a time on the axis with the largest physical extent (the paper samples cubic patches)
  until the estimated training memory fits.  Default budget 2 GiB (a batch of 2): a 96^3 patch
  for isotropic CT.  The estimate tracked the measured peak of a bf16-autocast training step on
  an H200 (1.2-2.0 vs 1.4-1.8 GiB); a float32 step peaked 1.1-1.9x higher.
* Intensities: up to ``samples_per_case`` random foreground voxels per case.  CT uses raw
  values; other modalities are min-max scaled per image first, as the reference code does,
  since MRI intensities are not calibrated between scans.  mean/std are taken after clipping.
* Labels: tumour-like names are "lesion" (merge components smaller than ``min_size_mm3``, the
  smallest training component: it never deletes an object as large as a real training lesion;
  the paper's average size is kept as ``mean_component_mm3``), others "organ" (keep the
  largest component).  Components use 26-connectivity.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import SimpleITK as sitk
import torch
from scipy import ndimage

from deepimaging.core.errors import GeometryMismatchError, InputError
from deepimaging.core.progress import CancelToken, ProgressCallback, check_cancel, report

from .model import ROG, Stride, count_parameters, total_stride

PLAN_VERSION = 1
ANISOTROPY_RATIO = 3.0
DEFAULT_MEMORY_BUDGET = 2 * 1024 ** 3
LESION_NAME = re.compile(r"tumou?r|lesion|cancer|nodul|metasta|neoplas|carcinom", re.IGNORECASE)
CT_NAME = re.compile(r"(^|[^a-z])ct([^a-z]|$)", re.IGNORECASE)
PathLike = Union[str, Path]


@dataclass
class ChannelInfo:
    """Normalisation of one input channel: clip to [p0.5, p99.5], then (x - mean) / std."""

    name: str
    normalization: str  # "clip_zscore" (CT) or "minmax_clip_zscore" (per-image min-max first)
    percentile_00_5: float
    percentile_99_5: float
    mean: float
    std: float

    def clip_zscore(self, values: np.ndarray) -> np.ndarray:
        """Clip to [p0.5, p99.5], then z-score, in float32: the last step of preprocessing
        (``preprocess.normalize_channel``), kept here so the valid range uses the same arithmetic."""
        x = np.clip(np.asarray(values, dtype=np.float32), self.percentile_00_5, self.percentile_99_5)
        return ((x - self.mean) / self.std).astype(np.float32, copy=False)

    def normalised_range(self) -> Tuple[float, float]:
        """(low, high) every preprocessed voxel of this channel lies in: the z-scored clip limits,
        ``((p0.5 - mean) / std, (p99.5 - mean) / std)``, bit-identical to the clipped voxels."""
        low, high = self.clip_zscore(np.asarray([self.percentile_00_5, self.percentile_99_5], np.float32))
        return float(low), float(high)


@dataclass
class LabelInfo:
    """One label value with its post-processing rule and training-set component statistics."""

    value: int
    name: str
    kind: str  # "background", "organ" (keep largest component) or "lesion" (merge small ones)
    components: int = 0
    smallest_component_mm3: float = 0.0
    mean_component_mm3: float = 0.0
    min_size_mm3: float = 0.0  # lesions: smaller predicted components are merged away


@dataclass
class Plan:
    """Everything ROG training, inference and post-processing need to know about a task.

    ``labels[i]`` is network output class ``i`` (label values need not be contiguous);
    ``anisotropic_axis`` is the (z, y, x) axis that got the 10th-percentile spacing, or None;
    ``median_shape`` is the median case shape after resampling to ``target_spacing_zyx``.
    """

    name: str
    num_cases: int
    channels: List[ChannelInfo]
    labels: List[LabelInfo]
    median_spacing_zyx: Tuple[float, float, float]
    target_spacing_zyx: Tuple[float, float, float]
    anisotropic_axis: Optional[int]
    median_shape: Tuple[int, int, int]
    patch_size: Tuple[int, int, int]
    stem_strides: Tuple[Stride, Stride]
    lattice_stride: Stride
    batch_size: int = 2
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET
    estimated_memory_bytes: int = 0
    version: int = PLAN_VERSION

    def __post_init__(self) -> None:
        self.stem_strides = tuple(tuple(int(v) for v in s) for s in self.stem_strides)  # type: ignore
        self.lattice_stride = tuple(int(v) for v in self.lattice_stride)  # type: ignore
        self.patch_size = tuple(int(v) for v in self.patch_size)  # type: ignore
        if any(p % t for p, t in zip(self.patch_size, self.total_stride)):
            raise ValueError(f"patch {self.patch_size} is not a multiple of the total stride {self.total_stride}")

    @property
    def total_stride(self) -> Stride:
        return total_stride(self.stem_strides, self.lattice_stride)

    @property
    def head_upsampling(self) -> Tuple[Stride, Stride]:
        """Head factors: back to the stem-stage-1 grid, then to the input grid."""
        return (self.stem_strides[1], self.stem_strides[0])

    @property
    def lowest_resolution(self) -> Tuple[float, float, float]:
        return tuple(1.0 / t for t in self.total_stride)  # type: ignore[return-value]

    def network_config(self) -> Dict[str, Any]:
        """Constructor arguments for :class:`ROG` (``ROG.from_config``)."""
        return {"in_channels": len(self.channels), "num_classes": len(self.labels),
                "stem_strides": [list(s) for s in self.stem_strides],
                "lattice_stride": list(self.lattice_stride), "length": 2}

    def build_model(self) -> ROG:
        return ROG.from_config(self.network_config())

    def input_range(self) -> Tuple[List[float], List[float]]:
        """Per-channel valid input range on the normalised scale, ``([low_c], [high_c])``.

        Preprocessing clips each channel to its foreground [p0.5, p99.5] before the z-score, so
        every network input (padding included) lies in ``[(p0.5 - mean) / std, (p99.5 - mean) / std]``
        (MRI-like channels: the percentiles of the per-image min-max scaled values).  Attacks and
        Free AT clamp perturbed inputs to it; see :mod:`deepimaging.rog.adversarial` for eps.
        """
        ranges = [c.normalised_range() for c in self.channels]
        return [lo for lo, _ in ranges], [hi for _, hi in ranges]

    def to_dict(self) -> Dict[str, Any]:
        """JSON-able dict; derived values are included for readers and ignored on load."""
        derived = {"total_stride": self.total_stride, "head_upsampling": self.head_upsampling,
                   "lowest_resolution": self.lowest_resolution, "network": self.network_config()}
        # the JSON round trip turns tuples into lists and numpy scalars into Python numbers
        return json.loads(json.dumps({**asdict(self), "derived": derived}, default=lambda o: o.item()))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Plan":
        data = {k: v for k, v in data.items() if k != "derived"}  # derived values are recomputed
        if data.get("version", PLAN_VERSION) > PLAN_VERSION:
            raise ValueError(f"plan version {data['version']} is newer than this code ({PLAN_VERSION})")
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown plan key(s): {sorted(unknown)}")
        data["channels"] = [ChannelInfo(**c) for c in data["channels"]]
        data["labels"] = [LabelInfo(**lb) for lb in data["labels"]]
        for key in ("median_spacing_zyx", "target_spacing_zyx", "median_shape"):
            data[key] = tuple(data[key])
        return cls(**data)


@dataclass
class DatasetSpec:
    """Cases (per-channel image files or one 4-D file, plus a label map) and their metadata."""

    cases: List[Tuple[Tuple[Path, ...], Path]]
    label_names: Dict[int, str] = field(default_factory=dict)
    modalities: List[str] = field(default_factory=list)
    name: str = "dataset"
    label_kinds: Dict[int, str] = field(default_factory=dict)  # value -> "organ"/"lesion" overrides


# -- reading datasets ---------------------------------------------------------------------------
def _parse_labels(labels: Mapping[str, Any]) -> Dict[int, str]:
    """MSD ``{"0": "background"}`` or nnU-Net v2 ``{"background": 0}`` -> ``{0: "background"}``."""
    out: Dict[int, str] = {}
    for key, val in labels.items():
        if str(key).strip().lstrip("-").isdigit():
            out[int(key)] = str(val)
        elif isinstance(val, int) and not isinstance(val, bool):
            out[val] = str(key)
        else:
            raise InputError(f"dataset.json label entry {key!r}: {val!r} is not 'value: name' or 'name: value' "
                             "(region-based labels are not supported)")
    return dict(sorted(out.items()))


def read_msd_dataset(folder: PathLike) -> DatasetSpec:
    """Read a Medical Segmentation Decathlon (or nnU-Net v2) folder: dataset.json + imagesTr/ + labelsTr/."""
    root = Path(folder)
    meta_file = root / "dataset.json"
    if not meta_file.is_file():
        raise InputError(f"{root} has no dataset.json (expected the MSD layout: dataset.json, imagesTr/, labelsTr/)")
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{meta_file} is not valid JSON: {exc}") from exc
    if "labels" not in meta:
        raise InputError(f"{meta_file} has no 'labels' entry")
    channels = meta.get("modality", meta.get("channel_names", {"0": "image"}))
    modalities = [str(channels[k]) for k in sorted(channels, key=int)]
    cases = [((root / e["image"],), root / e["label"]) for e in meta.get("training", [])]
    if "training" not in meta:  # nnU-Net v2: labelsTr/<case><ending>, imagesTr/<case>_<0000..><ending>
        ending = meta.get("file_ending", ".nii.gz")
        for label in sorted((root / "labelsTr").glob(f"*{ending}")):
            case = label.name[: -len(ending)]
            images = tuple(root / "imagesTr" / f"{case}_{i:04d}{ending}" for i in range(len(modalities)))
            cases.append((images, label))
    return DatasetSpec(cases, _parse_labels(meta["labels"]), modalities, str(meta.get("name", root.name)))


def _geometry(img: sitk.Image) -> Tuple[Tuple[int, ...], np.ndarray, np.ndarray, np.ndarray]:
    """Size, spacing, origin (x, y, z) and 3x3 direction of the first three axes."""
    dim = img.GetDimension()
    direction = np.asarray(img.GetDirection(), float).reshape(dim, dim)[:3, :3]
    return (img.GetSize()[:3], np.asarray(img.GetSpacing()[:3]), np.asarray(img.GetOrigin()[:3]), direction)


def _check_volume(img: sitk.Image, path: Path, max_channels: int) -> None:
    dim, size = img.GetDimension(), img.GetSize()
    if dim == 2 or (dim >= 3 and 1 in size[:3]):
        raise InputError(f"{path} is a 2-D image (size {size}); ROG needs 3-D volumes")
    channels = size[3] if dim == 4 else img.GetNumberOfComponentsPerPixel()
    if dim > 4 or channels > max_channels:
        allowed = f" (or a 4-D image of at most {max_channels} channels)" if max_channels > 1 else ""
        raise InputError(f"{path} is a {dim}-D image of size {size} with {channels} volume(s) per voxel grid; "
                         f"expected a 3-D volume{allowed}")


def _check_geometry(ref: sitk.Image, other: sitk.Image, what: str, tol: float) -> None:
    (s1, sp1, o1, d1), (s2, sp2, o2, d2) = _geometry(ref), _geometry(other)
    diffs = []
    if s1 != s2:
        diffs.append(f"size {s1} vs {s2}")
    if not np.allclose(sp1, sp2, rtol=tol, atol=0):
        diffs.append(f"spacing {tuple(sp1)} vs {tuple(sp2)}")
    if not np.allclose(o1, o2, rtol=0, atol=tol * max(sp1)):
        diffs.append(f"origin {tuple(o1)} vs {tuple(o2)}")
    if not np.allclose(d1, d2, rtol=0, atol=tol):
        diffs.append("direction matrices differ")
    if diffs:
        raise GeometryMismatchError(f"{what}: " + "; ".join(diffs) + " (x, y, z order)")


def read_case(images: Sequence[Path], label: Path, channels: int,
              tol: float = 1e-3) -> Tuple[List[np.ndarray], np.ndarray, np.ndarray]:
    """Read and validate one case -> (channel arrays (z, y, x), integer labels, spacing (z, y, x))."""
    for path in (*images, label):
        if not Path(path).is_file():
            raise FileNotFoundError(f"missing file: {path}")
    lab_img = sitk.ReadImage(str(label))
    _check_volume(lab_img, label, 1)
    arrays: List[np.ndarray] = []
    for path in images:
        img = sitk.ReadImage(str(path))
        _check_volume(img, path, channels)
        _check_geometry(img, lab_img, f"label {label.name} does not match image {path.name}", tol)
        arr = sitk.GetArrayFromImage(img)  # native dtype: only samples are converted to float
        if img.GetDimension() == 4:
            arrays.extend(arr)
        elif img.GetNumberOfComponentsPerPixel() > 1:
            arrays.extend(np.moveaxis(arr, -1, 0))
        else:
            arrays.append(arr)
    if len(arrays) != channels:
        raise InputError(f"case {label.name}: found {len(arrays)} channel(s), the dataset declares {channels}")
    lab = sitk.GetArrayFromImage(lab_img).reshape(lab_img.GetSize()[:3][::-1])
    if lab.dtype.kind == "f" and (not np.all(np.isfinite(lab)) or np.any(lab != np.round(lab))):
        raise InputError(f"label map {label} has non-integer values; expected integer label values")
    if lab.dtype.kind != "u" and lab.min() < 0:
        raise InputError(f"label map {label} has negative values (min {lab.min()}); labels must be >= 0")
    lab = lab.astype(np.int32) if lab.dtype.kind == "f" else lab
    return arrays, lab, np.asarray(lab_img.GetSpacing()[::-1], float)


# -- architecture -------------------------------------------------------------------------------
@functools.lru_cache(maxsize=64)
def _network_costs(stem: Tuple[Stride, Stride], lattice: Stride, in_ch: int, n_cls: int) -> Tuple[float, int]:
    """(leaf-module output elements per input voxel, parameters), from one meta-device forward."""
    with torch.device("meta"):
        model = ROG(in_ch, n_cls, stem, lattice)
    total = [0]
    for m in model.modules():  # the hooks die with this throw-away model
        if not list(m.children()):
            m.register_forward_hook(lambda _m, _i, o: total.__setitem__(0, total[0] + o.numel()))
    ref = tuple(2 * t for t in total_stride(stem, lattice))
    with torch.no_grad():
        model.eval()(torch.empty((1, in_ch, *ref), device="meta"))
    return total[0] / float(np.prod(ref)), count_parameters(model)


def estimate_memory_bytes(patch: Sequence[int], stem_strides: Sequence[Sequence[int]], lattice_stride: Sequence[int],
                          in_channels: int = 1, num_classes: int = 2, batch_size: int = 2) -> int:
    """Training memory estimate: leaf-module outputs for a batch (4 bytes each) + weights, grads,
    Adam state; close to a bf16-autocast step's measured peak, float32 peaks up to ~1.9x higher."""
    stem = tuple(tuple(int(v) for v in s) for s in stem_strides)
    per_voxel, params = _network_costs(stem, tuple(int(v) for v in lattice_stride), in_channels, num_classes)
    return int(4 * (batch_size * per_voxel * float(np.prod(patch)) + 4 * params))


def plan_architecture(spacing_zyx: Sequence[float], median_shape: Sequence[float], in_channels: int = 1,
                      num_classes: int = 2, memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET,
                      batch_size: int = 2) -> Tuple[Tuple[Stride, Stride], Stride, Tuple[int, int, int], int]:
    """Strides, patch size and memory estimate for one resampled median volume (module docstring)."""
    spacing, shape = np.asarray(spacing_zyx, float), np.maximum(np.asarray(median_shape, float), 1)
    steps, current = np.zeros(3, int), spacing.copy()
    for _ in range(3):
        pool = current <= 2 * current.min() * (1 + 1e-6)
        steps += pool
        current[pool] *= 2
    max_steps = np.clip(np.floor(np.log2(np.maximum(shape / 4, 1))).astype(int) - 2, 0, 3)
    steps = np.minimum(steps, max_steps)
    per_stage = [tuple(2 if k >= 3 - n else 1 for n in steps) for k in range(3)]
    stem, lattice = (per_stage[0], per_stage[1]), per_stage[2]
    ts = np.asarray(total_stride(stem, lattice))
    patch = (np.ceil(shape / ts) * ts).astype(int)

    def memory(p: np.ndarray) -> int:
        return estimate_memory_bytes(p, stem, lattice, in_channels, num_classes, batch_size)

    while memory(patch) > memory_budget_bytes:
        coarse = patch // ts
        options = [a for a in range(3) if coarse[a] > 1 and np.prod(coarse) // coarse[a] * (coarse[a] - 1) > 1]
        if not options:
            raise InputError(f"memory budget {memory_budget_bytes / 2 ** 30:.2f} GiB is too small for the "
                             f"smallest patch {tuple(patch)} ({memory(patch) / 2 ** 30:.2f} GiB)")
        axis = max(options, key=lambda a: (patch[a] * spacing[a], patch[a] / shape[a]))
        patch[axis] -= ts[axis]
    return stem, lattice, tuple(int(p) for p in patch), memory(patch)  # type: ignore[return-value]


def target_spacing(spacings_zyx: np.ndarray, shapes: np.ndarray) -> Tuple[np.ndarray, Optional[int]]:
    """Median spacing, or the 10th-percentile rule on a strongly anisotropic coarse axis."""
    target = np.median(spacings_zyx, axis=0)
    axis = int(np.argmax(target))
    others = [a for a in range(3) if a != axis]
    sizes = np.median(shapes * spacings_zyx / target, axis=0)
    if target[axis] / target.min() > ANISOTROPY_RATIO and sizes[axis] * ANISOTROPY_RATIO < sizes[others].min():
        target[axis] = max(np.percentile(spacings_zyx[:, axis], 10), target[others].max() + 1e-5)
        return target, axis
    return target, None


# -- the planner --------------------------------------------------------------------------------
def _to_spec(dataset: Union[PathLike, DatasetSpec, Sequence[Tuple[Any, Any]]],
             label_names: Optional[Mapping[int, str]], modalities: Optional[Sequence[str]]) -> DatasetSpec:
    if isinstance(dataset, DatasetSpec):
        spec = dataset
    elif isinstance(dataset, (str, Path)):
        if not Path(dataset).is_dir():
            raise InputError(f"{dataset} is not a folder (expected an MSD dataset or a list of (image, label) pairs)")
        spec = read_msd_dataset(dataset)
    else:
        cases = []
        for image, label in dataset:
            images = (image,) if isinstance(image, (str, Path)) else tuple(image)
            cases.append((tuple(Path(p) for p in images), Path(label)))
        spec = DatasetSpec(cases)
    if label_names is not None:
        spec.label_names = {int(k): str(v) for k, v in label_names.items()}
    if modalities is not None:
        spec.modalities = [str(m) for m in modalities]
    if not spec.cases:
        raise InputError("the dataset is empty: no (image, label) cases to plan from")
    if not spec.modalities:
        spec.modalities = ["image"] * len(spec.cases[0][0])
    return spec


def _check_label_kinds(kinds: Mapping[int, str], names: Optional[Mapping[int, str]]) -> None:
    """Kinds are "organ"/"lesion" for foreground values ("background" only for 0), of known labels."""
    for value, kind in kinds.items():
        if kind not in ("background", "organ", "lesion") or (kind == "background") != (value == 0):
            raise InputError(f"label kind {kind!r} for value {value} is not allowed: foreground labels are "
                             "'organ' or 'lesion', value 0 is 'background'")
    unknown = sorted(set(kinds) - set(names)) if names is not None else []
    if unknown:
        raise InputError(f"label kind(s) given for value(s) {unknown}, which are not labels of the dataset "
                         f"{dict(sorted(names.items()))}")


def plan_dataset(dataset: Union[PathLike, DatasetSpec, Sequence[Tuple[Any, Any]]], *,
                 label_names: Optional[Mapping[int, str]] = None, modalities: Optional[Sequence[str]] = None,
                 label_kinds: Optional[Mapping[int, str]] = None,
                 memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET, batch_size: int = 2,
                 samples_per_case: int = 10000, seed: int = 0, geometry_tolerance: float = 1e-3,
                 progress: Optional[ProgressCallback] = None, cancel: Optional[CancelToken] = None) -> Plan:
    """Plan ROG for a dataset: an MSD folder, a :class:`DatasetSpec` or (image, label) path pairs.

    ``modalities`` names the channels ("CT" selects raw-value normalisation); ``label_kinds``
    (e.g. ``{1: "organ", 2: "lesion"}``, default: the spec's ``label_kinds``) overrides the
    name-based organ/lesion choice per label value.  Raises
    :class:`~deepimaging.core.errors.InputError` (or ``GeometryMismatchError``) naming the case.
    """
    spec = _to_spec(dataset, label_names, modalities)
    label_kinds = {int(k): str(v) for k, v in (label_kinds if label_kinds is not None else spec.label_kinds).items()}
    _check_label_kinds(label_kinds, spec.label_names or None)  # before reading any case
    n_ch = len(spec.modalities)
    schemes = ["clip_zscore" if CT_NAME.search(m) else "minmax_clip_zscore" for m in spec.modalities]
    rng = np.random.default_rng(seed)
    spacings, shapes, samples = [], [], [[] for _ in range(n_ch)]
    comps: Dict[int, List[float]] = {}
    found: set = set()
    for i, (images, label) in enumerate(spec.cases):
        check_cancel(cancel)
        report(progress, i / len(spec.cases), f"reading case {i + 1}/{len(spec.cases)}: {label.name}")
        arrays, lab, spacing = read_case(images, label, n_ch, geometry_tolerance)
        spacings.append(spacing)
        shapes.append(lab.shape)
        values = np.flatnonzero(np.bincount(lab.ravel())) if lab.max() < 2 ** 20 else np.unique(lab)
        found.update(int(v) for v in values)
        voxel_mm3 = float(np.prod(spacing))
        for v in values[values > 0]:
            cc, n = ndimage.label(lab == v, structure=np.ones((3, 3, 3), bool))
            sizes = np.bincount(cc.ravel())[1:] * voxel_mm3
            comps.setdefault(int(v), []).extend([float(sizes.min()), float(sizes.sum()), float(n)])
        foreground = np.flatnonzero(lab.ravel() > 0)
        if foreground.size:
            pick = rng.choice(foreground, min(samples_per_case, foreground.size), replace=False)
            for c, arr in enumerate(arrays):
                vals = arr.ravel()[pick].astype(np.float64)
                if schemes[c] == "minmax_clip_zscore":
                    lo, hi = float(arr.min()), float(arr.max())
                    vals = (vals - lo) / (hi - lo) if hi > lo else np.zeros_like(vals)
                samples[c].append(vals)
    if not comps:
        raise InputError("no label map in the dataset has any foreground (all voxels are 0)")
    undeclared = sorted(found - set(spec.label_names) - {0}) if spec.label_names else []
    if undeclared:
        raise InputError(f"label value(s) {undeclared} occur in the label maps but are not declared "
                         f"(declared: {spec.label_names})")

    channels = []
    for c, name in enumerate(spec.modalities):
        vals = np.concatenate(samples[c])
        lo, hi = np.percentile(vals, [0.5, 99.5])
        clipped = np.clip(vals, lo, hi)
        std = float(clipped.std()) if clipped.std() > 1e-8 else 1.0  # constant foreground: no scaling
        channels.append(ChannelInfo(name, schemes[c], float(lo), float(hi), float(clipped.mean()), std))

    names = dict(spec.label_names) or {v: ("background" if v == 0 else f"label_{v}") for v in found | {0}}
    _check_label_kinds(label_kinds, names)
    labels = []
    for value, name in sorted(names.items()):
        kind = "background" if value == 0 else ("lesion" if LESION_NAME.search(name) else "organ")
        kind = label_kinds.get(value, kind)
        stats = np.asarray(comps.get(value, [0.0, 0.0, 1.0])).reshape(-1, 3)  # (min, sum, count) per case
        count, smallest = int(stats[:, 2].sum()), float(stats[:, 0].min())
        labels.append(LabelInfo(value, name, kind, count if value in comps else 0, smallest,
                                float(stats[:, 1].sum() / count), smallest if kind == "lesion" else 0.0))
    if labels[0].value != 0:
        labels.insert(0, LabelInfo(0, "background", "background"))

    spacing_arr, shape_arr = np.asarray(spacings), np.asarray(shapes, float)
    target, aniso_axis = target_spacing(spacing_arr, shape_arr)
    median_shape = np.median(np.round(shape_arr * spacing_arr / target), axis=0).astype(int)
    stem, lattice, patch, mem = plan_architecture(target, median_shape, n_ch, len(labels),
                                                  memory_budget_bytes, batch_size)
    report(progress, 1.0, "plan ready")
    return Plan(spec.name, len(spec.cases), channels, labels,
                tuple(float(s) for s in np.median(spacing_arr, axis=0)), tuple(float(s) for s in target),
                aniso_axis, tuple(int(s) for s in median_shape), patch, stem, lattice, batch_size,
                int(memory_budget_bytes), mem)
