"""Compare DRI, Y-Net and Z-Net on held-out simulated phantoms (the paper's Fig. 2 / Table S2).

Test phantoms: the test part of the 70/20/10 split (split seed from the network checkpoints),
the first ``n_test`` of them for the networks and the first ``n_dri`` of those for DRI (about
10-20 s of CPU per phantom).  The main table uses only the phantoms every method saw.

Metrics (see :mod:`deepimaging.nirst.metrics`): MSE, PSNR and SSIM per chromophore inside the
disk; data range for PSNR/SSIM = max - min of the true maps inside the disk over the ``n_test``
evaluated test phantoms, per chromophore (printed with the tables); relative error of the mean
value recovered inside each true inclusion.

8-optode generalisation (paper: "the number of source-detector pairs ... reduced from 16 to
eight"): optodes 0, 2, ..., 14 are kept, i.e. the 9 x 8 x 7 pairs among them
(:func:`~deepimaging.nirst.forward.measurement_subset`), which equal a real 8-optode ring.  The
networks trained on 16 optodes keep their 16-optode input layout (so what the convolutions have
learnt still applies) and the missing pairs are filled in two ways, both reported: *interpolated*
(linearly in source and detector angle in the normalised source x offset grid,
:func:`fill_missing_optodes`) and *zero-filled* (set to 0, the training mean).  Measured with the
shipped Z-Net on 40 phantoms: water MSE 3.2 (16 optodes), 3.9 (interpolated), 70 (zero-filled),
and 13.5 when the native 8 x 8 grid is fed instead -- so interpolation is the main result.  DRI,
being model-based, simply uses an 8-optode forward model.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence

import numpy as np
import torch

from deepimaging.core.device import DeviceLike
from deepimaging.core.errors import InputError
from deepimaging.core.progress import CancelToken, ProgressCallback, report, sub_progress

from .data import DEFAULT_SPLIT_SEED, DatasetLike, as_dataset, split_indices
from .dri import REFERENCE_VALUES, reference_amplitudes, run_dri
from .forward import measurement_subset
from .znet import arrange_measurements, flatten_measurements
from .mesh import DEFAULT_ELEMENT_SIZE_MM
from .optics import WAVELENGTHS_NM
from .metrics import default_disk, inclusion_errors, inclusion_masks, map_metrics, truth_data_range
from .phantoms import CHROMOPHORE_UNITS, CHROMOPHORES
from .recon import Reconstructor, load_reconstructor

KEPT_OPTODES_8 = tuple(range(0, 16, 2))
def fill_missing_optodes(grid: torch.Tensor, step: int) -> torch.Tensor:
    """Fill a (B, W, n, n) source x offset grid of which only every ``step``-th optode was measured.

    Known cells: sources and offsets that are multiples of ``step`` (offset 0 is never measured).
    Missing offsets are interpolated linearly along the ring within each known source row, then
    missing sources linearly between the neighbouring known rows (circularly); both axes are
    angles on the ring, so this is interpolation in source and detector angle.
    """
    n = grid.shape[-1]
    out = torch.zeros_like(grid)
    known_rows = torch.arange(0, n, step)
    known_offsets = [k for k in range(step, n, step)]
    out[:, :, known_rows[:, None], torch.tensor(known_offsets)[None, :]] = \
        grid[:, :, known_rows[:, None], torch.tensor(known_offsets)[None, :]]
    for k in range(1, n):
        if k % step == 0:
            continue
        low, high = (k // step) * step, (k // step + 1) * step
        weight = (k - low) / step
        if low == 0:  # offset 0 is the source itself: hold the first known offset
            out[:, :, known_rows, k] = out[:, :, known_rows, high]
        elif high >= n:
            out[:, :, known_rows, k] = out[:, :, known_rows, low]
        else:
            out[:, :, known_rows, k] = (1 - weight) * out[:, :, known_rows, low] + weight * out[:, :, known_rows, high]
    for source in range(n):
        if source % step:
            low = (source // step) * step
            weight = (source - low) / step
            out[:, :, source, 1:] = (1 - weight) * out[:, :, low, 1:] + weight * out[:, :, (low + step) % n, 1:]
    return out


def network_maps(rec: Reconstructor, measurements: np.ndarray, mri: np.ndarray,
                 kept_optodes: Optional[Sequence[int]] = None, fill: str = "interpolate") -> np.ndarray:
    """Network maps (N, 3, H, W); with ``kept_optodes`` the other pairs are filled (module doc).

    ``fill="zero"`` sets the missing normalised inputs to 0 (the training mean); ``"interpolate"``
    (evenly spaced kept optodes only) uses :func:`fill_missing_optodes`.
    """
    signals, images = rec.normalisation.inputs(measurements, mri)
    if kept_optodes is not None:
        kept = sorted(int(k) for k in kept_optodes)
        keep = torch.zeros(signals.shape[1], dtype=signals.dtype)
        keep[measurement_subset(rec.n_optodes, kept, len(rec.wavelengths_nm))] = 1.0
        signals = signals * keep
        if fill == "interpolate":
            step = rec.n_optodes // len(kept)
            if kept != list(range(0, rec.n_optodes, step)):
                raise InputError("interpolation needs evenly spaced kept optodes starting at optode 0")
            grid = arrange_measurements(signals, rec.n_optodes, len(rec.wavelengths_nm))
            signals = flatten_measurements(fill_missing_optodes(grid, step))
        elif fill != "zero":
            raise InputError(f"unknown fill {fill!r}; use interpolate or zero")
    return rec.predict_normalised(signals, images)


def _method_rows(name: str, maps: np.ndarray, truth: np.ndarray, data_range: np.ndarray, disk: np.ndarray,
                 inclusions: Dict[str, np.ndarray], seconds: float) -> Dict[str, Any]:
    per_phantom = map_metrics(maps, truth, data_range, disk)
    errors = inclusion_errors(maps, inclusions["values"], inclusions["masks"], inclusions["counts"])
    out: Dict[str, Any] = {"method": name, "n": int(len(maps)), "seconds_per_phantom": seconds}
    for chromophore in CHROMOPHORES:
        stats = {m: [float(np.mean(v)), float(np.std(v))] for m, v in per_phantom[chromophore].items()}
        e = errors[chromophore]
        stats["inclusion_error_pct"] = [float(np.mean(e)), float(np.std(e))] if e.size else [float("nan")] * 2
        out[chromophore] = stats
    return out


def markdown_table(rows: Sequence[Dict[str, Any]], title: str) -> str:
    """A README-ready table: method x chromophore with mean +- std of each metric."""
    lines = [f"**{title}**", "",
             "| Method | Chromophore | MSE | PSNR (dB) | SSIM | Inclusion error (%) | s / phantom |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        for chromophore, unit in zip(CHROMOPHORES, CHROMOPHORE_UNITS):
            s = row[chromophore]
            lines.append(f"| {row['method']} | {chromophore} ({unit}) | {s['mse'][0]:.3g} ± {s['mse'][1]:.2g} | "
                         f"{s['psnr'][0]:.1f} ± {s['psnr'][1]:.1f} | {s['ssim'][0]:.3f} ± {s['ssim'][1]:.3f} | "
                         f"{s['inclusion_error_pct'][0]:.1f} ± {s['inclusion_error_pct'][1]:.1f} | "
                         f"{row['seconds_per_phantom']:.3g} |")
    return "\n".join(lines)


def comparison_figure(path: Path, mri: np.ndarray, truth: np.ndarray, recons: Dict[str, np.ndarray],
                      title: str) -> Path:
    """PNG: per phantom and chromophore a row of MRI, truth and each method, shared colour scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n, columns = len(truth), 2 + len(recons)
    disk = default_disk(truth.shape[-1])
    colours = matplotlib.colormaps["inferno"].with_extremes(bad="white")
    fig, axes = plt.subplots(3 * n, columns, figsize=(2.1 * columns + 0.8, 2.0 * 3 * n), squeeze=False)
    for p in range(n):
        for c, (name, unit) in enumerate(zip(CHROMOPHORES, CHROMOPHORE_UNITS)):
            row = axes[3 * p + c]
            vmin, vmax = 0.7 * float(truth[p, c][disk].min()), 1.05 * float(truth[p, c][disk].max())
            row[0].imshow(mri[p], cmap="gray", origin="lower")
            image = None
            for k, (label, maps) in enumerate([("truth", truth)] + list(recons.items())):
                shown = np.ma.masked_where(~disk, maps[p, c])
                image = row[k + 1].imshow(shown, cmap=colours, origin="lower", vmin=vmin, vmax=max(vmax, vmin + 1e-6))
                if p == 0 and c == 0:
                    row[k + 1].set_title(label)
            if p == 0 and c == 0:
                row[0].set_title("MRI")
            row[0].set_ylabel(f"#{p + 1} {name} ({unit})")
            fig.colorbar(image, ax=list(row), shrink=0.8, pad=0.01)
            for ax in row:
                ax.set_xticks([])
                ax.set_yticks([])
    fig.suptitle(title)
    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)
    return path


