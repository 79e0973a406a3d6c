"""Shared helpers of the static checks: module discovery and a small CMake reader.

The Widget, the .ui files and the CMake lists can't run without the Slicer application, so
they are checked by reading them.  Modules are discovered, not listed: any top-level folder
holding a CMakeLists.txt and ``<Folder>.py`` is a module folder, so new modules are covered
without touching these tests.
"""

import sys
import types
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "support"))
from cmakelists import REPO, cmake_commands, cmake_variables, module_folders  # noqa: E402


def module_scripts():
    """Every top-level ``.py`` of every module folder (a folder may hold several modules)."""
    return sorted(script for folder in module_folders() for script in folder.glob("*.py"))


def pytest_generate_tests(metafunc):
    if "module_dir" in metafunc.fixturenames:
        folders = module_folders()
        metafunc.parametrize("module_dir", folders, ids=[f.name for f in folders])
    if "module_script" in metafunc.fixturenames:
        scripts = module_scripts()
        metafunc.parametrize("module_script", scripts, ids=[s.name for s in scripts])


@pytest.fixture
def repo():
    return REPO


@pytest.fixture
def cmake():
    """The CMake reader: ``cmake.commands(path)`` and ``cmake.variables(path)``."""
    return types.SimpleNamespace(commands=cmake_commands, variables=cmake_variables)


@pytest.fixture
def all_module_folders():
    return module_folders()
