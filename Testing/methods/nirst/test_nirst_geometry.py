"""Optode ring parameters, the disk's physical frame, MRI orientation and the rim (issue #11)."""

import numpy as np
import pytest
import torch

from deepimaging.core.checkpoint import make_header, save_checkpoint
from deepimaging.core.errors import InputError
from deepimaging.core.image import Image
from deepimaging.nirst.calibration import homogeneous_amplitudes
from deepimaging.nirst.data import Normalisation
from deepimaging.nirst.forward import DiffusionForwardModel
from deepimaging.nirst.geometry import (OptodeGeometry, disk_frame, infer_n_optodes, maps_to_image, match_geometry,
                                        plane_axes, resample_mri)
from deepimaging.nirst.mesh import make_disk_mesh
from deepimaging.nirst.optics import absorption, reduced_scattering
from deepimaging.nirst.pipeline import reconstruct
from deepimaging.nirst.recon import load_reconstructor, simulate_example
from deepimaging.nirst.train import build_network
from deepimaging.nirst.znet import MeasurementNormalizer

TINY = {"signal_widths": [16, 8, 8, 8, 8], "signal_stem": 8, "mri_widths": [4, 4, 8, 8, 16],
        "decoder_widths": [16, 8, 8, 8, 8]}


def tiny_checkpoint(path, **extra_config):
    """A tiny randomly initialised Z-Net (16 optodes, 9 wavelengths) with fitted normalisation."""
    torch.manual_seed(0)
    model = build_network("znet", 16, 9, TINY)
    amplitudes = torch.exp(torch.randn(8, 2160, dtype=torch.float64) - 8.0)
    normalizer = MeasurementNormalizer(16, 9).fit(amplitudes, amplitudes.mean(0))
    config = {"arch": "znet", "net_config": TINY, "n_optodes": 16, "n_wavelengths": 9,
              "wavelengths_nm": [661, 735, 785, 808, 826, 852, 903, 912, 948], "grid_size": 100,
              "diameter_mm": 82.0, **extra_config}
    save_checkpoint(path, model.state_dict(), make_header("nirst-znet", config),
                    Normalisation(normalizer, np.array([14.0, 7.0, 40.0])).tensors())
    return path


@pytest.fixture(scope="module")
def rec(tmp_path_factory):
    return load_reconstructor(tiny_checkpoint(tmp_path_factory.mktemp("geo") / "tiny.pt"), device="cpu")


@pytest.fixture(scope="module")
def example():
    return simulate_example(seed=5)


def reoriented(image, turn):
    """The same physical image stored with its (i, j) axes permuted/negated by the 2x2 ``turn``.

    New pixel n' holds old pixel ``turn @ n' + t``; direction and origin follow, so every
    pixel keeps its physical position (needs equal x/y spacing).
    """
    ny, nx = image.shape[1:]
    r = np.asarray(turn, dtype=int)
    new_shape = (nx, ny) if r[0, 0] == 0 else (ny, nx)  # (ny', nx')
    corners = np.array([[0, 0], [new_shape[1] - 1, 0], [0, new_shape[0] - 1], [new_shape[1] - 1, new_shape[0] - 1]])
    t = -np.min(corners @ r.T, axis=0)
    j2, i2 = np.meshgrid(np.arange(new_shape[0]), np.arange(new_shape[1]), indexing="ij")
    old = np.einsum("ab,bjk->ajk", r, np.stack([i2, j2])) + t[:, None, None]
    array = image.array[0][old[1], old[0]]
    turn3 = np.eye(3)
    turn3[:2, :2] = r
    origin = image.ijk_to_lps() @ [t[0], t[1], 0, 1]
    out = Image(array[None], image.spacing, tuple(origin[:3]), image.direction @ turn3)
    return out, (lambda a: a[0][old[1], old[0]])  # old-grid array -> new grid


def test_default_geometry_and_config_keys():
    assert OptodeGeometry() == OptodeGeometry(82.0, 16, 0.0, "ccw")
    assert OptodeGeometry.from_config({"diameter_mm": 82.0, "n_optodes": 16}) == OptodeGeometry()
    cfg = {"diameter_mm": 90, "n_optodes": 8, "optode_angle_offset_deg": 22.5, "optode_winding": "cw"}
    assert OptodeGeometry.from_config(cfg) == OptodeGeometry(90.0, 8, 22.5, "cw")
    assert np.allclose(np.rad2deg(OptodeGeometry(82, 4, 10, "cw").angles()), [10, -80, -170, -260])
    assert infer_n_optodes(2160, 9) == 16 and infer_n_optodes(504, 9) == 8 and infer_n_optodes(2000, 9) is None
    with pytest.raises(InputError, match="winding"):
        OptodeGeometry(winding="left")


