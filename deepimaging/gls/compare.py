"""Side-by-side comparison of GLS and its baselines on one dataset (thesis Tables 2 and 3).

:func:`compare_archs` holds out ``test_fraction`` of the samples (a seeded split), trains every
architecture with :func:`~deepimaging.gls.train.train_gls` on the rest under the same budget
(epochs x steps per epoch, batch, Adam + cosine schedule, BCE mask loss; the keypoint
architectures add their heatmap loss) and the same internal validation split for choosing
``best.pt``, then segments every held-out image with :func:`~deepimaging.gls.infer.predict_image`
on its own grid and scores it against its mask:

* Dice and IoU (:mod:`deepimaging.core.metrics`), mean over the held-out images;
* boundary F1 with a 2-pixel tolerance (``boundary_f1(tolerance=2)``);
* keypoint error: mean Euclidean distance in pixels of the image grid between predicted and
  annotated keypoints, over held-out images with keypoints and over K - only for ``gls`` and
  ``global`` (the architectures with a keypoint decoder), ``null`` / "—" for the others.

Outputs in ``out_dir``: ``comparison.json``, ``comparison.md`` (the table, the thesis' numbers,
its claimed ordering GLS > global-only > U-Net and whether the measured Dice agree - computed
from the numbers), ``comparison.png`` (held-out images with the ground-truth contour and each
architecture's contour) and ``models/<arch>/best.pt``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Union

import numpy as np

from deepimaging.core.device import DeviceLike, select_device
from deepimaging.core.errors import InputError
from deepimaging.core.imageio import atomic_output
from deepimaging.core.metrics import boundary_f1, dice, iou
from deepimaging.core.optional import import_optional
from deepimaging.core.progress import CancelToken, ProgressCallback, report, sub_progress

from .data import Sample
from .infer import ARCHS, KEYPOINT_ARCHS, SIZE_DIVISORS, GLSModel, check_arch, load_gls, predict_image
from .model import DEFAULT_WIDTHS, count_parameters
from .train import train_gls
from .trainingdata import DataLike, as_samples, split_indices

log = logging.getLogger(__name__)

DEFAULT_ARCHS = ("unet", "unetpp", "cenet", "global", "gls")
THESIS_ORDER = ("gls", "global", "unet")  # the thesis' claim: GLS > global-only > U-Net (Dice)
THESIS_DICE = {"Iris-290": {"unet": 0.9463, "cenet": 0.9513, "unetpp": 0.9572, "global": 0.9518, "gls": 0.9626},
               "CAMUS": {"unet": 0.8947, "cenet": 0.9025, "unetpp": 0.9000, "global": 0.9059, "gls": 0.9185}}
LABELS = {"gls": "GLS", "global": "global-only", "unet": "U-Net", "unetpp": "UNet++", "cenet": "CE-Net"}
BOUNDARY_TOLERANCE_PX = 2.0


def evaluate_model(model: GLSModel, samples: Sequence[Sample], device: DeviceLike = None) -> Dict[str, Any]:
    """Scores of ``model`` on ``samples`` (each on its own grid) and the predictions (for figures)."""
    rows, masks, points = [], [], []
    for sample in samples:
        pred = predict_image(sample.image, model, device=device)
        m = pred.mask.array[0] > 0
        masks.append(m)
        points.append(pred.keypoints_px[0])
        row = {"name": sample.name, "dice": dice(m, sample.mask), "iou": iou(m, sample.mask),
               "boundary_f1": boundary_f1(m, sample.mask, tolerance=BOUNDARY_TOLERANCE_PX)}
        if model.arch in KEYPOINT_ARCHS and sample.keypoints is not None:
            row["keypoint_error_px"] = float(np.mean(np.linalg.norm(pred.keypoints_px[0] - sample.keypoints, axis=-1)))
        rows.append(row)
    errors = [r["keypoint_error_px"] for r in rows if "keypoint_error_px" in r]
    summary = {key: float(np.mean([r[key] for r in rows])) for key in ("dice", "iou", "boundary_f1")}
    summary["dice_std"] = float(np.std([r["dice"] for r in rows]))
    summary["keypoint_error_px"] = float(np.mean(errors)) if errors else None
    summary["keypoint_error_median_px"] = float(np.median(errors)) if errors else None
    return {"summary": summary, "per_image": rows, "masks": masks, "keypoints": points}


def ordering_verdict(scores: Dict[str, float]) -> Dict[str, Any]:
    """Does the measured Dice follow the thesis' GLS > global-only > U-Net (among the archs run)?"""
    present = [a for a in THESIS_ORDER if a in scores]
    measured = sorted(scores, key=lambda a: -scores[a])
    if len(present) < 2:
        return {"thesis_ordering": list(THESIS_ORDER), "measured_ordering": measured, "compared": present,
                "agrees": None, "statement": "The thesis' ordering GLS > global-only > U-Net was not tested "
                                             "(fewer than two of these architectures were run)."}
    agrees = all(scores[a] > scores[b] for a, b in zip(present, present[1:]))
    claim = " > ".join(LABELS[a] for a in present)
    got = ", ".join(f"{LABELS[a]} {scores[a]:.4f}" for a in present)
    statement = (f"The measured held-out Dice ({got}) {'agree' if agrees else 'do not agree'} with the thesis' "
                 f"ordering {claim}.")
    return {"thesis_ordering": list(THESIS_ORDER), "measured_ordering": measured, "compared": present,
            "agrees": agrees, "statement": statement}


