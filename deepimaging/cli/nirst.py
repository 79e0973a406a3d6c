"""``deepimaging nirst simulate | train | evaluate | reconstruct``: MRI-guided NIRST with Z-Net."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from ..core.errors import InputError
from ..core.imageio import IMAGE_EXTENSIONS, read_image, write_image
from ..core.progress import tqdm_progress

OUTPUT_FILE_NAMES = {"HbO": "HbO_uM", "Hb": "Hb_uM", "water": "water_pct", "HbT": "HbT_uM", "StO2": "StO2_pct"}


def register(methods: argparse._SubParsersAction) -> None:
    parser = methods.add_parser("nirst", help="MRI-guided near-infrared spectral tomography (Z-Net)")
    verbs = parser.add_subparsers(dest="verb", metavar="<verb>", required=True)

    sim = verbs.add_parser("simulate", help="simulate paper-style phantoms and their boundary data",
                           description="Simulate N phantoms (FEM diffusion model, 9 wavelengths, 16 optodes).")
    sim.add_argument("--n", type=int, required=True, help="phantoms in the whole dataset")
    sim.add_argument("--seed", type=int, default=0, help="dataset seed (default %(default)s)")
    sim.add_argument("--shard", default=None, help="k/n: simulate only part k (0-based) of n, e.g. 0/4")
    sim.add_argument("--workers", type=int, default=None, help="processes (default: every core)")
    sim.add_argument("--out", type=Path, required=True, help="output .npz file, or a folder for shard files")
    sim.add_argument("--element-size", type=float, default=1.0, help="FEM element size in mm (default %(default)s)")
    sim.add_argument("--noise", type=float, default=0.02, help="relative amplitude noise (default %(default)s)")
    sim.set_defaults(func=run_simulate)

    train = verbs.add_parser("train", help="train Z-Net or Y-Net on a simulated dataset")
    train.add_argument("--data", type=Path, required=True, help="dataset .npz or a folder of shards")
    train.add_argument("--arch", choices=("znet", "ynet"), default="znet")
    train.add_argument("--out", type=Path, required=True, help="folder for best.pt / last.pt")
    train.add_argument("--epochs", type=int, default=200)
    train.add_argument("--batch-size", type=int, default=128)
    train.add_argument("--lr", type=float, default=0.005)
    train.add_argument("--loss", choices=("mse", "l1", "smooth_l1"), default="mse")
    train.add_argument("--schedule", choices=("cosine", "constant"), default="cosine", help="learning-rate schedule")
    train.add_argument("--max-minutes", type=float, default=None, help="wall-clock budget; stops cleanly")
    train.add_argument("--device", default=None, help="auto (default), cpu, cuda, cuda:N or mps")
    train.add_argument("--seed", type=int, default=0, help="initialisation/shuffling seed")
    train.add_argument("--split-seed", type=int, default=0, help="seed of the 70/20/10 split")
    train.add_argument("--no-resume", action="store_true", help="start afresh even if OUT/last.pt exists")
    train.add_argument("--export", type=Path, default=None, help="also write the best weights (fp16) here")
    train.add_argument("--net-config", default=None,
                       help="advanced: JSON of network constructor overrides, e.g. '{\"signal_stem\": 64}'")
    train.set_defaults(func=run_train)

    ev = verbs.add_parser("evaluate", help="compare DRI, Y-Net and Z-Net on the test phantoms")
    ev.add_argument("--data", type=Path, required=True, help="the dataset the networks were trained on")
    ev.add_argument("--znet", type=Path, default=None, help="Z-Net checkpoint")
    ev.add_argument("--ynet", type=Path, default=None, help="Y-Net checkpoint")
    ev.add_argument("--n-test", type=int, default=None, help="first N test phantoms (default: all)")
    ev.add_argument("--n-dri", type=int, default=20, help="phantoms for DRI, ~15 s CPU each (default %(default)s)")
    ev.add_argument("--workers", type=int, default=None, help="DRI processes (default: every core)")
    ev.add_argument("--dri-element-size", type=float, default=2.5, help="DRI mesh size in mm")
    ev.add_argument("--no-8-optodes", action="store_true", help="skip the 8-optode generalisation test")
    ev.add_argument("--figure-phantoms", type=int, default=3, help="phantoms in the comparison figures")
    ev.add_argument("--device", default=None, help="auto (default), cpu, cuda, cuda:N or mps")
    ev.add_argument("--out", type=Path, required=True, help="folder for results.md/.json and the figures")
    ev.set_defaults(func=run_evaluate)

    rec = verbs.add_parser("reconstruct", help="HbO/Hb/water/HbT/StO2 maps from a measurement file and an MRI",
                           description="Measurements: CSV/TXT (values in wavelength, source, detector order) "
                                       "or NPZ with key 'amplitudes'. Maps are written on the MRI's grid.")
    rec.add_argument("--measurements", type=Path, required=True, help=".csv, .txt, .npz or .npy")
    rec.add_argument("--mri", type=Path, required=True, help=f"MRI image ({', '.join(IMAGE_EXTENSIONS)})")
    rec.add_argument("--checkpoint", type=Path, default=None, help="Z-Net/Y-Net checkpoint (default: shipped Z-Net)")
    rec.add_argument("--out-dir", type=Path, required=True)
    rec.add_argument("--format", choices=("nrrd", "nii.gz", "nii"), default="nrrd")
    rec.add_argument("--slice", type=int, default=None, help="slice index (k) of a 3D MRI")
    rec.add_argument("--disk-centre", type=float, nargs=2, metavar=("I", "J"), default=None,
                     help="disk centre in MRI pixel indices (default: the image centre)")
    rec.add_argument("--inclusion-mask", type=Path, default=None,
                     help="label image on the MRI grid: print the HbT contrast inside it")
    rec.add_argument("--device", default=None, help="auto (default), cpu, cuda, cuda:N or mps")
    rec.set_defaults(func=run_reconstruct)


def _parse_shard(text: str):
    try:
        k, n = (int(part) for part in text.split("/"))
    except ValueError:
        raise InputError(f"--shard must look like k/n (e.g. 0/4), got {text!r}") from None
    return k, n


def run_simulate(args: argparse.Namespace) -> int:
    from ..nirst import save_dataset, shard_range, simulate_phantoms

    start, count = 0, args.n
    if args.shard:
        k, n = _parse_shard(args.shard)
        start, count = shard_range(args.n, k, n)
    out = args.out
    if out.suffix != ".npz":
        out.mkdir(parents=True, exist_ok=True)
        out = out / f"nirst-seed{args.seed}-{start:06d}-{start + count:06d}.npz"
    began = time.perf_counter()
    with tqdm_progress(f"simulating {count} phantoms") as progress:
        data = simulate_phantoms(count, seed=args.seed, start=start, noise=args.noise, workers=args.workers,
                                 progress=progress, element_size_mm=args.element_size)
    seconds = time.perf_counter() - began
    path = save_dataset(out, data)
    print(f"simulated phantoms {start}..{start + count - 1} in {seconds:.1f} s: {count / seconds:.2f} phantoms/s; "
          f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)")
    return 0


def run_train(args: argparse.Namespace) -> int:
    from ..nirst.train import train_network

    try:
        net_config = json.loads(args.net_config) if args.net_config else None
    except json.JSONDecodeError as exc:
        raise InputError(f"--net-config is not valid JSON: {exc}") from None
    with tqdm_progress(f"training {args.arch}") as progress:
        summary = train_network(args.data, arch=args.arch, out_dir=args.out, epochs=args.epochs,
                                batch_size=args.batch_size, lr=args.lr, loss=args.loss, device=args.device,
                                resume=not args.no_resume, max_minutes=args.max_minutes, schedule=args.schedule,
                                seed=args.seed, split_seed=args.split_seed, export=args.export,
                                net_config=net_config, progress=progress, log=lambda line: print(line, flush=True))
    print(f"best checkpoint: {summary['best']}")
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    from ..nirst.evaluate import evaluate

    with tqdm_progress("evaluating") as progress:
        result = evaluate(args.data, znet=args.znet, ynet=args.ynet, out_dir=args.out, n_test=args.n_test,
                          n_dri=args.n_dri, device=args.device, workers=args.workers,
                          dri_element_size_mm=args.dri_element_size, eight_optodes=not args.no_8_optodes,
                          n_figure=args.figure_phantoms, progress=progress)
    print(result["markdown"])
    print(f"wrote {args.out / 'results.md'}, results.json and " + ", ".join(p.name for p in result["figures"]))
    return 0


def run_reconstruct(args: argparse.Namespace) -> int:
    from ..nirst.recon import extract_slice, hbt_contrast, load_reconstructor, read_measurements, reconstruct_image

    measurements = read_measurements(args.measurements)
    mri = read_image(args.mri)
    if args.slice is not None:
        mri = extract_slice(mri, args.slice)
    began = time.perf_counter()
    reconstructor = load_reconstructor(args.checkpoint, args.device)
    images = reconstruct_image(measurements, mri, reconstructor=reconstructor,
                               disk_centre_ijk=tuple(args.disk_centre) if args.disk_centre else None)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, image in images.items():
        written.append(write_image(image, args.out_dir / f"{OUTPUT_FILE_NAMES[name]}.{args.format}"))
    print(f"reconstructed with {reconstructor.method} in {time.perf_counter() - began:.2f} s; wrote "
          + ", ".join(p.name for p in written) + f" to {args.out_dir}")
    if args.inclusion_mask is not None:
        mask = read_image(args.inclusion_mask)
        if args.slice is not None and mask.array.shape[0] > 1:
            mask = extract_slice(mask, args.slice)
        mri.require_same_grid(mask, what="inclusion mask", of="MRI")
        contrast = hbt_contrast(images["HbT"].array, np.asarray(mask.array) > 0)
        print(f"HbT contrast inside / outside the mask: {contrast:.3f}")
    return 0
