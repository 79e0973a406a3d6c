"""Device choice, mixed precision and seeding, shared by every method.

Order of preference: CUDA > MPS > CPU.  The environment variable ``DEEPIMAGING_DEVICE``
overrides the automatic choice, and every pipeline's ``device=`` argument overrides both.
"""

from __future__ import annotations

import contextlib
import os
import random
from typing import Iterator, Optional, Union

import numpy as np
import torch

DeviceLike = Union[str, torch.device, None]
ENV_VAR = "DEEPIMAGING_DEVICE"


class DeviceUnavailableError(RuntimeError):
    """The requested device (e.g. ``cuda``) does not exist on this machine or torch build."""


def cuda_usable() -> bool:
    """True only when torch was built with CUDA *and* a CUDA device answers."""
    return bool(torch.backends.cuda.is_built() and torch.cuda.is_available())


def mps_usable() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_built() and mps.is_available())


def select_device(device: DeviceLike = None) -> torch.device:
    """Return the torch device to run on.

    ``device`` may be ``None``/``"auto"`` (then ``$DEEPIMAGING_DEVICE`` or the best available),
    ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"mps"``.  Asking for a device that is not there raises
    :class:`DeviceUnavailableError` with the reason instead of failing later inside torch.
    """
    if device is None or (isinstance(device, str) and device.strip().lower() in ("", "auto")):
        device = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
        if device == "auto":
            if cuda_usable():
                return torch.device("cuda")
            if mps_usable():
                return torch.device("mps")
            return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise DeviceUnavailableError(f"unknown device {device!r}: use auto, cpu, cuda, cuda:N or mps") from exc
    if dev.type == "cuda":
        if not torch.backends.cuda.is_built():
            raise DeviceUnavailableError(
                f"device {device!r} requested but this torch ({torch.__version__}) was built without CUDA; "
                "install a CUDA build of torch or choose device='cpu'")
        if not torch.cuda.is_available():
            raise DeviceUnavailableError(
                f"device {device!r} requested but no CUDA device is available (driver missing or "
                "CUDA_VISIBLE_DEVICES hides it); choose device='cpu'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceUnavailableError(
                f"device {device!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    elif dev.type == "mps" and not mps_usable():
        raise DeviceUnavailableError(f"device {device!r} requested but MPS is not available")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise DeviceUnavailableError(f"unsupported device type {dev.type!r}")
    return dev


def autocast(device: torch.device, enabled: bool = True) -> contextlib.AbstractContextManager:
    """Mixed precision (bf16 if supported, else fp16) on CUDA; a no-op elsewhere."""
    if enabled and device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast(device_type="cuda", dtype=dtype)
    return contextlib.nullcontext()


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) for reproducible runs."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


@contextlib.contextmanager
def torch_threads(n: Optional[int]) -> Iterator[None]:
    """Temporarily set torch's intra-op thread count (``None`` leaves it alone)."""
    if n is None:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(max(1, int(n)))
    try:
        yield
    finally:
        torch.set_num_threads(old)
