"""The ROG step of ``make demo``: plan, train briefly, segment a held-out volume, report Dice.

Everything is built in: five synthetic 48^3 CT-like volumes with two blob "organs" are written
in the MSD layout, planned, and trained on for about a minute on a CPU (a cpu-friendly variant of
the plan, see :func:`~deepimaging.rog.synthetic.cpu_friendly`).  The held-out volume has a
different spacing from the training set, so the prediction also exercises resampling there
and back.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import List

from ..core.device import DeviceLike, select_device, torch_threads
from ..core.imageio import write_image
from ..core.metrics import dice
from ..core.segfile import write_segmentation
from .infer import labels_to_segmentation, predict_volume
from .plan import plan_dataset
from .synthetic import cpu_friendly, make_blob_case, write_blob_dataset
from .train import train_rog

EPOCHS, STEPS = 8, 12


def run_demo(out_dir: Path, device: DeviceLike = None) -> List[str]:
    """Write ``rog_image.nrrd``, ``rog_truth.seg.nrrd``, ``rog_prediction.seg.nrrd`` and ``rog_model/``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dev = select_device(device)
    root = write_blob_dataset(out_dir / "rog_data", cases=5, shape=(48, 48, 48))
    plan = cpu_friendly(plan_dataset(root))
    threads = None if dev.type != "cpu" else max(1, min(4, (os.cpu_count() or 2) // 2))
    with torch_threads(threads):
        result = train_rog(root, out_dir / "rog_model", EPOCHS, plan=plan, steps_per_epoch=STEPS, resume=False,
                           device=dev)
        image, truth = make_blob_case((40, 40, 40), spacing=(1.2, 1.2, 1.2), seed=100)
        labels, _ = predict_volume(image, result.best_path, device=dev)
    write_image(image, out_dir / "rog_image.nrrd")
    write_segmentation(labels_to_segmentation(truth, plan), out_dir / "rog_truth.seg.nrrd")
    write_segmentation(labels_to_segmentation(labels, plan), out_dir / "rog_prediction.seg.nrrd")
    scores = {lb.name: dice(labels.array == lb.value, truth.array == lb.value) for lb in plan.labels[1:]}
    last = result.history[-1]
    return [f"trained {result.epochs_completed} epochs x {STEPS} steps on {dev} in {result.seconds:.1f} s "
            f"(patch {plan.patch_size}, validation Dice {last['dice_mean']:.3f})",
            "held-out volume (1.2 mm, resampled to 1.0 mm and back) Dice: "
            + ", ".join(f"{name} {d:.3f}" for name, d in scores.items()),
            f"wrote rog_image.nrrd, rog_truth.seg.nrrd, rog_prediction.seg.nrrd, rog_model/best.pt in {out_dir}"]
