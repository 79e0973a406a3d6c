"""Validation of the NIRST physics: spectra, mesh, diffusion FEM against theory, Jacobian."""

import numpy as np
import pytest
from scipy.special import ive

from deepimaging.nirst import (
    WAVELENGTHS_NM,
    DiffusionForwardModel,
    absorption,
    boundary_mismatch_factor,
    disk_mask,
    make_disk_mesh,
    measurement_subset,
    node_to_pixel_matrix,
    optode_positions,
    pixel_centres,
    pixel_to_node_matrix,
    reduced_scattering,
    spectral_matrix,
)
from deepimaging.nirst.optics import HEMOGLOBIN_EXTINCTION


def _bessel_ratios(x: float, m_max: int) -> np.ndarray:
    """rho[m] = I_m(x) / I_{m-1}(x), m = 1 .. m_max + 1, by stable backward recurrence."""
    top = m_max + 60 + int(2 * x)
    rho = np.zeros(top + 2)
    ratio = x / (2.0 * (top + 1))
    for m in range(top, 0, -1):
        ratio = 1.0 / (2.0 * m / x + ratio)
        rho[m] = ratio
    return rho


def disk_rim_fluence(radius, source_radius, delta_theta, mua, musp, a_factor, m_max=3000):
    """Exact rim fluence of a unit point source in a homogeneous disk with the Robin condition.

    Modal (Fourier-Bessel) series of the 2D Green's function of -D lap + mu_a:
    phi(R, dtheta) = 1/(2 pi D) sum_m eps_m cos(m dtheta) I_m(k r0) (a/(kR)) / (I_m(kR) + a I_m'(kR)),
    k = sqrt(mu_a / D), a = 2 A D k, eps_0 = 1, eps_m = 2 (derived from the addition theorem of
    K_0 and the Wronskian of I_m, K_m).  Ratios of I_m are summed in log space.
    """
    d = 1.0 / (3.0 * (mua + musp))
    k = np.sqrt(mua / d)
    a = 2.0 * a_factor * d * k
    x0, x1 = k * source_radius, k * radius
    rho0, rho1 = _bessel_ratios(x0, m_max), _bessel_ratios(x1, m_max)
    log_ratio = np.log(ive(0, x0)) + x0 - np.log(ive(0, x1)) - x1
    log_ratio = log_ratio + np.concatenate([[0.0], np.cumsum(np.log(rho0[1:m_max + 1] / rho1[1:m_max + 1]))])
    derivative = np.concatenate([[rho1[1]], 0.5 * (1.0 / rho1[1:m_max + 1] + rho1[2:m_max + 2])])
    term = np.exp(log_ratio) * (a / x1) / (1.0 + a * derivative)
    weights = np.where(np.arange(m_max + 1) == 0, 1.0, 2.0) * term
    return np.cos(np.outer(np.atleast_1d(delta_theta), np.arange(m_max + 1))) @ weights / (2.0 * np.pi * d)


def _log_error_vs_theory(mesh, mua, musp, n_optodes=16):
    model = DiffusionForwardModel(mesh, n_optodes)
    amplitudes = model.measure(mua, musp)[0]
    delta = 2.0 * np.pi * (model.detector_index - model.source_index) / n_optodes
    exact = disk_rim_fluence(mesh.radius, mesh.radius - 1.0 / (mua + musp), delta, mua, musp, model.boundary_factor)
    return np.log(amplitudes) - np.log(exact)


def test_spectra_are_physical():
    eps = np.array([HEMOGLOBIN_EXTINCTION[w] for w in WAVELENGTHS_NM])
    below, above = np.array(WAVELENGTHS_NM) < 800, np.array(WAVELENGTHS_NM) > 800
    assert np.all(eps[below, 0] < eps[below, 1]) and np.all(eps[above, 0] > eps[above, 1])
    # The HbO/Hb crossing (isosbestic point, ~797-800 nm) by linear interpolation 785 -> 808 nm.
    diff = eps[:, 0] - eps[:, 1]
    i = int(np.flatnonzero(np.diff(np.sign(diff)))[0])
    crossing = WAVELENGTHS_NM[i] - diff[i] * (WAVELENGTHS_NM[i + 1] - WAVELENGTHS_NM[i]) / (diff[i + 1] - diff[i])
    assert 790.0 < crossing < 810.0
    breast = absorption(15.0, 7.0, 0.4)
    assert breast.shape == (9,) and np.all(breast > 0)
    assert 0.003 < breast[WAVELENGTHS_NM.index(808)] < 0.01
    assert np.argmax(spectral_matrix()[:, 2]) == WAVELENGTHS_NM.index(948)  # water peak
    nodal = absorption(np.full(5, 15.0), np.full(5, 7.0), np.full(5, 0.4))
    assert nodal.shape == (9, 5) and np.allclose(nodal, breast[:, None])
    scattering = reduced_scattering()
    assert np.all(np.diff(scattering) < 0) and 0.8 < scattering[3] < 1.5
    with pytest.raises(ValueError):
        absorption(1.0, 1.0, 0.1, wavelengths=[700])


