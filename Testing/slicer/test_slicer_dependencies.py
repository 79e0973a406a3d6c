"""The modules' dependency step (DeepImagingCommonLib.dependencies): one list of what Slicer
bundles, what torch brings and what each module installs on demand, and an installer that
asks once and never lets pip replace Slicer's numpy/SimpleITK or torch."""

import re
import sys
from pathlib import Path

import pytest

from DeepImagingCommonLib import dependencies

REPO = Path(__file__).resolve().parents[2]


def versions(table):
    return lambda distribution: table.get(distribution)


def test_every_module_has_an_entry_and_only_rog_needs_more_than_torch():
    modules = sorted(p.name for p in REPO.iterdir() if (p / f"{p.name}Lib").is_dir() and p.name != "DeepImagingCommon")
    assert sorted(dependencies.MODULE_REQUIREMENTS) == modules
    assert [r.distribution for r in dependencies.moduleRequirements("ROGSegment")] == ["monai"]
    assert dependencies.moduleRequirements("LevelSetRefine") == () and dependencies.moduleRequirements("NIRSTRecon") == ()
    with pytest.raises(KeyError, match="known"):
        dependencies.moduleRequirements("NoSuchModule")


def test_on_demand_floors_match_the_library_requirements():
    """pyproject.toml (the pip install of the library) and the Slicer list ask for the same floor."""
    text = (REPO / "pyproject.toml").read_text()
    for requirement in {r for reqs in dependencies.MODULE_REQUIREMENTS.values() for r in reqs}:
        match = re.search(rf'"{requirement.distribution}>=([0-9.]+)"', text)
        assert match and match.group(1) == requirement.minimum, requirement
    assert f'"torch>={dependencies.MINIMUM_TORCH_VERSION}"' in text


def test_allowed_imports_are_bundle_torch_and_the_modules_own_packages():
    rog, levelset = dependencies.allowedImports("ROGSegment"), dependencies.allowedImports("LevelSetRefine")
    assert {"numpy", "scipy", "SimpleITK", "vtk", "torch", "monai"} <= rog
    assert "monai" not in levelset and not {"tqdm", "skimage", "psutil", "matplotlib", "slicerio"} & rog


def test_nothing_to_do_when_everything_is_installed():
    asked = []
    done = dependencies.ensureRequirements([dependencies.MONAI], confirm=lambda *a: asked.append(a) or True,
                                           install=lambda args: pytest.fail("must not install"),
                                           versionOf=versions({"monai": "1.5.2"}))
    assert done == [] and asked == []


def test_missing_package_is_installed_after_one_confirmation_with_slicers_packages_pinned():
    table = {"numpy": "1.26.4", "SimpleITK": "2.4.0", "scipy": "1.13.1", "torch": "2.6.0+cu124", "vtk": "9.4.0"}
    asked, installs = [], []

    def install(arguments):
        constraints = Path(arguments[arguments.index("--constraint") + 1]).read_text().split()
        installs.append((arguments, constraints))
        table["monai"] = "1.5.2"

    done = dependencies.ensureRequirements([dependencies.MONAI], confirm=lambda text, details: asked.append(details)
                                           or True, install=install, versionOf=versions(table))
    assert done == [dependencies.MONAI] and len(asked) == 1 and "monai>=1.3 (installed: none)" in asked[0]
    arguments, constraints = installs[0]
    assert arguments[0] == "monai>=1.3"
    assert sorted(constraints) == ["SimpleITK==2.4.0", "numpy==1.26.4", "scipy==1.13.1", "torch==2.6.0+cu124",
                                   "vtk==9.4.0"]
    assert not Path(arguments[arguments.index("--constraint") + 1]).exists(), "the constraints file is removed"


def test_too_old_package_is_upgraded_and_declining_stops_with_a_message():
    with pytest.raises(dependencies.DependencyError, match=r"declined.*\n.*monai>=1.3 \(installed: 0.9.1\)"):
        dependencies.ensureRequirements([dependencies.MONAI], confirm=lambda *a: False,
                                        install=lambda args: pytest.fail("declined: must not install"),
                                        versionOf=versions({"monai": "0.9.1"}))


def test_pip_failure_and_a_package_still_missing_are_reported():
    def broken(arguments):
        raise RuntimeError("ResolutionImpossible: monai needs torch>=2.8")

    with pytest.raises(dependencies.DependencyError, match="failed: ResolutionImpossible.*kept"):
        dependencies.ensureRequirements([dependencies.MONAI], askConfirmation=False, install=broken,
                                        versionOf=versions({}))
    with pytest.raises(dependencies.DependencyError, match="still missing"):
        dependencies.ensureRequirements([dependencies.MONAI], askConfirmation=False, install=lambda args: None,
                                        versionOf=versions({}))


def test_console_check_names_the_package_and_the_fix():
    dependencies.requireModuleDependencies("LevelSetRefine", versionOf=versions({}))
    with pytest.raises(dependencies.DependencyError, match=r"(?s)monai>=1.3.*ensureModuleDependencies\('ROGSegment'\)"):
        dependencies.requireModuleDependencies("ROGSegment", versionOf=versions({}))


def test_module_step_installs_torch_first_then_the_modules_packages(monkeypatch):
    order = []
    monkeypatch.setattr(dependencies, "ensureTorch", lambda askConfirmation: order.append("torch") or "torch-module")
    monkeypatch.setattr(dependencies, "ensureRequirements",
                        lambda requirements, **kwargs: order.append([r.distribution for r in requirements]))
    assert dependencies.ensureModuleDependencies("ROGSegment") == "torch-module"
    assert order == ["torch", ["monai"]]


def test_the_dialog_lives_in_the_gui_module_file():
    """The Lib stays Qt-free: its default confirmation calls DeepImagingCommon.py's dialog."""
    source = (REPO / "DeepImagingCommon" / "DeepImagingCommon.py").read_text()
    assert "def confirmPackageInstallation(text, details):" in source
    assert "confirmOkCancelDisplay" in source
    assert sys.modules.get("qt") is None
