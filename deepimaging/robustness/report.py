"""Robustness reports: JSON, a Markdown table (the ROG paper's Table 1 style) and a Dice-vs-eps plot.

JSON schema (keys always present)::

    {"eps": [...], "clean_dice": float, "attacks": {name: [mean foreground Dice per eps]},
     "robust_dice": [per eps], "auc": {name: float}, "robust_auc": float, "threshold": float,
     "mode": "cascade" | "individual", "eps_scale": ..., "eps_abs": [[per channel] per eps],
     "per_case": {...}, "ran_on": {...}, "warnings": [...], "notes": [...], "settings": {...}, ...}

Every file is written atomically (temporary file beside it, then ``os.replace``).  matplotlib
is imported only inside :func:`plot_dice_vs_eps` and drawn on an Agg canvas without touching
pyplot's global backend (safe inside Slicer).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, Mapping, Union

from deepimaging.core.imageio import atomic_output
from deepimaging.robustness.autoattack import RobustnessResult

PathLike = Union[str, os.PathLike]
ResultLike = Union[RobustnessResult, Mapping[str, object]]


def result_dict(result: ResultLike) -> Dict[str, object]:
    """The JSON-able dictionary of a result (a dict read back from JSON passes through)."""
    data = result.to_dict() if isinstance(result, RobustnessResult) else dict(result)
    missing = [k for k in ("eps", "clean_dice", "attacks", "robust_dice", "auc") if k not in data]
    if missing:
        raise ValueError(f"not a robustness result: missing {missing}")
    return data


def markdown_table(result: ResultLike) -> str:
    """Dice per eps for clean, every attack and the robust Dice, plus the AUC row, as Markdown."""
    data = result_dict(result)
    names = list(data["attacks"])
    scale = data.get("eps_scale", "absolute")
    eps_label = "eps (x 1/255 of range)" if scale == "range" else "eps"
    header = [eps_label, "clean", *names, "robust"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for i, e in enumerate(data["eps"]):
        eps_text = f"{e * 255:.3g}" if scale == "range" else f"{e:.4g}"
        row = [eps_text, f"{data['clean_dice']:.4f}", *[f"{data['attacks'][n][i]:.4f}" for n in names],
               f"{data['robust_dice'][i]:.4f}"]
        lines.append("| " + " | ".join(row) + " |")
    robust_auc = data.get("robust_auc")
    lines.append("| AUC | " + f"{data['clean_dice']:.4f} | " + " | ".join(f"{data['auc'][n]:.4f}" for n in names)
                 + (f" | {robust_auc:.4f} |" if robust_auc is not None else " | |"))
    mode = data.get("mode", "cascade")
    text = [f"Mean foreground Dice over {data.get('num_cases', '?')} case(s); a case is broken below "
            f"{data.get('threshold', float('nan')):.4f} (half the mean clean Dice).",
            "Per-attack columns: " + ("robust Dice after each stage of the cascade (AutoAttack order)."
                                      if mode == "cascade" else "each attack on its own (Table 1 style)."),
            "", *lines]
    for title, key in (("Notes", "notes"), ("Warnings", "warnings")):
        if data.get(key):
            text += ["", f"**{title}**", ""] + [f"- {m}" for m in data[key]]
    return "\n".join(text) + "\n"


def plot_dice_vs_eps(result: ResultLike, path: PathLike, title: str = "Dice vs eps") -> Path:
    """Write a PNG of Dice vs eps (one line per attack, the robust Dice dashed, clean dotted)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    data = result_dict(result)
    scale = data.get("eps_scale", "absolute")
    xs = [e * 255 for e in data["eps"]] if scale == "range" else list(data["eps"])
    fig = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for name, values in data["attacks"].items():
        ax.plot(xs, values, marker="o", label=f"{name} (AUC {data['auc'][name]:.3f})")
    ax.plot(xs, data["robust_dice"], "k--", marker="s", label="robust")
    ax.axhline(data["clean_dice"], color="grey", linestyle=":", label=f"clean {data['clean_dice']:.3f}")
    ax.set_xlabel("eps (x 1/255 of the valid range)" if scale == "range" else "eps (input units)")
    ax.set_ylabel("mean foreground Dice")
    ax.set_ylim(0.0, 1.02)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


def _write_text(path: Path, text: str) -> Path:
    with atomic_output(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


def write_report(result: ResultLike, out_dir: PathLike, stem: str = "robustness",
                 plot: bool = True) -> Dict[str, Path]:
    """Write ``<stem>.json``, ``<stem>.md`` and (if ``plot``) ``<stem>.png`` into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = result_dict(result)
    paths = {"json": _write_text(out / f"{stem}.json", json.dumps(data, indent=2, allow_nan=False) + "\n"),
             "markdown": _write_text(out / f"{stem}.md", markdown_table(data))}
    if plot:
        paths["png"] = plot_dice_vs_eps(data, out / f"{stem}.png")
    return paths