def test_match_geometry_permutes_rotates_or_refuses():
    net = OptodeGeometry()
    assert match_geometry(net, net).is_identity
    flipped = match_geometry(net.with_changes(winding="cw"), net)
    assert list(flipped.network_optode) == [(-k) % 16 for k in range(16)] and flipped.rotation_rad == 0
    shifted = match_geometry(net.with_changes(angle_offset_deg=45.0, winding="cw"), net)
    assert list(shifted.network_optode) == [(2 - k) % 16 for k in range(16)] and shifted.rotation_rad == 0
    rotated = match_geometry(net.with_changes(angle_offset_deg=10.0), net)
    assert list(rotated.network_optode) == list(range(16)) and np.isclose(np.rad2deg(rotated.rotation_rad), 10.0)
    eight = match_geometry(net.with_changes(n_optodes=8), net)
    assert list(eight.network_optode) == list(range(0, 16, 2)) and eight.step == 2
    with pytest.raises(InputError, match="90 mm ring.*--method dri"):
        match_geometry(net.with_changes(diameter_mm=90.0), net)
    with pytest.raises(InputError, match="5 optodes cannot be mapped"):
        match_geometry(net.with_changes(n_optodes=5), net)


def test_other_numbering_of_the_same_ring_is_the_same_measurement():
    """Forward model with a cw / 45-degree ring = the default ring's data re-ordered (exactly)."""
    mesh = make_disk_mesh(82.0, 3.0)
    r = np.hypot(mesh.nodes[:, 0] - 12.0, mesh.nodes[:, 1] + 20.0)
    hbo = np.where(r < 10, 30.0, 14.0)
    mua = absorption(hbo, 7.0, 0.4, [661, 808])
    musp = reduced_scattering([661, 808])
    default = DiffusionForwardModel(mesh, 16).measure(mua, musp).ravel()
    user = OptodeGeometry(angle_offset_deg=45.0, winding="cw")
    data = DiffusionForwardModel(mesh, 16, angle_offset_deg=45.0, winding="cw").measure(mua, musp).ravel()
    assert not np.allclose(data, default, rtol=1e-3)
    reordered, known = match_geometry(user, OptodeGeometry()).network_layout(data, 2)
    assert known.all()
    np.testing.assert_allclose(reordered, default, rtol=1e-9)


def test_plane_axes_are_physical():
    flip = np.diag([-1.0, 1.0, -1.0])
    for direction in (np.eye(3), flip, np.array([[0.0, -1, 0], [1, 0, 0], [0, 0, 1]])):
        u, v = plane_axes(Image(np.zeros((1, 4, 4)), direction=direction))
        assert np.allclose(u, [1, 0, 0]) and np.allclose(v, [0, 1, 0])  # axial: left, posterior
    coronal = np.array([[1.0, 0, 0], [0, 0, 1], [0, 1, 0]])
    u, v = plane_axes(Image(np.zeros((1, 4, 4)), direction=coronal))
    assert np.allclose(u, [1, 0, 0]) and np.allclose(v, [0, 0, 1])
    image = Image(np.zeros((1, 100, 100)), (0.82, 0.82, 2.0))
    with pytest.raises(InputError, match="off the MRI slice plane"):
        disk_frame(image, (40.0, 40.0, 5.0))


@pytest.mark.parametrize("turn", [[[-1, 0], [0, 1]], [[1, 0], [0, -1]], [[0, -1], [1, 0]], [[0, 1], [1, 0]]],
                         ids=["flip-i", "flip-j", "rotate-90", "transpose"])
def test_reoriented_mri_gives_the_same_maps_in_physical_space(rec, example, turn):
    measurements, mri, _ = example
    base = reconstruct(measurements, mri, reconstructor=rec)
    other, to_new = reoriented(mri, turn)
    assert not np.allclose(other.array, mri.array)
    out = reconstruct(measurements, other, reconstructor=rec)
    for name in ("HbT", "water"):
        assert out.maps[name].same_grid(other)
        np.testing.assert_allclose(out.maps[name].array[0], to_new(base.maps[name].array), rtol=1e-4, atol=1e-4)


def test_disk_centre_is_physical(rec, example):
    measurements, mri, _ = example
    base = reconstruct(measurements, mri, reconstructor=rec)
    padded = np.pad(mri.array[0], ((0, 30), (20, 0)))  # the phantom is no longer at the slice centre
    origin = (mri.origin[0] - 20 * 0.82, mri.origin[1], mri.origin[2])
    moved = Image(padded[None], mri.spacing, origin)
    centre = (mri.ijk_to_lps() @ [49.5, 49.5, 0, 1])[:3]
    out = reconstruct(measurements, moved, reconstructor=rec, disk_centre_lps=centre)
    np.testing.assert_allclose(out.maps["HbT"].array[0, :100, 20:], base.maps["HbT"].array[0], atol=1e-4)
    by_pixel = reconstruct(measurements, moved, reconstructor=rec, disk_centre_ijk=(69.5, 49.5))
    np.testing.assert_allclose(by_pixel.maps["HbT"].array, out.maps["HbT"].array, atol=1e-5)


