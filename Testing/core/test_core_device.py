import pytest
import torch

from deepimaging.core import device as dev
from deepimaging.core.device import DeviceUnavailableError, select_device


def test_auto_picks_cpu_without_accelerators(monkeypatch):
    monkeypatch.delenv(dev.ENV_VAR, raising=False)
    monkeypatch.setattr(dev, "cuda_usable", lambda: False)
    monkeypatch.setattr(dev, "mps_usable", lambda: False)
    assert select_device() == torch.device("cpu")
    assert select_device("auto") == torch.device("cpu")


def test_auto_prefers_cuda_then_mps(monkeypatch):
    monkeypatch.delenv(dev.ENV_VAR, raising=False)
    monkeypatch.setattr(dev, "cuda_usable", lambda: True)
    monkeypatch.setattr(dev, "mps_usable", lambda: True)
    assert select_device().type == "cuda"
    monkeypatch.setattr(dev, "cuda_usable", lambda: False)
    assert select_device().type == "mps"


def test_env_var_overrides_auto_and_argument_overrides_env(monkeypatch):
    monkeypatch.setenv(dev.ENV_VAR, "cpu")
    monkeypatch.setattr(dev, "cuda_usable", lambda: True)
    assert select_device() == torch.device("cpu")
    monkeypatch.setenv(dev.ENV_VAR, "cuda")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceUnavailableError):
            select_device()
    assert select_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown when CUDA is absent")
def test_cuda_requested_but_absent_gives_clear_error():
    with pytest.raises(DeviceUnavailableError, match="CUDA"):
        select_device("cuda")


def test_unknown_device_string():
    with pytest.raises(DeviceUnavailableError, match="unknown device"):
        select_device("tpu-please")


def test_autocast_is_noop_on_cpu():
    with dev.autocast(torch.device("cpu")):
        y = torch.ones(2, 2) @ torch.ones(2, 2)
    assert y.dtype == torch.float32


def test_seed_everything_reproducible():
    dev.seed_everything(7)
    a = torch.rand(3)
    dev.seed_everything(7)
    assert torch.equal(a, torch.rand(3))
