"""Make sure torch is available, installing it through the PyTorch extension on first use.

Slicer AI extensions learned the hard way that torch must come from ``PyTorchUtils``
(plain ``pip install torch`` picks a wrong or missing build) and that ``PyTorchUtils`` must
be imported lazily (importing it at module load stops the module from loading when the
PyTorch extension is absent).  So this file imports neither torch nor PyTorchUtils at
import time, and it needs no Qt: the Widget shows the errors raised here.
"""

import importlib.metadata
import re

MINIMUM_TORCH_VERSION = "2.1"
TORCH_REQUIREMENT = f">={MINIMUM_TORCH_VERSION}"


class DependencyError(RuntimeError):
    """A required package is missing, too old, or its installation was declined."""


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


def installedTorchVersion():
    """torch's version from its metadata, without importing it (None if not installed).

    Reading metadata first matters: once an old torch is imported it cannot be upgraded
    without restarting Slicer.
    """
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return None


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
