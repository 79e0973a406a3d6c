"""``deepimaging rog plan | train | predict | evaluate``: ROG from the shell (and under torchrun)."""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import re
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from ..core.device import torch_threads
from ..core.errors import InputError
from ..core.image import Image
from ..core.imageio import IMAGE_EXTENSIONS, file_extension, read_image, require_extension, write_image
from ..core.progress import ProgressCallback, tqdm_progress
from ..core.segfile import SEGMENTATION_EXTENSIONS, read_segmentation, write_segmentation

CHANNEL_FILE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


def register(methods: argparse._SubParsersAction) -> None:
    parser = methods.add_parser("rog", help="ROG generic 3D segmentation (plan, train, predict, evaluate)")
    verbs = parser.add_subparsers(dest="verb", metavar="<verb>", required=True)

    plan = verbs.add_parser("plan", help="derive spacing, patch size and strides from a dataset -> plan.json")
    _data_args(plan)
    plan.add_argument("--memory-gb", type=float, default=2.0, help="training memory budget (default %(default)s)")
    plan.add_argument("--batch-size", type=int, default=2, help="batch size the budget is for (default %(default)s)")
    plan.add_argument("--out", required=True,
                      help="plan.json to write; a folder (existing, or a path ending in /) gets FOLDER/plan.json")
    plan.set_defaults(func=run_plan)

    train = verbs.add_parser("train", help="train ROG (also under torchrun --nproc_per_node N)")
    _data_args(train)
    train.add_argument("--plan", type=Path, help="plan.json (default: plan the data, or the resumed run's plan)")
    train.add_argument("--out", required=True, type=Path, help="output folder for best.pt, last.pt, logs")
    train.add_argument("--epochs", type=int, default=1000,
                       help="total epochs (default %(default)s); an epoch here is --steps-per-epoch optimizer steps, "
                            "then validation, lr-plateau check and checkpoints")
    train.add_argument("--steps-per-epoch", type=int, default=250,
                       help="optimizer steps (batches; Free AT: replays) per epoch (default %(default)s). The reference "
                            "code's epoch is one pass over the training cases, i.e. ceil(training cases / (batch size "
                            "x GPUs)) steps: pass that number to match its epochs and --patience (training prints that number)")
    train.add_argument("--batch-size", type=int, help="patches per batch and rank (default: the plan's)")
    train.add_argument("--lr", type=float, default=1e-3, help="initial learning rate (default %(default)s)")
    train.add_argument("--patience", type=int, default=50,
                       help="epochs of plateau before halving the lr (default %(default)s)")
    train.add_argument("--val-fraction", type=float, default=0.2, help="share of cases held out (default %(default)s)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--workers", type=int, default=0, help="data-loading worker processes per rank")
    train.add_argument("--cache", type=Path, help="folder to cache preprocessed cases in (.npy)")
    train.add_argument("--no-augment", action="store_true", help="train on plain patches")
    train.add_argument("--no-resume", action="store_true", help="start over even if OUT/last.pt exists")
    train.add_argument("--no-amp", action="store_true", help="full precision on CUDA")
    train.add_argument("--free-at", action="store_true",
                       help="Free adversarial training (Shafahi et al. 2019): each batch replayed --free-at-replays "
                            "times with a carried-over perturbation; every replay counts as one step")
    train.add_argument("--free-at-eps", type=float, default=8.0,
                       help="Free AT eps in 1/255 of each channel's valid (clipped, z-scored) range "
                            "(default %(default)s, i.e. 8/255)")
    train.add_argument("--free-at-replays", type=int, default=5, help="Free AT replays m (default %(default)s)")
    train.add_argument("--init-from", type=Path, metavar="CKPT",
                       help="start from this ROG checkpoint's weights with a fresh optimizer and lr schedule "
                            "(fine-tuning, e.g. with --free-at); its plan must have the same labels, channels and "
                            "network")
    _run_args(train)
    train.set_defaults(func=run_train)

    predict = verbs.add_parser("predict", help="segment volume(s) with a trained checkpoint")
    predict.add_argument("--model", required=True, type=Path, help="ROG checkpoint (best.pt)")
    predict.add_argument("--image", required=True, type=Path, nargs="+",
                         help="image file (one per channel, or a 4-D file), or one folder of images")
    predict.add_argument("--out", required=True, type=Path,
                         help=".seg.nrrd (named segments) or a label map (.nrrd, .nii.gz, ...); a folder for a folder")
    predict.add_argument("--format", default=".seg.nrrd", choices=SEGMENTATION_EXTENSIONS,
                         help="output extension when --out is a folder (default %(default)s)")
    predict.add_argument("--probabilities", type=Path, help="also write class probabilities (4-D .nii.gz/.nrrd)")
    predict.add_argument("--batch-size", type=int, default=2, help="windows per batch (default %(default)s)")
    predict.add_argument("--overlap", type=float, default=0.5, help="window overlap 0-1 (default %(default)s)")
    predict.add_argument("--no-postprocess", action="store_true", help="skip largest-component / small-lesion rules")
    _run_args(predict)
    predict.set_defaults(func=run_predict)

    evaluate = verbs.add_parser("evaluate", help="Dice and HD95 per label of predictions vs reference labels")
    evaluate.add_argument("--pred", required=True, type=Path, help="prediction file or folder")
    evaluate.add_argument("--labels", required=True, type=Path, help="reference label map file or folder")
    evaluate.add_argument("--model", type=Path, help="checkpoint whose label names to use")
    evaluate.add_argument("--plan", type=Path, help="plan.json whose label names to use")
    evaluate.add_argument("--out", type=Path, help="write the scores to .json or .csv")
    evaluate.set_defaults(func=run_evaluate)


