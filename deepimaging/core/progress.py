"""Progress reporting and cooperative cancellation for long-running pipeline functions.

Every long job (training, inference, level-set evolution, simulation) accepts
``progress: ProgressCallback | None`` and ``cancel: CancelToken | None``.  The CLI plugs in a
tqdm bar (:func:`tqdm_progress`), Slicer plugs in its progress bar and Cancel button.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Callable, Iterator, Optional

from .optional import import_optional

ProgressCallback = Callable[[float, str], None]


class Cancelled(RuntimeError):
    """Raised inside a pipeline function when its :class:`CancelToken` was cancelled."""


class CancelToken:
    """A thread-safe cancel flag; ``check()`` raises :class:`Cancelled` once it is set."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def check(self) -> None:
        if self._event.is_set():
            raise Cancelled("cancelled by the user")


def check_cancel(cancel: Optional[CancelToken]) -> None:
    """Raise :class:`Cancelled` if ``cancel`` is set; a ``None`` token never cancels."""
    if cancel is not None:
        cancel.check()


def report(progress: Optional[ProgressCallback], fraction: float, message: str = "") -> None:
    """Call ``progress`` (if any) with ``fraction`` clamped to [0, 1]."""
    if progress is not None:
        progress(min(1.0, max(0.0, float(fraction))), message)


def sub_progress(progress: Optional[ProgressCallback], start: float, stop: float) -> Optional[ProgressCallback]:
    """Map a child's [0, 1] progress onto ``[start, stop]`` of the parent's range."""
    if progress is None:
        return None

    def child(fraction: float, message: str) -> None:
        report(progress, start + (stop - start) * fraction, message)

    return child


PROGRESS_ENV = "DEEPIMAGING_PROGRESS"
PROGRESS_PREFIX = "PROGRESS "


def progress_line(fraction: float, message: str = "") -> str:
    """The machine-readable line ``PROGRESS <fraction> <message>`` (parsed by the Slicer modules)."""
    return f"{PROGRESS_PREFIX}{min(1.0, max(0.0, float(fraction))):.4f} {message}".rstrip()


@contextlib.contextmanager
def tqdm_progress(description: str = "", total: int = 1000) -> Iterator[ProgressCallback]:
    """A :data:`ProgressCallback` for the CLI: a tqdm bar, or ``PROGRESS`` lines on stdout when
    ``$DEEPIMAGING_PROGRESS`` is ``lines`` (what Slicer's background processes ask for)."""
    import os
    import sys

    if os.environ.get(PROGRESS_ENV, "").lower() == "lines":
        last = [-1.0]

        def line_callback(fraction: float, message: str) -> None:
            if fraction - last[0] >= 0.001 or fraction >= 1.0:
                last[0] = fraction
                print(progress_line(fraction, f"{description}: {message}" if description else message),
                      file=sys.stdout, flush=True)

        yield line_callback
        return
    tqdm = import_optional("tqdm", "tqdm", "The progress bar").tqdm

    with tqdm(total=total, desc=description, unit="", bar_format="{l_bar}{bar}| {elapsed}<{remaining} {postfix}") as bar:

        def callback(fraction: float, message: str) -> None:
            target = int(round(min(1.0, max(0.0, fraction)) * total))
            if target > bar.n:
                bar.update(target - bar.n)
            if message:
                bar.set_postfix_str(message, refresh=False)

        yield callback
