"""The Python packages each module needs inside Slicer, and the one step that installs them.

Slicer's own Python bundles numpy, scipy, SimpleITK, vtk and little else (the lists below);
torch comes from the PyTorch extension; anything else a module needs is installed here, on
first use, with the user's confirmation, as MONAIAuto3DSeg does.  This file is the single
place that says which package is bundled, which comes from PyTorch and which is installed on
demand: the modules' dependency step and the tests of a Slicer-like Python both read it.

Rules learned by Slicer AI extensions and kept here:

* torch must come from ``PyTorchUtils`` (plain ``pip install torch`` picks a wrong or missing
  build), and ``PyTorchUtils`` is imported lazily (importing it at module load stops the
  module from loading when the PyTorch extension is absent);
* versions are read from package metadata, never by importing: an imported old package cannot
  be upgraded without restarting Slicer;
* pip must never replace Slicer's own packages (a pip-installed SimpleITK broke Slicer's IO,
  Slicer/Slicer#6711): every install runs with a constraints file that pins the packages
  Slicer bundles and torch to the versions already installed, so pip picks a release of the
  requested package that fits them, or fails with a message instead of swapping them;
* every requirement has a version floor (unpinned, users got monai 0.9).

No Qt and no ``slicer`` at import time, so the lists are usable from tests and the shell.
"""

import importlib.metadata
import logging
import os
import re
import tempfile

MINIMUM_TORCH_VERSION = "2.1"
TORCH_REQUIREMENT = f">={MINIMUM_TORCH_VERSION}"

# The oldest Python of a supported Slicer (5.8 runs 3.9, 5.10 runs 3.12): every file that
# Slicer imports (module folders and the `deepimaging` library) must run on it.
OLDEST_SLICER_PYTHON = (3, 9)
SUPPORTED_SLICER = "5.8"

# Import names of what Slicer's Python ships with (Slicer's SuperBuild: python-numpy,
# python-scipy, SimpleITK, VTK, the requests/DICOM/PythonQt requirement sets, pip tooling),
# plus Slicer's own packages.  Nothing else can be assumed to be there.
SLICER_BUNDLED = (
    "numpy", "scipy", "SimpleITK", "sitkUtils", "vtk", "vtkmodules", "slicer", "mrml", "packaging",
    "pyparsing", "six", "requests", "urllib3", "idna", "certifi", "charset_normalizer", "chardet",
    "pydicom", "PIL", "retrying", "dicomweb_client", "pip", "setuptools", "pkg_resources",
    "_distutils_hack", "wheel",
)

# Distribution names whose installed version the installer pins, so pip never replaces them.
PROTECTED_DISTRIBUTIONS = ("numpy", "scipy", "SimpleITK", "vtk", "torch")

# torch as the PyTorch extension installs it, and the packages torch itself imports.
TORCH_PACKAGES = ("torch", "torchgen", "functorch", "filelock", "typing_extensions", "sympy", "mpmath",
                  "networkx", "jinja2", "markupsafe", "fsspec", "triton", "nvidia", "opt_einsum")


class Requirement:
    """One package installed on demand: pip name, import name and version floor."""

    def __init__(self, distribution, importName, minimum, reason):
        self.distribution = distribution
        self.importName = importName
        self.minimum = minimum
        self.reason = reason

    @property
    def specifier(self):
        return f"{self.distribution}>={self.minimum}"

    def __repr__(self):
        return f"Requirement({self.specifier!r})"


MONAI = Requirement("monai", "monai", "1.3", "ROG's sliding-window inference, augmentation and Dice+CE loss; "
                    "GLS's U-Net and UNet++ baselines")

# What each module installs on first use, beyond torch.  LevelSetRefine and NIRSTRecon need
# nothing more: the library imports scikit-image, tqdm, matplotlib, nilearn and slicerio only
# on the shell and evaluation paths (`deepimaging` CLI, figures, tables), never from Slicer.
# GLSSegment needs MONAI because the U-Net and UNet++ baselines it trains and runs
# (--arch unet|unetpp) are MONAI's BasicUNet / BasicUNetPlusPlus.
MODULE_REQUIREMENTS = {
    "GLSSegment": (MONAI,),
    "LevelSetRefine": (),
    "NIRSTRecon": (),
    "ROGSegment": (MONAI,),
}