def _data_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, help="dataset folder in the MSD layout (dataset.json, imagesTr, labelsTr)")
    parser.add_argument("--images", type=Path, nargs="+", help="image files (instead of --data)")
    parser.add_argument("--labels", type=Path, nargs="+", help="label maps, one per image, same order")
    parser.add_argument("--label-names", nargs="+", metavar="VALUE=NAME", help="e.g. 1=liver 2='liver tumour'")
    parser.add_argument("--modality", nargs="+", help="channel names, e.g. CT (selects CT normalisation) or T2 ADC")
    parser.add_argument("--label-kinds", nargs="+", metavar="VALUE=KIND",
                        help="organ (keep the largest component) or lesion (merge small components) per label, "
                             "e.g. 1=organ,2=lesion (default: lesion when the name says tumour/lesion/...)")


def _run_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None, help="auto (default), cpu, cuda, cuda:N or mps")
    parser.add_argument("--threads", type=int, help="torch CPU threads (1 is often fastest for small volumes)")


def _is_main_rank() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


@contextlib.contextmanager
def _progress(description: str) -> Iterator[Optional[ProgressCallback]]:
    """A tqdm bar on the main rank, nothing on the others."""
    if not _is_main_rank():
        yield None
        return
    with tqdm_progress(description) as callback:
        yield callback


def _dataset_source(args: argparse.Namespace):
    """The --data folder or (image, label) pairs, with any --label-names / --modality overrides."""
    from ..rog.plan import DatasetSpec, read_msd_dataset

    if (args.data is None) == (args.images is None):
        raise InputError("give either --data FOLDER or --images ... --labels ...")
    if args.data is not None:
        if not args.data.is_dir():
            raise InputError(f"--data {args.data} is not a folder")
        spec = read_msd_dataset(args.data)
    else:
        if not args.labels or len(args.labels) != len(args.images):
            raise InputError(f"--labels needs one file per image ({len(args.images)} images, "
                             f"{len(args.labels or [])} label maps)")
        spec = DatasetSpec([((img,), lab) for img, lab in zip(args.images, args.labels)])
    if args.label_names:
        spec.label_names = {0: "background", **_parse_label_names(args.label_names)}
    if args.modality:
        spec.modalities = list(args.modality)
    if args.label_kinds:
        spec.label_kinds = _parse_label_kinds(args.label_kinds)
    return spec


def _parse_label_names(items: Sequence[str]) -> Dict[int, str]:
    out: Dict[int, str] = {}
    for item in items:
        value, sep, name = item.partition("=")
        if not sep or not value.strip().isdigit() or not name.strip():
            raise InputError(f"--label-names entries look like 1=liver, got {item!r}")
        out[int(value)] = name.strip()
    return out


def _parse_label_kinds(items: Sequence[str]) -> Dict[int, str]:
    """``["1=organ,2=lesion"]`` (commas and/or spaces) -> ``{1: "organ", 2: "lesion"}``."""
    out: Dict[int, str] = {}
    for item in (part.strip() for entry in items for part in entry.split(",")):
        if not item:
            continue
        value, sep, kind = item.partition("=")
        kind = kind.strip().lower()
        if not sep or not value.strip().isdigit() or kind not in ("organ", "lesion"):
            raise InputError(f"--label-kinds entries look like 1=organ or 2=lesion, got {item!r}")
        out[int(value)] = kind
    return out


def plan_output_path(out: str) -> Path:
    """--out of ``rog plan``: a file, or FOLDER/plan.json for an existing folder or a path ending in /."""
    path = Path(out)
    if out.endswith(("/", os.sep)) or path.is_dir():
        return path / "plan.json"
    return path


