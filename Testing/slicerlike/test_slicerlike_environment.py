"""The Slicer-like interpreter itself: it runs the installed files and blocks what Slicer lacks.

If these fail, the module-path tests beside them prove nothing.
"""

import pytest

MODULES = ("GLSSegment", "LevelSetRefine", "NIRSTRecon", "ROGSegment")


def test_install_tree_holds_what_the_cmake_lists_install(install_tree):
    for relative in ("LevelSetRefine.py", "LevelSetRefineLib/logic.py", "DeepImagingCommonLib/dependencies.py",
                     "Resources/UI/ROGSegment.ui", "deepimaging/__init__.py", "deepimaging/rog/infer.py",
                     "deepimaging/nirst/weights/znet_default.pt", "deepimaging/nirst/weights/znet_paper.pt"):
        assert (install_tree / relative).is_file(), f"{relative} is not installed"
    assert not list(install_tree.rglob("test_*.py")), "tests must not be installed"


def test_imports_are_limited_to_slicers_packages(slicer_python, install_tree):
    code = (
        "import importlib, numpy, scipy, SimpleITK, vtk, torch\n"
        "import deepimaging, DeepImagingCommonLib\n"
        f"assert deepimaging.__file__.startswith({str(install_tree)!r}), deepimaging.__file__\n"
        "blocked = []\n"
        "for name in ('psutil', 'tqdm', 'skimage', 'matplotlib', 'slicerio', 'nilearn', 'monai', 'pytest'):\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except ModuleNotFoundError:\n"
        "        blocked.append(name)\n"
        "print(','.join(blocked))\n")
    out = slicer_python.check(slicer_python.run("LevelSetRefine", code, headless=False))
    assert out.split() == ["psutil,tqdm,skimage,matplotlib,slicerio,nilearn,monai,pytest"]


def test_reading_the_source_tree_is_caught(install_tree, tmp_path):
    """The open-file audit of the Slicer-like processes works (else the check in every test is void)."""
    from slicerlike import REPO, SlicerLikePython

    python = SlicerLikePython(install_tree, install_tree.parent, tmp_path / "opened.txt")
    result = python.run("LevelSetRefine", f"open({str(REPO / 'deepimaging' / '__init__.py')!r}).read()\n",
                        headless=False)
    assert result.returncode == 0, result.stderr
    with pytest.raises(AssertionError, match="read files from the source tree"):
        python.check(result)


def test_on_demand_packages_are_allowed_only_for_their_module(slicer_python):
    code = "import monai\nprint(monai.__version__)\n"
    slicer_python.check(slicer_python.run("ROGSegment", code, headless=False))
    assert slicer_python.run("NIRSTRecon", code, headless=False).returncode != 0


@pytest.mark.parametrize("module", MODULES)
def test_module_libs_import_in_slicers_python(slicer_python, module):
    """Every Lib a module loads, and the library packages its Logic uses, import there."""
    code = (f"import {module}Lib, DeepImagingCommonLib.nodes, DeepImagingCommonLib.process\n"
            "import deepimaging.core.checkpoint, deepimaging.levelset, deepimaging.nirst.recon, deepimaging.rog.plan\n")
    if module == "ROGSegment":
        code += "import deepimaging.rog.infer, deepimaging.rog.train, deepimaging.robustness.rog\n"
    if module == "GLSSegment":
        code += "import deepimaging.gls.infer, deepimaging.gls.train, deepimaging.gls.baselines\n"
    slicer_python.check(slicer_python.run(module, code))