class DependencyError(RuntimeError):
    """A required package is missing, too old, or its installation was declined or failed."""


def moduleRequirements(moduleName):
    """The on-demand :class:`Requirement` list of a module (KeyError names the known modules)."""
    try:
        return MODULE_REQUIREMENTS[moduleName]
    except KeyError:
        raise KeyError(f"unknown module {moduleName!r}; known: {sorted(MODULE_REQUIREMENTS)}") from None


def allowedImports(moduleName):
    """Top-level import names a module path may reach in Slicer's Python (stdlib aside)."""
    return set(SLICER_BUNDLED) | set(TORCH_PACKAGES) | {r.importName for r in moduleRequirements(moduleName)}


def versionTuple(version):
    """``"2.13.0+cpu"`` -> ``(2, 13, 0)``: numeric release parts only, for floor checks."""
    release = re.match(r"\s*v?(\d+(?:\.\d+)*)", str(version))
    if not release:
        raise ValueError(f"cannot read version {version!r}")
    return tuple(int(part) for part in release.group(1).split("."))


def versionAtLeast(version, minimum):
    """True if ``version`` is ``minimum`` or newer (missing parts count as 0)."""
    have, need = versionTuple(version), versionTuple(minimum)
    width = max(len(have), len(need))
    return have + (0,) * (width - len(have)) >= need + (0,) * (width - len(need))


def installedVersion(distribution):
    """A distribution's version from its metadata, without importing it (None if absent)."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def installedTorchVersion():
    """torch's version from its metadata, without importing it (None if not installed)."""
    return installedVersion("torch")


def requireTorchVersion(version, minimum=MINIMUM_TORCH_VERSION):
    """Raise :class:`DependencyError` with the fix when ``version`` is below the floor."""
    if not versionAtLeast(version, minimum):
        raise DependencyError(
            f"PyTorch {version} is installed but SlicerDeepImaging needs {minimum} or newer. "
            "Open the 'PyTorch Utils' module, uninstall PyTorch, install it again "
            f"with version requirement '>={minimum}', then restart Slicer.")


def ensureTorch(askConfirmation=True):
    """Return the ``torch`` module, installing it through PyTorchUtils if it is missing.

    Raises :class:`DependencyError` when the PyTorch extension is not installed, when the
    user declines the installation, or when the installed torch is too old.
    """
    version = installedTorchVersion()
    if version is not None:
        requireTorchVersion(version)
        import torch

        return torch
    try:
        import PyTorchUtils
    except ModuleNotFoundError as error:
        raise DependencyError(
            "This module needs the 'PyTorch' extension. Install it from the Extensions Manager, "
            "restart Slicer, and try again.") from error
    torchLogic = PyTorchUtils.PyTorchUtilsLogic()
    if torchLogic.torchInstalled():
        torch = torchLogic.torch
    else:
        torch = torchLogic.installTorch(askConfirmation=askConfirmation, torchVersionRequirement=TORCH_REQUIREMENT)
        if torch is None:
            raise DependencyError(
                "PyTorch is required but was not installed (the installation was cancelled). "
                "Apply again to be asked once more, or install it from the 'PyTorch Utils' module.")
    requireTorchVersion(torch.__version__)
    return torch


def missingRequirements(requirements, versionOf=installedVersion):
    """``[(requirement, installed version or None)]`` for those absent or below their floor."""
    missing = []
    for requirement in requirements:
        version = versionOf(requirement.distribution)
        if version is None or not versionAtLeast(version, requirement.minimum):
            missing.append((requirement, version))
    return missing


