"""Reading and writing images with their geometry (NRRD, NIfTI, MetaImage) via SimpleITK.

Also the single place that converts between :class:`~deepimaging.core.image.Image` and
``SimpleITK.Image``.  Writes are atomic: the file is written under a temporary name in the
target folder and renamed, so a failure never leaves a half-written output behind.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator, Union

import numpy as np

from .errors import InputError, UnsupportedFormatError
from .image import Image

PathLike = Union[str, os.PathLike]
IMAGE_EXTENSIONS = (".nrrd", ".nhdr", ".nii", ".nii.gz", ".mha", ".mhd")


def file_extension(path: PathLike) -> str:
    """Lower-case extension including double ones (``.nii.gz``, ``.seg.nrrd``)."""
    name = Path(path).name.lower()
    for double in (".seg.nrrd", ".nii.gz"):
        if name.endswith(double):
            return double
    return Path(name).suffix


def require_extension(path: PathLike, allowed: tuple, what: str = "image") -> str:
    ext = file_extension(path)
    if ext not in allowed:
        raise UnsupportedFormatError(
            f"cannot handle {what} file {str(path)!r}: extension {ext or '(none)'!r} is not one of {', '.join(allowed)}")
    return ext


def to_sitk(image: Image):
    """Convert to a ``SimpleITK.Image`` (3D, even for a single slice)."""
    import SimpleITK as sitk

    array = image.array
    if array.dtype == bool:
        array = array.astype(np.uint8)
    out = sitk.GetImageFromArray(np.ascontiguousarray(array))
    out.SetSpacing(image.spacing)
    out.SetOrigin(image.origin)
    out.SetDirection(tuple(image.direction.flatten()))
    return out


def from_sitk(sitk_image) -> Image:
    """Convert a 2D or 3D scalar ``SimpleITK.Image``; 2D becomes (1, y, x)."""
    import SimpleITK as sitk

    dim = sitk_image.GetDimension()
    if sitk_image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(
            f"image has {sitk_image.GetNumberOfComponentsPerPixel()} components per voxel; "
            "a scalar (single-component) image is needed")
    if dim not in (2, 3):
        raise InputError(f"expected a 2D or 3D image, got a {dim}-D image of size {sitk_image.GetSize()}")
    array = sitk.GetArrayFromImage(sitk_image)
    if dim == 2:
        d = np.asarray(sitk_image.GetDirection()).reshape(2, 2)
        direction = np.eye(3)
        direction[:2, :2] = d
        sp = sitk_image.GetSpacing()
        org = sitk_image.GetOrigin()
        return Image(array[np.newaxis], (sp[0], sp[1], 1.0), (org[0], org[1], 0.0), direction)
    return Image(array, sitk_image.GetSpacing(), sitk_image.GetOrigin(),
                 np.asarray(sitk_image.GetDirection()).reshape(3, 3))


def read_image(path: PathLike) -> Image:
    """Read a scalar image with its geometry; 4-D or vector images are rejected with a clear error."""
    import SimpleITK as sitk

    path = Path(path)
    require_extension(path, IMAGE_EXTENSIONS + (".seg.nrrd",))
    if not path.is_file():
        raise InputError(f"image file not found: {path}")
    try:
        sitk_image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise InputError(f"could not read image {path}: {str(exc).strip().splitlines()[-1]}") from exc
    return from_sitk(sitk_image)


@contextlib.contextmanager
def atomic_output(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; move it into place only if the block succeeds."""
    path = Path(path)
    if not path.parent.exists():
        raise InputError(f"output folder does not exist: {path.parent}")
    ext = file_extension(path)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=ext, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_image(image: Image, path: PathLike, compress: bool = True) -> Path:
    """Write ``image`` to NRRD/NIfTI/MHA by extension, atomically; returns the path."""
    import SimpleITK as sitk

    path = Path(path)
    require_extension(path, IMAGE_EXTENSIONS)
    sitk_image = to_sitk(image)
    with atomic_output(path) as tmp:
        sitk.WriteImage(sitk_image, str(tmp), compress)
    return path
