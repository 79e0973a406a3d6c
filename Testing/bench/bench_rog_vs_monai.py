"""ROG vs MONAI networks of about the same size, same task, same budget; ratios printed.

Not part of the test run (``bench_*`` files are not collected).  Run from the repository root::

    python Testing/bench/bench_rog_vs_monai.py --quick          # CPU, a few minutes
    python Testing/bench/bench_rog_vs_monai.py --device cuda    # full: 256^3 inference, 300 steps

Task: the MNI152 white-matter task (:mod:`deepimaging.rog.mni152`; 1 mm, corrupted axial slabs,
held-out slab z +8..+40 mm).  Contenders: ROG (2.60M parameters), MONAI ``SegResNet`` with
``init_filters=12`` (2.64M) and MONAI ``UNet`` with channels 16..256 and one residual unit
(2.45M).  Every network gets the same budget: the same stream of augmented, foreground-biased
patches (one sampler, one seed, replayed for each), the same batch size and number of steps,
Adam (amsgrad) lr 1e-3 / weight decay 1e-5, Dice + cross-entropy, the same mixed precision
on CUDA, the same initialisation seed.  No validation or lr schedule: a fixed-budget
comparison, scored with the final weights.  Reported per network:

* parameters;
* training step time: forward + backward + optimizer step on a ready batch (median over
  the steps after a warm-up; patch sampling is shared and timed separately);
* inference time over an N^3 volume (256, or 128 with ``--quick``): ROG's own sliding
  window (same patch, overlap 0.5, inverse-distance weights, 2 windows per batch);
* Dice and HD95 (mm) of white matter on the held-out slab, same sliding window, no
  post-processing.

On CPU the run uses one intra-op thread by default (``--threads``): the box is shared and
small 3D kernels run best single-threaded.  Results also go to ``OUT/bench_rog_vs_monai.json``.

Measured here (2 shared CPU cores, 1 thread, patch 16x32x32, batch 2, ROG's CPU-sized strides;
full run 8.5 min, ``--quick`` 1.8 min)::

    full, 300 steps    params  step ms  infer 256^3 s   Dice  HD95 mm
    ROG             2,596,315    215.3          152.8  0.906     2.00
    SegResNet       2,644,982    174.6          145.3  0.911     1.73
    UNet            2,448,988     47.9           35.2  0.881     2.24
    ROG / SegResNet: params 0.98x, step 1.23x, inference 1.05x, Dice -0.005
    ROG / UNet:      params 1.06x, step 4.50x, inference 4.34x, Dice +0.025

On this CPU ROG is not faster than dense networks of its size: convolution backward is 57 % of
its step, and a depthwise 3x3x3 convolution's backward took longer there than a dense one's
(15 vs 6 ms, 32 channels at 8x16x16, torch 2.13) despite 32x fewer FLOPs.  The paper's
efficiency claim is about parameters, FLOPs and GPU memory; rerun with ``--device cuda``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Optional, Sequence, Tuple

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout without installing

from deepimaging.core.device import autocast, seed_everything, select_device  # noqa: E402
from deepimaging.core.imageio import read_image  # noqa: E402
from deepimaging.core.metrics import dice, hausdorff95  # noqa: E402
from deepimaging.core.training import backward_and_step, make_grad_scaler  # noqa: E402
from deepimaging.rog.data import Augmentation, PatchStream, RogDataset  # noqa: E402
from deepimaging.rog.infer import sliding_window_probabilities  # noqa: E402
from deepimaging.rog.mni152 import build_mni152_task  # noqa: E402
from deepimaging.rog.model import count_parameters  # noqa: E402
from deepimaging.rog.plan import Plan, plan_dataset  # noqa: E402
from deepimaging.rog.preprocess import preprocess_image, restore_labels  # noqa: E402
from deepimaging.rog.synthetic import cpu_friendly  # noqa: E402


def build_models(plan: Plan) -> Dict[str, Callable[[], torch.nn.Module]]:
    """Constructors (called after seeding, so each starts from a fixed initialisation)."""
    from monai.networks.nets import SegResNet, UNet

    classes = len(plan.labels)
    return {
        "ROG": plan.build_model,
        "SegResNet": lambda: SegResNet(3, init_filters=12, in_channels=1, out_channels=classes,
                                       norm=("group", {"num_groups": 4})),
        "UNet": lambda: UNet(3, 1, classes, (16, 32, 64, 128, 256), (2, 2, 2, 2), num_res_units=1),
    }


def batch_stream(dataset: RogDataset, plan: Plan, batch: int, seed: int) -> Iterator[Tuple[torch.Tensor, ...]]:
    """The shared training stream: the same seed replays the same augmented patches for every network."""
    stream = iter(PatchStream(dataset, plan.patch_size, 0.5, Augmentation(), seed=seed))
    while True:
        pairs = [next(stream) for _ in range(batch)]
        yield torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train(model: torch.nn.Module, batches: Iterator[Tuple[torch.Tensor, ...]], steps: int, device: torch.device,
          warmup: int) -> Dict[str, float]:
    """Train in place; median step seconds (after ``warmup`` steps), sampling seconds per batch, final loss."""
    from monai.losses import DiceCELoss

    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-5, amsgrad=True)
    loss_fn = DiceCELoss(include_background=False, to_onehot_y=True, softmax=True, batch=True)
    scaler = make_grad_scaler(device)
    model.train()
    times, losses, sampling = [], [], 0.0
    for _ in range(steps):
        started = time.perf_counter()
        x, y = next(batches)
        sampling += time.perf_counter() - started
        x, y = x.to(device), y.to(device)
        _sync(device)
        started = time.perf_counter()
        with autocast(device):
            logits = model(x)
        loss = loss_fn(logits.float(), y[:, None])
        backward_and_step(loss, optimizer, scaler)
        _sync(device)
        times.append(time.perf_counter() - started)
        losses.append(loss.item())
    timed = times[warmup:] if len(times) > warmup else times
    return {"step_s": statistics.median(timed), "sampling_s": sampling / steps,
            "final_loss": float(np.mean(losses[-10:]))}


def probabilities(model: torch.nn.Module, array: np.ndarray, plan: Plan, device: torch.device) -> np.ndarray:
    """ROG's inference path (sliding window, inverse-distance weights) for any network."""
    return sliding_window_probabilities(array, model, plan, device, batch_size=2, overlap=0.5)