def protectionConstraints(versionOf=installedVersion):
    """``name==version`` lines pinning Slicer's own packages and torch as installed now."""
    lines = []
    for distribution in PROTECTED_DISTRIBUTIONS:
        version = versionOf(distribution)
        if version is not None:
            lines.append(f"{distribution}=={version}")
    return lines


def pipArguments(requirements, constraintsFile):
    """Arguments for ``slicer.util.pip_install``: the specifiers and the constraints file."""
    return [requirement.specifier for requirement in requirements] + ["--constraint", str(constraintsFile)]


def describeMissing(missing):
    return "\n".join(
        f"{requirement.specifier} (installed: {version or 'none'}) - {requirement.reason}"
        for requirement, version in missing)


def ensureRequirements(requirements, askConfirmation=True, confirm=None, install=None, versionOf=installedVersion):
    """Install what is missing of ``requirements`` (after one confirmation); no-op if all are there.

    ``confirm(text, details) -> bool`` and ``install(pipArguments)`` default to Slicer's
    dialog and ``slicer.util.pip_install``; tests pass their own.  Raises
    :class:`DependencyError` when the user declines or pip fails.
    """
    missing = missingRequirements(requirements, versionOf)
    if not missing:
        return []
    details = describeMissing(missing)
    if askConfirmation:
        confirm = confirm or _slicerConfirm
        text = ("This module needs Python packages that are not installed yet. Install them now? "
                "Slicer's own packages (numpy, SimpleITK, ...) and PyTorch are kept as they are.")
        if not confirm(text, details):
            raise DependencyError(
                "The module cannot run without these packages (installation declined):\n" + details)
    install = install or _slicerPipInstall
    handle, constraintsPath = tempfile.mkstemp(prefix="deepimaging-constraints-", suffix=".txt")
    try:
        with os.fdopen(handle, "w") as constraints:
            constraints.write("\n".join(protectionConstraints(versionOf)) + "\n")
        logging.info("Installing %s", ", ".join(r.specifier for r, _ in missing))
        try:
            install(pipArguments([r for r, _ in missing], constraintsPath))
        except Exception as error:  # pip's own message says what did not fit
            raise DependencyError(
                f"Installing {', '.join(r.specifier for r, _ in missing)} failed: {error}. Slicer's numpy, "
                "SimpleITK and PyTorch were kept; install a release that fits them from Slicer's Python "
                "console with slicer.util.pip_install(...).") from error
    finally:
        os.remove(constraintsPath)
    importlib.invalidate_caches()
    still = missingRequirements(requirements, versionOf)
    if still:
        raise DependencyError("These packages are still missing after installation:\n" + describeMissing(still))
    return [requirement for requirement, _ in missing]


def requireModuleDependencies(moduleName, versionOf=installedVersion):
    """Raise a clear :class:`DependencyError` when a module's on-demand packages are missing.

    For the Logic called from the Python console, which must not open dialogs or install:
    the message says how to install them.
    """
    missing = missingRequirements(moduleRequirements(moduleName), versionOf)
    if missing:
        raise DependencyError(
            f"{moduleName} needs packages that are not installed:\n{describeMissing(missing)}\n"
            f"Click Apply in the {moduleName} module to install them, or run "
            f"DeepImagingCommonLib.dependencies.ensureModuleDependencies('{moduleName}') in the Python console.")


def ensureModuleDependencies(moduleName, askConfirmation=True, confirm=None, install=None):
    """The dependency step of every module: torch first (PyTorch extension), then the module's
    on-demand packages.  Returns the ``torch`` module."""
    torch = ensureTorch(askConfirmation=askConfirmation)
    ensureRequirements(moduleRequirements(moduleName), askConfirmation=askConfirmation, confirm=confirm,
                       install=install)
    return torch


def _slicerConfirm(text, details):
    # The dialog is GUI code, so it lives in the (hidden) module file, not in this Qt-free Lib.
    import DeepImagingCommon

    return DeepImagingCommon.confirmPackageInstallation(text, details)


def _slicerPipInstall(arguments):
    import slicer

    slicer.util.pip_install(arguments)
