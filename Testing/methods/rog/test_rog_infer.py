"""ROG inference: inverse-distance weights, sliding window, OOM fallback, checkpoints, trained predictions."""

import warnings

import numpy as np
import pytest
import torch

from deepimaging.core.checkpoint import make_header, save_checkpoint
from deepimaging.core.errors import CheckpointError, InputError
from deepimaging.core.image import Image
from deepimaging.core.metrics import dice
from deepimaging.rog.infer import (RogModel, count_windows, inverse_distance_weights, labels_to_segmentation,
                                   load_rog, predict_volume, run_with_fallback, sliding_window_probabilities)
from deepimaging.rog.preprocess import preprocess_image
from deepimaging.rog.synthetic import make_blob_case


@pytest.fixture
def random_model(blob_plan):
    torch.manual_seed(0)
    model = blob_plan.build_model().eval()
    return RogModel(model, blob_plan, make_header("rog", model.config(), preprocessing=blob_plan.to_dict()))


@pytest.mark.parametrize("patch", [(32, 32, 32), (16, 48, 40), (7, 9, 11)])
def test_inverse_distance_weights_peak_at_the_centre(patch):
    w = inverse_distance_weights(patch).numpy()
    assert w.shape == patch and (w > 0).all() and w.max() == pytest.approx(1.0)
    for axis in range(3):
        assert np.allclose(w, np.flip(w, axis))
    centre = tuple(n // 2 for n in patch)
    assert w[centre] == w.max()
    assert w[0, 0, 0] == w.min() < 0.1 * w.max()  # corners count ~10x less than centres
    line = w[:, centre[1], centre[2]]
    half = line[: (patch[0] + 1) // 2]
    assert np.all(np.diff(half) >= 0)  # rises monotonically towards the centre


def test_window_count_matches_monai_placement():
    assert count_windows((32, 32, 32), (32, 32, 32), 0.5) == 1
    assert count_windows((64, 32, 32), (32, 32, 32), 0.5) == 3
    assert count_windows((20, 20, 20), (32, 32, 32), 0.5) == 1


def test_one_window_equals_a_plain_forward_pass(random_model, blob_plan):
    x = np.random.default_rng(0).normal(size=(1, 32, 32, 32)).astype(np.float32)
    probs = sliding_window_probabilities(x, random_model.model, blob_plan, torch.device("cpu"))
    with torch.no_grad():
        direct = torch.softmax(random_model.model(torch.from_numpy(x)[None]), 1)[0].numpy()
    assert probs.shape == (3, 32, 32, 32)
    assert np.allclose(probs, direct, atol=1e-5)


def test_overlapping_windows_blend_to_valid_probabilities(random_model, blob_plan):
    x = np.random.default_rng(1).normal(size=(1, 20, 48, 40)).astype(np.float32)  # smaller than a patch in z
    seen = []
    probs = sliding_window_probabilities(x, random_model.model, blob_plan, torch.device("cpu"), batch_size=3,
                                         progress=lambda f, m: seen.append(f))
    assert probs.shape == (3, 20, 48, 40) and np.isfinite(probs).all()
    assert np.allclose(probs.sum(0), 1.0, atol=1e-4)
    assert seen[-1] == pytest.approx(1.0) and len(seen) == 2  # 4 windows in batches of 3


def test_out_of_memory_retries_smaller_then_on_cpu():
    calls = []

    def job(device, batch, out_device):
        calls.append((device.type, batch, out_device.type))
        if batch > 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return np.ones(1)

    with pytest.warns(RuntimeWarning, match="out of memory"):
        assert run_with_fallback(job, torch.device("cpu"), 4).tolist() == [1.0]
    assert calls == [("cpu", 4, "cpu"), ("cpu", 1, "cpu")]

    def broken(device, batch, out_device):
        raise ValueError("not a memory problem")

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="not a memory problem"):
            run_with_fallback(broken, torch.device("cpu"), 4)


def test_prediction_lands_on_the_input_grid_with_named_segments(random_model):
    image, _ = make_blob_case((20, 30, 26), spacing=(1.3, 0.9, 1.6), seed=2)
    labels, probs = predict_volume(image, random_model, device="cpu", return_probabilities=True)
    labels.require_same_grid(image)
    assert probs.shape == (3, *image.shape) and np.allclose(probs.sum(0), 1.0, atol=1e-4)
    assert set(np.unique(labels.array)) <= {0, 1, 2}
    seg = labels_to_segmentation(labels, random_model.plan)
    assert seg.names() == ["liver", "kidney"]
    assert seg.segments[0].color != seg.segments[1].color


def test_trained_model_segments_a_held_out_volume(trained):
    image, truth = make_blob_case((36, 44, 40), spacing=(1.1, 0.9, 1.25), seed=77)  # other grid than training
    labels, _ = predict_volume(image, trained.best_path, device="cpu")
    labels.require_same_grid(image)
    scores = {v: dice(labels.array == v, truth.array == v) for v in (1, 2)}
    print(f"\nheld-out Dice after {trained.epochs_completed} short epochs: "
          f"liver {scores[1]:.3f}, kidney {scores[2]:.3f}")
    assert scores[1] > 0.7 and scores[2] > 0.6


def test_wrong_checkpoints_and_inputs_give_clear_errors(random_model, tmp_path):
    other = tmp_path / "levelset.pt"
    save_checkpoint(other, {"w": torch.zeros(1)}, make_header("levelset", {}))
    with pytest.raises(CheckpointError, match="method 'levelset'.*'rog'"):
        load_rog(other)
    image, _ = make_blob_case((20, 20, 20))
    with pytest.raises(CheckpointError, match="method 'levelset'"):
        predict_volume(image, other)
    broken = tmp_path / "broken.pt"
    save_checkpoint(broken, {"w": torch.zeros(1)}, make_header("rog", random_model.model.config()))
    with pytest.raises(CheckpointError, match="incomplete"):
        load_rog(broken)
    with pytest.raises(InputError, match="2-D"):
        predict_volume(Image(np.zeros((1, 30, 30), np.float32)), random_model)
    with pytest.raises(InputError, match="expects 1 channel"):
        predict_volume([image, image, image], random_model)  # a 4-D volume split into three channels
    assert preprocess_image(image, random_model.plan).array.shape == (1, 20, 20, 20)