def compare_archs(data: DataLike, out_dir: Union[str, Path], archs: Sequence[str] = DEFAULT_ARCHS,
                  epochs: int = 30, size: Sequence[int] = (256, 256), seed: int = 0, device: DeviceLike = None,
                  progress: Optional[ProgressCallback] = None, cancel: Optional[CancelToken] = None, *,
                  keypoints: int = 2, keypoint_rule: str = "iris-tails", crop_size: int = 96, batch_size: int = 4,
                  lr: float = 1e-3, test_fraction: float = 0.2, val_fraction: float = 0.2,
                  widths: Sequence[int] = DEFAULT_WIDTHS, steps_per_epoch: Optional[int] = None,
                  figure: bool = True, **train_kwargs: Any) -> Dict[str, Any]:
    """Train ``archs`` on one split and score them on the held-out images (module docstring).

    Returns the dict written to ``comparison.json``.  Extra keyword arguments go to
    :func:`~deepimaging.gls.train.train_gls` for every architecture alike.
    """
    archs = list(dict.fromkeys(check_arch(a) for a in archs))
    if not archs:
        raise InputError(f"no architecture to compare; choose from {', '.join(ARCHS)}")
    size = (int(size[0]), int(size[1]))
    for arch in archs:
        divisor = SIZE_DIVISORS[arch]
        if size[0] % divisor or size[1] % divisor:
            raise InputError(f"size {size[0]}x{size[1]} must be a multiple of {divisor} for {arch!r} (CE-Net pools "
                             f"five times); use e.g. {-(-size[0] // 32) * 32}x{-(-size[1] // 32) * 32}")
    if not 0 < test_fraction < 1:
        raise InputError(f"compare needs held-out images: test_fraction must be in (0, 1), got {test_fraction}")
    samples = as_samples(data, int(keypoints), keypoint_rule)
    train_idx, test_idx = split_indices(len(samples), test_fraction, seed + 1)
    train_set, test_set = [samples[i] for i in train_idx], [samples[i] for i in test_idx]
    if {"unet", "unetpp"} & set(archs):  # import MONAI before the clock of the first baseline starts
        import_optional("monai.networks.nets", "monai>=1.3", "The U-Net / UNet++ baselines")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dev = select_device(device)
    results: Dict[str, Dict[str, Any]] = {}
    predictions: Dict[str, Dict[str, Any]] = {}
    for i, arch in enumerate(archs):
        span = (i / len(archs), (i + 1) / len(archs))
        report(progress, span[0], f"training {arch} ({i + 1}/{len(archs)})")
        trained = train_gls(train_set, out / "models" / arch, arch=arch, epochs=epochs, size=size, keypoints=keypoints,
                            crop_size=crop_size, batch_size=batch_size, lr=lr, val_fraction=val_fraction, seed=seed,
                            device=dev, resume=False, cancel=cancel, keypoint_rule=keypoint_rule, widths=widths,
                            steps_per_epoch=steps_per_epoch,
                            progress=sub_progress(progress, span[0], span[0] + 0.9 * (span[1] - span[0])),
                            **train_kwargs)
        model = load_gls(trained.best_path, device=dev)
        scored = evaluate_model(model, test_set, dev)
        predictions[arch] = scored
        results[arch] = {**scored["summary"], "train_seconds": round(trained.seconds, 2),
                         "parameters": count_parameters(model.network), "epochs": trained.epochs_completed,
                         "optimizer_steps": trained.epochs_completed * trained.steps_per_epoch,
                         "best_val_dice": model.header["metrics"].get("val_dice"),
                         "stage_reached": model.header.get("stage_reached"),
                         "checkpoint": str(trained.best_path.relative_to(out)), "per_image": scored["per_image"]}
        log.info("%s: held-out Dice %.4f", arch, results[arch]["dice"])
    verdict = ordering_verdict({a: r["dice"] for a, r in results.items()})
    summary = {"archs": results, "settings": {
        "epochs": int(epochs), "size": list(size), "seed": int(seed), "batch_size": int(batch_size), "lr": float(lr),
        "crop_size": int(crop_size), "keypoints": int(keypoints), "keypoint_rule": keypoint_rule,
        "widths": [int(w) for w in widths], "test_fraction": float(test_fraction), "val_fraction": float(val_fraction),
        "device": str(dev), "boundary_tolerance_px": BOUNDARY_TOLERANCE_PX,
        "loss": "BCE (+ heatmap loss for gls/global)",
        "optimizer": "Adam + cosine annealing; the same optimizer steps for every architecture"},
        "train_names": [s.name for s in train_set], "test_names": [s.name for s in test_set],
        "thesis_dice": THESIS_DICE, **verdict}
    _write_text(out / "comparison.json", json.dumps(summary, indent=2))
    _write_text(out / "comparison.md", comparison_markdown(summary))
    if figure:
        write_figure(out / "comparison.png", test_set, predictions)
    report(progress, 1.0, "comparison written")
    return summary


