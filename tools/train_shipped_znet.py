"""Make the shipped Z-Net (``deepimaging/nirst/weights/znet_default.pt``) and its Y-Net baseline.

Simulate phantoms in shards (stopping early if ``--sim-minutes`` runs out), train Z-Net and
Y-Net with wall-clock budgets, write half-precision exports and run the held-out robustness
cases (:mod:`deepimaging.nirst.robustness_eval`) against DRI.  The defaults are the paper's
budget for a GPU run: 20,000 phantoms, 200 epochs (Adam lr 0.005, batch 128, MSE), on the
``robust`` phantom distribution (issue #11; ``--distribution paper`` for the paper-style set)::

    python tools/train_shipped_znet.py --out OUT [--phantoms 20000] [--epochs 200]
        [--distribution robust] [--sim-minutes 60] [--znet-minutes 120] [--ynet-minutes 120]
        [--workers 16] [--device cuda] [--init-from CKPT] [--archs znet ynet]

Y-Net alone, reproducibly (same data, split and schedule)::

    python tools/train_shipped_znet.py --out OUT --archs ynet

History of the shipped file:

* first version (paper distribution, 10,000 phantoms, 87 epochs in 2.5 min on an H200):
  ``--distribution paper --phantoms 10000 --sim-minutes 4 --znet-minutes 3 --ynet-minutes 1.5``;
  it copied MRI intensity into the optical maps (issue #11);
  it is kept as ``weights/znet_paper.pt`` (``--method znet-paper``);
* the default since issue #11 (robust distribution, CPU fine-tunes from it on 6,000 phantoms,
  no GPU lent): ``docs/nirst/results.md``, section "The shipped default".

Each network's checkpoint header records the data, budget and test metrics of its run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from deepimaging.nirst.simulate import save_dataset, simulate_phantoms
from deepimaging.nirst.train import train_network


def simulate(args: argparse.Namespace, data_dir: Path) -> int:
    """Simulate shards into ``data_dir`` until ``--phantoms`` or ``--sim-minutes``; skip existing shards."""
    data_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    done = 0
    while done < args.phantoms and time.perf_counter() - start < 60 * args.sim_minutes:
        n = min(args.shard, args.phantoms - done)
        path = data_dir / f"phantoms_{args.distribution}_{done:06d}.npz"
        if not path.exists():
            t = time.perf_counter()
            shard = simulate_phantoms(n, seed=args.seed, start=done, workers=args.workers,
                                      distribution=args.distribution)
            save_dataset(path, shard)
            print(f"simulated {done + n} phantoms ({n / (time.perf_counter() - t):.1f}/s)", flush=True)
        done += n
    return done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--phantoms", type=int, default=20000)
    parser.add_argument("--distribution", choices=("paper", "robust"), default="robust")
    parser.add_argument("--shard", type=int, default=2000, help="phantoms per shard file")
    parser.add_argument("--sim-minutes", type=float, default=60.0)
    parser.add_argument("--archs", nargs="+", choices=("znet", "ynet"), default=["znet", "ynet"])
    parser.add_argument("--znet-minutes", type=float, default=120.0)
    parser.add_argument("--ynet-minutes", type=float, default=120.0)
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.005)
    parser.add_argument("--init-from", type=Path, default=None, help="fine-tune Z-Net from this checkpoint")
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-robustness", action="store_true", help="skip the robustness cases (DRI, ~1 min)")
    args = parser.parse_args()
    data_dir = args.out / "data"
    start = time.perf_counter()
    done = simulate(args, data_dir)
    summary = {"command": " ".join(sys.argv), "phantoms": done, "simulation_s": time.perf_counter() - start}
    for arch in args.archs:
        minutes = args.znet_minutes if arch == "znet" else args.ynet_minutes
        result = train_network(data_dir, arch=arch, out_dir=args.out / arch, epochs=args.epochs,
                               batch_size=args.batch_size, lr=args.lr, device=args.device, max_minutes=minutes,
                               log=lambda line: print(line, flush=True), export=args.out / f"{arch}_default.pt",
                               init_from=args.init_from if arch == "znet" else None)
        summary[arch] = {k: v for k, v in result.items() if isinstance(v, (int, float, str, dict, list))}
    if not args.no_robustness and "znet" in args.archs:
        from deepimaging.nirst.recon import DEFAULT_CHECKPOINT, PAPER_CHECKPOINT
        from deepimaging.nirst.robustness_eval import robustness_evaluation

        networks = {"Z-Net (paper training)": PAPER_CHECKPOINT, "Z-Net (shipped)": DEFAULT_CHECKPOINT,
                    "Z-Net (new)": args.out / "znet_default.pt"}
        report = robustness_evaluation(networks, out_dir=args.out / "robustness", log=print)
        summary["robustness_checks"] = report["checks"]
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print(json.dumps(summary, indent=2, default=str))


if __name__ == "__main__":
    main()
