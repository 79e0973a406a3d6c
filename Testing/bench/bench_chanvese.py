"""Chan-Vese speed, side by side: ours (torch) vs scikit-image vs SimpleITK, one run, ratios printed.

Not part of the test run (run ``make bench`` or ``python Testing/bench/bench_chanvese.py``).
Every contender gets the same image, the same initial level set and the same number of
iterations (convergence tests off), and we report the best of ``--repeats`` wall times.
On 2D we also report the Dice between our result and scikit-image's (same algorithm).
SimpleITK's ScalarChanAndVeseDenseLevelSetImageFilter uses its own sparse-field-free dense
update and parameters (curvature weight, epsilon, no user dt), so it is compared on speed only.
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


def best_of(fn, repeats):
    times = []
    result = None
    for _ in range(repeats):
        t = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t)
    return min(times), result


def run_ours(image, phi0, iterations, device):
    from deepimaging.levelset import ChanVeseParams, chan_vese

    res = chan_vese(image, phi0, ChanVeseParams(max_iterations=iterations, tolerance=0.0), device=device)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sizes", default="256x256,512x512,128x128x128")
    parser.add_argument("--dtypes", default="float32,int16",
                        help="input array types given to every contender (int16: the image x 1000, as CT/MRI come)")
    args = parser.parse_args()
    from deepimaging.core.metrics import dice

    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, cores {os.cpu_count()}, "
          f"device {args.device}, {args.iterations} iterations, best of {args.repeats}")
    print(f"{'size':>13} {'input':>8} {'ours s':>8} {'skimage s':>10} {'sitk s':>8} {'skimage/ours':>13} "
          f"{'sitk/ours':>10} {'Dice(ours,sk)':>14}")
    for spec, dtype in [(s, d) for s in args.sizes.split(",") for d in args.dtypes.split(",")]:
        shape = tuple(int(s) for s in spec.split("x"))
        image, phi0 = case(shape)
        if dtype == "int16":
            image = np.round(image * 1000).astype(np.int16)
        run_ours(image, phi0, 5, args.device)  # warm-up (allocator, CUDA context)
        t_ours, m_ours = best_of(lambda: run_ours(image, phi0, args.iterations, args.device), args.repeats)
        try:
            t_sitk, _ = best_of(lambda: run_sitk(image, phi0, args.iterations), 1 if len(shape) == 3 else args.repeats)
        except ImportError:  # e.g. on a GPU machine without SimpleITK
            t_sitk = float("nan")
        if len(shape) == 2:
            t_sk, m_sk = best_of(lambda: run_skimage(image, phi0, args.iterations), args.repeats)
            sk_cols = f"{t_sk:10.3f}"
            ratio_sk = f"{t_sk / t_ours:12.1f}x"
            agreement = f"{dice(m_ours, m_sk):14.4f}"
        else:
            sk_cols, ratio_sk, agreement = f"{'(2D only)':>10}", f"{'-':>13}", f"{'-':>14}"
        print(f"{spec:>13} {dtype:>8} {t_ours:8.3f} {sk_cols} {t_sitk:8.3f} {ratio_sk} {t_sitk / t_ours:9.1f}x {agreement}")


if __name__ == "__main__":
    main()