def test_mesh_geometry_and_optodes():
    mesh = make_disk_mesh(82.0, 2.0)
    assert np.all(mesh.areas > 0)
    assert np.allclose(np.hypot(*mesh.nodes[mesh.boundary_nodes].T), 41.0)
    n_rim = len(mesh.boundary_nodes)
    polygon_area = 0.5 * n_rim * 41.0**2 * np.sin(2 * np.pi / n_rim)
    assert mesh.areas.sum() == pytest.approx(polygon_area, rel=1e-9)
    rim_points = mesh.nodes[mesh.boundary_nodes]
    for optode in optode_positions(41.0, 16):
        assert np.min(np.linalg.norm(rim_points - optode, axis=1)) < 1e-9
    assert make_disk_mesh(82.0, 2.0, refinement=1).n_nodes > 3 * mesh.n_nodes


@pytest.mark.parametrize(
    "diameter, mua, musp",
    [(86.0, 0.01, 1.0), (82.0, 0.03, 0.8), (82.0, 0.005, 1.3)],  # NIRFAST's classic case first
)
def test_homogeneous_disk_matches_bessel_series(diameter, mua, musp):
    # Tolerance 2 % in amplitude: P1 discretisation plus point-source projection on the 1 mm
    # default mesh (measured 0.3-0.9 %); it sits below the 2 % data noise the paper adds.
    error = _log_error_vs_theory(make_disk_mesh(diameter), mua, musp)
    assert np.max(np.abs(error)) < 0.02


def test_error_falls_with_mesh_refinement():
    errors = [np.max(np.abs(_log_error_vs_theory(make_disk_mesh(82.0, 3.0, refinement=r), 0.02, 1.0)))
              for r in range(3)]
    assert errors[0] > errors[1] > errors[2]
    assert errors[0] / errors[2] > 6.0  # ~second order: h / 4 gives ~ 1/10 of the error


def _smooth_heterogeneous_mua(mesh, base=0.01):
    x, y = mesh.nodes.T / mesh.radius
    return base * (1.0 + 0.5 * np.sin(2.0 * x + 1.0) * np.cos(3.0 * y) + 0.3 * x)


def _reciprocity_mismatch(model, mua):
    n = model.n_optodes
    table = np.zeros((n, n))
    table[model.source_index, model.detector_index] = model.measure(mua, 1.0)[0]
    off_diagonal = ~np.eye(n, dtype=bool)
    return np.abs(np.log(table[off_diagonal]) - np.log(table.T[off_diagonal])).max()


def test_reciprocity():
    mesh = make_disk_mesh(82.0, 2.0)
    strong = _smooth_heterogeneous_mua(mesh)  # +-50 % variations
    # Sources on the rim: the discrete operator is symmetric, so i -> j equals j -> i exactly.
    assert _reciprocity_mismatch(DiffusionForwardModel(mesh, source_depth_mm=0.0), strong) < 1e-9
    # Sources one transport length inside (default): each optode's source-vs-detector coupling
    # depends on the tissue under it, so reciprocity holds only as closely as the tissue under
    # the optodes is alike -- within 1 % for +-10 % variations, ~3 % for +-50 %.
    model = DiffusionForwardModel(mesh)
    mild = 0.01 + 0.2 * (strong - 0.01)
    assert _reciprocity_mismatch(model, mild) < 0.01
    assert _reciprocity_mismatch(model, strong) < 0.05


def test_absorbing_inclusion_shadows_crossing_paths():
    mesh = make_disk_mesh(82.0, 1.5)
    model = DiffusionForwardModel(mesh)
    background = np.full(mesh.n_nodes, 0.01)
    centre = np.array([15.0, 0.0])
    inclusion = background.copy()
    inclusion[np.linalg.norm(mesh.nodes - centre, axis=1) < 8.0] *= 3.0
    change = np.log(model.measure(inclusion, 1.0)[0] / model.measure(background, 1.0)[0])
    assert np.all(change <= 1e-9)  # more absorption never adds light
    sources = optode_positions(41.0, 16)[model.source_index]
    detectors = optode_positions(41.0, 16)[model.detector_index]
    segment = detectors - sources
    t = np.clip(np.einsum("pi,pi->p", centre - sources, segment) / np.einsum("pi,pi->p", segment, segment), 0, 1)
    distance = np.linalg.norm(sources + t[:, None] * segment - centre, axis=1)
    crossing, far = change[distance < 5.0], change[distance > 25.0]
    assert crossing.mean() < -0.3 < -0.05 < far.mean()  # measured: -0.85 vs -0.007