def evaluate(data: DatasetLike, znet: Optional[Path | str] = None, ynet: Optional[Path | str] = None,
             out_dir: Path | str = "nirst-evaluation", n_test: Optional[int] = None, n_dri: int = 20,
             device: DeviceLike = None, workers: Optional[int] = None, dri_element_size_mm: float = 2.5,
             eight_optodes: bool = True, n_figure: int = 3, progress: Optional[ProgressCallback] = None,
             cancel: Optional[CancelToken] = None, log: Optional[Callable[[str], None]] = None,
             all_phantoms: bool = False) -> Dict[str, Any]:
    """Evaluate, write ``results.md``, ``results.json`` and comparison PNGs into ``out_dir``.

    ``all_phantoms``: ``data`` is a held-out dataset (another seed); evaluate every phantom of it
    instead of the test part of the split.
    """
    say = log or (lambda line: None)
    dataset = as_dataset(data)
    meta = dataset.get("meta", {})
    n_optodes = int(meta.get("n_optodes", 16))
    wavelengths = [int(w) for w in meta.get("wavelengths_nm", WAVELENGTHS_NM)]
    networks = {name: load_reconstructor(path, device, wavelengths, n_optodes)
                for name, path in (("Y-Net", ynet), ("Z-Net", znet)) if path is not None}
    seeds = {int(r.header["config"].get("split_seed", DEFAULT_SPLIT_SEED)) for r in networks.values()}
    if len(seeds) > 1:
        raise InputError(f"the checkpoints were trained with different split seeds {sorted(seeds)}")
    split_seed = seeds.pop() if seeds else DEFAULT_SPLIT_SEED
    test_rows = (np.arange(len(dataset["measurements"])) if all_phantoms
                 else split_indices(len(dataset["measurements"]), split_seed)[2])
    if n_test is not None:
        test_rows = test_rows[: max(1, int(n_test))]
    n_dri = min(int(n_dri), len(test_rows))
    if not networks and n_dri == 0:
        raise InputError("nothing to evaluate: give --znet and/or --ynet, or --n-dri > 0")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    measurements = np.asarray(dataset["measurements"][test_rows], dtype=np.float64)
    mri = np.asarray(dataset["mri"][test_rows], dtype=np.float32)
    truth = np.asarray(dataset["maps"][test_rows], dtype=np.float32)
    disk = default_disk(truth.shape[-1])
    data_range = truth_data_range(truth, disk)
    inclusions = {"values": dataset["inclusion_values"][test_rows], "counts": dataset["inclusion_count"][test_rows],
                  "masks": inclusion_masks(dataset["inclusion_centres_mm"][test_rows],
                                           dataset["inclusion_diameters_mm"][test_rows],
                                           dataset["inclusion_count"][test_rows], truth.shape[-1],
                                           float(meta.get("diameter_mm", 82.0)))}

    def subset(rows: slice) -> Dict[str, np.ndarray]:
        return {k: v[rows] for k, v in inclusions.items()}

    say(f"{len(test_rows)} test phantoms (split seed {split_seed}); DRI on the first {n_dri}; data range "
        + ", ".join(f"{n} {r:.3g} {u}" for n, r, u in zip(CHROMOPHORES, data_range, CHROMOPHORE_UNITS)))
    recons16: Dict[str, np.ndarray] = {}
    recons8: Dict[str, np.ndarray] = {}
    timing: Dict[str, float] = {}
    reference = None
    if n_dri:
        element = float(meta.get("element_size_mm", DEFAULT_ELEMENT_SIZE_MM))
        reference = reference_amplitudes(REFERENCE_VALUES, n_optodes, element, wavelengths,
                                         float(meta.get("diameter_mm", 82.0)))
        began = time.perf_counter()
        recons16["DRI"] = run_dri(measurements[:n_dri], mri[:n_dri], reference, n_optodes, dri_element_size_mm,
                                  workers, sub_progress(progress, 0.0, 0.45), cancel)
        timing["DRI"] = (time.perf_counter() - began) / n_dri
        say(f"DRI: {n_dri} phantoms in {time.perf_counter() - began:.0f} s")
    for name, rec in networks.items():
        began = time.perf_counter()
        recons16[name] = network_maps(rec, measurements, mri)
        timing[name] = (time.perf_counter() - began) / len(test_rows)
    common = slice(0, n_dri) if n_dri else slice(0, len(test_rows))
    results: Dict[str, Any] = {"n_test": int(len(test_rows)), "n_common": int(common.stop), "split_seed": split_seed,
                               "data_range": {n: float(r) for n, r in zip(CHROMOPHORES, data_range)},
                               "data_range_definition": "max - min of the true map inside the disk over the "
                                                        f"{len(test_rows)} evaluated test phantoms"}
    results["common16"] = [_method_rows(name, maps[common], truth[common], data_range, disk, subset(common),
                                        timing[name]) for name, maps in recons16.items()]
    results["networks16"] = [_method_rows(name, recons16[name], truth, data_range, disk, inclusions, timing[name])
                             for name in networks]
    if eight_optodes and n_optodes == 16:
        timing8: Dict[str, float] = {}
        if n_dri:
            kept = measurement_subset(16, KEPT_OPTODES_8, len(wavelengths))
            began = time.perf_counter()
            recons8["DRI"] = run_dri(measurements[:n_dri][:, kept], mri[:n_dri], reference[kept], 8,
                                     dri_element_size_mm, workers, sub_progress(progress, 0.5, 0.95), cancel)
            timing8["DRI"] = (time.perf_counter() - began) / n_dri
        for name, rec in networks.items():
            for fill, label in (("interpolate", f"{name} (interpolated)"), ("zero", f"{name} (zero-filled)")):
                began = time.perf_counter()
                recons8[label] = network_maps(rec, measurements[common], mri[common], KEPT_OPTODES_8, fill)
                timing8[label] = (time.perf_counter() - began) / common.stop
        results["common8"] = [_method_rows(name, maps, truth[common], data_range, disk, subset(common),
                                           timing8[name]) for name, maps in recons8.items()]
    tables = [markdown_table(results["common16"], f"16 optodes, the same {common.stop} test phantoms for every method")]
    if networks and len(test_rows) > common.stop:
        tables.append(markdown_table(results["networks16"],
                                     f"16 optodes, networks on all {len(test_rows)} test phantoms"))
    if recons8:
        tables.append(markdown_table(results["common8"], f"8 optodes (generalisation; networks trained on 16, "
                                                          f"missing pairs interpolated or zero-filled), "
                                                          f"{common.stop} phantoms"))
    ranges = ", ".join(f"{n} {r:.3g} {u}" for n, r, u in zip(CHROMOPHORES, data_range, CHROMOPHORE_UNITS))
    text = "\n\n".join(tables) + (f"\n\nPSNR/SSIM data range (max - min of the true maps inside the disk over the "
                                  f"{len(test_rows)} test phantoms): {ranges}. Metrics over disk pixels only.\n")
    (out_dir / "results.md").write_text(text)
    (out_dir / "results.json").write_text(json.dumps(results, indent=1))
    shown = slice(0, min(n_figure, common.stop))
    figures = [comparison_figure(out_dir / "nirst_comparison_16optodes.png", mri[shown], truth[shown],
                                 {k: v[shown] for k, v in recons16.items()}, "16 optodes")]
    if recons8:
        figures.append(comparison_figure(out_dir / "nirst_comparison_8optodes.png", mri[shown], truth[shown],
                                         {k: v[shown] for k, v in recons8.items()}, "8 optodes (trained on 16)"))
    report(progress, 1.0, "evaluation done")
    say(text)
    return {"results": results, "markdown": text, "figures": figures, "out_dir": out_dir}

