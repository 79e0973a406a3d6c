"""Suite-wide settings: one intra-op thread per test process; Testing/support on the path.

CI has 2 cores and the suite runs in 2 xdist workers; each worker (and every child process
a test starts, through OMP_NUM_THREADS) uses one thread.  With two OpenMP threads per
process on two shared cores, torch's small-tensor ops spin-wait and run 5-20x slower.
"""

import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)

# Shared test helpers (CMake reader, Slicer-like Python, headless scene, torchrun) for every folder.
sys.path.insert(0, str(Path(__file__).resolve().parent / "support"))
