"""The optional numba kernel of classic Chan-Vese gives the torch path's results (the reference)."""

import math
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("numba")

from deepimaging.core.errors import InputError, MissingDependencyError  # noqa: E402
from deepimaging.core.metrics import dice  # noqa: E402
from deepimaging.core.progress import CancelToken, Cancelled  # noqa: E402
from deepimaging.levelset import ChanVeseParams, chan_vese, default_level_set, signed_distance  # noqa: E402
from deepimaging.levelset import chanvese, chanvese_numba  # noqa: E402


def blob_image(shape, noise=0.35, seed=0):
    """An ellipse / ellipsoid in noise and a smaller one as the initial level set."""
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    radii = (0.6, 0.45, 0.5)[:len(shape)]
    truth = sum((g / r) ** 2 for g, r in zip(grids, radii)) < 1
    image = truth + rng.normal(0, noise, shape)
    phi0 = signed_distance(sum((g / r) ** 2 for g, r in zip(grids, radii)) < 0.4) / 5
    return image.astype(np.float32), phi0.astype(np.float32)


def both(image, phi0, params, **kwargs):
    ref = chan_vese(image, phi0, params, device="cpu", backend="torch", **kwargs)
    fast = chan_vese(image, phi0, params, device="cpu", backend="numba", **kwargs)
    return ref, fast


PARAMS = [ChanVeseParams(max_iterations=4, tolerance=0),
          ChanVeseParams(mu=0.3, lambda1=1.5, lambda2=0.7, dt=1.1, eps=0.8, max_iterations=4, tolerance=0),
          ChanVeseParams(mu=0.0, max_iterations=4, tolerance=0)]


@pytest.mark.parametrize("shape,spacing", [((40, 52), None), ((12, 20, 18), (2.5, 1.0, 1.2)), ((30, 1), (1.0, 2.0)),
                                           ((3, 1, 9), None)])
@pytest.mark.parametrize("index", range(len(PARAMS)))
def test_few_steps_equal_torch(shape, spacing, index):
    """Step by step the fused kernel computes the torch update (to float32 rounding)."""
    rng = np.random.default_rng(1)
    image = rng.random((2,) + shape).astype(np.float32) if index == 1 else rng.random(shape).astype(np.float32)
    phi0 = rng.normal(0, 3, shape).astype(np.float32)
    before = phi0.copy()
    ref, fast = both(image, phi0, PARAMS[index], spacing=spacing)
    torch.testing.assert_close(fast.phi, ref.phi, rtol=1e-4, atol=1e-4)
    assert np.array_equal(phi0, before)  # the caller's array is not written to
    assert fast.phi.dtype == torch.float32 and fast.phi.shape == shape and fast.iterations == 4


def test_2d_long_run_and_convergence_match():
    image, phi0 = blob_image((96, 96))
    ref, fast = both(image, phi0, ChanVeseParams(max_iterations=300, tolerance=1e-3))
    assert fast.converged == ref.converged and fast.iterations == ref.iterations
    assert dice(fast.mask.numpy(), ref.mask.numpy()) > 0.999
    ref, fast = both(image, default_level_set(image.shape), ChanVeseParams(max_iterations=150, tolerance=0))
    assert dice(fast.mask.numpy(), ref.mask.numpy()) > 0.999


def test_3d_anisotropic_and_vector_valued_match():
    image, phi0 = blob_image((16, 28, 24), seed=2)
    params = ChanVeseParams(mu=0.1, max_iterations=100, tolerance=1e-3)
    ref, fast = both(image, phi0, params, spacing=(2.0, 1.0, 0.8))
    assert fast.iterations == ref.iterations and fast.converged == ref.converged
    assert dice(fast.mask.numpy(), ref.mask.numpy()) > 0.999
    second = np.flip(image, axis=2).copy()
    ref, fast = both(np.stack([image, second]), phi0, ChanVeseParams(max_iterations=60, lambda2=2.0, tolerance=0))
    assert dice(fast.mask.numpy(), ref.mask.numpy()) > 0.999


