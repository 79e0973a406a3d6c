"""``deepimaging gls train | predict | compare``: GLS keypoint-guided B-scan segmentation from the shell.

The Slicer module runs ``deepimaging gls train`` in a background process with
``DEEPIMAGING_PROGRESS=lines`` (``PROGRESS <fraction> <message>`` lines on stdout).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Dict

from ..core.device import torch_threads
from ..core.errors import InputError
from ..core.image import Image
from ..core.imageio import atomic_output, file_extension, from_sitk, require_extension
from ..core.progress import tqdm_progress
from ..core.segfile import SEGMENTATION_EXTENSIONS, write_segmentation

ARCH_CHOICES = ("gls", "global", "unet", "unetpp", "cenet")


def register(methods: argparse._SubParsersAction) -> None:
    parser = methods.add_parser("gls", help="GLS global + keypoint-guided local segmentation of 2D B-scans")
    verbs = parser.add_subparsers(dest="verb", metavar="<verb>", required=True)

    train = verbs.add_parser("train", help="train GLS (three stages) or a baseline -> OUT/best.pt")
    _data_args(train)
    train.add_argument("--out", required=True, type=Path, help="output folder for best.pt, last.pt, training_log.csv")
    train.add_argument("--arch", default="gls", choices=ARCH_CHOICES, help="architecture (default %(default)s)")
    train.add_argument("--epochs", type=int, default=100,
                       help="total epochs (default %(default)s; GLS splits them 50/25/25 %% over its three stages); "
                            "an epoch is one pass over the training images unless --steps-per-epoch is given")
    train.add_argument("--val-fraction", type=float, default=0.2, help="share of images held out (default %(default)s)")
    train.add_argument("--no-resume", action="store_true", help="start over even if OUT/last.pt exists")
    train.add_argument("--no-augment", action="store_true", help="train without augmentation")
    train.set_defaults(func=run_train)

    predict = verbs.add_parser("predict", help="segment a 2D B-scan or a stack of B-scans (slices along z)")
    predict.add_argument("--model", required=True, type=Path, help="GLS checkpoint (RUN/best.pt)")
    predict.add_argument("--image", required=True, type=Path, help="image file (.png, .nrrd, .nii.gz, ...)")
    predict.add_argument("--out", required=True, type=Path,
                         help="segmentation to write (.seg.nrrd: one segment 'foreground')")
    predict.add_argument("--keypoints-out", type=Path,
                         help="JSON with the keypoints in pixels and in physical LPS millimetres")
    predict.add_argument("--threshold", type=float, default=0.5, help="probability threshold (default %(default)s)")
    _run_args(predict)
    predict.set_defaults(func=run_predict)

    compare = verbs.add_parser("compare", help="train every architecture on one split and compare on held-out images")
    _data_args(compare)
    compare.add_argument("--out", required=True, type=Path, help="folder for comparison.json/.md/.png and models/")
    compare.add_argument("--archs", nargs="+", choices=ARCH_CHOICES, default=list(ARCH_CHOICES),
                         help="architectures to compare (default: all)")
    compare.add_argument("--epochs", type=int, default=30, help="epochs for every architecture (default %(default)s)")
    compare.add_argument("--test-fraction", type=float, default=0.2,
                         help="share of images held out for scoring (default %(default)s)")
    compare.set_defaults(func=run_compare)


def _data_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, type=Path,
                        help="folder with images/NAME.*, masks/NAME.* and optionally keypoints.csv (name,k,x,y)")
    parser.add_argument("--camus", action="store_true",
                        help="read the CAMUS layout (patientNNNN/..._gt.mhd; LV endocardium, K = 1 apex keypoint)")
    parser.add_argument("--keypoints", type=int, help="keypoints K (default 2; 1 with --camus)")
    parser.add_argument("--keypoint-rule", default=None, choices=("iris-tails", "extremes-x", "lv-apex"),
                        help="how keypoints are derived from masks not listed in keypoints.csv "
                             "(default iris-tails; lv-apex with --camus)")
    parser.add_argument("--size", type=int, nargs=2, default=(256, 256), metavar=("H", "W"),
                        help="network input size (default 256 256; multiples of 16, of 32 for cenet)")
    parser.add_argument("--crop-size", type=int, default=96,
                        help="GLS local crop on the network grid (default %(default)s)")
    parser.add_argument("--batch-size", type=int, default=4, help="images per batch (default %(default)s)")
    parser.add_argument("--lr", type=float, default=1e-3,
                        help="initial learning rate, cosine-annealed (default %(default)s; the thesis: 5e-5 over "
                             "500 epochs)")
    parser.add_argument("--steps-per-epoch", type=int, help="optimizer steps per epoch (default: one pass)")
    parser.add_argument("--widths", type=int, nargs=5, metavar="C", default=None,
                        help="five encoder widths (default 16 32 64 128 256, the thesis' Table 1)")
    parser.add_argument("--seed", type=int, default=0)
    _run_args(parser)


def _run_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None, help="auto (default), cpu, cuda, cuda:N or mps")
    parser.add_argument("--threads", type=int, help="torch CPU threads")


def _load_data(args: argparse.Namespace) -> Any:
    """The samples (CAMUS) or the folder, and K / rule resolved for the layout."""
    from ..gls.data import load_camus

    if not args.data.is_dir():
        raise InputError(f"--data {args.data} is not a folder")
    if args.camus:
        if args.keypoints not in (None, 1):
            raise InputError("CAMUS samples carry one keypoint (the LV apex): leave --keypoints out or pass 1")
        if args.keypoint_rule not in (None, "lv-apex"):
            raise InputError("CAMUS keypoints use the lv-apex rule")
        args.keypoints, args.keypoint_rule = 1, "lv-apex"
        return load_camus(args.data)
    args.keypoints = 2 if args.keypoints is None else args.keypoints
    args.keypoint_rule = args.keypoint_rule or "iris-tails"
    return args.data


def _common(args: argparse.Namespace) -> Dict[str, Any]:
    from ..gls.model import DEFAULT_WIDTHS

    return dict(size=tuple(args.size), keypoints=args.keypoints, crop_size=args.crop_size, batch_size=args.batch_size,
                lr=args.lr, seed=args.seed, device=args.device, keypoint_rule=args.keypoint_rule,
                widths=tuple(args.widths or DEFAULT_WIDTHS), steps_per_epoch=args.steps_per_epoch)


def run_train(args: argparse.Namespace) -> int:
    from ..gls.train import Augmentation, train_gls

    data = _load_data(args)
    with torch_threads(args.threads), tqdm_progress(f"training {args.arch}") as progress:
        result = train_gls(data, args.out, arch=args.arch, epochs=args.epochs, val_fraction=args.val_fraction,
                           resume=not args.no_resume, progress=progress,
                           augmentation=None if args.no_augment else Augmentation(), **_common(args))
    last = result.history[-1] if result.history else {}
    extra = "".join(f", {label} {last[key]:.3f}" for key, label in
                    (("val_dice_global", "global-branch Dice"), ("val_keypoint_error_px", "keypoint error px"))
                    if key in last)
    stage = f", stage {result.stage_reached}" if args.arch == "gls" else ""
    print(f"trained {args.arch} for {result.epochs_completed} epoch(s) x {result.steps_per_epoch} step(s) in "
          f"{result.seconds:.1f} s{stage}; last validation Dice {last.get('val_dice', float('nan')):.3f}{extra}")
    print(f"wrote {result.best_path} and {result.last_path}")
    return 0


def read_input_image(path: Path) -> Image:
    """A 2D image or a B-scan stack with its geometry; colour images become grey (2D only)."""
    import SimpleITK as sitk

    from ..gls.data import read_2d

    if not path.is_file():
        raise InputError(f"image file not found: {path}")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
        if reader.GetNumberOfComponents() > 1:
            return read_2d(path, "image")
        return from_sitk(reader.Execute())
    except RuntimeError as exc:
        raise InputError(f"could not read image {path}: {str(exc).strip().splitlines()[-1]}") from exc


def run_predict(args: argparse.Namespace) -> int:
    from ..gls.infer import keypoints_document, load_gls, predict_image

    require_extension(args.out, SEGMENTATION_EXTENSIONS, "output segmentation")
    for path in [args.out] + ([args.keypoints_out] if args.keypoints_out else []):
        if not path.parent.is_dir():
            raise InputError(f"output folder does not exist: {path.parent}")
    if args.keypoints_out and file_extension(args.keypoints_out) != ".json":
        raise InputError(f"--keypoints-out must end in .json, got {args.keypoints_out.name}")
    model = load_gls(args.model, device=args.device)
    image = read_input_image(args.image)
    with torch_threads(args.threads), tqdm_progress("segmenting") as progress:
        pred = predict_image(image, model, device=args.device, threshold=args.threshold, progress=progress)
    document = None
    if args.keypoints_out:
        document = keypoints_document(pred, model, args.model, args.image)
    write_segmentation(pred.to_segmentation(), args.out)
    if document is not None:
        with atomic_output(args.keypoints_out) as tmp:
            tmp.write_text(json.dumps(document, indent=2), encoding="utf-8")
    voxels = int(pred.mask.array.sum())
    also = f" and {args.keypoints_out} ({len(document['keypoints'])} keypoint(s))" if document else ""
    print(f"wrote {args.out} ({image.shape[0]} slice(s), {voxels} foreground pixel(s), {pred.source} output of "
          f"{pred.arch}){also}")
    if document is not None and not document["keypoints"]:
        print(f"note: a {pred.arch} model has no keypoint head; the keypoint list is empty")
    return 0


def run_compare(args: argparse.Namespace) -> int:
    from ..gls.compare import LABELS, compare_archs

    data = _load_data(args)
    with torch_threads(args.threads), tqdm_progress("comparing") as progress:
        summary = compare_archs(data, args.out, archs=args.archs, epochs=args.epochs, test_fraction=args.test_fraction,
                                progress=progress, **_common(args))
    for arch, r in summary["archs"].items():
        kp = "" if r["keypoint_error_px"] is None else f", keypoint error {r['keypoint_error_px']:.2f} px"
        print(f"{LABELS[arch]:>12}: Dice {r['dice']:.4f}, IoU {r['iou']:.4f}, boundary F1 {r['boundary_f1']:.4f}{kp} "
              f"({r['train_seconds']:.1f} s)")
    print(summary["statement"])
    print(f"wrote {args.out / 'comparison.json'}, comparison.md, comparison.png")
    return 0
