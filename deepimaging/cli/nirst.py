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

RECONSTRUCT_DESCRIPTION = """\
Reconstruct HbO (uM), Hb (uM), water (%), HbT (uM) and StO2 (%) maps on the MRI's grid.

Measurements: raw positive CW amplitudes (not logarithms), W x N x (N-1) values in the order
wavelength, source, detector: for each of the 9 wavelengths (661, 735, 785, 808, 826, 852, 903,
912, 948 nm), each optode k = 0..N-1 as source, the other optodes as detectors in increasing
number. 2160 values for 16 optodes, 504 for 8 (on a 16-optode network the missing pairs are
interpolated; DRI uses an 8-optode model). CSV/TXT are read row by row, left to right (e.g. 144
rows = 9 wavelengths x 16 sources, 15 detector columns); NPZ: key 'amplitudes'.

Optode ring: optode k sits at angle OFFSET + s * 360 k / N degrees on a ring of DIAMETER mm,
s = +1 for --winding ccw, -1 for cw. Angles are measured in the MRI slice plane from the
physical axis u towards v: axial slice u = patient's left (LPS +x), v = posterior (LPS +y);
coronal u = left, v = superior; sagittal u = posterior, v = superior. Default (the shipped
network's ring, read from its checkpoint): 82 mm, 16 optodes, optode 0 at 0 deg (patient's left
of the centre on an axial slice), ccw = from left towards posterior, which is clockwise on
Slicer's axial view. The disk centre is a physical point (default: the slice centre); the MRI's
origin, spacing and direction are all honoured. Z-Net accepts another offset or winding by
re-numbering the optodes (and rotating its grid), but not another diameter (use --method dri).

Calibration: the networks and DRI read amplitudes on the simulator's absolute scale. With a
homogeneous phantom measured on the same system: --reference FILE --reference-medium HBO HB
WATER (each channel scaled by model/reference, NIRFAST style). With only the known background:
--background HBO HB WATER (one scale per wavelength; --per-optode-coupling also fits a factor
per source and detector). Uncalibrated data more than 33x off the model are refused.
"""

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
    sim.add_argument("--distribution", choices=("paper", "robust"), default="paper",
                     help="paper: the paper's discrete levels and fixed MRI contrast (default); robust: continuous "
                          "values, random MRI contrast/bias/texture, MRI-only and optics-only lesions")
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
    train.add_argument("--init-from", type=Path, default=None,
                       help="fine-tune from this checkpoint's weights (keeps its normalisation), e.g. the shipped Z-Net")
    train.add_argument("--net-config", default=None,
                       help="advanced: JSON of network constructor overrides, e.g. '{\"signal_stem\": 64}'")
    train.set_defaults(func=run_train)

    ev = verbs.add_parser("evaluate", help="compare DRI, Y-Net and Z-Net on the test phantoms")
    ev.add_argument("--data", type=Path, default=None,
                    help="the dataset the networks were trained on (required unless --robustness)")
    ev.add_argument("--robustness", action="store_true",
                    help="instead: the held-out robustness cases (MRI-only / optics-only lesion, off-level tissue, "
                         "two inclusions, brighter MRI) for the networks given and DRI; writes robustness.md/.json")
    ev.add_argument("--znet-old", type=Path, default=None,
                    help="with --robustness: a second Z-Net shown beside --znet (e.g. the previously shipped one)")
    ev.add_argument("--no-dri", action="store_true", help="with --robustness: skip DRI")
    ev.add_argument("--all-phantoms", action="store_true",
                    help="--data is a held-out set (another seed): use all its phantoms, not the test split")
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

    rec = verbs.add_parser(
        "reconstruct", help="HbO/Hb/water/HbT/StO2 maps from a measurement file and an MRI (Z-Net or DRI)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=RECONSTRUCT_DESCRIPTION)
    rec.add_argument("--measurements", type=Path, required=True, help=".csv, .txt, .npz (key 'amplitudes') or .npy")
    rec.add_argument("--mri", type=Path, required=True, help=f"MRI image ({', '.join(IMAGE_EXTENSIONS)})")
    rec.add_argument("--method", choices=("znet", "znet-paper", "dri"), default="znet",
                     help="znet: the shipped Z-Net trained on the robust distribution (default, ~0.1 s) or "
                          "--checkpoint; znet-paper: the shipped Z-Net trained on the paper-style distribution "
                          "(leans on MRI intensity, see README); dri: MRI-guided model-based fit (seconds)")
    rec.add_argument("--checkpoint", type=Path, default=None,
                     help="Z-Net/Y-Net checkpoint file for --method znet (default: the shipped Z-Net)")
    rec.add_argument("--out-dir", type=Path, required=True)
    rec.add_argument("--format", choices=("nrrd", "nii.gz", "nii"), default="nrrd")
    rec.add_argument("--slice", type=int, default=None, help="slice index (k) of a 3D MRI")
    geometry = rec.add_argument_group(
        "optode ring (defaults: the network's ring for znet; 82 mm, offset 0, ccw for dri)")
    geometry.add_argument("--diameter", type=float, default=None, metavar="MM", help="ring diameter in mm")
    geometry.add_argument("--n-optodes", type=int, default=None, metavar="N",
                          help="optode count (default: from the number of values, W*N*(N-1))")
    geometry.add_argument("--optode-offset", type=float, default=None, metavar="DEG",
                          help="angle of optode 0 in degrees from the plane's u axis (axial: patient's left)")
    geometry.add_argument("--winding", choices=("ccw", "cw"), default=None,
                          help="numbering direction: ccw = from u towards v (axial: left towards posterior)")
    geometry.add_argument("--disk-centre-ras", type=float, nargs=3, metavar=("R", "A", "S"), default=None,
                          help="disk centre, physical RAS mm as Slicer shows it (default: the slice centre)")
    geometry.add_argument("--disk-centre-ijk", "--disk-centre", type=float, nargs=2, metavar=("I", "J"), default=None,
                          help="disk centre as a pixel (i, j) of the slice instead (--disk-centre is the older name)")
    cal = rec.add_argument_group("calibration (see the description)")
    cal.add_argument("--reference", type=Path, default=None, metavar="FILE",
                     help="amplitudes of a homogeneous phantom measured with the same system (same layout)")
    cal.add_argument("--reference-medium", type=float, nargs=3, metavar=("HBO", "HB", "WATER"), default=None,
                     help="the phantom's HbO uM, Hb uM, water %%")
    cal.add_argument("--reference-mua", type=float, nargs="+", metavar="MUA", default=None,
                     help="or the phantom's mu_a per wavelength, 1/mm")
    cal.add_argument("--reference-musp", type=float, nargs="+", metavar="MUSP", default=None,
                     help="with --reference-mua: its mu_s' per wavelength, 1/mm (default: the simulator's)")
    cal.add_argument("--background", type=float, nargs=3, metavar=("HBO", "HB", "WATER"), default=None,
                     help="no reference: the known background HbO uM, Hb uM, water %%; fits a scale per wavelength")
    cal.add_argument("--per-optode-coupling", action="store_true",
                     help="with --background: also fit a coupling factor per source and per detector")
    cal.add_argument("--no-scale-check", action="store_true",
                     help="reconstruct even when the amplitudes are far off the model's scale")
    rec.add_argument("--expected-noise", type=float, default=0.02, metavar="FRACTION",
                     help="Z-Net data-consistency check: the measurement noise to expect (default 0.02, the "
                          "simulations'); a data misfit of the maps above 2.5x this warns that MRI and optics "
                          "disagree; 0 turns the check off")
    rec.add_argument("--dri-element-size", type=float, default=2.5, metavar="MM", help="DRI mesh size (default 2.5)")
    rec.add_argument("--dri-iterations", type=int, default=6, help="DRI Gauss-Newton iterations (default 6)")
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
        label = "" if args.distribution == "paper" else f"-{args.distribution}"
        out = out / f"nirst{label}-seed{args.seed}-{start:06d}-{start + count:06d}.npz"
    began = time.perf_counter()
    with tqdm_progress(f"simulating {count} phantoms") as progress:
        data = simulate_phantoms(count, seed=args.seed, start=start, noise=args.noise, workers=args.workers,
                                 progress=progress, element_size_mm=args.element_size,
                                 distribution=args.distribution)
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
                                net_config=net_config, progress=progress, log=lambda line: print(line, flush=True),
                                init_from=args.init_from)
    print(f"best checkpoint: {summary['best']}")
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    from ..nirst.evaluate import evaluate

    if args.robustness:
        return run_robustness(args)
    if args.data is None:
        raise InputError("--data is required (or use --robustness)")

    with tqdm_progress("evaluating") as progress:
        result = evaluate(args.data, znet=args.znet, ynet=args.ynet, out_dir=args.out, n_test=args.n_test,
                          n_dri=args.n_dri, device=args.device, workers=args.workers,
                          dri_element_size_mm=args.dri_element_size, eight_optodes=not args.no_8_optodes,
                          n_figure=args.figure_phantoms, progress=progress, all_phantoms=args.all_phantoms)
    print(result["markdown"])
    print(f"wrote {args.out / 'results.md'}, results.json and " + ", ".join(p.name for p in result["figures"]))
    return 0