def test_parallel_kernel_equals_serial(monkeypatch):
    """Rows spread over threads give bit-identical results (per-row sums added in a fixed order)."""
    image, phi0 = blob_image((20, 24, 16), seed=4)
    params = ChanVeseParams(max_iterations=20, tolerance=0)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        serial = chan_vese(image, phi0, params, backend="numba", device="cpu")
        torch.set_num_threads(2)
        monkeypatch.setattr(chanvese_numba, "PARALLEL_MIN_VOXELS", 0)
        parallel = chan_vese(image, phi0, params, backend="numba", device="cpu")
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(serial.phi, parallel.phi)


def test_progress_and_cancel_as_in_torch():
    image, phi0 = blob_image((48, 48))
    seen = {}
    for backend in ("torch", "numba"):
        calls = []
        res = chan_vese(image, phi0, ChanVeseParams(max_iterations=500, tolerance=1e-2), device="cpu",
                        backend=backend, progress=lambda f, m: calls.append((f, m.split(",")[0])))
        assert res.converged and calls[-1][0] == 1.0
        seen[backend] = calls
    assert seen["numba"] == seen["torch"]

    for backend in ("torch", "numba"):
        token = CancelToken()
        calls = []

        def progress(fraction, message):
            calls.append(fraction)
            if len(calls) == 3:
                token.cancel()

        with pytest.raises(Cancelled):
            chan_vese(image, phi0, ChanVeseParams(max_iterations=50, tolerance=0), device="cpu", backend=backend,
                      progress=progress, cancel=token)
        assert len(calls) == 3


def test_backend_choice(monkeypatch):
    dev = torch.device("cpu")
    monkeypatch.delenv("DEEPIMAGING_CHANVESE_BACKEND", raising=False)
    assert chanvese._resolve_backend("auto", dev) == "numba"
    assert chanvese._resolve_backend("auto", torch.device("cuda")) == "torch"
    assert chanvese._resolve_backend("torch", dev) == "torch"
    monkeypatch.setenv("DEEPIMAGING_CHANVESE_BACKEND", "torch")
    assert chanvese._resolve_backend("auto", dev) == "torch"
    assert chanvese._resolve_backend("numba", dev) == "numba"  # an explicit choice wins over the variable
    monkeypatch.delenv("DEEPIMAGING_CHANVESE_BACKEND")
    with pytest.raises(InputError, match="backend"):
        chan_vese(np.zeros((4, 4)), np.ones((4, 4)), device="cpu", backend="fortran")
    with pytest.raises(InputError, match="CPU only"):
        chanvese._resolve_backend("numba", torch.device("cuda"))
    monkeypatch.setattr(chanvese, "is_available", lambda name: False)  # as in Slicer without numba
    assert chanvese._resolve_backend("auto", dev) == "torch"


def test_without_numba_forced_fails_and_auto_falls_back(monkeypatch):
    monkeypatch.setitem(sys.modules, "numba", None)  # import numba -> ModuleNotFoundError
    monkeypatch.delitem(sys.modules, "deepimaging.levelset.chanvese_numba")
    with pytest.raises(MissingDependencyError, match="numba"):
        chan_vese(np.zeros((4, 4)), np.ones((4, 4)), device="cpu", backend="numba")
    monkeypatch.setattr(chanvese, "is_available", lambda name: True)  # found but not importable
    with pytest.warns(UserWarning, match="torch path"):
        res = chan_vese(np.eye(4), np.ones((4, 4)), ChanVeseParams(max_iterations=3), device="cpu")
    assert res.iterations >= 1


def test_matches_scikit_image_defaults():
    """Same contract as the torch path: skimage's dt 0.5 is our pi/2, masks agree."""
    from skimage.segmentation import chan_vese as sk_chan_vese

    image, phi0 = blob_image((64, 64), seed=5)
    sk = sk_chan_vese(image.astype(np.float64), mu=0.25, dt=0.5, tol=1e-3, max_num_iter=150,
                      init_level_set=phi0.astype(np.float64))
    ours = chan_vese(image, phi0, ChanVeseParams(dt=0.5 * math.pi, max_iterations=150), device="cpu",
                     backend="numba")
    assert dice(ours.mask.numpy(), sk) >= 0.98
