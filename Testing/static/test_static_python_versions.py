"""Every file Slicer imports runs on the oldest supported Slicer's Python (5.8: Python 3.9).

The files are those the extension installs (module folders and the `deepimaging` library,
read from the CMake lists).  Two checks, because neither alone is enough:

* vermin (PyPI, MIT) finds syntax, standard-library functions, keyword arguments and modules
  newer than 3.9 (``zip(strict=)``, ``match``, ``itertools.pairwise``, ...);
* our own AST check finds PEP 604 unions (``X | None``) where Python evaluates them at run
  time: annotations of functions, classes and modules without ``from __future__ import
  annotations`` (a TypeError at import on 3.9), and ``isinstance(x, A | B)``.  vermin's own
  union detection is marked unstable and flags integer ``|=`` and string annotations.
"""

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cmakelists import installed_files

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "DeepImagingCommon"))
from DeepImagingCommonLib.dependencies import OLDEST_SLICER_PYTHON  # noqa: E402

TARGET = ".".join(str(part) for part in OLDEST_SLICER_PYTHON)


def slicer_imported_files():
    return sorted({source for relative, source in installed_files().items() if relative.endswith(".py")})


def _has_future_annotations(tree):
    return any(isinstance(node, ast.ImportFrom) and node.module == "__future__"
               and any(alias.name == "annotations" for alias in node.names) for node in tree.body)


def _has_union(expression):
    return expression is not None and any(isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr)
                                          for node in ast.walk(expression))


def _evaluated_annotations(tree):
    """Annotations Python evaluates when the module is imported (not those inside function bodies)."""
    found = []

    def visit(body, scope):
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                arguments = node.args
                for arg in arguments.posonlyargs + arguments.args + arguments.kwonlyargs + [arguments.vararg,
                                                                                            arguments.kwarg]:
                    if arg is not None and arg.annotation is not None:
                        found.append(arg.annotation)
                if node.returns is not None:
                    found.append(node.returns)
            elif isinstance(node, ast.ClassDef):
                visit(node.body, "class")
            elif isinstance(node, ast.AnnAssign):
                found.append(node.annotation)
            elif isinstance(node, (ast.If, ast.Try)):
                visit(node.body + node.orelse + getattr(node, "finalbody", []), scope)
    visit(tree.body, "module")
    return found


def runtime_union_problems(source, name="<source>"):
    """``["line N: ..."]`` for PEP 604 unions evaluated at run time on Python < 3.10."""
    tree = ast.parse(source, name)
    problems = []
    if not _has_future_annotations(tree):
        problems += [f"line {a.lineno}: annotation uses 'X | Y' (TypeError on Python {TARGET}; use Optional/Union)"
                     for a in _evaluated_annotations(tree) if _has_union(a)]
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("isinstance", "issubclass") \
                and len(node.args) == 2 and _has_union(node.args[1]):
            problems.append(f"line {node.lineno}: {node.func.id}(..., A | B) needs Python 3.10")
    return problems


def test_files_slicer_imports_are_found():
    files = {path.relative_to(path.parents[1]).as_posix() for path in slicer_imported_files()}
    assert {"LevelSetRefine/LevelSetRefine.py", "ROGSegment/ROGSegment.py", "deepimaging/__init__.py"} <= files


@pytest.mark.parametrize("path", slicer_imported_files(), ids=lambda p: p.relative_to(p.parents[1]).as_posix())
def test_no_runtime_unions_and_valid_syntax(path):
    source = path.read_text()
    ast.parse(source, str(path), feature_version=OLDEST_SLICER_PYTHON)
    problems = runtime_union_problems(source, str(path))
    assert not problems, f"{path.name} would not load on Python {TARGET} (Slicer 5.8): " + "; ".join(problems)


def test_vermin_finds_nothing_newer_than_the_oldest_slicer_python():
    vermin = shutil.which("vermin", path=str(Path(sys.executable).parent)) or shutil.which("vermin")
    assert vermin, "vermin is a test dependency (pip install -e .[test])"
    result = subprocess.run([vermin, "--no-tips", f"--target={TARGET}-", "--violations", "--eval-annotations",
                             "--no-parse-comments", "--backport", "typing", "-vv"]
                            + [str(p) for p in slicer_imported_files()], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("source, bad", [
    ("def f(x: int | None) -> None: pass", True),
    ("class P:\n    volume: 'A' | None = None", True),
    ("def f() -> list[int] | None: pass", True),
    ("from __future__ import annotations\ndef f(x: int | None) -> None: pass", False),
    ("def f():\n    local: int | None = None", False),
    ("x = 3 | 4\nflags = 0\nflags |= 2", False),
    ("from typing import Optional\ndef f(x: Optional[int]) -> None: pass", False),
    ("isinstance(1, int | str)", True),
])
def test_union_check_catches_what_python_39_rejects(source, bad):
    assert bool(runtime_union_problems(source)) is bad, source
