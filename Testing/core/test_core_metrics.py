import numpy as np
import pytest
import torch
from scipy import ndimage

from deepimaging.core import metrics


def random_blob(rng, shape):
    noise = ndimage.gaussian_filter(rng.normal(size=shape), 2.0)
    mask = noise > np.percentile(noise, 70)
    border = tuple(slice(2, -2) for _ in shape)  # keep away from the border like real organs
    out = np.zeros(shape, bool)
    out[border] = mask[border]
    return out


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("shape,spacing", [((40, 48), (0.7, 1.3)), ((16, 20, 24), (2.5, 0.8, 1.0))])
def test_against_monai(seed, shape, spacing):
    from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance, compute_iou
    from monai.metrics import compute_dice

    rng = np.random.default_rng(seed)
    a, b = random_blob(rng, shape), random_blob(rng, shape)
    ta = torch.from_numpy(a)[None, None].float()
    tb = torch.from_numpy(b)[None, None].float()
    onehot_a = torch.cat([1 - ta, ta], 1)
    onehot_b = torch.cat([1 - tb, tb], 1)
    assert metrics.dice(a, b) == pytest.approx(compute_dice(onehot_a, onehot_b, include_background=False).item(), abs=1e-6)
    assert metrics.iou(a, b) == pytest.approx(compute_iou(onehot_a, onehot_b, include_background=False).item(), abs=1e-6)
    hd = compute_hausdorff_distance(onehot_a, onehot_b, percentile=95, spacing=list(spacing)).item()
    asd = compute_average_surface_distance(onehot_a, onehot_b, symmetric=True, spacing=list(spacing)).item()
    assert metrics.hausdorff95(a, b, spacing) == pytest.approx(hd, rel=1e-5)
    assert metrics.assd(a, b, spacing) == pytest.approx(asd, rel=1e-5)


def test_known_values():
    a = np.zeros((20, 20), bool)
    a[5:15, 5:15] = True
    b = np.zeros_like(a)
    b[5:15, 7:17] = True  # shifted by 2 px
    assert metrics.dice(a, b) == pytest.approx(2 * 80 / 200)
    assert metrics.iou(a, b) == pytest.approx(80 / 120)
    assert metrics.hausdorff95(a, b) == pytest.approx(2.0)
    assert metrics.hausdorff95(a, b, spacing=(1.0, 3.0)) == pytest.approx(6.0)
    assert metrics.boundary_f1(a, a) == 1.0
    assert metrics.boundary_f1(a, b, tolerance=2.0) == pytest.approx(1.0)
    assert metrics.boundary_f1(a, b, tolerance=0.5) < 0.6


def test_empty_masks():
    z = np.zeros((5, 5), bool)
    one = z.copy()
    one[2, 2] = True
    assert metrics.dice(z, z) == 1.0 and metrics.dice(one, z) == 0.0
    assert metrics.hausdorff95(one, z) == np.inf
    assert metrics.boundary_f1(one, z) == 0.0
    with pytest.raises(ValueError, match="shapes"):
        metrics.dice(z, np.zeros((4, 4)))
