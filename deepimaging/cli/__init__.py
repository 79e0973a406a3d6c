"""The ``deepimaging`` command: ``deepimaging <method> <verb> ...``.

Each method registers its verbs in its own file here (``levelset.py``, ...), and every verb
is a thin layer of argument parsing and file I/O around one pipeline function — the same
function the Slicer modules call.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import List, Optional

from ..core.errors import DeepImagingError
from ..core.progress import Cancelled


# One file per method in this package, each with ``register(subparsers)``.
COMMAND_MODULES = ("levelset", "nirst", "rog", "gls", "robustness", "demo")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deepimaging", description="SlicerDeepImaging pipelines from the shell.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more detail")
    methods = parser.add_subparsers(dest="method", metavar="<method>", required=True)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"{__name__}.{name}":
                continue  # that method's commands are not part of this build yet
            raise
        module.register(methods)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return int(args.func(args) or 0)
    except (DeepImagingError, ValueError, FileNotFoundError) as exc:
        print(f"deepimaging: error: {exc}", file=sys.stderr)
        return 2
    except (Cancelled, KeyboardInterrupt):
        print("deepimaging: cancelled", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
