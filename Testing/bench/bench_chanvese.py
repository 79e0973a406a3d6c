"""Chan-Vese speed, side by side: ours (torch and numba) vs scikit-image vs SimpleITK, one run, ratios printed.

Not part of the test run (run ``make bench`` or ``python Testing/bench/bench_chanvese.py``).
Every contender gets the same image, the same initial level set and the same number of
iterations (convergence tests off).  Repeats run round-robin (each repeat times every
contender once), so machine load hits all of them alike; we print the best wall time and
ratios of the best and of the median times.  Ours runs twice: the torch path (the reference)
and the optional fused numba kernel (``backend="numba"``; its JIT compile or cache load is done
by a warm-up before timing and printed apart).  On 2D we also report the Dice between our
results and scikit-image's (same algorithm).  SimpleITK's ScalarChanAndVeseDenseLevelSetImageFilter
uses its own dense update and parameters (curvature weight, epsilon, no user dt), so it is
compared on speed only.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch


def case(shape, seed=0):
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    truth = sum(g ** 2 for g in grids) < 0.5 ** 2
    image = (truth + rng.normal(0, 0.4, shape)).astype(np.float32)
    init = sum(g ** 2 for g in grids) < 0.3 ** 2
    from deepimaging.levelset import signed_distance
    return image, signed_distance(init) / 10.0


def race(contenders, repeats):
    """Time each ``name -> fn`` ``repeats`` times, round-robin; {name: (best s, median s, last result)}."""
    times = {name: [] for name in contenders}
    results = {}
    for _ in range(repeats):
        for name, fn in contenders.items():
            t = time.perf_counter()
            results[name] = fn()
            times[name].append(time.perf_counter() - t)
    return {name: (min(ts), float(np.median(ts)), results[name]) for name, ts in times.items()}


def run_ours(image, phi0, iterations, device, backend="torch"):
    from deepimaging.levelset import ChanVeseParams, chan_vese

    res = chan_vese(image, phi0, ChanVeseParams(max_iterations=iterations, tolerance=0.0), device=device,
                    backend=backend)
    if res.phi.is_cuda:
        torch.cuda.synchronize()
    return res.mask.cpu().numpy()


def run_skimage(image, phi0, iterations):
    from skimage.segmentation import chan_vese

    # The very array ours gets: float32 stays float32 in scikit-image, integer images
    # (int16, as CT/MRI come) are computed in float64 there.
    return chan_vese(image, mu=0.25, dt=0.5, tol=0.0, max_num_iter=iterations, init_level_set=phi0)


def run_sitk(image, phi0, iterations):
    import SimpleITK as sitk

    f = sitk.ScalarChanAndVeseDenseLevelSetImageFilter()
    f.SetNumberOfIterations(iterations)
    f.SetMaximumRMSError(0.0)
    f.SetUseImageSpacing(False)
    f.SetEpsilon(1.0)
    f.SetCurvatureWeight(0.25)
    f.SetLambda1(1.0)
    f.SetLambda2(1.0)
    init = sitk.GetImageFromArray(phi0.astype(np.float32))
    img = sitk.GetImageFromArray(image.astype(np.float32))
    out = f.Execute(init, img)
    return sitk.GetArrayFromImage(out) > 0


def numba_status(device):
    """(usable, description) of the optional numba backend."""
    if torch.device(device).type != "cpu":
        return False, "numba: CPU only"
    try:
        import numba
    except ImportError:
        return False, "numba: not installed"
    t = time.perf_counter()
    run_ours(np.zeros((64, 64), np.float32), np.ones((64, 64), np.float32), 2, device, "numba")
    return True, f"numba {numba.__version__} (first call incl. compile or cache load {time.perf_counter() - t:.1f} s)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sizes", default="256x256,512x512,128x128x128")
    parser.add_argument("--dtypes", default="float32,int16",
                        help="input array types given to every contender (int16: the image x 1000, as CT/MRI come)")
    parser.add_argument("--no-sitk", action="store_true", help="skip SimpleITK (slow on 3D)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch (and so numba) threads; 0 keeps torch's default (all cores)")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    from deepimaging.core.metrics import dice

    has_numba, numba_text = numba_status(args.device)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, cores {os.cpu_count()}, "
          f"device {args.device}, {args.iterations} iterations, best of {args.repeats} (round-robin); {numba_text}")
    print(f"{'size':>13} {'input':>7} {'torch s':>8} {'numba s':>8} {'skimage s':>9} {'sitk s':>7} "
          f"{'sk/torch':>8} {'sk/numba':>8} {'(median)':>8} {'sitk/numba':>10} {'Dice(torch,sk)':>14} "
          f"{'Dice(numba,sk)':>14} {'Dice(numba,torch)':>17}")
    nan = (float("nan"), float("nan"), None)
    for spec, dtype in [(s, d) for s in args.sizes.split(",") for d in args.dtypes.split(",")]:
        shape = tuple(int(s) for s in spec.split("x"))
        image, phi0 = case(shape)
        if dtype == "int16":
            image = np.round(image * 1000).astype(np.int16)
        contenders = {"torch": lambda: run_ours(image, phi0, args.iterations, args.device, "torch")}
        if has_numba:
            contenders["numba"] = lambda: run_ours(image, phi0, args.iterations, args.device, "numba")
        if len(shape) == 2:
            contenders["skimage"] = lambda: run_skimage(image, phi0, args.iterations)
        run_ours(image, phi0, 5, args.device, "torch")  # warm-ups (allocator, CUDA context, numba kernels)
        if has_numba:
            run_ours(image, phi0, 5, args.device, "numba")
        timed = race(contenders, args.repeats)
        timed["sitk"] = nan
        if not args.no_sitk:
            try:  # slow in 3D: one run there
                timed.update(race({"sitk": lambda: run_sitk(image, phi0, args.iterations)},
                                  1 if len(shape) == 3 else args.repeats))
            except ImportError:  # e.g. on a GPU machine without SimpleITK
                pass
        for name in ("numba", "skimage"):
            timed.setdefault(name, nan)
        t = {name: v[0] for name, v in timed.items()}
        med = {name: v[1] for name, v in timed.items()}
        masks = {name: v[2] for name, v in timed.items()}

        def agree(a, b):
            return f"{dice(masks[a], masks[b]):.4f}" if masks[a] is not None and masks[b] is not None else "-"

        def ratio(slow, fast, width):
            return f"{slow / fast:{width - 1}.1f}x" if np.isfinite(slow / fast) else f"{'-':>{width}}"

        print(f"{spec:>13} {dtype:>7} {t['torch']:8.3f} {t['numba']:8.3f} {t['skimage']:9.3f} {t['sitk']:7.2f} "
              f"{ratio(t['skimage'], t['torch'], 8)} {ratio(t['skimage'], t['numba'], 8)} "
              f"{ratio(med['skimage'], med['numba'], 8)} {ratio(t['sitk'], t['numba'], 10)} "
              f"{agree('torch', 'skimage'):>14} {agree('numba', 'skimage'):>14} {agree('numba', 'torch'):>17}")


if __name__ == "__main__":
    main()
