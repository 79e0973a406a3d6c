"""Installed as ``sitecustomize`` in the Slicer-like virtual environments (see slicerlike.py).

It records every file a process opens inside the source folders of the library and the
modules (``DEEPIMAGING_SLICERLIKE_WATCH``, os.pathsep-separated) into
``DEEPIMAGING_SLICERLIKE_OPENLOG``: an installed extension must never read its sources.
Child processes (training) run the same interpreter, so they are watched too.
"""

import os
import sys


def _install():
    log, watch = os.environ.get("DEEPIMAGING_SLICERLIKE_OPENLOG"), os.environ.get("DEEPIMAGING_SLICERLIKE_WATCH")
    if not (log and watch):
        return
    watched = tuple(os.path.realpath(folder) + os.sep for folder in watch.split(os.pathsep) if folder)

    def audit(event, args):
        if event != "open" or not args or not isinstance(args[0], (str, bytes, os.PathLike)):
            return
        try:
            path = os.path.realpath(os.fsdecode(args[0]))
        except (TypeError, ValueError):
            return
        if path.startswith(watched):
            with open(log, "a", encoding="utf-8") as handle:
                handle.write(path + "\n")

    sys.addaudithook(audit)


_install()
