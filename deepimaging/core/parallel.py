"""Process-level parallelism helpers shared by the methods' CPU workers (simulation, DRI).

Each worker process should use one core: its BLAS/OpenMP must stay single-threaded, or
N workers x M threads oversubscribe the cores (measured 5x slower on a 2-core machine).
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

THREAD_LIMIT_VARIABLES = (
    "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS",
)


@contextlib.contextmanager
def single_threaded_children() -> Iterator[None]:
    """Environment inherited by processes started inside the block: one BLAS/OpenMP thread."""
    saved = {name: os.environ.get(name) for name in THREAD_LIMIT_VARIABLES}
    os.environ.update({name: "1" for name in THREAD_LIMIT_VARIABLES})
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