def test_offset_by_whole_spacings_reorders_and_other_offsets_rotate(rec, example):
    measurements, mri, _ = example
    base = reconstruct(measurements, mri, reconstructor=rec)
    user = OptodeGeometry(angle_offset_deg=22.5, winding="cw")
    channels = match_geometry(user, OptodeGeometry())
    # The same physical ring numbered differently: the user's optode k is network optode channels[k].
    grid = measurements.reshape(9, 16, 15)
    user_data = np.empty_like(grid)
    for k in range(16):
        dets = [d for d in range(16) if d != k]
        for col, d in enumerate(dets):
            m, md = channels.network_optode[k], channels.network_optode[d]
            user_data[:, k, col] = grid[:, m, md if md < m else md - 1]
    out = reconstruct(user_data.ravel(), mri, reconstructor=rec, geometry=user)
    np.testing.assert_allclose(out.maps["HbT"].array, base.maps["HbT"].array, rtol=1e-5, atol=1e-5)
    assert any("mapped onto the network's ring" in note for note in out.notes)
    turned = reconstruct(measurements, mri, reconstructor=rec, angle_offset_deg=10.0)
    assert any("grid rotated by 10 deg" in note for note in turned.notes)
    angle = np.deg2rad(10.0)  # the network's grid (and its optode 0) turned by the residual offset
    assert np.allclose(turned.frame.u, [np.cos(angle), np.sin(angle), 0.0])


def test_rim_has_no_zero_pull_in():
    """Constant disk values stay constant up to the rim both ways (bilinear used to mix in zeros)."""
    n, pitch = 200, 0.5
    x = (np.arange(n) - (n - 1) / 2) * pitch
    r = np.hypot(*np.meshgrid(x, x))
    fine = Image(np.where(r < 41.0, 50.0, 0.0)[None], (pitch, pitch, 1.0), (x[0], x[0], 0.0))
    grid = resample_mri(fine)
    gx = (np.arange(100) + 0.5) * 0.82 - 41.0
    disk = np.hypot(*np.meshgrid(gx, gx)) < 41.0
    np.testing.assert_allclose(grid[disk], 50.0)
    maps = maps_to_image({"HbO": np.where(disk, 14.0, 0.0)}, fine)
    ring = (r > 41.0 - 0.7) & (r < 41.0)
    np.testing.assert_allclose(maps["HbO"].array[0][ring], 14.0)
    assert np.all(maps["HbO"].array[0][r >= 41.0] == 0)


def test_homogeneous_dri_rim_within_a_few_percent():
    n, pitch = 180, 0.5
    x = (np.arange(n) - (n - 1) / 2) * pitch
    r = np.hypot(*np.meshgrid(x, x))
    mri = Image(np.where(r < 41.0, 50.0, 0.0)[None], (pitch, pitch, 1.0), (x[0], x[0], 0.0))
    out = reconstruct(homogeneous_amplitudes(), mri, method="dri", dri_element_size_mm=5.0, dri_iterations=1)
    ring = (r > 41.0 - 0.7) & (r < 41.0)
    for name in ("HbO", "Hb", "water"):
        values = out.maps[name].array[0]
        ratio = values[ring] / values[r < 35].mean()
        assert 0.97 < ratio.min() and ratio.max() < 1.03, (name, ratio.min(), ratio.max())


def test_dri_builds_its_model_for_the_users_ring(example):
    """DRI on the same ring numbered cw from 45 degrees = DRI on the default numbering."""
    measurements, mri, _ = example
    options = {"method": "dri", "dri_element_size_mm": 5.0, "dri_iterations": 1}
    base = reconstruct(measurements, mri, **options)
    user = OptodeGeometry(angle_offset_deg=45.0, winding="cw")
    network_optode = match_geometry(user, OptodeGeometry()).network_optode
    grid = measurements.reshape(9, 16, 15)
    user_data = np.empty_like(grid)
    for k in range(16):
        for col, d in enumerate(d for d in range(16) if d != k):
            m, md = network_optode[k], network_optode[d]
            user_data[:, k, col] = grid[:, m, md if md < m else md - 1]
    out = reconstruct(user_data.ravel(), mri, geometry=user, **options)
    assert "optode 0 at 45 deg, cw" in out.notes[0]
    np.testing.assert_allclose(out.maps["HbT"].array, base.maps["HbT"].array, rtol=2e-3, atol=2e-3)
    with pytest.raises(InputError, match=r"expected 1188 measurements \(9 wavelengths x 12 sources x 11 detectors\)"):
        reconstruct(measurements, mri, n_optodes=12, **options)


def test_checkpoint_ring_keys_are_read(tmp_path, example):
    from deepimaging.core.errors import CheckpointError

    measurements, mri, _ = example
    other = load_reconstructor(tiny_checkpoint(tmp_path / "cw.pt", optode_angle_offset_deg=22.5,
                                               optode_winding="cw"), device="cpu")
    assert other.geometry == OptodeGeometry(82.0, 16, 22.5, "cw")
    native = reconstruct(measurements, mri, reconstructor=other)  # default: the network's own ring
    assert not any("mapped" in note for note in native.notes)
    simulator_ring = reconstruct(measurements, mri, reconstructor=other, angle_offset_deg=0.0, winding="ccw")
    assert any("user optode k -> network optode 1, 0, 15" in note for note in simulator_ring.notes)
    with pytest.raises(CheckpointError, match="invalid optode ring"):
        load_reconstructor(tiny_checkpoint(tmp_path / "bad.pt", optode_winding="left"))
