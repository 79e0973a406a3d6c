"""``deepimaging robustness evaluate``: AutoAttack for 3D segmentation on a ROG checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import List

from ..core.device import torch_threads
from ..core.errors import InputError
from ..core.progress import tqdm_progress

ATTACK_NAMES = ("pgd", "apgd-ce", "apgd-dlr", "apgd-t", "fab-t", "square")


def register(methods: argparse._SubParsersAction) -> None:
    parser = methods.add_parser("robustness", help="adversarial robustness of segmentation models")
    verbs = parser.add_subparsers(dest="verb", metavar="<verb>", required=True)
    evaluate = verbs.add_parser(
        "evaluate", help="attack a ROG model on held-out cases (AutoAttack for 3D segmentation)",
        description="Attack the model on DIR's labelled test cases (imagesTs/labelsTs; else imagesTr/labelsTr) "
                    "with L-infinity attacks for every eps, and write OUT/robustness.json, .md and .png: "
                    "clean Dice, per-attack Dice, robust Dice (worst per case) and Dice-vs-eps AUC. "
                    "A case is broken when its mean foreground Dice falls below half the model's mean clean "
                    "Dice; later attacks run only on the cases not yet broken.")
    evaluate.add_argument("--model", required=True, type=Path, help="ROG checkpoint (best.pt)")
    evaluate.add_argument("--data", required=True, type=Path, help="dataset folder in the MSD layout")
    evaluate.add_argument("--out", required=True, type=Path, help="output folder")
    evaluate.add_argument("--attacks", default="apgd-ce,apgd-dlr,fab-t,square",
                          help=f"comma-separated, run in this order; from {', '.join(ATTACK_NAMES)} "
                               "(default %(default)s; add pgd to compare; a 2-class model gets APGD-T with "
                               "targeted CE instead of APGD-DLR)")
    evaluate.add_argument("--eps", default="0,4,8,12,16",
                          help="comma-separated eps in 1/255 of each channel's valid range [p0.5, p99.5] "
                               "(the paper's 8/255; default %(default)s)")
    evaluate.add_argument("--eps-units", default="range", choices=("range", "intensity", "normalised"),
                          help="what --eps means: 1/255 of the valid range (default), original intensity "
                               "units (e.g. HU), or z-units of the normalised input")
    evaluate.add_argument("--iterations", type=int, help="APGD/PGD/FAB iterations (default: the preset's)")
    evaluate.add_argument("--restarts", type=int, help="restarts per attack (default: the preset's)")
    evaluate.add_argument("--queries", type=int, help="Square attack queries (default: the preset's)")
    evaluate.add_argument("--preset", default="paper", choices=("paper", "standard"),
                          help="budgets: paper (5 iterations, 500 queries, as the ROG paper) or standard "
                               "(AutoAttack's 100 iterations, 5000 queries)")
    evaluate.add_argument("--each", action="store_true",
                          help="run every attack on every case on its own (the paper's Table 1) instead of "
                               "the cascade")
    evaluate.add_argument("--cases", type=int, help="attack only the first N cases")
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--no-plot", action="store_true", help="skip the PNG")
    evaluate.add_argument("--device", default=None, help="auto (default), cpu, cuda, cuda:N or mps")
    evaluate.add_argument("--threads", type=int, help="torch CPU threads")
    evaluate.set_defaults(func=run_evaluate)


def _numbers(text: str, what: str) -> List[float]:
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise InputError(f"{what} must be comma-separated numbers, got {text!r}") from None
    if not values:
        raise InputError(f"{what} is empty")
    return values


def run_evaluate(args: argparse.Namespace) -> int:
    from ..robustness.rog import evaluate_dataset

    attacks = [name.strip().lower() for name in args.attacks.split(",") if name.strip()]
    unknown = [name for name in attacks if name not in ATTACK_NAMES]
    if unknown or not attacks:
        raise InputError(f"unknown attack(s) {unknown}; choose from {', '.join(ATTACK_NAMES)}")
    if args.out.exists() and not args.out.is_dir():
        raise InputError(f"--out {args.out} is a file, not a folder")
    eps = _numbers(args.eps, "--eps")
    with torch_threads(args.threads), tqdm_progress("attacking") as progress:
        result, paths = evaluate_dataset(
            args.model, args.data, args.out, eps, eps_units=args.eps_units, attacks=attacks,
            iterations=args.iterations, restarts=args.restarts, square_queries=args.queries, preset=args.preset,
            cascade=not args.each, max_cases=args.cases, seed=args.seed, device=args.device,
            plot=not args.no_plot, progress=progress)
    print(f"clean Dice {result.clean_dice:.4f} over {len(result.clean_dice_per_case)} case(s); robust Dice per eps "
          + ", ".join(f"{e:g}: {d:.4f}" for e, d in zip(eps, result.robust_dice))
          + f"; robust AUC {result.robust_auc:.4f}")
    for warning in result.warnings:
        print(f"warning: {warning}")
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0
