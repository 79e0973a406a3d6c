"""Run code as Slicer's Python would: from the install tree, with only Slicer's packages.

``SlicerLikePython(root, workdir).run(module, code)`` runs ``code`` in a virtual environment
made for ``module``: no system site-packages, and links to exactly these packages of the test
environment — what Slicer bundles, torch (PyTorch extension) and the module's on-demand
packages, all three lists read from ``DeepImagingCommonLib.dependencies``, the one place the
extension keeps them.  Everything else (tqdm, scikit-image, psutil, pytest, the editable
``deepimaging`` of the source tree) is simply absent, as in Slicer, for the process and for
the children it starts (they run the same interpreter).  ``sys.path`` starts with the install
tree, a copy of what the extension build installs (see :mod:`cmakelists`).  The interpreter is
newer than Slicer 5.8's Python 3.9; the static checks cover the language version.
"""

import hashlib
import importlib.metadata
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

SUPPORT = Path(__file__).resolve().parent
REPO = SUPPORT.parents[1]
sys.path.insert(0, str(REPO / "DeepImagingCommon"))
from DeepImagingCommonLib import dependencies  # noqa: E402

# slicer-core's compiled MRML: in the tests it stands in for Slicer's own libraries.
SLICER_STAND_INS = ("slicer_core",)

# Plain Python code, run in the child first: the scene wiring of Slicer's application.
HEADLESS_PRELUDE = (
    "from headless import HeadlessSlicer\n"
    "harness = HeadlessSlicer()\n"
    "harness.install()\n"
)


def _distribution_tops(distribution):
    """Top-level entries (packages, modules, ``*.libs``) a distribution installed."""
    tops = set()
    for file in distribution.files or []:
        first = str(file).split("/")[0]
        if first not in ("..", "__pycache__") and not first.endswith((".dist-info", ".pth")):
            tops.add(first)
    return tops


def _import_name(entry):
    return entry.split(".")[0]


def build_environment(destination, allowed):
    """A venv at ``destination`` whose site-packages links only the distributions providing ``allowed``."""
    destination = Path(destination)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(destination)], check=True)
    site = Path(subprocess.run([str(destination / "bin" / "python"), "-c",
                                "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    source = Path(sysconfig.get_paths()["purelib"])
    for distribution in importlib.metadata.distributions(path=[str(source)]):
        tops = _distribution_tops(distribution)
        if not {_import_name(top) for top in tops} & allowed:
            continue
        for entry in tops | {Path(distribution._path).name}:  # the dist-info: versions stay readable
            if (source / entry).exists() and not (site / entry).exists():
                (site / entry).symlink_to(source / entry)
    shutil.copy2(SUPPORT / "slicerlike_sitecustomize.py", site / "sitecustomize.py")
    return destination / "bin" / "python"


class SlicerLikePython:
    """Runs snippets in Slicer-like interpreters rooted at an install tree."""

    def __init__(self, root, workdir, openLog=None):
        self.root = Path(root)
        self.workdir = Path(workdir)
        self.openLog = Path(openLog) if openLog else None
        self._interpreters = {}

    def interpreter(self, module, withoutOnDemand=()):
        """The Python of ``module``'s environment (built once per package set)."""
        allowed = frozenset((dependencies.allowedImports(module) - set(withoutOnDemand)) | set(SLICER_STAND_INS))
        if allowed not in self._interpreters:
            key = hashlib.sha1(",".join(sorted(allowed)).encode()).hexdigest()[:10]
            self._interpreters[allowed] = build_environment(self.workdir / f"venv-{key}", allowed)
        return self._interpreters[allowed]

    def environment(self):
        env = {key: value for key, value in os.environ.items()
               if key not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME", "DEEPIMAGING_PROGRESS")}
        # Slicer puts its qt-scripted-modules folder on sys.path; the test helpers come after it.
        env.update(PYTHONPATH=os.pathsep.join([str(self.root), str(SUPPORT)]), PYTHONNOUSERSITE="1",
                   OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        if self.openLog is not None:
            watched = [REPO / "deepimaging"] + [p for p in REPO.iterdir() if (p / "CMakeLists.txt").is_file()]
            env.update(DEEPIMAGING_SLICERLIKE_OPENLOG=str(self.openLog),
                       DEEPIMAGING_SLICERLIKE_WATCH=os.pathsep.join(str(p) for p in watched))
        return env

    def run(self, module, code, headless=True, timeout=300, withoutOnDemand=()):
        """``subprocess.CompletedProcess`` of ``code`` run for ``module`` (scene wired first if ``headless``)."""
        source = (HEADLESS_PRELUDE if headless else "") + code
        # Never the repository as working directory: `python -c` puts the working directory
        # first on sys.path, which would import the source tree instead of the install tree.
        return subprocess.run([str(self.interpreter(module, withoutOnDemand)), "-c", source],
                              env=self.environment(), capture_output=True, text=True, timeout=timeout,
                              cwd=self.workdir)

    def check(self, result):
        """Assert a run succeeded and read no file of the source tree; returns its stdout."""
        assert result.returncode == 0, (
            f"exit {result.returncode}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}")
        if self.openLog is not None and self.openLog.is_file():
            opened = sorted(set(self.openLog.read_text().split()))
            assert not opened, ("the installed extension read files from the source tree (not installed?): "
                                + ", ".join(opened))
        return result.stdout
