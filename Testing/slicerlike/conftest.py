"""Fixtures of the Slicer-like tests: an install tree built from the CMake lists, and a runner
whose interpreters hold only the packages Slicer's Python would have (see Testing/support)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "support"))
from cmakelists import build_install_tree  # noqa: E402
from slicerlike import SlicerLikePython  # noqa: E402

try:
    import slicer  # noqa: F401

    SLICER_CORE = hasattr(slicer, "vtkMRMLScene")
except ImportError:
    SLICER_CORE = False


@pytest.fixture(scope="session")
def install_tree(tmp_path_factory):
    """``<tmp>/qt-scripted-modules``: exactly the files the extension build installs."""
    return build_install_tree(tmp_path_factory.mktemp("slicer-install") / "qt-scripted-modules")


@pytest.fixture(scope="session")
def open_log(tmp_path_factory):
    """File collecting every source-tree file a Slicer-like process opened (should stay empty)."""
    return tmp_path_factory.mktemp("slicer-openlog") / "opened-in-repo.txt"


@pytest.fixture(scope="session")
def slicer_python(install_tree, open_log):
    if not SLICER_CORE:
        pytest.skip("slicer-core is not installed: the Slicer-like tests need its MRML scene")
    return SlicerLikePython(install_tree, install_tree.parent, open_log)