def inference_seconds(model: torch.nn.Module, size: int, plan: Plan, device: torch.device) -> float:
    """Wall time of a sliding-window pass over a size^3 volume (values do not change the cost)."""
    volume = np.random.default_rng(0).normal(size=(1, size, size, size)).astype(np.float32)
    probabilities(model, volume[:, :plan.patch_size[0], :plan.patch_size[1], :plan.patch_size[2]], plan, device)
    _sync(device)  # the warm-up above compiled kernels / filled caches
    started = time.perf_counter()
    probabilities(model, volume, plan, device)
    _sync(device)
    return time.perf_counter() - started


def score(model: torch.nn.Module, image_path: Path, label_path: Path, plan: Plan,
          device: torch.device) -> Tuple[float, float]:
    """(Dice, HD95 mm) of white matter on the held-out slab, no post-processing."""
    prep = preprocess_image(read_image(image_path), plan)
    classes = probabilities(model, prep.array, plan, device).argmax(0).astype(np.uint8)
    labels = restore_labels(classes, prep.grid, plan)
    truth = read_image(label_path)
    pred, ref = labels.array == 1, truth.array == 1
    return dice(pred, ref), hausdorff95(pred, ref, truth.spacing_zyx)


def run(args: argparse.Namespace) -> Dict[str, Any]:
    device = select_device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    out = Path(args.out or tempfile.mkdtemp(prefix="bench_rog_"))
    task = build_mni152_task(out / "data", args.resolution, seed=args.seed)
    plan = plan_dataset(task.root, batch_size=args.batch_size)
    if not args.full_plan:
        plan = cpu_friendly(plan, args.patch)
    dataset = RogDataset.from_files(task.root, plan)
    print(f"task: {len(task.train)} training slabs, test slab z {task.test_z_mm} mm; patch {plan.patch_size}, "
          f"stem strides {plan.stem_strides}, lattice stride {plan.lattice_stride}; {args.steps} steps of batch "
          f"{args.batch_size} on {device} (threads {torch.get_num_threads()})", flush=True)
    rows: Dict[str, Dict[str, float]] = {}
    for name, make in build_models(plan).items():
        if args.models and name not in args.models:
            continue
        seed_everything(args.seed)
        model = make().to(device)
        started = time.perf_counter()
        stats = train(model, batch_stream(dataset, plan, args.batch_size, args.seed), args.steps, device,
                      warmup=min(5, args.steps // 5))
        train_s = time.perf_counter() - started
        model.eval()
        infer_s = inference_seconds(model, args.infer_size, plan, device)
        d, hd = score(model, task.test_image, task.test_label, plan, device)
        rows[name] = {"params": count_parameters(model), "step_ms": stats["step_s"] * 1e3, "train_s": train_s,
                      "sampling_ms": stats["sampling_s"] * 1e3, "final_loss": stats["final_loss"],
                      "infer_s": infer_s, "dice": d, "hd95_mm": hd}
        print(f"  {name}: " + ", ".join(f"{k} {v:.4g}" for k, v in rows[name].items()), flush=True)
    report = {"device": str(device), "threads": torch.get_num_threads(), "steps": args.steps,
              "batch_size": args.batch_size, "patch_size": list(plan.patch_size), "infer_size": args.infer_size,
              "models": rows}
    print_table(report)
    (out / "bench_rog_vs_monai.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    print(f"results: {out / 'bench_rog_vs_monai.json'}")
    return report


def print_table(report: Dict[str, Any]) -> None:
    rows, n = report["models"], report["infer_size"]
    print(f"\n{'network':<10} {'params':>10} {'step ms':>9} {f'infer {n}^3 s':>14} {'Dice':>7} {'HD95 mm':>8}")
    for name, r in rows.items():
        print(f"{name:<10} {r['params']:>10,d} {r['step_ms']:>9.1f} {r['infer_s']:>14.2f} {r['dice']:>7.3f} "
              f"{r['hd95_mm']:>8.2f}")
    if "ROG" not in rows:
        return
    rog = rows["ROG"]
    for name, r in rows.items():
        if name != "ROG":
            print(f"ROG / {name}: params {rog['params'] / r['params']:.2f}x, step time "
                  f"{rog['step_ms'] / r['step_ms']:.2f}x, inference {rog['infer_s'] / r['infer_s']:.2f}x, "
                  f"Dice {rog['dice'] / r['dice']:.2f}x ({rog['dice'] - r['dice']:+.3f})")


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="128^3 inference and 100 training steps")
    parser.add_argument("--steps", type=int, help="training steps per network (default 300, quick 100)")
    parser.add_argument("--infer-size", type=int, help="edge of the inference volume (default 256, quick 128)")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--patch", type=int, nargs=3, default=(16, 32, 32), help="z y x, multiples of 16")
    parser.add_argument("--full-plan", action="store_true", help="the planner's strides and patch (GPU-sized)")
    parser.add_argument("--resolution", type=int, default=1, help="template grid in mm")
    parser.add_argument("--models", nargs="+", choices=["ROG", "SegResNet", "UNet"], help="default: all")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on CPU")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="working folder (default: a new temporary folder)")
    args = parser.parse_args(argv)
    args.steps = args.steps or (100 if args.quick else 300)
    args.infer_size = args.infer_size or (128 if args.quick else 256)
    return run(args)


if __name__ == "__main__":
    main()
