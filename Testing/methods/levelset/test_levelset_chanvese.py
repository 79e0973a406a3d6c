import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from deepimaging.core.errors import InputError
from deepimaging.core.metrics import dice
from deepimaging.core.progress import CancelToken, Cancelled
from deepimaging.levelset import ChanVeseParams, chan_vese, chan_vese_update, default_level_set, signed_distance
from deepimaging.levelset.chanvese import _FastClassicStep


def ellipse_image(n=96, noise=0.35, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:n, :n]
    truth = ((yy - n / 2) / (0.3 * n)) ** 2 + ((xx - n / 2) / (0.2 * n)) ** 2 < 1
    return truth * 1.0 + rng.normal(0, noise, (n, n)), truth


@pytest.mark.parametrize("init", ["mask", "checkerboard"])
def test_matches_scikit_image(init):
    """Same image, initial level set and parameters: our 2D result agrees with skimage's."""
    from skimage.segmentation import chan_vese as sk_chan_vese

    image, truth = ellipse_image()
    if init == "mask":
        n = image.shape[0]
        yy, xx = np.mgrid[:n, :n]
        phi0 = signed_distance(((yy - n / 2) ** 2 + (xx - n / 2) ** 2) < (0.15 * n) ** 2).astype(np.float64)
    else:
        phi0 = default_level_set(image.shape, "checkerboard").astype(np.float64)
    sk = sk_chan_vese(image, mu=0.25, lambda1=1, lambda2=1, tol=1e-3, max_num_iter=150, dt=0.5,
                      init_level_set=phi0.copy())
    ours = chan_vese(image, phi0, ChanVeseParams(mu=0.25, dt=0.5 * math.pi, max_iterations=150, tolerance=1e-3),
                     device="cpu")
    assert dice(ours.mask.numpy(), sk) >= 0.98
    assert dice(ours.mask.numpy(), truth) > 0.5


def test_fast_step_equals_differentiable_update():
    rng = np.random.default_rng(1)
    for shape, spacing in (((40, 50), (1.0, 1.0)), ((12, 20, 18), (2.5, 1.0, 1.2))):
        phi = torch.from_numpy(rng.normal(0, 3, shape).astype(np.float32))[None]
        img = torch.from_numpy(rng.random((2,) + shape).astype(np.float32))[None]
        rel = tuple(s / min(spacing) for s in spacing)
        for p in (ChanVeseParams(mu=0.3, lambda1=1.5, lambda2=0.7, dt=1.1, eps=0.8), ChanVeseParams(mu=0.0)):
            step = _FastClassicStep(img, p, rel)
            ref, fast = phi, phi
            for _ in range(4):  # several steps: the fast path reuses its buffers in turn
                ref = chan_vese_update(ref, img, mu=p.mu, lambda1=p.lambda1, lambda2=p.lambda2, dt=p.dt, eps=p.eps,
                                       spacing=rel)
                fast = step(fast)
                torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-4)


def test_update_is_differentiable_in_hyperparameters():
    phi = torch.randn(2, 16, 16, requires_grad=True)
    img = torch.rand(2, 3, 16, 16)
    mu = torch.tensor([0.2, 0.4], requires_grad=True)
    out = chan_vese_update(phi, img, mu=mu, lambda1=1.0, lambda2=1.0, dt=torch.tensor([1.0, 2.0]), eps=1.0,
                           spacing=(1, 1), soft_means=True)
    out.sum().backward()
    assert phi.grad is not None and phi.grad.abs().sum() > 0
    assert mu.grad is not None and mu.grad.abs().sum() > 0


def test_3d_anisotropic_segments_a_ball():
    rng = np.random.default_rng(2)
    z, y, x = np.mgrid[:16, :32, :32]
    truth = ((z - 8) * 2.0) ** 2 + (y - 16) ** 2 + (x - 16) ** 2 < 10 ** 2  # z spacing 2 mm, 1 mm in-plane
    image = truth + rng.normal(0, 0.3, truth.shape)
    start = ndimage.binary_erosion(truth, iterations=3)
    res = chan_vese(image, signed_distance(start, (2.0, 1.0, 1.0)) / 5, ChanVeseParams(mu=0.1, max_iterations=150),
                    spacing=(2.0, 1.0, 1.0), device="cpu")
    assert dice(res.mask.numpy(), truth) > 0.9 > dice(start, truth)


def test_vector_valued_uses_all_channels():
    """Two channels each with half the contrast: together they find the object."""
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[:64, :64]
    truth = (yy - 32) ** 2 + (xx - 32) ** 2 < 15 ** 2
    left = truth & (xx < 32)
    right = truth & (xx >= 32)
    channels = np.stack([left + rng.normal(0, 0.2, truth.shape), right + rng.normal(0, 0.2, truth.shape)])
    phi0 = signed_distance(ndimage.binary_erosion(truth, iterations=4)) / 5
    both = chan_vese(channels, phi0, ChanVeseParams(mu=0.1, max_iterations=200), device="cpu").mask.numpy()
    one = chan_vese(channels[0], phi0, ChanVeseParams(mu=0.1, max_iterations=200), device="cpu").mask.numpy()
    assert dice(both, truth) > 0.9
    assert dice(both, truth) > dice(one, truth) + 0.1


def test_converges_and_reports_progress():
    image, _ = ellipse_image(64, noise=0.05)
    seen = []
    res = chan_vese(image, default_level_set(image.shape, "disk"), ChanVeseParams(max_iterations=2000, tolerance=1e-2),
                    progress=lambda f, m: seen.append(f), device="cpu")
    assert res.converged and res.iterations < 2000
    assert seen[-1] == 1.0 and all(b >= a for a, b in zip(seen, seen[1:]))


def test_cancel_between_iterations():
    image, _ = ellipse_image(64)
    token = CancelToken()
    calls = []

    def progress(f, m):
        calls.append(f)
        if len(calls) == 3:
            token.cancel()

    with pytest.raises(Cancelled):
        chan_vese(image, default_level_set(image.shape), ChanVeseParams(max_iterations=500, tolerance=0),
                  progress=progress, cancel=token, device="cpu")
    assert len(calls) == 3


def test_bad_inputs():
    with pytest.raises(InputError, match="NaN"):
        chan_vese(np.array([[np.nan, 1.0], [0.0, 1.0]]), np.ones((2, 2)), device="cpu")
    with pytest.raises(InputError, match="does not match"):
        chan_vese(np.zeros((4, 4)), np.ones((5, 5)), device="cpu")
    with pytest.raises(InputError, match="dt"):
        chan_vese(np.zeros((4, 4)), np.ones((4, 4)), ChanVeseParams(dt=0), device="cpu")
    with pytest.raises(InputError, match="2D or 3D"):
        chan_vese(np.zeros((2, 2, 2, 2)), np.ones((2, 2, 2, 2)), device="cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (checked on the GPU machine)")
def test_cuda_matches_cpu():
    image, _ = ellipse_image(64)
    phi0 = default_level_set(image.shape, "disk")
    cpu = chan_vese(image, phi0, ChanVeseParams(max_iterations=100, tolerance=0), device="cpu").mask.numpy()
    gpu = chan_vese(image, phi0, ChanVeseParams(max_iterations=100, tolerance=0), device="cuda").mask.cpu().numpy()
    assert dice(cpu, gpu) > 0.99
