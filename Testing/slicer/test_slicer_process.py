"""DeepImagingCommonLib.process and .dependencies: the Qt-free parts every module reuses."""

import os
import sys
import time
import types

import pytest

from DeepImagingCommonLib import dependencies, process


def _run_until_done(job, timeout=30.0):
    lines = []
    deadline = time.time() + timeout
    while job.running and time.time() < deadline:
        lines += job.poll()
        time.sleep(0.02)
    return lines + job.poll()


def test_background_process_reports_progress_and_success():
    script = ("from DeepImagingCommonLib.process import progressLine\n"
              "for i in range(3): print(progressLine((i + 1) / 3, f'step {i + 1}'), flush=True)\n"
              "print('caf\\u00e9 done')\n")
    env = {"PYTHONPATH": os.pathsep.join(sys.path), "PYTHONIOENCODING": "utf-8"}
    job = process.BackgroundProcess([sys.executable, "-c", script], env=env).start()
    lines = _run_until_done(job)
    assert job.state == process.ProcessState.SUCCEEDED and job.returncode == 0
    progress = [process.parseProgressLine(line) for line in lines]
    assert [p for p in progress if p] == [(pytest.approx(1 / 3, abs=1e-3), "step 1"),
                                          (pytest.approx(2 / 3, abs=1e-3), "step 2"), (1.0, "step 3")]
    assert lines[-1] == "caf\u00e9 done"


def test_background_process_failure_and_stderr():
    job = process.BackgroundProcess([sys.executable, "-c", "import sys; sys.stderr.write('boom\\n'); sys.exit(3)"])
    lines = _run_until_done(job.start())
    assert job.state == process.ProcessState.FAILED and job.returncode == 3
    assert "boom" in lines


def test_background_process_cancel_kills_the_child():
    job = process.BackgroundProcess([sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"])
    job.start()
    deadline = time.time() + 20
    seen = []
    while "started" not in seen and time.time() < deadline:
        seen += job.poll()
        time.sleep(0.02)
    started = time.time()
    job.cancel()
    _run_until_done(job, timeout=10)
    assert job.state == process.ProcessState.CANCELLED
    assert time.time() - started < 10


def test_cancel_kills_grandchildren_when_psutil_is_available():
    psutil = pytest.importorskip("psutil", reason="psutil not installed: only the direct child is killed")
    script = ("import subprocess, sys, time\n"
              "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
              "print(child.pid, flush=True); time.sleep(60)\n")
    job = process.BackgroundProcess([sys.executable, "-c", script]).start()
    lines, deadline = [], time.time() + 20
    while not lines and time.time() < deadline:
        lines += job.poll()
        time.sleep(0.02)
    grandchild = psutil.Process(int(lines[0]))
    job.cancel()
    grandchild.wait(timeout=10)
    assert not grandchild.is_running() or grandchild.status() == psutil.STATUS_ZOMBIE


def test_parse_progress_line_ignores_other_output():
    assert process.parseProgressLine("PROGRESS 0.5 half way") == (0.5, "half way")
    assert process.parseProgressLine("PROGRESS 2") == (1.0, "")
    assert process.parseProgressLine("PROGRESS nan-ish") is None
    assert process.parseProgressLine("epoch 3 loss 0.2") is None
    assert process.progressLine(-1, "x") == "PROGRESS 0.0000 x"


def test_version_floor():
    assert dependencies.versionAtLeast("2.13.0+cpu", "2.1")
    assert dependencies.versionAtLeast("2.1", "2.1.0")
    assert not dependencies.versionAtLeast("1.13.1", "2.1")
    assert not dependencies.versionAtLeast("2.0.1", "2.1")
    with pytest.raises(dependencies.DependencyError, match="needs 2.1 or newer"):
        dependencies.requireTorchVersion("1.13.1")


def test_ensure_torch_uses_the_installed_torch():
    import torch

    assert dependencies.installedTorchVersion() == torch.__version__
    assert dependencies.ensureTorch(askConfirmation=False) is torch


def test_ensure_torch_without_pytorch_extension(monkeypatch):
    monkeypatch.setattr(dependencies, "installedTorchVersion", lambda: None)
    monkeypatch.setitem(sys.modules, "PyTorchUtils", None)  # import raises ModuleNotFoundError
    with pytest.raises(dependencies.DependencyError, match="needs the 'PyTorch' extension"):
        dependencies.ensureTorch()


def test_ensure_torch_installs_through_pytorchutils(monkeypatch):
    calls = []

    class FakeLogic:
        @staticmethod
        def torchInstalled():
            return False

        def installTorch(self, **kwargs):
            calls.append(kwargs)
            return types.SimpleNamespace(__version__="2.4.0") if len(calls) == 1 else None

    monkeypatch.setattr(dependencies, "installedTorchVersion", lambda: None)
    monkeypatch.setitem(sys.modules, "PyTorchUtils", types.SimpleNamespace(PyTorchUtilsLogic=FakeLogic))
    assert dependencies.ensureTorch().__version__ == "2.4.0"
    assert calls[0] == {"askConfirmation": True, "torchVersionRequirement": ">=2.1"}
    with pytest.raises(dependencies.DependencyError, match="cancelled"):
        dependencies.ensureTorch()