def run_plan(args: argparse.Namespace) -> int:
    from ..rog.plan import plan_dataset

    out = plan_output_path(str(args.out))
    spec = _dataset_source(args)
    with _progress("planning") as progress:
        plan = plan_dataset(spec, memory_budget_bytes=int(args.memory_gb * 2 ** 30), batch_size=args.batch_size,
                            progress=progress)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(plan.to_dict(), indent=2), encoding="utf-8")
    print(f"plan for {plan.num_cases} case(s): spacing {plan.target_spacing_zyx} mm (z, y, x), patch "
          f"{plan.patch_size}, total stride {plan.total_stride}, labels "
          f"{[(lb.value, lb.name, lb.kind) for lb in plan.labels]}; wrote {out}")
    return 0


def run_train(args: argparse.Namespace) -> int:
    from ..rog.data import Augmentation
    from ..rog.train import train_rog

    source = _dataset_source(args)
    with torch_threads(args.threads), _progress("training ROG") as progress:
        result = train_rog(source, args.out, args.epochs, plan=args.plan, steps_per_epoch=args.steps_per_epoch,
                           batch_size=args.batch_size, lr=args.lr, patience=args.patience,
                           val_fraction=args.val_fraction, seed=args.seed, num_workers=args.workers,
                           augmentation=None if args.no_augment else Augmentation(), cache_dir=args.cache,
                           resume=not args.no_resume, amp=not args.no_amp, free_at=args.free_at,
                           free_at_eps=args.free_at_eps / 255.0, free_at_replays=args.free_at_replays,
                           init_from=args.init_from, device=args.device, progress=progress)
    if _is_main_rank():
        last = result.history[-1] if result.history else {}
        dice = " ".join(f"{k[5:]} {v:.3f}" for k, v in last.items() if k.startswith("dice_") and k != "dice_mean")
        print(f"trained {result.epochs_completed} epoch(s)" + (" with Free AT" if args.free_at else "")
              + f" in {result.seconds:.1f} s"
              + (" (stopped early: lr plateau)" if result.stopped_early else "")
              + f"; last validation Dice: {dice or '-'}; best mean Dice {result.best_dice or 0:.3f}")
        print(f"an epoch was {args.steps_per_epoch} step(s); one pass over the training cases (the reference code's "
              f"epoch) is {result.reference_steps_per_epoch} (--steps-per-epoch to match it)")
        print(f"weights sha256 {result.weights_sha256[:16]}; wrote {result.best_path} and {result.last_path}")
    return 0


def _case_name(path: Path) -> str:
    ext = file_extension(path)
    return path.name[: -len(ext)] if ext else path.name


def _image_cases(paths: Sequence[Path]) -> List[Tuple[str, List[Path]]]:
    """Files given -> one case; a folder -> one case per file, nnU-Net ``_0000`` channel files grouped."""
    if len(paths) == 1 and paths[0].is_dir():
        groups: Dict[str, List[Path]] = {}
        for f in sorted(paths[0].iterdir()):
            if f.is_file() and file_extension(f) in IMAGE_EXTENSIONS:
                match = CHANNEL_FILE.match(_case_name(f))
                groups.setdefault(match["case"] if match else _case_name(f), []).append(f)
        if not groups:
            raise InputError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {paths[0]}")
        return sorted(groups.items())
    for p in paths:
        require_extension(p, IMAGE_EXTENSIONS)
    match = CHANNEL_FILE.match(_case_name(paths[0]))
    return [(match["case"] if match else _case_name(paths[0]), list(paths))]


def run_predict(args: argparse.Namespace) -> int:
    from ..rog.infer import labels_to_segmentation, load_rog, predict_volume
    from ..rog.preprocess import read_channels

    cases = _image_cases(args.image)
    folder = len(args.image) == 1 and args.image[0].is_dir()
    if folder:
        args.out.mkdir(parents=True, exist_ok=True)
        if args.probabilities:
            raise InputError("--probabilities is for a single image, not a folder")
    else:
        require_extension(args.out, SEGMENTATION_EXTENSIONS, "output segmentation")
    rog = load_rog(args.model)
    with torch_threads(args.threads):
        for name, files in cases:
            channels = [ch for f in files for ch in read_channels(f)]
            with _progress(f"segmenting {name}") as progress:
                labels, probs = predict_volume(channels, rog, device=args.device, batch_size=args.batch_size,
                                               overlap=args.overlap, postprocess=not args.no_postprocess,
                                               return_probabilities=args.probabilities is not None,
                                               progress=progress)
            out = args.out / f"{name}{args.format}" if folder else args.out
            if file_extension(out) == ".seg.nrrd":
                write_segmentation(labels_to_segmentation(labels, rog.plan), out)
            else:  # a label map keeps the dataset's label values
                write_image(labels, out)
            if probs is not None:
                _write_probabilities(probs, labels, args.probabilities)
            found = [lb.name for lb in rog.plan.labels[1:] if (labels.array == lb.value).any()]
            print(f"{name}: wrote {out} (segments found: {', '.join(found) or 'none'})")
    return 0


