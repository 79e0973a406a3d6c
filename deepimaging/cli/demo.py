"""``deepimaging demo``: run every method's main job on built-in data (what ``make demo`` runs).

Each method contributes ``deepimaging.<method>.demo.run_demo(out_dir, device) -> list[str]``
(the lines to print); the steps run in the order below.
"""

from __future__ import annotations

import argparse
import importlib
import time
from pathlib import Path

DEMO_STEPS = ("levelset", "nirst", "rog", "gls")


def register(methods: argparse._SubParsersAction) -> None:
    parser = methods.add_parser("demo", help="run the built-in demonstration of every method")
    parser.add_argument("--out", type=Path, default=Path("demo-output"), help="output folder (default %(default)s)")
    parser.add_argument("--device", default=None, help="auto (default), cpu, cuda, cuda:N or mps")
    parser.add_argument("--only", choices=DEMO_STEPS, action="append", help="run only this step (repeatable)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    for step in args.only or DEMO_STEPS:
        try:
            module = importlib.import_module(f"deepimaging.{step}.demo")
        except ModuleNotFoundError as exc:
            if exc.name in (f"deepimaging.{step}", f"deepimaging.{step}.demo"):
                continue  # method without a demo yet
            raise
        t = time.perf_counter()
        print(f"[{step}] running ...", flush=True)
        for line in module.run_demo(out, device=args.device):
            print(f"[{step}] {line}", flush=True)
        print(f"[{step}] done in {time.perf_counter() - t:.1f} s", flush=True)
    print(f"demo finished in {time.perf_counter() - start:.1f} s; results are in {out}")
    return 0
