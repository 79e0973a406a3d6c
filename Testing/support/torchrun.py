"""Two-rank torchrun (gloo on loopback) for the DDP tests.

The rendezvous port is picked free just before the launch, which leaves a short race with
other processes on a busy machine, and gloo aborts a rank (SIGABRT) when its peer connection
times out under heavy load.  So a launch that died on a signal is retried once, on a new port;
a rank that exits with an ordinary error code fails the test at once.
"""

import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_ranks(arguments, timeout=240, attempts=2):
    """``torch.distributed.run --nproc_per_node 2 <arguments>``; returns the CompletedProcess."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for attempt in range(attempts):
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                   "--master_port", str(free_port())] + [str(a) for a in arguments]
        proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
        died_on_signal = "Signal " in proc.stderr and "received by PID" in proc.stderr
        if proc.returncode == 0 or not died_on_signal or attempt == attempts - 1:
            return proc
    return proc