def _write_probabilities(probs: np.ndarray, grid: Image, path: Path) -> None:
    """Class probabilities as a 4-D image (classes last in ITK's order) on the input grid."""
    import SimpleITK as sitk

    from ..core.imageio import atomic_output, to_sitk

    require_extension(path, IMAGE_EXTENSIONS, "probability map")
    volumes = [to_sitk(grid.with_array(p.astype(np.float32))) for p in probs]
    with atomic_output(path) as tmp:
        sitk.WriteImage(sitk.JoinSeries(volumes), str(tmp), True)


def _label_names(args: argparse.Namespace) -> Optional[Dict[int, str]]:
    from ..rog.infer import load_rog
    from ..rog.train import load_plan

    if args.model:
        return load_rog(args.model).label_names
    if args.plan:
        return {lb.value: lb.name for lb in load_plan(args.plan).labels}
    return None


def _read_labels(path: Path, names: Optional[Dict[int, str]]) -> Image:
    """A label-value map from a label image, or from a .seg.nrrd by segment name."""
    if file_extension(path) != ".seg.nrrd":
        return read_image(path)
    seg = read_segmentation(path)
    by_name = {n: v for v, n in (names or {}).items()}
    out = np.zeros(seg.geometry.shape, np.uint16)
    for segment in seg.segments:
        generic = re.fullmatch(r"Label (\d+)", segment.name)
        value = by_name.get(segment.name, int(generic[1]) if generic else None)
        if value is None:
            raise InputError(f"{path}: segment {segment.name!r} is not a label of the model; pass --model or --plan")
        out[segment.mask] = value
    return seg.geometry.with_array(out)


def _pairs(pred: Path, labels: Path) -> List[Tuple[str, Path, Path]]:
    if pred.is_file() and labels.is_file():
        return [(_case_name(labels), pred, labels)]
    if not (pred.is_dir() and labels.is_dir()):
        raise InputError("--pred and --labels must both be files or both be folders")
    refs = {_case_name(f): f for f in labels.iterdir() if f.is_file() and file_extension(f) in SEGMENTATION_EXTENSIONS}
    out = [(_case_name(f), f, refs[_case_name(f)]) for f in sorted(pred.iterdir())
           if f.is_file() and _case_name(f) in refs]
    if not out:
        raise InputError(f"no prediction in {pred} has a reference label map of the same name in {labels}")
    return out


def run_evaluate(args: argparse.Namespace) -> int:
    from ..rog.evaluate import label_values, score_case, summarize

    names = _label_names(args)
    pairs = _pairs(args.pred, args.labels)
    loaded = [(name, _read_labels(p, names), _read_labels(r, names)) for name, p, r in pairs]
    values = label_values(names, [ref for _, _, ref in loaded])
    cases = [score_case(name, pred, ref, list(values)) for name, pred, ref in loaded]
    summary = summarize(cases, values)
    print(f"{len(cases)} case(s)")
    for name, row in summary.items():
        print(f"  {name:<20} Dice {row['dice_mean']:.4f} +- {row['dice_std']:.4f}   HD95 {row['hd95_mean_mm']:.2f} mm"
              f"   ({int(row['cases'])} case(s))")
    per_case = [c.foreground_dice for c in cases]
    print(f"  mean foreground Dice per case: {np.mean(per_case):.4f} +- {np.std(per_case):.4f} "
          f"(min {np.min(per_case):.4f})")
    if args.out:
        _write_scores(args.out, cases, values, summary)
        print(f"wrote {args.out}")
    return 0


def _write_scores(path: Path, cases, values: Dict[int, str], summary: Dict[str, Dict[str, float]]) -> None:
    if path.suffix.lower() == ".csv":
        with path.open("w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["case", "label", "value", "dice", "hd95_mm"])
            for case in cases:
                for value, s in case.scores.items():
                    writer.writerow([case.name, values.get(value, value), value, s["dice"], s["hd95"]])
        return
    if path.suffix.lower() != ".json":
        raise InputError(f"--out must end in .json or .csv, got {path.name}")
    data = {"summary": summary,
            "cases": {c.name: {values.get(v, str(v)): s for v, s in c.scores.items()} for c in cases},
            "foreground_dice": {c.name: c.foreground_dice for c in cases}}
    path.write_text(json.dumps(data, indent=2, default=str), encoding="utf-8")
