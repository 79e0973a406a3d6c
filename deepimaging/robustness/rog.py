"""The robustness benchmark on ROG checkpoints and held-out MSD cases (CLI and Slicer both call it).

The attack library is model-agnostic; this file binds it to ROG: it reads held-out cases
(``imagesTs``/``labelsTs`` when the dataset has them, else ``imagesTr``/``labelsTr``),
preprocesses each exactly as training and prediction do (:func:`deepimaging.rog.infer.prepare_case`),
attacks the whole sliding-window segmentation (:class:`deepimaging.rog.infer.SlidingWindowSegmenter`,
float32 logits with gradients), clamps to the plan's valid input range and scales eps to it
(8/255 = 8/255 of each channel's [p0.5, p99.5] span, see :mod:`deepimaging.rog.adversarial`),
or takes eps in original intensity units (HU) with ``eps_units="intensity"``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from deepimaging.core.device import DeviceLike, select_device
from deepimaging.core.errors import InputError
from deepimaging.core.image import Image
from deepimaging.core.progress import CancelToken, ProgressCallback, report, sub_progress
from deepimaging.robustness.autoattack import DEFAULT_ATTACKS, RobustnessResult, run_autoattack
from deepimaging.robustness.losses import foreground_dice

PathLike = Union[str, Path]
EPS_UNITS = ("range", "intensity", "normalised")


@dataclass
class HeldOutCase:
    name: str
    images: Tuple[Path, ...]
    label: Path


def _case_name(path: Path) -> str:
    name = path.name
    for ending in (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd"):
        if name.endswith(ending):
            return name[: -len(ending)]
    return path.stem


def held_out_cases(folder: PathLike) -> Tuple[List[HeldOutCase], str]:
    """``(cases, which)``: ``imagesTs``+``labelsTs`` pairs if the folder has labelled test cases,
    else the training cases of ``dataset.json`` (``which`` says "test" or "training")."""
    from deepimaging.rog.plan import read_msd_dataset

    root = Path(folder)
    labels = root / "labelsTs"
    if labels.is_dir() and any(labels.iterdir()):
        cases = []
        for label in sorted(p for p in labels.iterdir() if p.is_file() and not p.name.startswith(".")):
            name = _case_name(label)
            same = root / "imagesTs" / label.name  # MSD: identical file names
            images = (same,) if same.is_file() else tuple(sorted((root / "imagesTs").glob(f"{name}_[0-9][0-9][0-9][0-9]*")))
            if not images:
                raise InputError(f"{label.name} in labelsTs has no image in imagesTs")
            cases.append(HeldOutCase(name, images, label))
        return cases, "test"
    spec = read_msd_dataset(root)
    if not spec.cases:
        raise InputError(f"{root} has no labelled cases (labelsTs/ or dataset.json 'training')")
    return [HeldOutCase(_case_name(label), tuple(images), label) for images, label in spec.cases], "training"


def eps_fractions(values: Sequence[float], units: str, plan) -> Tuple[List[float], str]:
    """Eps as ``run_autoattack`` takes it: ``(values, eps_scale)``.

    ``units``: "range" (values in 1/255 of each channel's valid range, the paper's 8/255),
    "intensity" (original units, e.g. HU; converted per channel with the plan's std) or
    "normalised" (z-units)."""
    from deepimaging.rog.adversarial import eps_from_intensity

    if units not in EPS_UNITS:
        raise InputError(f"eps units must be one of {EPS_UNITS}, got {units!r}")
    if any(float(v) < 0 for v in values) or not values:
        raise InputError(f"eps values must be non-negative and at least one, got {list(values)}")
    if units == "range":
        return [float(v) / 255.0 for v in values], "range"
    if units == "normalised":
        return [float(v) for v in values], "absolute"
    converted = [eps_from_intensity(plan, float(v)) for v in values]
    if len(plan.channels) > 1 and any(float(c.max() - c.min()) > 0 for c in converted):
        raise InputError("eps in intensity units needs a single-channel model (channels have different stds); "
                         "use eps units 'range' or 'normalised'")
    return [float(c[0]) for c in converted], "absolute"


def evaluate_rog_robustness(model: Union[PathLike, object], cases: Sequence[Tuple[object, object]],
                            eps: Sequence[float], *, eps_units: str = "range",
                            attacks: Optional[Sequence[str]] = None, iterations: Optional[int] = None,
                            restarts: Optional[int] = None, square_queries: Optional[int] = None,
                            preset: str = "paper", cascade: bool = True, keep_examples: bool = False,
                            overlap: float = 0.5, seed: int = 0, device: DeviceLike = None,
                            progress: Optional[ProgressCallback] = None,
                            cancel: Optional[CancelToken] = None) -> Tuple[RobustnessResult, list]:
    """Attack a ROG checkpoint on ``cases`` ``[(image, label)]`` (files, Images or arrays as
    :func:`deepimaging.rog.infer.prepare_case` takes them) for every eps.

    Returns ``(result, prepared)``: the benchmark result (``result.settings`` also records the eps
    as given, their units, the timing and the model) and the :class:`PreparedCase` list (network
    grid, for mapping adversarial examples back).
    """
    from deepimaging.rog.adversarial import input_range_tensors
    from deepimaging.rog.infer import SlidingWindowSegmenter, prepare_case

    dev = select_device(device)
    segmenter = SlidingWindowSegmenter.from_checkpoint(model, device=dev, overlap=overlap)
    plan = segmenter.plan
    values, scale = eps_fractions(eps, eps_units, plan)
    report(progress, 0.0, "Preparing cases")
    prepared = []
    for index, (image, label) in enumerate(cases):
        case = prepare_case(image, plan, label, device=dev)
        if case.label is None:
            raise InputError(f"case {index} has no reference label map")
        prepared.append(case)
    low, high = input_range_tensors(plan, device=dev)
    started = time.perf_counter()
    result = run_autoattack(segmenter, [(c.image, c.label) for c in prepared], values,
                            attacks=list(attacks) if attacks else list(DEFAULT_ATTACKS),
                            valid_range=(low.reshape(-1), high.reshape(-1)), eps_scale=scale, preset=preset,
                            iterations=iterations, restarts=restarts, square_queries=square_queries,
                            cascade=cascade, keep_examples=keep_examples, seed=seed, device=dev,
                            progress=sub_progress(progress, 0.05, 1.0), cancel=cancel)
    result.settings.update({"eps_given": [float(v) for v in eps], "eps_units": eps_units,
                            "seconds": round(time.perf_counter() - started, 2),
                            "labels": {str(i): lb.name for i, lb in enumerate(plan.labels)},
                            "model": str(model) if isinstance(model, (str, Path)) else type(model).__name__})
    return result, prepared


def evaluate_dataset(model: PathLike, data: PathLike, out_dir: PathLike, eps: Sequence[float], *,
                     max_cases: Optional[int] = None, plot: bool = True, **options) -> Tuple[RobustnessResult, dict]:
    """The CLI's job: held-out cases of an MSD folder -> benchmark -> ``out_dir/robustness.{json,md,png}``."""
    from deepimaging.robustness.report import write_report

    cases, which = held_out_cases(data)
    if max_cases is not None:
        cases = cases[: int(max_cases)]
    result, _ = evaluate_rog_robustness(model, [(c.images if len(c.images) > 1 else c.images[0], c.label)
                                                for c in cases], eps, **options)
    result.settings["cases"] = [c.name for c in cases]
    result.settings["case_set"] = which
    if which == "training":
        result.notes.append("the dataset has no labelsTs/: the training cases were attacked (held-out test cases "
                            "measure robustness better)")
    paths = write_report(result, out_dir, stem="robustness", plot=plot)
    return result, paths


def read_report(path: PathLike) -> dict:
    return json.loads(Path(path).read_text())


@dataclass
class AttackedCase:
    """One attacked case on the user's grid: what Slicer shows and the CLI could write."""

    adversarial: Image    # the adversarial volume in the original intensity units
    perturbation: Image   # adversarial - original (intensity units)
    labels: Image         # the model's label map on the adversarial input (label values)
    dice: float             # mean foreground Dice of that label map (network grid)


def _intensity_scale(channel, original) -> Tuple[float, float, float]:
    """(units per normalised unit, clip low, clip high) of a channel in the original intensities."""
    scale, low, high = float(channel.std), float(channel.percentile_00_5), float(channel.percentile_99_5)
    if channel.normalization == "minmax_clip_zscore":  # per-image min-max to [0, 1] came first
        lo, hi = float(original.min()), float(original.max())
        span = hi - lo if hi > lo else 1.0
        scale, low, high = scale * span, lo + low * span, lo + high * span
    return scale, low, high


def attacked_case(model, image: Image, prepared, adversarial_input: torch.Tensor) -> AttackedCase:
    """Map an adversarial network input back to the case's own grid and intensities, and segment it.

    ``image``: the case's original single-channel :class:`Image`; ``prepared``: its
    :class:`PreparedCase`; ``adversarial_input``: ``(1, 1, D, H, W)`` on the network grid (a
    ``result.examples`` entry).  The perturbation ``delta`` (normalised units) becomes
    ``delta * std`` intensity units (times the image's min-max span for MRI-like channels),
    resampled back linearly when the case was resampled.  Voxels outside the plan's clip range
    (which the network saw at the clip limit) are set to ``limit + perturbation``, so that
    preprocessing the adversarial volume gives the attacked input again (exactly when no
    resampling was needed).
    """
    from deepimaging.rog.infer import SlidingWindowSegmenter
    from deepimaging.rog.preprocess import from_target, restore_labels

    segmenter = model if isinstance(model, SlidingWindowSegmenter) else SlidingWindowSegmenter.from_checkpoint(model)
    plan = segmenter.plan
    if len(plan.channels) != 1:
        raise InputError("mapping an adversarial example back needs a single-channel model")
    clean = prepared.image.detach().cpu()
    adversarial_input = adversarial_input.detach().cpu().reshape(clean.shape)
    scale, low, high = _intensity_scale(plan.channels[0], image.array)
    delta = ((adversarial_input - clean)[0, 0].numpy().astype(np.float64)) * scale
    delta = from_target(delta, prepared.grid, plan, "linear")
    original = image.array.astype(np.float64)
    clipped = np.clip(original, low, high)
    adversarial = np.where((delta != 0) & (clipped != original), clipped + delta, original + delta)
    device = next(segmenter.model.parameters()).device
    with torch.no_grad():
        logits = segmenter(adversarial_input.to(device))
    predicted = logits.argmax(1).cpu()
    dice = (float(foreground_dice(predicted, prepared.label.cpu(), len(plan.labels))[0])
            if prepared.label is not None else float("nan"))
    return AttackedCase(image.with_array(adversarial.astype(np.float32)),
                        image.with_array((adversarial - original).astype(np.float32)),
                        restore_labels(predicted[0].numpy().astype(np.uint8), prepared.grid, plan), dice)
