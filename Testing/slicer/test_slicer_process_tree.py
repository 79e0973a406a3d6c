"""DeepImagingCommonLib.process as it runs inside Slicer: no psutil, and a launcher child.

Inside Slicer the child command is ``PythonSlicer``, a launcher that runs the real Python as
its own child, and psutil is not installed.  Every scenario here therefore runs in a fresh
Python where importing psutil fails, and starts a small "launcher stand-in" script whose
grandchild does the work.  Cancel must kill that grandchild, and ``poll()`` (called from
Slicer's GUI thread by a timer) must never block, even while a grandchild that outlived the
child still holds the output pipe open.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

COMMON = Path(__file__).resolve().parents[2] / "DeepImagingCommon"
POSIX_ONLY = pytest.mark.skipif(os.name == "nt", reason="process groups and /proc are POSIX")
POLL_LIMIT = 0.5  # seconds one poll() may take on the GUI thread

# Slicer's Python has no psutil: make the import fail the way it does there.
_BLOCK_PSUTIL = ("import sys\n"
                 "class Block:\n"
                 "    def find_spec(self, name, path=None, target=None):\n"
                 "        if name == 'psutil' or name.startswith('psutil.'):\n"
                 "            raise ModuleNotFoundError(\"No module named 'psutil'\")\n"
                 "sys.meta_path.insert(0, Block())\n"
                 "try:\n"
                 "    import psutil\n"
                 "except ModuleNotFoundError:\n"
                 "    pass\n"
                 "else:\n"
                 "    raise SystemExit('psutil was not blocked')\n")

_SCENARIO_PRELUDE = """
import json, os, subprocess, sys, time
from DeepImagingCommonLib.process import BackgroundProcess, killProcessTree

def pollUntilDone(job, seconds):
    lines, durations = [], []
    deadline = time.monotonic() + seconds
    while job.running and time.monotonic() < deadline:
        started = time.monotonic()
        lines += job.poll()
        durations.append(time.monotonic() - started)
        time.sleep(0.02)
    return lines, durations

def waitForFile(path, seconds, job=None):
    lines, deadline = [], time.monotonic() + seconds
    while not os.path.exists(path) and time.monotonic() < deadline:
        if job is not None:
            lines += job.poll()
        time.sleep(0.05)
    assert os.path.exists(path), 'the worker did not start: %r' % lines
    return lines

def report(**values):
    print('RESULT ' + json.dumps(values), flush=True)
