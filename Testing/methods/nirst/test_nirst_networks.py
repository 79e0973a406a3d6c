"""Z-Net / Y-Net networks of NIRSTRecon: sizes, shapes, gradient flow, trainability, input contract."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F

from deepimaging.core.device import torch_threads
from deepimaging.nirst.ynet import YNet
from deepimaging.nirst.znet import (MeasurementNormalizer, ZNet, arrange_measurements, count_parameters,
                                    flatten_measurements, infer_n_optodes, n_measurements)

PAPER_PARAMS = {ZNet: 3.48e6, YNet: 6.09e6}


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    # These small convolutions gain little from a second thread, and when other jobs share
    # the two cores, OpenMP spinning made the overfit test 6-10x slower (measured 60 s vs 6 s).
    with torch_threads(1):
        yield


def _batch(n_optodes: int, batch: int = 2, size: int = 100, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, n_measurements(n_optodes), generator=g)
    mri = torch.randn(batch, 1, size, size, generator=g)
    return x, mri


@pytest.mark.parametrize("cls", [ZNet, YNet])
def test_parameter_count_matches_paper(cls):
    n = count_parameters(cls())
    assert abs(n / PAPER_PARAMS[cls] - 1) < 0.05, n


def test_znet_is_smaller_than_ynet():
    # The paper's point: Z-Net needs about half of Y-Net's parameters.
    assert count_parameters(ZNet()) < 0.6 * count_parameters(YNet())


@pytest.mark.parametrize("cls", [ZNet, YNet])
@pytest.mark.parametrize("n_optodes", [16, 8])
def test_forward_shapes(cls, n_optodes):
    net = cls(n_optodes=n_optodes)
    assert net.n_inputs == n_optodes * (n_optodes - 1) * 9
    x, mri = _batch(n_optodes)
    out = net(x, mri)
    assert out.shape == (2, 3, 100, 100)
    assert torch.isfinite(out).all()
    net.eval()
    with torch.no_grad():
        assert net(arrange_measurements(x), mri[:, 0]).shape == (2, 3, 100, 100)


@pytest.mark.parametrize("cls", [ZNet, YNet])
def test_weights_trained_on_16_optodes_run_on_8(cls):
    # The paper's generalisation test feeds 8-optode data to the network trained on 16.
    net16, net8 = cls(n_optodes=16).eval(), cls(n_optodes=8).eval()
    net8.load_state_dict(net16.state_dict())
    x, mri = _batch(8)
    with torch.no_grad():
        assert torch.allclose(net16(x, mri), net8(x, mri))


@pytest.mark.parametrize("cls, signal_prefix, mri_prefix",
                         [(ZNet, "signal_", "mri_"), (YNet, "signal_encoder", "mri_encoder")])
def test_gradients_reach_both_branches(cls, signal_prefix, mri_prefix):
    net = cls()
    x, mri = _batch(16)
    F.mse_loss(net(x, mri), torch.randn(2, 3, 100, 100)).backward()
    for prefix in (signal_prefix, mri_prefix):
        grads = [p.grad for name, p in net.named_parameters() if name.startswith(prefix)]
        assert grads and all(gr is not None for gr in grads), prefix
        assert sum(float(gr.abs().sum()) for gr in grads) > 0, prefix
        first_conv = next(p for name, p in net.named_parameters() if name.startswith(prefix) and p.dim() == 4)
        assert float(first_conv.grad.abs().sum()) > 0, prefix


@pytest.mark.parametrize("cls", [ZNet, YNet])
def test_tiny_overfit(cls):
    # 32 px images keep this fast on two CPU cores; the networks are size-agnostic.
    torch.manual_seed(0)
    net = cls()
    x, mri = _batch(16, batch=4, size=32, seed=1)
    target = F.interpolate(torch.randn(4, 3, 4, 4, generator=torch.Generator().manual_seed(2)),
                           size=(32, 32), mode="bilinear", align_corners=False)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    losses = []
    for _ in range(60):
        opt.zero_grad()
        loss = F.mse_loss(net(x, mri), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 5, (losses[0], losses[-1])


def test_arrangement_follows_source_major_convention():
    n, w = 16, 9
    x = torch.arange(n_measurements(n, w), dtype=torch.float32).view(1, -1)
    grid = arrange_measurements(x)
    assert grid.shape == (1, w, n, n)
    for wl, s, d in [(0, 0, 1), (3, 5, 2), (8, 15, 14), (2, 7, 8)]:
        d_rank = d if d < s else d - 1
        index = ((wl * n) + s) * (n - 1) + d_rank
        assert grid[0, wl, s, (d - s) % n] == index
    assert torch.all(grid[0, :, torch.arange(n), 0] == 0)     # offset 0 = source itself, unmeasured
    assert torch.equal(flatten_measurements(grid), x)
    assert infer_n_optodes(504) == 8 and infer_n_optodes(2160) == 16
    with pytest.raises(ValueError):
        arrange_measurements(torch.zeros(1, 2000))


def test_normalizer_round_trip_and_state_dict():
    g = torch.Generator().manual_seed(3)
    reference = torch.exp(-torch.rand(2160, generator=g, dtype=torch.float64) * 10)
    train = reference * torch.exp(0.1 * torch.randn(50, 2160, generator=g, dtype=torch.float64))
    norm = MeasurementNormalizer().fit(train, reference=reference)
    z = norm.transform(train)
    assert z.dtype == torch.float32 and z.shape == train.shape
    per_wl = z.view(50, 9, -1).transpose(0, 1).reshape(9, -1)
    assert torch.allclose(per_wl.mean(1), torch.zeros(9), atol=1e-4)
    assert torch.allclose(per_wl.std(1), torch.ones(9), atol=1e-3)
    assert torch.allclose(norm.inverse_transform(norm.transform(train[:3]).double()), train[:3], rtol=1e-5)

    buffer = io.BytesIO()
    torch.save(norm.state_dict(), buffer)
    buffer.seek(0)
    restored = MeasurementNormalizer.from_state_dict(torch.load(buffer, weights_only=True))
    assert torch.equal(restored.transform(train[:5]), norm.transform(train[:5]))

    plain = MeasurementNormalizer(n_optodes=8).fit(torch.rand(10, 504, generator=g) + 0.5)
    assert plain.load_state_dict(plain.state_dict()).log_reference is None
    with pytest.raises(ValueError):
        plain.transform(torch.rand(2, 2160))
    with pytest.raises(RuntimeError):
        MeasurementNormalizer().transform(train)
