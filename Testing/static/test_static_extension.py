"""The extension's top-level CMakeLists.txt and its ExtensionsIndex entry (JSON) agree.

The catalog entry follows Slicer's schema ``slicer-extension-catalog-entry-schema-v1.0.2``
(Slicer/Schemas); its allowed keys are repeated here so the check needs no network.
"""

import json
import re

import pytest

SCHEMA_KEYS = {"$schema", "category", "scm_url", "scm_revision", "scm_type", "build_dependencies",
               "dicom_support_rule", "build_subdirectory", "enabled", "tier"}
REQUIRED_KEYS = {"$schema", "category", "scm_url"}
METADATA = ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
            "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS", "EXTENSION_DEPENDS")


@pytest.fixture
def top_cmake(repo, cmake):
    return cmake.variables(repo / "CMakeLists.txt")


@pytest.fixture
def project_name(repo, cmake):
    names = [args[0] for name, args in cmake.commands(repo / "CMakeLists.txt") if name == "project"]
    assert len(names) == 1, "the top-level CMakeLists.txt needs exactly one project()"
    return names[0]


@pytest.fixture
def entry(repo, project_name):
    path = repo / f"{project_name}.json"
    assert path.is_file(), f"the ExtensionsIndex entry must be named after project(): {path.name}"
    return json.loads(path.read_text())


def test_cmake_has_the_extension_metadata(top_cmake):
    for key in METADATA:
        assert top_cmake.get(key) and " ".join(top_cmake[key]).strip(), f"{key} is missing or empty"
    for key in ("EXTENSION_HOMEPAGE", "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS"):
        for url in " ".join(top_cmake[key]).split():
            assert re.match(r"https://\S+$", url), f"{key}: {url!r} is not an https URL"
    assert " ".join(top_cmake["EXTENSION_ICONURL"]).endswith(".png")
    assert "PyTorch" in " ".join(top_cmake["EXTENSION_DEPENDS"]).split()


def test_catalog_entry_follows_the_schema(entry):
    assert REQUIRED_KEYS <= set(entry), f"missing keys {sorted(REQUIRED_KEYS - set(entry))}"
    assert set(entry) <= SCHEMA_KEYS, f"keys the schema forbids: {sorted(set(entry) - SCHEMA_KEYS)}"
    assert "slicer-extension-catalog-entry-schema" in entry["$schema"]
    assert re.match(r"https://github\.com/[\w.-]+/[\w.-]+$", entry["scm_url"])
    assert isinstance(entry.get("scm_revision", ""), str) and entry.get("scm_revision", "main")
    assert entry.get("scm_type", "git") in ("git", "local")
    assert entry.get("build_subdirectory", ".") == "."  # not a superbuild
    tier = entry.get("tier", 1)
    assert isinstance(tier, int) and 1 <= tier <= 5
    assert all(isinstance(d, str) for d in entry.get("build_dependencies", []))


def test_catalog_entry_matches_cmake(entry, top_cmake):
    assert entry["category"] == " ".join(top_cmake["EXTENSION_CATEGORY"])
    depends = " ".join(top_cmake["EXTENSION_DEPENDS"]).split()
    depends = [] if depends == ["NA"] else depends
    assert sorted(entry.get("build_dependencies", [])) == sorted(depends)


def test_every_module_folder_is_built(repo, cmake, all_module_folders):
    subdirectories = [args[0] for name, args in cmake.commands(repo / "CMakeLists.txt") if name == "add_subdirectory"]
    for folder in all_module_folders:
        assert folder.name in subdirectories, f"top-level CMakeLists.txt lacks add_subdirectory({folder.name})"
    for sub in subdirectories:
        assert (repo / sub / "CMakeLists.txt").is_file(), f"add_subdirectory({sub}) names no CMake folder"


def test_extension_installs_the_deepimaging_package(repo, cmake, all_module_folders):
    """One module globs deepimaging/*.py and hands it to ctkMacroCompilePythonScript."""
    installers = []
    for folder in all_module_folders:
        commands = cmake.commands(folder / "CMakeLists.txt")
        globs = [args for name, args in commands if name == "file" and args and args[0] == "GLOB_RECURSE"
                 and any(a.endswith("deepimaging/*.py") for a in args)]
        compiles = [args for name, args in commands if name == "ctkMacroCompilePythonScript"]
        if globs and compiles:
            installers.append(folder.name)
            assert "CONFIGURE_DEPENDS" in globs[0], "the glob must re-run at build time to catch new files"
            assert "${PROJECT_SOURCE_DIR}" in (folder / "CMakeLists.txt").read_text()
            assert any("INSTALL_DIR" in args for args in compiles)
    assert installers == ["DeepImagingCommon"], installers
    assert (repo / "deepimaging" / "__init__.py").is_file()