"""

# Like PythonSlicer: run the real Python as a child, wait for it, return its exit code.
_LAUNCHER = ("import subprocess, sys\n"
             "sys.exit(subprocess.call([sys.executable] + sys.argv[1:]))\n")

# A launcher that starts a worker sharing its stdout and exits at once: the pipe stays open.
_DETACHING_LAUNCHER = ("import subprocess, sys\n"
                       "subprocess.Popen([sys.executable] + sys.argv[1:])\n"
                       "print('launcher exiting', flush=True)\n")


def _worker(sleep_seconds, after=""):
    """Worker code: writes its pid to argv[1] (atomically), sleeps, then runs ``after``."""
    return ("import os, sys, time\n"
            "path = sys.argv[1]\n"
            "with open(path + '.tmp', 'w') as f:\n"
            "    f.write(str(os.getpid()))\n"
            "os.replace(path + '.tmp', path)\n"
            f"time.sleep({sleep_seconds})\n" + after)


def _run_without_psutil(code, *args, timeout=90):
    """Run a scenario in a fresh Python without psutil; returns the dict it reported."""
    env = dict(os.environ, PYTHONPATH=str(COMMON), PYTHONUNBUFFERED="1")
    result = subprocess.run([sys.executable, "-c", _BLOCK_PSUTIL + _SCENARIO_PRELUDE + code] + [str(a) for a in args],
                            env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout + result.stderr
    reports = [line[len("RESULT "):] for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    assert reports, result.stdout + result.stderr
    return json.loads(reports[-1])


def _is_gone(pid):
    """True when ``pid`` no longer runs; a zombie waiting to be reaped counts as gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    try:  # the state field follows the ')' that closes the command name
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def _wait_gone(pid, seconds=5.0):
    deadline = time.monotonic() + seconds
    while not _is_gone(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return _is_gone(pid)


@pytest.fixture
def scripts(tmp_path):
    (tmp_path / "launcher.py").write_text(_LAUNCHER)
    (tmp_path / "detaching_launcher.py").write_text(_DETACHING_LAUNCHER)
    return tmp_path


@pytest.fixture
def worker_pid_file(tmp_path):
    """Where workers write their pid; a worker still alive after the test is killed."""
    path = tmp_path / "worker.pid"
    yield path
    if path.is_file():
        pid = int(path.read_text())
        if not _is_gone(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


@POSIX_ONLY
def test_cancel_kills_the_launchers_child_without_psutil(scripts, worker_pid_file):
    code = """
launcher, pidFile, worker = sys.argv[1:4]
job = BackgroundProcess([sys.executable, launcher, '-c', worker, pidFile]).start()
lines = waitForFile(pidFile, 60, job)
started = time.monotonic()
job.cancel()
cancelSeconds = time.monotonic() - started
more, durations = pollUntilDone(job, 30)
report(state=job.state.name, cancelSeconds=cancelSeconds, maxPoll=max(durations, default=0.0), lines=lines + more)
"""
    result = _run_without_psutil(code, scripts / "launcher.py", worker_pid_file, _worker(60))
    worker = int(worker_pid_file.read_text())
    assert _wait_gone(worker), f"cancel left the launcher's child (pid {worker}) running"
    assert result["state"] == "CANCELLED", result
    assert result["cancelSeconds"] < 1.0, result
    assert result["maxPoll"] < POLL_LIMIT, result


@POSIX_ONLY
def test_poll_never_blocks_while_an_orphan_holds_the_pipe(scripts, worker_pid_file):
    code = """
launcher, pidFile, worker = sys.argv[1:4]
started = time.monotonic()
job = BackgroundProcess([sys.executable, launcher, '-c', worker, pidFile]).start()
lines, durations = pollUntilDone(job, 30)
report(state=job.state.name, returncode=job.returncode, seconds=time.monotonic() - started,
       maxPoll=max(durations, default=0.0), polls=len(durations), lines=lines)
"""
    worker = _worker(4, "print('worker done', flush=True)\n")
    result = _run_without_psutil(code, scripts / "detaching_launcher.py", worker_pid_file, worker)
    assert result["maxPoll"] < POLL_LIMIT, result
    assert result["state"] == "SUCCEEDED" and result["returncode"] == 0, result
    assert result["seconds"] < 10, result
    assert "launcher exiting" in result["lines"], result
    if worker_pid_file.is_file():  # the orphan still holding the pipe was killed after the grace period
        assert _wait_gone(int(worker_pid_file.read_text())), result


@POSIX_ONLY
def test_wait_is_bounded_and_kills_orphans_holding_the_pipe(scripts, worker_pid_file):
    code = """
launcher, pidFile, worker = sys.argv[1:4]
job = BackgroundProcess([sys.executable, launcher, '-c', worker, pidFile]).start()
waitForFile(pidFile, 60)
started = time.monotonic()
lines = job.wait(timeout=60)
report(state=job.state.name, returncode=job.returncode, seconds=time.monotonic() - started, lines=lines,
       running=job.running)
"""
    result = _run_without_psutil(code, scripts / "detaching_launcher.py", worker_pid_file, _worker(60))
    assert result["state"] == "SUCCEEDED" and result["returncode"] == 0 and not result["running"], result
    assert result["seconds"] < 10, result
    assert "launcher exiting" in result["lines"], result
    assert _wait_gone(int(worker_pid_file.read_text())), "wait() left the orphan holding the pipe running"


@POSIX_ONLY
def test_kill_process_tree_kills_the_group_without_psutil(scripts, worker_pid_file):
    code = """
launcher, pidFile, worker = sys.argv[1:4]
proc = subprocess.Popen([sys.executable, launcher, '-c', worker, pidFile], start_new_session=True,
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # not our report pipe
waitForFile(pidFile, 60)
killProcessTree(proc)
report(returncode=proc.returncode)
"""
    result = _run_without_psutil(code, scripts / "launcher.py", worker_pid_file, _worker(60))
    assert result["returncode"] is not None, result
    worker = int(worker_pid_file.read_text())
    assert _wait_gone(worker), f"killProcessTree left the launcher's child (pid {worker}) running"


@pytest.mark.parametrize("exit_code, state", [(0, "SUCCEEDED"), (5, "FAILED")])
@pytest.mark.parametrize("through_launcher", [False, True], ids=["direct", "launcher"])
def test_all_output_up_to_the_exit_is_delivered(scripts, exit_code, state, through_launcher):
    worker = ("import os, sys\n"
              "for i in range(300):\n"
              "    print('line', i)\n"
              "sys.stdout.write('last line before exit')\n"
              "sys.stdout.flush()\n"
              f"os._exit({exit_code})\n")
    code = """
launcher, worker = sys.argv[1:3]
args = ([sys.executable, launcher] if launcher else [sys.executable]) + ['-c', worker]
job = BackgroundProcess(args).start()
lines, durations = pollUntilDone(job, 60)
report(state=job.state.name, returncode=job.returncode, maxPoll=max(durations, default=0.0), lines=lines)
"""
    launcher = scripts / "launcher.py" if through_launcher else ""
    result = _run_without_psutil(code, launcher, worker)
    assert result["lines"] == [f"line {i}" for i in range(300)] + ["last line before exit"]
    assert result["state"] == state and result["returncode"] == exit_code, result
    assert result["maxPoll"] < POLL_LIMIT, result
