"""``deepimaging levelset refine | train | evaluate | synth``: Chan-Vese refinement, classic or learned.

``refine`` without ``--model`` is the classic Chan-Vese refinement; with ``--model RUN/best.pt``
the learned (deep Chan-Vese) one, and with ``--roi z0,y0,x0,z1,y1,x1`` and no ``--mask`` its
ROI mode.  ``train`` / ``evaluate`` / ``synth`` belong to the learned refiner.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import List

import numpy as np

from ..core.device import torch_threads
from ..core.errors import InputError
from ..core.imageio import IMAGE_EXTENSIONS, read_image, require_extension
from ..core.progress import tqdm_progress
from ..core.segfile import SEGMENTATION_EXTENSIONS, Segmentation, read_segmentation, write_segmentation
from ..levelset import refine_defaults, refine_mask


def register(methods: argparse._SubParsersAction) -> None:
    parser = methods.add_parser("levelset", help="level-set segmentation and refinement (classic and learned)")
    verbs = parser.add_subparsers(dest="verb", metavar="<verb>", required=True)
    refine = verbs.add_parser("refine", help="refine a segment with classic Chan-Vese, or a learned model (--model)",
                              description="Refine one segment of MASK on IMG and write it to OUT.")
    defaults = refine_defaults()
    refine.add_argument("--image", required=True, type=Path, help=f"image ({', '.join(IMAGE_EXTENSIONS)})")
    refine.add_argument("--mask", type=Path, help="label image or Slicer .seg.nrrd (required unless --model with --roi)")
    refine.add_argument("--out", required=True, type=Path, help="output .seg.nrrd or label image")
    refine.add_argument("--segment", help="segment name to refine (needed when MASK has several)")
    refine.add_argument("--mu", type=float, default=defaults.mu, help="length weight (default %(default)s)")
    refine.add_argument("--lambda1", type=float, default=defaults.lambda1, help="inside fit weight")
    refine.add_argument("--lambda2", type=float, default=defaults.lambda2, help="outside fit weight")
    refine.add_argument("--iterations", type=int, default=defaults.max_iterations, help="iteration cap")
    refine.add_argument("--tolerance", type=float, default=defaults.tolerance, help="RMS phi change to stop at")
    refine.add_argument("--roi-margin", default="auto",
                        help="voxels around the segment to evolve in: auto (default), a number, or 'all'")
    refine.add_argument("--model", type=Path, help="learned refiner checkpoint (RUN/best.pt): use it instead of classic")
    refine.add_argument("--roi", help="with --model: box z0,y0,x0,z1,y1,x1 in voxel indices (ends exclusive); "
                                      "without --mask this is ROI mode")
    refine.add_argument("--device", default=None, help="auto (default), cpu, cuda, cuda:N or mps")
    refine.set_defaults(func=run_refine)

    train = verbs.add_parser("train", help="train the learned refiner -> OUT/best.pt")
    train.add_argument("--data", type=Path, help="folder with images/NAME.*, masks/NAME.*, optional coarse/NAME.*")
    train.add_argument("--synthetic", type=int, metavar="N",
                       help="instead of --data: write N built-in cases into OUT/data and train on them")
    train.add_argument("--out", required=True, type=Path, help="run folder for best.pt and last.pt")
    train.add_argument("--dim", type=int, choices=(2, 3), default=2, help="2 (slices) or 3 (volumes)")
    train.add_argument("--epochs", type=int, default=30, help="epochs (default %(default)s)")
    train.add_argument("--steps-per-epoch", type=int, help="optimizer steps per epoch (default 16)")
    train.add_argument("--batch-size", type=int, help="ROIs per step (default 8)")
    train.add_argument("--lr", type=float, help="initial learning rate, cosine-annealed (default 2e-3)")
    train.add_argument("--grid", type=int, help="ROI grid side (default 64 in 2D, 32 in 3D)")
    train.add_argument("--steps", type=int, help="unrolled Chan-Vese steps N (default 3)")
    train.add_argument("--widths", type=int, nargs="+", help="U-Net widths per level (default 16 32 64)")
    train.add_argument("--features", type=int, help="channels C of the Chan-Vese feature embedding (default 64)")
    train.add_argument("--mask-free-fraction", type=float, help="share of ROI-mode items (default 0.25)")
    train.add_argument("--loss-weights", type=float, nargs=2, metavar=("W0", "WN"),
                       help="weights of the phi_0 and phi_N loss terms (default 1 1; the paper: 1 5 or 0.2 1)")
    train.add_argument("--detach-phi0", action="store_true", help="ablation: no gradient from the unroll into phi_0")
    train.add_argument("--seed", type=int, help="random seed (default 0)")
    train.add_argument("--no-resume", action="store_true", help="start over even if OUT/last.pt exists")
    _run_args(train)
    train.set_defaults(func=run_train)

    evaluate = verbs.add_parser("evaluate", help="compare coarse / classic / learned -> OUT/evaluation.{json,md,png}")
    evaluate.add_argument("--model", required=True, type=Path, help="learned refiner checkpoint (RUN/best.pt)")
    evaluate.add_argument("--data", required=True, type=Path, help="test folder (images/, masks/, optional coarse/)")
    evaluate.add_argument("--out", required=True, type=Path, help="output folder")
    evaluate.add_argument("--detached-model", type=Path, help="checkpoint trained with --detach-phi0 (ablation)")
    evaluate.add_argument("--train-detached", type=Path, metavar="TRAINDIR",
                          help="train the ablation on TRAINDIR (same settings as --model, detach phi_0) into "
                               "OUT/detached_run and evaluate it")
    evaluate.add_argument("--no-timing", action="store_true", help="skip the CPU timing")
    _run_args(evaluate)
    evaluate.set_defaults(func=run_evaluate)

    synth = verbs.add_parser("synth", help="write built-in cases (non-uniform intensities) in the training layout")
    synth.add_argument("--out", required=True, type=Path, help="folder to write images/, masks/, coarse/ into")
    synth.add_argument("--dim", type=int, choices=(2, 3), default=2)
    synth.add_argument("--n", type=int, default=40, help="number of cases (default %(default)s)")
    synth.add_argument("--seed", type=int, default=0, help="first case's seed (default %(default)s)")
    synth.add_argument("--size", type=int, help="image side in voxels (default 96 in 2D, 48 in 3D)")
    synth.set_defaults(func=run_synth)


def _run_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None, help="auto (default), cpu, cuda, cuda:N or mps")
    parser.add_argument("--threads", type=int, help="torch CPU threads")


def parse_box(text: str) -> List[int]:
    """``"z0,y0,x0,z1,y1,x1"`` -> six ints (InputError otherwise)."""
    try:
        values = [int(float(v)) for v in text.replace(" ", "").split(",")]
    except ValueError:
        raise InputError(f"--roi must be six integers z0,y0,x0,z1,y1,x1, got {text!r}") from None
    if len(values) != 6:
        raise InputError(f"--roi must be six integers z0,y0,x0,z1,y1,x1, got {len(values)} value(s)")
    return values


def run_refine(args: argparse.Namespace) -> int:
    require_extension(args.out, SEGMENTATION_EXTENSIONS, "output segmentation")
    if args.model is None and (args.mask is None or args.roi is not None):
        raise InputError("--mask is required for the classic refinement; --roi needs --model")
    if args.mask is None and args.roi is None:
        raise InputError("give --mask, or --roi z0,y0,x0,z1,y1,x1 for the learned ROI mode")
    inputs = [args.image.resolve()] + ([args.mask.resolve()] if args.mask is not None else [])
    if args.out.resolve() in inputs:
        raise InputError("--out must not overwrite the input image or mask")
    image = read_image(args.image)
    if args.mask is not None:
        segmentation = read_segmentation(args.mask)
        image.require_same_grid(segmentation.geometry, what="mask", of="image")
        segment = segmentation.segment(args.segment)
        name, colour, mask, geometry = segment.name, segment.color, segment.mask, segmentation.geometry
    else:
        name, colour, mask = args.segment or "segment", None, None
        geometry = image.with_array(np.zeros(image.shape, np.uint8))
    if args.model is not None:
        from ..levelset.deep import refine_learned

        box = parse_box(args.roi) if args.roi is not None else None
        with tqdm_progress(f"refining '{name}' (learned)") as progress:
            result = refine_learned(image, mask, args.model, roi=box, device=args.device, progress=progress)
        state = f"{result.iterations} learned steps"
    else:
        result, state = _classic(args, image, mask, name)
    out = Segmentation(geometry)
    out.add(name, result.mask, colour)
    write_segmentation(out, args.out)
    print(f"refined '{name}' in {state}; wrote {args.out}")
    return 0


def _classic(args: argparse.Namespace, image, mask, name: str):
    params = refine_defaults()
    params.mu, params.lambda1, params.lambda2 = args.mu, args.lambda1, args.lambda2
    params.max_iterations, params.tolerance = args.iterations, args.tolerance
    margin = {"auto": "auto", "all": None}.get(args.roi_margin)
    if margin is None and args.roi_margin != "all":
        try:
            margin = int(args.roi_margin)
        except ValueError:
            raise InputError(f"--roi-margin must be auto, all or a number of voxels, got {args.roi_margin!r}") from None
    with tqdm_progress(f"refining '{name}'") as progress:
        result = refine_mask(image, mask, params, roi_margin=margin, device=args.device, progress=progress)
    state = "converged" if result.converged else "stopped at the iteration cap"
    return result, f"{result.iterations} iterations ({state})"


def run_train(args: argparse.Namespace) -> int:
    from ..levelset.deep import train_refiner, write_synthetic_refine_dataset

    if (args.data is None) == (args.synthetic is None):
        raise InputError("give exactly one of --data DIR or --synthetic N")
    data = args.data
    if args.synthetic is not None:
        data = write_synthetic_refine_dataset(args.out / "data", n=args.synthetic, dim=args.dim, seed=args.seed or 0)
    elif not data.is_dir():
        raise InputError(f"--data {data} is not a folder")
    options = dict(steps_per_epoch=args.steps_per_epoch, batch_size=args.batch_size, lr=args.lr, grid=args.grid,
                   steps=args.steps, features=args.features, widths=tuple(args.widths) if args.widths else None,
                   mask_free_fraction=args.mask_free_fraction, seed=args.seed,
                   weight_initial=args.loss_weights[0] if args.loss_weights else None,
                   weight_final=args.loss_weights[1] if args.loss_weights else None,
                   detach_phi0=True if args.detach_phi0 else None, resume=not args.no_resume)
    with torch_threads(args.threads), tqdm_progress("training the learned refiner") as progress:
        best = train_refiner(data, args.out, dim=args.dim, epochs=args.epochs, device=args.device, progress=progress,
                             **{k: v for k, v in options.items() if v is not None})
    print(f"wrote {best}")
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    from ..levelset.deep import evaluate_refiner
    from ..levelset.deep.evaluate import markdown_table, train_detached_like

    if not args.data.is_dir():
        raise InputError(f"--data {args.data} is not a folder")
    if args.detached_model is not None and args.train_detached is not None:
        raise InputError("give --detached-model or --train-detached, not both")
    args.out.mkdir(parents=True, exist_ok=True)
    detached = args.detached_model
    if args.train_detached is not None:
        with torch_threads(args.threads), tqdm_progress("training the detached-phi_0 ablation") as progress:
            detached = train_detached_like(args.model, args.train_detached, args.out / "detached_run",
                                           device=args.device, progress=progress)
    with torch_threads(args.threads), tqdm_progress("evaluating") as progress:
        result = evaluate_refiner(args.model, args.data, args.out, detached_model=detached,
                                  device=args.device, timing=not args.no_timing, progress=progress)
    print(markdown_table(result))
    print(f"wrote {args.out / 'evaluation.json'}, evaluation.md, evaluation.png")
    return 0


def run_synth(args: argparse.Namespace) -> int:
    from ..levelset.deep import write_synthetic_refine_dataset

    out = write_synthetic_refine_dataset(args.out, n=args.n, dim=args.dim, seed=args.seed, size=args.size)
    print(f"wrote {args.n} {args.dim}D cases to {out}/images, masks, coarse")
    return 0
