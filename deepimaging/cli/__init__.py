"""The ``deepimaging`` command: ``deepimaging <method> <verb> ...``.

Each method registers its verbs in its own file here (``levelset.py``, ...), and every verb
is a thin layer of argument parsing and file I/O around one pipeline function — the same
function the Slicer modules call.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import List, Optional

from ..core.errors import DeepImagingError
from ..core.progress import Cancelled


def build_parser() -> argparse.ArgumentParser:
    from . import demo, levelset

    parser = argparse.ArgumentParser(prog="deepimaging", description="SlicerDeepImaging pipelines from the shell.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more detail")
    methods = parser.add_subparsers(dest="method", metavar="<method>", required=True)
    for module in (levelset, demo):
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
