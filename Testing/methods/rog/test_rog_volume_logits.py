"""Differentiable whole-volume logits for attacks, the nn.Module wrapper, and held-out case preparation."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.data.utils import dense_patch_slices

from deepimaging.core.errors import InputError
from deepimaging.core.imageio import read_image, write_image
from deepimaging.rog.infer import (SlidingWindowSegmenter, inverse_distance_weights, prepare_case,
                                   sliding_window_probabilities, volume_logits)
from deepimaging.rog.preprocess import preprocess_labelled
from deepimaging.rog.synthetic import make_blob_case

CPU = torch.device("cpu")


@pytest.fixture
def net(tiny_plan):
    torch.manual_seed(0)
    return tiny_plan.build_model().eval()


def _naive_logits(net, x, plan, average, overlap=0.5):
    """Independent float64 reference: every window's weighted output padded to the volume and summed."""
    patch, size = tuple(plan.patch_size), tuple(x.shape[2:])
    interval = [p if p >= n else max(int(p * (1 - overlap)), 1) for n, p in zip(size, patch)]
    w = inverse_distance_weights(patch).double()
    num, den = 0.0, 0.0
    for window in dense_patch_slices(size, patch, interval):
        out = net(x[(slice(None), slice(None)) + tuple(window)]).double()
        value = torch.softmax(out, 1) if average == "probabilities" else out
        pads = [p for s, n in zip(window[::-1], size[::-1]) for p in (s.start, n - s.stop)]
        num = num + F.pad(value * w, pads)
        den = den + F.pad(w[None, None], pads)
    mean = num / den
    return torch.log(mean) if average == "probabilities" else mean


@pytest.mark.parametrize("shape", [(20, 30, 40), (12, 30, 20)])  # the second is padded (smaller than the patch)
def test_differentiable_logits_equal_the_prediction_path(net, tiny_plan, shape):
    x = np.random.default_rng(0).normal(size=(1, *shape)).astype(np.float32)
    probs = sliding_window_probabilities(x, net, tiny_plan, CPU, batch_size=3)
    volume = torch.from_numpy(x)[None].requires_grad_(True)
    logits = volume_logits(net, volume, tiny_plan, batch_size=3)
    assert logits.shape == (1, 3, *shape) and logits.dtype == torch.float32 and logits.requires_grad
    assert np.array_equal(logits.argmax(1)[0].numpy(), probs.argmax(0))
    assert np.allclose(torch.softmax(logits, 1)[0].detach().numpy(), probs, atol=1e-5)
    target = torch.from_numpy(probs.argmax(0))[None].long()
    F.cross_entropy(logits, (target + 1) % 3).backward()
    grad = volume.grad
    assert torch.isfinite(grad).all() and (grad != 0).float().mean() > 0.99


def test_gradients_match_an_independent_implementation(net, tiny_plan):
    x = torch.from_numpy(np.random.default_rng(1).normal(size=(1, 1, 20, 24, 40)).astype(np.float32))
    weights = torch.from_numpy(np.random.default_rng(2).normal(size=(1, 3, 20, 24, 40)))
    for average in ("probabilities", "logits"):
        grads = []
        # one window per forward pass in both: with this tiny patch the coarsest level has 2 voxels, and
        # instance norm over 2 voxels amplifies the rounding differences between batch sizes
        for fn in (lambda v: volume_logits(net, v, tiny_plan, average=average, batch_size=1),
                   lambda v: _naive_logits(net, v, tiny_plan, average)):
            v = x.clone().requires_grad_(True)
            out = fn(v)
            (out.double() * weights).sum().backward()
            grads.append((out.detach().double(), v.grad.double()))
        (ours, g_ours), (ref, g_ref) = grads
        assert torch.allclose(ours, ref, atol=1e-4), average
        assert torch.allclose(g_ours, g_ref, rtol=1e-3, atol=1e-3 * g_ref.abs().max().item()), average
    with torch.no_grad():  # without recorded gradients no checkpointing is needed; same values
        assert torch.allclose(volume_logits(net, x, tiny_plan), volume_logits(net, x, tiny_plan, checkpoint=True))


def test_segmenter_module_batches_volumes_and_stays_float32(net, tiny_plan, tiny_run):
    x = torch.from_numpy(np.random.default_rng(3).normal(size=(2, 1, 16, 20, 40)).astype(np.float32))
    segmenter = SlidingWindowSegmenter(net, tiny_plan).eval()
    with torch.no_grad():
        out = segmenter(x)
        assert out.shape == (2, 3, 16, 20, 40)
        assert torch.allclose(out[1:], volume_logits(net, x[1:], tiny_plan))
        with torch.autocast("cpu", dtype=torch.bfloat16):  # a caller's autocast does not reach the network
            assert torch.equal(segmenter(x), out)
    loaded = SlidingWindowSegmenter.from_checkpoint(tiny_run.best_path)
    assert not loaded.training and loaded.plan == tiny_run.plan
    with pytest.raises(InputError, match="normalised volume"):
        volume_logits(net, x, tiny_plan)  # two volumes at once: use the module
    with pytest.raises(ValueError, match="average"):
        SlidingWindowSegmenter(net, tiny_plan, average="median")


def test_prepare_case_from_files_and_arrays(tiny_plan, tmp_path):
    image, label = make_blob_case((30, 34, 28), spacing=(1.2, 0.9, 1.1), seed=5)
    write_image(image, tmp_path / "img.nii.gz")
    write_image(label, tmp_path / "lab.nii.gz")
    case = prepare_case(tmp_path / "img.nii.gz", tiny_plan, tmp_path / "lab.nii.gz")
    array, classes = preprocess_labelled(read_image(tmp_path / "img.nii.gz"), read_image(tmp_path / "lab.nii.gz"),
                                         tiny_plan)
    assert case.image.shape == (1, *array.shape) and case.image.dtype == torch.float32
    assert case.label.shape == (1, *classes.shape) and case.label.dtype == torch.int64
    assert np.array_equal(case.image[0].numpy(), array) and np.array_equal(case.label[0].numpy(), classes)
    assert case.resampled and case.grid.shape == image.shape
    low, high = tiny_plan.input_range()
    assert case.image.min().item() >= low[0] and case.image.max().item() <= high[0]
    from_arrays = prepare_case(image.array, tiny_plan, label.array, spacing=image.spacing)
    array, classes = preprocess_labelled(image, label, tiny_plan)
    assert np.array_equal(from_arrays.image[0].numpy(), array)
    assert np.array_equal(from_arrays.label[0].numpy(), classes)
    unlabelled = prepare_case([image], tiny_plan)
    assert unlabelled.label is None and torch.equal(unlabelled.image, from_arrays.image)
    native = prepare_case(image.array, tiny_plan)  # arrays without spacing: already on the target grid
    assert not native.resampled and native.image.shape[2:] == image.shape