def _calibration(args: argparse.Namespace):
    """The --reference / --background flags as a Calibration (None without them)."""
    from ..nirst.calibration import Calibration, Medium
    from ..nirst.recon import read_measurements

    if args.reference is not None and args.background is not None:
        raise InputError("give either --reference (with --reference-medium or --reference-mua) or --background")
    if args.reference is not None:
        if (args.reference_medium is None) == (args.reference_mua is None):
            raise InputError("--reference needs the phantom's properties: --reference-medium HBO HB WATER "
                             "or --reference-mua (one value per wavelength)")
        medium = (Medium(tuple(args.reference_medium)) if args.reference_medium is not None
                  else Medium(mua=tuple(args.reference_mua),
                              musp=tuple(args.reference_musp) if args.reference_musp else None))
        return Calibration(medium, reference=read_measurements(args.reference), per_optode=args.per_optode_coupling)
    if args.reference_medium is not None or args.reference_mua is not None:
        raise InputError("--reference-medium / --reference-mua describe a --reference file; give one")
    if args.background is not None:
        return Calibration(Medium(tuple(args.background)), per_optode=args.per_optode_coupling)
    if args.per_optode_coupling:
        raise InputError("--per-optode-coupling needs --background")
    return None


def run_robustness(args: argparse.Namespace) -> int:
    from ..nirst.recon import DEFAULT_CHECKPOINT, PAPER_CHECKPOINT
    from ..nirst.robustness_eval import robustness_evaluation

    networks = {}
    if args.znet_old is not None:
        networks["Z-Net (old)"] = args.znet_old
    if args.znet is not None:
        networks["Z-Net"] = args.znet
    else:  # both shipped networks
        networks["Z-Net (paper training)"] = PAPER_CHECKPOINT
        networks["Z-Net (robust training)"] = DEFAULT_CHECKPOINT
    if args.ynet is not None:
        networks["Y-Net"] = args.ynet
    result = robustness_evaluation(networks, out_dir=args.out, with_dri=not args.no_dri, device=args.device,
                                   dri_element_size_mm=args.dri_element_size, workers=args.workers)
    print(result["markdown"])
    print(f"wrote {args.out / 'robustness.md'} and robustness.json")
    return 0


