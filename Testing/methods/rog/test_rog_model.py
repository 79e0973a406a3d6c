"""ROG network: published size and topology, shapes for (an)isotropic strides, gradients, config."""

import json

import pytest
import torch

from deepimaging.rog.model import (ROG, count_conv_macs, count_parameters, estimate_gflops, lattice_layout,
                                   total_stride)

# Counted from the reference code (BCV-Uniandes/ROG) for 1 modality / 2 classes.
REFERENCE_PARAMETERS = 2_596_315

# (stem stride 1, stem stride 2, level 0 -> 1 stride) that the reference planner derives for
# the ten MSD tasks from its stored size statistics (axis order as there, irrelevant at 96^3).
MSD_STRIDES = [
    ((1, 1, 1), (2, 2, 2), (2, 2, 2)), ((2, 2, 1), (2, 2, 2), (2, 2, 2)), ((2, 2, 1), (2, 2, 2), (2, 2, 2)),
    ((1, 1, 1), (1, 1, 1), (2, 2, 2)), ((1, 1, 1), (2, 2, 1), (2, 2, 1)), ((2, 2, 1), (2, 2, 2), (2, 2, 2)),
    ((2, 1, 1), (2, 2, 1), (2, 2, 2)), ((1, 1, 1), (2, 2, 1), (2, 2, 2)), ((2, 2, 1), (2, 2, 1), (2, 2, 2)),
    ((2, 2, 1), (2, 2, 1), (2, 2, 2)),
]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny 3D convs run far faster single-threaded, especially on a busy CI machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_parameter_count_matches_the_reference():
    n = count_parameters(ROG(1, 2))
    print(f"ROG(1 modality, 2 classes): {n:,} parameters")
    assert n == REFERENCE_PARAMETERS
    assert abs(n - 2.6e6) / 2.6e6 < 0.05


@pytest.mark.parametrize("stem, lattice", [
    (((1, 2, 2), (2, 2, 2)), (2, 2, 2)),
    (((1, 1, 1), (1, 2, 2)), (1, 2, 2)),
    (((1, 1, 1), (1, 1, 1)), (1, 1, 1)),
])
def test_parameter_count_does_not_depend_on_strides(stem, lattice):
    assert count_parameters(ROG(1, 2, stem, lattice)) == REFERENCE_PARAMETERS


def test_lattice_topology_is_the_published_one():
    layout = lattice_layout(2)
    assert layout == [[0], [1], [0, 2], [1, 3], [0, 2], [1, 3], [0, 2], [1], [0]]
    model = ROG(1, 2)
    assert sum(len(step) for step in model.lattice) == 14
    coarse = [cell for levels, cells in zip(layout, model.lattice) for lv, cell in zip(levels, cells) if lv == 3]
    assert [count_parameters(c) for c in coarse] == [685_568, 685_568]  # "~686k each"
    assert total_stride() == (32, 32, 32)  # lowest resolution 1/32 of the input
    assert total_stride(((1, 2, 2), (1, 2, 2)), (2, 2, 2)) == (8, 32, 32)


@pytest.mark.parametrize("stem, lattice, shape", [
    (((2, 2, 2), (2, 2, 2)), (2, 2, 2), (32, 64, 32)),
    (((1, 2, 2), (2, 2, 2)), (1, 2, 2), (16, 32, 64)),  # anisotropic: z downsampled 8x, y/x 32x
    (((1, 1, 1), (1, 2, 2)), (2, 2, 2), (12, 20, 18)),  # not multiples of the total stride
])
def test_output_has_the_input_spatial_shape(stem, lattice, shape):
    model = ROG(2, 3, stem, lattice).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 2, *shape))
    assert out.shape == (1, 3, *shape)
    assert torch.isfinite(out).all()


def test_gradients_reach_every_parameter_and_the_input():
    model = ROG(1, 2, ((1, 2, 2), (2, 2, 2)), (1, 2, 2))
    x = torch.randn(1, 1, 16, 32, 64, requires_grad=True)
    target = torch.randint(0, 2, (1, 16, 32, 64))
    torch.nn.functional.cross_entropy(model(x), target).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing
    assert all(p.grad.abs().sum() > 0 for p in model.parameters())
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_config_round_trip_rebuilds_the_same_network():
    model = ROG(2, 4, ((1, 2, 2), (2, 2, 2)), (1, 2, 2)).eval()
    config = json.loads(json.dumps(model.config()))
    clone = ROG.from_config(config).eval()
    assert clone.config() == model.config()
    clone.load_state_dict(model.state_dict())
    x = torch.randn(1, 2, 16, 32, 64)
    with torch.no_grad():
        assert torch.allclose(model(x), clone(x))


def test_bad_configs_and_inputs_give_clear_errors():
    with pytest.raises(ValueError, match="unknown ROG config"):
        ROG.from_config({"in_channels": 1, "num_classes": 2, "depth": 5})
    with pytest.raises(ValueError, match="1 or 2"):
        ROG(1, 2, ((3, 2, 2), (2, 2, 2)))
    model = ROG(1, 2).eval()
    with pytest.raises(ValueError, match="smaller than the network's total stride"):
        model(torch.zeros(1, 1, 16, 64, 64))
    with pytest.raises(ValueError, match="one voxel at the coarsest level"):
        model(torch.zeros(1, 1, 32, 32, 32))
    with pytest.raises(ValueError, match="expected input"):
        model(torch.zeros(1, 3, 64, 64, 64))


def test_gflops_at_96_cubed():
    default = ROG(1, 2)
    macs = count_conv_macs(default, (96, 96, 96))
    gflops = estimate_gflops(default, (96, 96, 96))
    distinct = {s: estimate_gflops(ROG(1, 2, s[:2], s[2]), (96, 96, 96)) for s in set(MSD_STRIDES)}
    per_task = [distinct[s] for s in MSD_STRIDES]
    mean = sum(per_task) / len(per_task)
    print(f"\nall strides 2 at 96^3: {gflops:.2f} GMACs (= 'GFLOPs' as in the paper), {2 * macs / 1e9:.2f} GFLOPs "
          f"as 2 x MACs; reference-planner MSD strides: mean {mean:.2f}, max {max(per_task):.2f} GMACs "
          "(paper: 30.55 mean, 79.32 max)")
    assert gflops == pytest.approx(5.026, abs=0.01)
    assert 10 <= mean <= 100
    assert max(per_task) > 2 * gflops  # strides of 1 in the stem cost more
