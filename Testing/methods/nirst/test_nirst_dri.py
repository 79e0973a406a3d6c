"""DRI baseline: spectral Jacobian, MRI-guided regulariser, recovery of an inclusion's HbT contrast."""

import numpy as np
import pytest

from deepimaging.core.errors import InputError
from deepimaging.nirst import (DiffusionForwardModel, absorption, disk_mask, make_disk_mesh, pixel_centres,
                               pixel_to_node_matrix, reduced_scattering)
from deepimaging.nirst.dri import DRIReconstructor, reference_amplitudes
from deepimaging.nirst.phantoms import render_phantom

RADIUS = 41.0
DATA_MESH_MM = 2.0  # the "measurement" model: finer than DRI's, so no inverse crime
BACKGROUND = np.array([14.0, 7.0, 40.0])
INCLUSION = np.array([28.0, 10.5, 50.0])  # HbT 38.5 vs 21 uM: contrast 1.83


def _simulate(centre, diameter, values, element_size_mm=DATA_MESH_MM):
    """Noise-free amplitudes and the MRI of one phantom with one inclusion (fixed geometry)."""
    maps, mri = render_phantom(np.array([centre]), np.array([diameter]), BACKGROUND, np.array([values]),
                               np.random.default_rng(0), RADIUS)
    mesh = make_disk_mesh(2 * RADIUS, element_size_mm)
    nodal = pixel_to_node_matrix(mesh) @ maps.reshape(3, -1).astype(float).T
    mua = absorption(nodal[:, 0], nodal[:, 1], nodal[:, 2] / 100.0)
    amplitudes = DiffusionForwardModel(mesh).measure(mua, reduced_scattering()).ravel()
    return amplitudes, mri, maps


@pytest.fixture(scope="module")
def small_dri():
    return DRIReconstructor(element_size_mm=6.0, iterations=2)


def test_spectral_jacobian_is_the_chain_rule_of_the_mua_jacobian(small_dri):
    rng = np.random.default_rng(1)
    n = small_dri.mesh.n_nodes
    values = BACKGROUND[:, None] * (1.0 + 0.2 * rng.random((3, n)))
    log_f, jac = small_dri._log_and_jacobian(values)
    direction = rng.standard_normal((3, n)) * BACKGROUND[:, None] * 1e-4
    direction[:, small_dri.mesh.boundary_nodes] = 0.0  # rim values move the source depth, held fixed in J
    plus, minus = small_dri._amplitudes(values + direction), small_dri._amplitudes(values - direction)
    numeric = (np.log(plus) - np.log(minus)) / 2
    analytic = np.einsum("pcn,cn->p", jac, direction)
    assert np.allclose(log_f, np.log(small_dri._amplitudes(values)))
    assert np.max(np.abs(numeric - analytic)) < 1e-3 * np.max(np.abs(analytic))


def test_regulariser_smooths_within_mri_regions_not_across(small_dri):
    x, y = pixel_centres(RADIUS)
    lesion = np.hypot(x - 10, y) < 12
    mri = np.where(disk_mask(RADIUS), np.where(lesion, 80.0, 50.0), 0.0)
    m = small_dri.regularisation_matrix(mri)
    nodes = small_dri.mesh.nodes
    inside = np.hypot(nodes[:, 0] - 10, nodes[:, 1]) < 12
    piecewise = np.where(inside, 2.0, 1.0)  # constant per MRI region: (almost) free
    smooth_across = 1.0 + 0.02 * nodes[:, 0]  # a gentle ramp of the same range: penalised
    assert piecewise @ m @ piecewise < 0.05 * (smooth_across @ m @ smooth_across)


def test_dri_recovers_inclusion_hbt_contrast_noise_free():
    amplitudes, mri, maps = _simulate((12.0, -8.0), 20.0, INCLUSION)
    reference = reference_amplitudes(element_size_mm=DATA_MESH_MM)
    dri = DRIReconstructor(element_size_mm=3.0, iterations=5)
    result = dri.reconstruct(amplitudes, mri, reference=reference)
    x, y = pixel_centres(RADIUS)
    inside = np.hypot(x - 12.0, y + 8.0) < 10.0
    background = disk_mask(RADIUS) & ~inside
    hbt = result.maps[0] + result.maps[1]
    contrast = hbt[inside].mean() / hbt[background].mean()
    true_contrast = INCLUSION[:2].sum() / BACKGROUND[:2].sum()
    # Stated tolerance: HbT contrast within 10 % of the truth, each chromophore's inclusion mean
    # within 15 %, background within 3 % (noise-free data, 2 mm data mesh vs 3 mm DRI mesh).
    assert abs(contrast / true_contrast - 1.0) < 0.10, contrast
    for c in range(3):
        assert abs(result.maps[c][inside].mean() / INCLUSION[c] - 1.0) < 0.15
        assert abs(result.maps[c][background].mean() / BACKGROUND[c] - 1.0) < 0.03
    assert result.objective[-1] < 0.05 * result.objective[0]
    assert set(result.as_dict()) == {"HbO", "Hb", "water", "HbT", "StO2"}


def test_dri_rejects_bad_inputs(small_dri):
    mri = np.full((100, 100), 50.0)
    with pytest.raises(InputError, match="expects 2160"):
        small_dri.reconstruct(np.ones(100), mri)
    with pytest.raises(InputError, match="positive"):
        small_dri.reconstruct(-np.ones(2160), mri)
    with pytest.raises(InputError, match="100x100"):
        small_dri.reconstruct(np.ones(2160), np.ones((50, 50)))
