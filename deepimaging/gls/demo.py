"""The GLS step of ``make demo``: synthetic AS-OCT B-scans, GLS vs U-Net, a segmented B-scan stack.

Writes 30 synthetic 128 x 128 B-scans (:mod:`deepimaging.gls.synthetic`), holds 6 out, and
trains GLS (three stages) and the U-Net baseline on the other 24 with the same budget through
:func:`~deepimaging.gls.compare.compare_archs` (``gls_compare/``: comparison.json/.md/.png).
To fit about a minute on two CPU cores the networks run at half the thesis' widths
(8, 16, 32, 64, 128) with a 48-pixel crop, 24 epochs x 6 steps and lr 2e-3.  The held-out B-scans are then stacked into one
volume (slices along z, 0.06 mm pixels, 1 mm between slices), segmented by the GLS model, and
written as ``gls_bscans.nrrd``, ``gls_prediction.seg.nrrd`` and ``gls_keypoints.json``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import List

import numpy as np

from ..core.device import DeviceLike, select_device, torch_threads
from ..core.image import Image
from ..core.imageio import write_image
from ..core.metrics import dice
from ..core.segfile import write_segmentation
from .compare import compare_archs
from .data import load_folder
from .infer import keypoints_document, load_gls, predict_image
from .synthetic import write_synthetic_dataset

N_IMAGES, SIZE, CROP = 30, (128, 128), 48
WIDTHS = (8, 16, 32, 64, 128)
EPOCHS, STEPS, LR = 24, 6, 2e-3  # a short run: a higher lr than the library default 1e-3
SPACING = (0.06, 0.06, 1.0)  # mm: x, y in a B-scan, z between B-scans


def run_demo(out_dir: Path, device: DeviceLike = None) -> List[str]:
    """Train, compare, segment the held-out stack; returns the lines to print."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dev = select_device(device)
    root = write_synthetic_dataset(out_dir / "gls_data", n=N_IMAGES, size=SIZE, overwrite=True)
    threads = None if dev.type != "cpu" else max(1, min(4, (os.cpu_count() or 2) // 2))
    with torch_threads(threads):
        summary = compare_archs(root, out_dir / "gls_compare", archs=("unet", "gls"), epochs=EPOCHS, size=SIZE,
                                crop_size=CROP, widths=WIDTHS, steps_per_epoch=STEPS, lr=LR, test_fraction=0.2,
                                device=dev)
        held_out = [s for s in load_folder(root) if s.name in set(summary["test_names"])]
        stack = Image(np.concatenate([s.image.array for s in held_out]), SPACING, (-3.84, -3.84, 0.0))
        model_path = out_dir / "gls_compare" / "models" / "gls" / "best.pt"
        model = load_gls(model_path, device=dev)
        pred = predict_image(stack, model, device=dev)
    write_image(stack, out_dir / "gls_bscans.nrrd")
    write_segmentation(pred.to_segmentation(), out_dir / "gls_prediction.seg.nrrd")
    document = keypoints_document(pred, model, model_path, out_dir / "gls_bscans.nrrd")
    (out_dir / "gls_keypoints.json").write_text(json.dumps(document, indent=2), encoding="utf-8")
    stack_dice = np.mean([dice(pred.mask.array[i], s.mask) for i, s in enumerate(held_out)])
    gls, unet = summary["archs"]["gls"], summary["archs"]["unet"]
    n_val = round(len(summary["train_names"]) * 0.2)
    return [f"trained GLS (3 stages) and U-Net for {EPOCHS} epochs x {STEPS} steps each on "
            f"{len(summary['train_names'])} "
            f"synthetic B-scans ({n_val} of them for validation) on {dev}: {gls['train_seconds']:.1f} s and "
            f"{unet['train_seconds']:.1f} s",
            f"held-out Dice ({len(held_out)} B-scans): GLS {gls['dice']:.3f} vs U-Net {unet['dice']:.3f}; boundary F1 "
            f"(2 px) {gls['boundary_f1']:.3f} vs {unet['boundary_f1']:.3f}; GLS keypoint error "
            f"{gls['keypoint_error_px']:.2f} px mean, {gls['keypoint_error_median_px']:.2f} px median",
            f"held-out stack segmented slice by slice: Dice {stack_dice:.3f}, {len(document['keypoints'])} keypoints "
            "in LPS mm",
            f"wrote gls_bscans.nrrd, gls_prediction.seg.nrrd, gls_keypoints.json, gls_compare/ in {out_dir}"]