def run_reconstruct(args: argparse.Namespace) -> int:
    from ..nirst.geometry import extract_slice
    from ..nirst.pipeline import reconstruct
    from ..nirst.recon import hbt_contrast, load_reconstructor, read_measurements

    measurements = read_measurements(args.measurements)
    calibration = _calibration(args)
    mri = read_image(args.mri)
    if args.slice is not None:
        mri = extract_slice(mri, args.slice)
    centre = None
    if args.disk_centre_ras is not None:
        r, a, s = args.disk_centre_ras
        centre = (-r, -a, s)  # RAS -> LPS
    began = time.perf_counter()
    if args.checkpoint is not None and args.method == "znet-paper":
        raise InputError("--checkpoint picks the network for --method znet; --method znet-paper is the shipped one")
    reconstructor = None
    if args.method != "dri":
        reconstructor = load_reconstructor(args.checkpoint or args.method, args.device)
    with tqdm_progress(f"reconstructing ({args.method})") as progress:
        output = reconstruct(measurements, mri, method=args.method, reconstructor=reconstructor,
                             diameter_mm=args.diameter, n_optodes=args.n_optodes, angle_offset_deg=args.optode_offset,
                             winding=args.winding, disk_centre_lps=centre, disk_centre_ijk=args.disk_centre_ijk,
                             calibration=calibration, scale_check=not args.no_scale_check,
                             dri_element_size_mm=args.dri_element_size, dri_iterations=args.dri_iterations,
                             expected_noise=args.expected_noise, progress=progress)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, image in output.maps.items():
        written.append(write_image(image, args.out_dir / f"{OUTPUT_FILE_NAMES[name]}.{args.format}"))
    for note in output.notes:
        print(note)
    model = f"{reconstructor.method} ({reconstructor.path.name})" if reconstructor is not None else "DRI"
    print(f"reconstructed with {model} in {time.perf_counter() - began:.2f} s; wrote "
          + ", ".join(p.name for p in written) + f" to {args.out_dir}")
    if args.inclusion_mask is not None:
        mask = read_image(args.inclusion_mask)
        if args.slice is not None and mask.array.shape[0] > 1:
            mask = extract_slice(mask, args.slice)
        mri.require_same_grid(mask, what="inclusion mask", of="MRI")
        contrast = hbt_contrast(output.maps["HbT"].array, np.asarray(mask.array) > 0)
        print(f"HbT contrast inside / outside the mask: {contrast:.3f}")
    return 0