def test_jacobian_matches_finite_differences():
    mesh = make_disk_mesh(82.0, 3.0)
    model = DiffusionForwardModel(mesh, source_depth_mm=1.0)  # J treats optode positions as fixed
    mua = _smooth_heterogeneous_mua(mesh)
    musp = np.full(mesh.n_nodes, 1.0)
    amplitudes, jacobian, scattering_jacobian = model.measure_and_jacobian(mua, musp, scattering=True)
    assert jacobian.shape == scattering_jacobian.shape == (1, 240, mesh.n_nodes)
    assert np.allclose(amplitudes, model.measure(mua, musp))
    radii = np.hypot(*mesh.nodes.T)
    nodes = [0, int(np.argmin(np.abs(radii - 20.0))), int(mesh.boundary_nodes[3])]
    for node in nodes:
        step = 1e-6
        plus, minus = mua.copy(), mua.copy()
        plus[node] += step
        minus[node] -= step
        numeric = (np.log(model.measure(plus, musp)[0]) - np.log(model.measure(minus, musp)[0])) / (2 * step)
        assert np.allclose(jacobian[0, :, node], numeric, rtol=1e-5, atol=1e-7 * np.abs(numeric).max())
        plus, minus = musp.copy(), musp.copy()
        plus[node] += 1e-5
        minus[node] -= 1e-5
        numeric = (np.log(model.measure(mua, plus)[0]) - np.log(model.measure(mua, minus)[0])) / 2e-5
        assert np.allclose(scattering_jacobian[0, :, node], numeric, rtol=1e-5, atol=1e-7 * np.abs(numeric).max())
    assert np.all(jacobian <= 1e-12)  # absorption anywhere can only lower the CW signal


def test_measurement_ordering_and_optode_counts():
    mesh = make_disk_mesh(82.0, 2.0)
    model = DiffusionForwardModel(mesh, 16)
    amplitudes = model.measure(absorption(15.0, 7.0, 0.4)[:, None] * np.ones(mesh.n_nodes), reduced_scattering())
    assert amplitudes.shape == (9, 240)
    # Source-major, detectors ascending with the source skipped.
    assert list(model.detector_index[:15]) == list(range(1, 16))
    assert list(model.detector_index[15:30]) == [0] + list(range(2, 16))
    separation = (model.detector_index - model.source_index) % 16
    for step in range(1, 16):  # homogeneous disk: amplitude depends only on the separation
        same = amplitudes[:, separation == step]
        assert np.allclose(same, same[:, :1], rtol=1e-3)  # 1e-3: Delaunay tie-breaks
    assert DiffusionForwardModel(mesh, 12).measure(0.01, 1.0).shape == (1, 132)
    # 8 optodes = every other optode of 16 (same rim nodes): the 16-optode data subset matches.
    mua = _smooth_heterogeneous_mua(mesh)[None] * np.array([1.0, 2.0])[:, None]
    eight = DiffusionForwardModel(mesh, 8).measure(mua, 1.0)
    assert eight.shape == (2, 56)
    subset = measurement_subset(16, range(0, 16, 2), n_wavelengths=2)
    assert np.allclose(model.measure(mua, 1.0).ravel()[subset], eight.ravel(), rtol=1e-9)


def test_pixel_and_node_transfer():
    mesh = make_disk_mesh(82.0)
    to_nodes, to_pixels = pixel_to_node_matrix(mesh), node_to_pixel_matrix(mesh)
    assert to_nodes.shape == (mesh.n_nodes, 10000) and to_pixels.shape == (10000, mesh.n_nodes)
    x, y = pixel_centres(41.0)
    inside = disk_mask(41.0)
    constant = np.where(inside, 7.0, 0.0).ravel()
    assert np.allclose(to_nodes @ constant, 7.0)  # zeros outside the disk never leak in
    linear_nodes = to_nodes @ np.where(inside, x + 2 * y, 0.0).ravel()
    assert np.max(np.abs(linear_nodes - (mesh.nodes[:, 0] + 2 * mesh.nodes[:, 1]))) < 1.5
    interior = np.hypot(*mesh.nodes.T) < 39.0
    assert np.allclose(linear_nodes[interior], (mesh.nodes[:, 0] + 2 * mesh.nodes[:, 1])[interior], atol=1e-9)
    back = (to_pixels @ (mesh.nodes[:, 0] + 2 * mesh.nodes[:, 1])).reshape(100, 100)
    assert np.all(back[~inside] == 0.0)
    assert np.max(np.abs(back[inside] - (x + 2 * y)[inside])) < 0.05


def test_boundary_factor():
    assert boundary_mismatch_factor(1.33) == pytest.approx(2.348, abs=1e-3)
    assert boundary_mismatch_factor(1.0) == 1.0
