"""Optional packages, imported where they are used and only there.

Inside 3D Slicer the library runs on Slicer's own Python, which bundles numpy, scipy,
SimpleITK and vtk and little else; torch comes from the PyTorch extension and a module's
few extra packages are installed on demand (``DeepImagingCommonLib.dependencies``).  So the
paths Slicer runs import nothing more at module level, and packages that serve only the
shell or evaluation (scikit-image metrics, tqdm bars, matplotlib figures, slicerio files,
nilearn data) are imported through :func:`import_optional`, which turns a missing package
into an error that names it and says how to install it.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from .errors import MissingDependencyError


def is_available(module: str) -> bool:
    """True when ``module`` can be imported (found on the path), without importing it."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def import_optional(module: str, distribution: str, purpose: str) -> ModuleType:
    """Import ``module`` or raise :class:`MissingDependencyError` naming ``distribution``.

    Only a missing ``module`` itself becomes that error; a broken package that fails while
    importing one of its own dependencies keeps its original exception.
    """
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as error:
        root = module.split(".")[0]
        if error.name is not None and error.name.split(".")[0] != root:
            raise
        raise MissingDependencyError(
            f"{purpose} needs the Python package '{distribution}', which is not installed "
            f"(pip install \"{distribution}\"; inside Slicer: slicer.util.pip_install(\"{distribution}\"))") from error