def _write_text(path: Path, text: str) -> None:
    with atomic_output(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def _fmt(value: Optional[float], digits: int = 4) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def comparison_markdown(summary: Dict[str, Any]) -> str:
    """The comparison as a Markdown report (table, thesis numbers, ordering sentence)."""
    s = summary["settings"]
    lines = [f"# GLS comparison: {len(summary['test_names'])} held-out images, {len(summary['train_names'])} for "
             "training (of which a validation share picks best.pt)", "",
             f"Same budget for every architecture: {s['epochs']} epochs, batch {s['batch_size']}, Adam lr {s['lr']} "
             f"with cosine annealing, BCE loss; network size {s['size'][0]}x{s['size'][1]}, GLS crop {s['crop_size']}, "
             f"seed {s['seed']}, device {s['device']}.", "",
             "| architecture | Dice | IoU | boundary F1 (2 px) | keypoint error (px) | train time (s) | parameters |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for arch, r in summary["archs"].items():
        lines.append(f"| {LABELS[arch]} | {_fmt(r['dice'])} ± {r['dice_std']:.4f} | {_fmt(r['iou'])} | "
                     f"{_fmt(r['boundary_f1'])} | {_fmt(r['keypoint_error_px'], 2)} | {r['train_seconds']:.1f} | "
                     f"{r['parameters']:,} |")
    lines += ["", "Keypoint error only for the architectures with a keypoint decoder (GLS, global-only); "
              "distances in pixels of each image's own grid.", "",
              "Thesis Dice (Tables 2 and 3): " + "; ".join(
                  f"{name}: " + ", ".join(f"{LABELS[a]} {d:.4f}" for a, d in table.items())
                  for name, table in summary["thesis_dice"].items()), "",
              "Claimed ordering: GLS > global-only > U-Net. " + summary["statement"], ""]
    return "\n".join(lines)


def write_figure(path: Path, samples: Sequence[Sample], predictions: Dict[str, Dict[str, Any]], rows: int = 3) -> Path:
    """Held-out images (rows) x architectures (columns): truth contour green, prediction red,
    keypoints (truth x, predicted o) for the keypoint architectures."""
    import_optional("matplotlib", "matplotlib", "The comparison figure")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    shown = list(range(min(rows, len(samples))))
    archs = list(predictions)
    fig = Figure(figsize=(2.6 * len(archs), 2.6 * len(shown)), dpi=100)
    FigureCanvasAgg(fig)
    for r, i in enumerate(shown):
        sample = samples[i]
        for c, arch in enumerate(archs):
            ax = fig.add_subplot(len(shown), len(archs), r * len(archs) + c + 1)
            ax.imshow(sample.image.array[0], cmap="gray", interpolation="nearest")
            if sample.mask.any():
                ax.contour(sample.mask.astype(float), levels=[0.5], colors="lime", linewidths=0.8)
            pred = predictions[arch]["masks"][i]
            if pred.any():
                ax.contour(pred.astype(float), levels=[0.5], colors="red", linewidths=0.8)
            if arch in KEYPOINT_ARCHS:
                if sample.keypoints is not None:
                    ax.plot(sample.keypoints[:, 0], sample.keypoints[:, 1], "x", color="lime", ms=5)
                kp = predictions[arch]["keypoints"][i]
                ax.plot(kp[:, 0], kp[:, 1], "o", mfc="none", color="red", ms=5)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{LABELS[arch]} Dice {predictions[arch]['per_image'][i]['dice']:.3f}", fontsize=8)
            if c == 0:
                ax.set_ylabel(sample.name, fontsize=7)
    fig.suptitle("held-out images: truth (green), prediction (red)", fontsize=9)
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(str(tmp), format="png")
    return path
