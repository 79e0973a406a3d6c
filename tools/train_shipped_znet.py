"""Make the shipped Z-Net (``deepimaging/nirst/weights/znet_default.pt``) and its Y-Net baseline.

How the checkpoint in the repository was produced (on a lent GPU machine with 16 CPU cores):
simulate the paper's 20,000 phantoms in shards (stopping early if a time budget runs out),
then train Z-Net and Y-Net with wall-clock budgets, writing half-precision exports.  Usage::

    python tools/train_shipped_znet.py --out OUT [--phantoms 20000] [--sim-minutes 4]
        [--znet-minutes 3] [--ynet-minutes 1.5] [--workers 16] [--device cuda]

Each network's checkpoint header records the data, budget and test metrics of its run.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from deepimaging.nirst.simulate import save_dataset, simulate_phantoms
from deepimaging.nirst.train import train_network


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--phantoms", type=int, default=20000)
    parser.add_argument("--shard", type=int, default=2000, help="phantoms per shard file")
    parser.add_argument("--sim-minutes", type=float, default=4.0)
    parser.add_argument("--znet-minutes", type=float, default=3.0)
    parser.add_argument("--ynet-minutes", type=float, default=1.5)
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    data_dir = args.out / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    done = 0
    while done < args.phantoms and time.perf_counter() - start < 60 * args.sim_minutes:
        n = min(args.shard, args.phantoms - done)
        t = time.perf_counter()
        shard = simulate_phantoms(n, seed=args.seed, start=done, workers=args.workers)
        save_dataset(data_dir / f"phantoms_{done:06d}.npz", shard)
        done += n
        print(f"simulated {done} phantoms ({n / (time.perf_counter() - t):.1f}/s)", flush=True)
    summary = {"phantoms": done, "simulation_s": time.perf_counter() - start}
    for arch, minutes in (("znet", args.znet_minutes), ("ynet", args.ynet_minutes)):
        result = train_network(data_dir, arch=arch, out_dir=args.out / arch, epochs=args.epochs,
                               device=args.device, max_minutes=minutes, log=lambda line: print(line, flush=True),
                               export=args.out / f"{arch}_default.pt")
        summary[arch] = {k: v for k, v in result.items() if isinstance(v, (int, float, str, dict, list))}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print(json.dumps(summary, indent=2, default=str))


if __name__ == "__main__":
    main()
