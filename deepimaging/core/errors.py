"""Exception types shared by all methods, so callers (CLI, Slicer) can show clear messages."""


class DeepImagingError(Exception):
    """Base class of every error raised on purpose by ``deepimaging``."""


class InputError(DeepImagingError, ValueError):
    """The caller's input is unusable (wrong dimension, NaN voxels, empty mask, ...)."""


class GeometryMismatchError(InputError):
    """Two images that must share a voxel grid do not (size, spacing, origin or direction)."""


class UnsupportedFormatError(InputError):
    """A file extension that no reader/writer here handles."""


class CheckpointError(DeepImagingError, ValueError):
    """A checkpoint is truncated, corrupt, of another method or otherwise incompatible."""


class MissingDependencyError(DeepImagingError, ImportError):
    """An optional package that this path needs is not installed (the message says which)."""
