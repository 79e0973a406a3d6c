"""Side-by-side evaluation of refinements: coarse mask, classic Chan-Vese, the TSDF head alone
(phi_0), the full unrolled model (phi_N), the "detached phi_0" ablation and ROI mode.

:func:`evaluate_refiner` writes ``OUT/evaluation.json``, ``evaluation.md`` and ``evaluation.png``.
Metrics per case, averaged over cases (2D cases are scored on the (y, x) plane):

* Dice; boundary F1 at 1 and 2 px (LevelSet R-CNN's boundary F-score, in voxels: spacing ignored);
* HD95 in mm (image spacing).  An empty result scores Dice 0, F1 0, and its HD95 is left out of
  the mean (``empty`` counts such cases).

Coarse masks: the folder's ``coarse/`` ones, else a seeded corruption of the truth per case.
Classic = :func:`deepimaging.levelset.refine_mask` with :func:`refine_defaults`.  ROI mode gets
the true bounding box (what a user would draw).  Timing: mean CPU seconds per ROI of the learned
refiner (2D and 3D; the dimension the model lacks is timed on an untrained network of the same
architecture -- time does not depend on the weights) and of the classic refinement.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import torch

from ...core.device import DeviceLike, torch_threads
from ...core.errors import DeepImagingError
from ...core.image import Image
from ...core.imageio import atomic_output
from ...core.metrics import boundary_f1, dice, hausdorff95
from ...core.progress import CancelToken, ProgressCallback, check_cancel, report
from ..refine import refine_defaults, refine_mask
from .corruption import corrupt_mask
from .data import RefineSample, as_samples, model_spacing
from .infer import LearnedRefiner, _as_refiner, predict_levelsets
from .model import DeepChanVese, RefinerConfig
from .roi import spatial_view
from .synthetic import make_sample

METHODS = ("coarse", "classic", "initial", "learned", "detached", "roi_mode")
LABELS = {"coarse": "coarse mask", "classic": "classic Chan-Vese", "initial": "initial TSDF head (phi_0)",
          "learned": "learned, N unrolled steps (phi_N)", "detached": "ablation: detached phi_0 (phi_N)",
          "roi_mode": "learned, ROI mode (true box, no mask)"}


def score(pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float]) -> Dict[str, float]:
    """Dice, boundary F1 at 1/2 px and HD95 (mm) of two model-axes masks."""
    if not pred.any():
        return {"dice": 0.0, "bf1_1px": 0.0, "bf1_2px": 0.0, "hd95_mm": float("nan")}
    return {"dice": dice(pred, truth), "bf1_1px": boundary_f1(pred, truth, 1.0), "bf1_2px": boundary_f1(pred, truth, 2.0),
            "hd95_mm": hausdorff95(pred, truth, spacing)}


def _coarse(sample: RefineSample, index: int, dim: int) -> np.ndarray:
    if sample.coarse is not None and sample.coarse.any():
        return spatial_view(sample.coarse, dim)
    return corrupt_mask(spatial_view(sample.truth, dim), np.random.default_rng(10 ** 6 + index))


def _full(mask: np.ndarray, dim: int) -> np.ndarray:
    return mask[np.newaxis] if dim == 2 else mask


def _true_box(truth: np.ndarray, dim: int) -> List[int]:
    coords = np.argwhere(truth)
    lo, hi = coords.min(axis=0), coords.max(axis=0) + 1
    if dim == 2:
        return [0, int(lo[0]), int(lo[1]), 1, int(hi[0]), int(hi[1])]
    return [int(v) for v in lo] + [int(v) for v in hi]


def time_learned(config: RefinerConfig, dim: int, repeats: int = 3) -> float:
    """Mean CPU seconds of one ROI forward pass (untrained network of ``config``'s architecture in ``dim``)."""
    cfg = RefinerConfig.from_dict({**config.to_dict(), "dim": dim, "grid": config.grid if dim == config.dim else 0})
    model = DeepChanVese(cfg).eval()
    x = torch.randn((1, 3) + cfg.grid_shape)
    with torch.no_grad():
        model(x)
        start = time.perf_counter()
        for _ in range(repeats):
            model(x)
    return (time.perf_counter() - start) / repeats


def time_classic(dim: int) -> float:
    """CPU seconds of one classic refinement of a built-in case (96^2 or 48^3)."""
    image, truth = make_sample(dim, 123)
    coarse = corrupt_mask(spatial_view(truth, dim), np.random.default_rng(5))
    start = time.perf_counter()
    try:
        refine_mask(Image(image), _full(coarse, dim), refine_defaults(), device="cpu")
    except DeepImagingError:
        pass
    return time.perf_counter() - start


def train_detached_like(model: Union[str, Path], data: Union[str, Path, Sequence[RefineSample]], out_dir: Union[str, Path],
                        *, device: DeviceLike = None, progress: Optional[ProgressCallback] = None,
                        cancel: Optional[CancelToken] = None) -> Path:
    """Train the ablation: the same config, data and schedule as ``model``'s checkpoint, with detach_phi0."""
    from ...core.checkpoint import load_checkpoint
    from .model import METHOD
    from .train import TRAIN_DEFAULTS, train_refiner

    header = load_checkpoint(model, method=METHOD).header
    training = dict(header.get("training", {}))
    epochs = int(training.pop("epochs", 30))
    options = {k: v for k, v in training.items() if k in TRAIN_DEFAULTS}
    options.update({k: v for k, v in header["config"].items() if k != "dim"})
    options["detach_phi0"] = True
    return train_refiner(data, out_dir, dim=int(header["config"]["dim"]), epochs=epochs, device=device,
                         progress=progress, cancel=cancel, **options)


def evaluate_refiner(model: Union[str, Path, LearnedRefiner], data: Union[str, Path, Sequence[RefineSample]],
                     out_dir: Union[str, Path], *, detached_model: Optional[Union[str, Path, LearnedRefiner]] = None,
                     device: DeviceLike = None, figure: bool = True, timing: bool = True,
                     progress: Optional[ProgressCallback] = None, cancel: Optional[CancelToken] = None,
                     extra: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Score every method on the cases of ``data``; write evaluation.{json,md,png}; return the summary."""
    refiner = _as_refiner(model, device)
    detached = _as_refiner(detached_model, device) if detached_model is not None else None
    dim = int(refiner.config.dim)
    samples = as_samples(data)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    methods = [m for m in METHODS if m != "detached" or detached is not None]
    per_case: List[Dict[str, Any]] = []
    learned_seconds, classic_seconds, shown = [], [], []
    for i, sample in enumerate(samples):
        check_cancel(cancel)
        report(progress, i / len(samples), f"case {i + 1}/{len(samples)}: {sample.name}")
        truth = spatial_view(sample.truth, dim)
        spacing = model_spacing(sample.image, dim)
        coarse = _coarse(sample, i, dim)
        masks = {"coarse": coarse}
        start = time.perf_counter()
        try:
            classic = refine_mask(sample.image, _full(coarse, dim), refine_defaults(), device="cpu")
            masks["classic"] = spatial_view(classic.mask, dim)
        except DeepImagingError:
            masks["classic"] = np.zeros_like(truth)
        classic_seconds.append(time.perf_counter() - start)
        start = time.perf_counter()
        phi0, phin, _, params = predict_levelsets(sample.image, _full(coarse, dim), refiner)
        learned_seconds.append(time.perf_counter() - start)
        masks["initial"], masks["learned"] = spatial_view(phi0, dim) > 0, spatial_view(phin, dim) > 0
        if detached is not None:
            masks["detached"] = spatial_view(predict_levelsets(sample.image, _full(coarse, dim), detached)[1], dim) > 0
        masks["roi_mode"] = spatial_view(predict_levelsets(sample.image, None, refiner,
                                                           roi=_true_box(truth, dim))[1], dim) > 0
        per_case.append({"name": sample.name, "params": params,
                         **{m: score(masks[m], truth, spacing) for m in methods}})
        if len(shown) < 4:
            shown.append((spatial_view(sample.image.array, dim), truth, masks))
    summary = _summarise(per_case, methods)
    result: Dict[str, Any] = {"dimension": dim, "cases": len(samples), "model": refiner.header.get("config", {}),
                              "model_metrics": refiner.header.get("metrics", {}), "methods": summary,
                              "labels": {m: LABELS[m] for m in methods}, "claims": _claims(summary),
                              "paired_dice": _paired(per_case, methods),
                              "seconds_per_roi_measured": {"learned": float(np.mean(learned_seconds)),
                                                           "classic": float(np.mean(classic_seconds))},
                              "per_case": per_case, **(extra or {})}
    if timing:
        with torch_threads(1):
            result["cpu_timing_1_thread"] = {
                "learned_2d_roi_s": time_learned(refiner.config, 2), "learned_3d_roi_s": time_learned(refiner.config, 3),
                "classic_2d_96px_s": time_classic(2), "classic_3d_48cube_s": time_classic(3),
                "note": "learned: one forward pass of one ROI (grid 2D/3D of the config; the other dimension on an "
                        "untrained network of the same architecture); classic: refine_mask with refine_defaults()"}
    _write(out_dir, result, shown, methods, figure)
    report(progress, 1.0, f"evaluated {len(samples)} cases")
    return result


def _summarise(per_case: List[Dict[str, Any]], methods: Sequence[str]) -> Dict[str, Dict[str, float]]:
    out = {}
    for m in methods:
        rows = [c[m] for c in per_case]
        hd = [r["hd95_mm"] for r in rows if np.isfinite(r["hd95_mm"])]
        out[m] = {k: float(np.mean([r[k] for r in rows])) for k in ("dice", "bf1_1px", "bf1_2px")}
        out[m]["hd95_mm"] = float(np.mean(hd)) if hd else float("nan")
        out[m]["empty"] = int(sum(1 for r in rows if r["dice"] == 0.0 and not np.isfinite(r["hd95_mm"])))
    return out


def _paired(per_case: List[Dict[str, Any]], methods: Sequence[str]) -> Dict[str, Dict[str, float]]:
    """Per-case Dice differences of the learned phi_N against each other method: mean and wins/losses."""
    out = {}
    for m in methods:
        if m == "learned":
            continue
        diff = np.array([c["learned"]["dice"] - c[m]["dice"] for c in per_case])
        out[f"learned - {m}"] = {"mean": float(diff.mean()), "wins": int((diff > 0).sum()), "losses": int((diff < 0).sum())}
    return out


def _claims(s: Dict[str, Dict[str, float]]) -> Dict[str, bool]:
    keys = ("dice", "bf1_1px", "bf1_2px")
    claims = {f"final > initial > coarse ({k})": bool(s["learned"][k] > s["initial"][k] > s["coarse"][k]) for k in keys}
    claims["learned > classic (dice)"] = bool(s["learned"]["dice"] > s["classic"]["dice"])
    if "detached" in s:
        claims["learned > detached (dice)"] = bool(s["learned"]["dice"] > s["detached"]["dice"])
    return claims


def markdown_table(result: Dict[str, Any]) -> str:
    """The summary as a Markdown table."""
    lines = ["| method | Dice | boundary F1 @1 px | boundary F1 @2 px | HD95 (mm) | empty |",
             "| --- | --- | --- | --- | --- | --- |"]
    for m, v in result["methods"].items():
        lines.append(f"| {result['labels'][m]} | {v['dice']:.3f} | {v['bf1_1px']:.3f} | {v['bf1_2px']:.3f} | "
                     f"{v['hd95_mm']:.2f} | {v['empty']} |")
    return "\n".join(lines)


def _write(out_dir: Path, result: Dict[str, Any], shown, methods: Sequence[str], figure: bool) -> None:
    with atomic_output(out_dir / "evaluation.json") as tmp:
        tmp.write_text(json.dumps(result, indent=1, default=float))
    text = [f"# Learned level-set refinement: evaluation ({result['dimension']}D, {result['cases']} cases)", "",
            markdown_table(result), "", "Claims:", ""]
    text += [f"- {k}: {'yes' if v else 'no'}" for k, v in result["claims"].items()]
    text += ["", "Per-case Dice of the learned phi_N against each method (mean difference, cases better / worse):", ""]
    text += [f"- {k}: {v['mean']:+.4f} ({v['wins']} better / {v['losses']} worse)" for k, v in result["paired_dice"].items()]
    if "cpu_timing_1_thread" in result:
        t = result["cpu_timing_1_thread"]
        text += ["", "CPU seconds per ROI (1 thread): " + ", ".join(f"{k} {v:.3f}" for k, v in t.items() if k != "note")]
    with atomic_output(out_dir / "evaluation.md") as tmp:
        tmp.write_text("\n".join(text) + "\n")
    if figure and shown:
        _figure(out_dir / "evaluation.png", shown, result["dimension"])


def _figure(path: Path, shown, dim: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"coarse": "orange", "classic": "deepskyblue", "initial": "magenta", "learned": "red"}
    fig, axes = plt.subplots(1, len(shown), figsize=(3.2 * len(shown), 3.4), dpi=80, squeeze=False)
    for ax, (image, truth, masks) in zip(axes[0], shown):
        z = int(np.argwhere(truth)[:, 0].mean()) if dim == 3 else None
        cut = (lambda a: a[z]) if dim == 3 else (lambda a: a)  # noqa: E731
        ax.imshow(cut(image), cmap="gray")
        ax.contour(cut(truth).astype(float), levels=[0.5], colors="lime", linewidths=1.2)
        for name, colour in colours.items():
            if cut(masks[name]).any():
                ax.contour(cut(masks[name]).astype(float), levels=[0.5], colors=colour, linewidths=0.9)
        ax.set_axis_off()
    for name, colour in [("truth", "lime")] + list(colours.items()):
        axes[0][0].plot([], [], color=colour, label=name)
    axes[0][0].legend(loc="lower left", fontsize=7)
    fig.suptitle("truth (green), coarse, classic Chan-Vese, phi_0 and learned phi_N")
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(str(tmp), format="png")
    plt.close(fig)
