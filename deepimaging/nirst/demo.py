"""The NIRST step of ``make demo``: simulate a phantom, reconstruct it with the shipped Z-Net."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List

import numpy as np

from ..core.image import Image
from ..core.imageio import write_image
from .mesh import DEFAULT_DIAMETER_MM, disk_mask
from .recon import (DEFAULT_CHECKPOINT, OUTPUT_NAMES, OUTPUT_UNITS, hbt_contrast, load_reconstructor,
                    reconstruct_image, simulate_example)


def run_demo(out_dir: Path, device=None, checkpoint=None, seed: int = 0) -> List[str]:
    """Write the MRI, the five maps (NRRD) and a figure; return lines with the errors.

    Without the shipped checkpoint the step says so and skips (it appears once Z-Net is trained).
    """
    path = Path(checkpoint) if checkpoint else DEFAULT_CHECKPOINT
    if not path.is_file():
        return [f"shipped Z-Net checkpoint not found ({path}); skipped -- train one with "
                "`deepimaging nirst train --arch znet --export <file>` and copy it there"]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    measurements, mri, truth = simulate_example(seed)
    reconstructor = load_reconstructor(path, device)
    images = reconstruct_image(measurements, mri, reconstructor=reconstructor)
    write_image(mri, out_dir / "nirst_mri.nrrd")
    for name, image in images.items():
        write_image(image, out_dir / f"nirst_{name}_{OUTPUT_UNITS[name].replace('%', 'pct')}.nrrd")
    disk = disk_mask(0.5 * DEFAULT_DIAMETER_MM, mri.array.shape[-1])
    inside = truth["inclusion_mask"]
    lines = [f"Z-Net ({reconstructor.path.name}) on simulated phantom seed {seed}: "
             f"{int(inside.sum())} inclusion pixels"]
    for name in ("HbO", "Hb", "water"):
        rec, true = images[name].array[0], truth[name]
        rmse = float(np.sqrt(np.mean((rec[disk] - true[disk]) ** 2)))
        rel = 100.0 * (float(rec[inside].mean()) / float(true[inside].mean()) - 1.0)
        lines.append(f"{name}: inclusion {rec[inside].mean():.2f} vs true {true[inside].mean():.2f} "
                     f"{OUTPUT_UNITS[name]} ({rel:+.1f} %), RMSE in the disk {rmse:.3f} {OUTPUT_UNITS[name]}")
    lines.append(f"HbT contrast inclusion/background: {hbt_contrast(images['HbT'].array[0], inside):.3f} "
                 f"(true {hbt_contrast(truth['HbT'], inside):.3f})")
    _figure(mri, images, truth, out_dir / "nirst_reconstruction.png")
    lines.append("wrote nirst_mri.nrrd, nirst_{HbO,Hb,water,HbT,StO2}_*.nrrd, nirst_reconstruction.png")
    return lines


def _figure(mri: Image, images: Dict[str, Image], truth: Dict[str, np.ndarray], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(OUTPUT_NAMES) + 1, figsize=(2.4 * (len(OUTPUT_NAMES) + 1), 5.0))
    axes[0, 0].imshow(mri.array[0], cmap="gray", origin="lower")
    axes[0, 0].set_title("MRI")
    axes[1, 0].set_axis_off()
    for k, name in enumerate(OUTPUT_NAMES, start=1):
        true = truth[name]
        vmin, vmax = float(true[true > 0].min()) * 0.7, float(true.max()) * 1.05
        for row, values, label in ((0, true, "true"), (1, images[name].array[0], "Z-Net")):
            shown = axes[row, k].imshow(values, cmap="inferno", origin="lower", vmin=vmin, vmax=vmax)
            axes[row, k].set_title(f"{name} ({OUTPUT_UNITS[name]}) {label}", fontsize=9)
        fig.colorbar(shown, ax=list(axes[:, k]), shrink=0.7)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)
