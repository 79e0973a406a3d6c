"""Panel inputs every module Logic checks the same way: device choice, path fields, checkpoint files.

Qt-free and torch-free, so the Logic can check its inputs before anything heavy is imported.
"""

from pathlib import Path

from deepimaging.core.errors import CheckpointError, InputError

DEVICE_CHOICES = ("auto", "cpu", "cuda")


def requireDevice(device):
    """``None`` for automatic choice, else the device string; unknown names are an InputError."""
    device = (device or "auto").strip().lower()
    if device == "auto":
        return None
    if device not in DEVICE_CHOICES and not device.startswith("cuda:"):
        raise InputError(f"unknown device '{device}': choose one of {', '.join(DEVICE_CHOICES)}")
    return device


def isPathSet(path):
    """False for no path: ``None``, "" or "." (what an empty path widget gives)."""
    return path is not None and str(path).strip() not in ("", ".")


def requireCheckpointPath(path, method):
    """The checkpoint path as a ``Path``; an unset or missing file gives a clear error naming ``method``."""
    if not isPathSet(path):
        raise InputError(f"no model selected: choose a {method} checkpoint file (best.pt from training)")
    path = Path(str(path).strip()).expanduser()
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    return path


def requireTrainingFolder(folder, layout):
    """A training folder on disk as a ``Path``, after a quick check that it has images/ and masks/.

    ``layout`` describes the expected files in the error message.  The full check is the
    library's, in the training process; this one catches a wrong folder before a process starts.
    """
    if not isPathSet(folder):
        raise InputError("no training data folder selected")
    folder = Path(str(folder)).expanduser()
    if not folder.is_dir():
        raise InputError(f"training data folder not found: {folder}")
    missing = [sub for sub in ("images", "masks") if not (folder / sub).is_dir()]
    if missing:
        raise InputError(f"{folder} has no {' and no '.join(sub + '/' for sub in missing)} folder; {layout}")
    return folder
