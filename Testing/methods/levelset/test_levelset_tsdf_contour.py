import numpy as np
import pytest

from deepimaging.core.errors import InputError
from deepimaging.core.image import Image
from deepimaging.levelset import sdf_to_mask, signed_distance, truncated_sdf, zero_contours, zero_surface


def disk(n=41, r=12):
    yy, xx = np.mgrid[:n, :n]
    return (yy - n // 2) ** 2 + (xx - n // 2) ** 2 <= r * r


def test_sdf_sign_and_roundtrip_2d_3d():
    m2 = disk()
    phi = signed_distance(m2)
    assert np.array_equal(sdf_to_mask(phi), m2)
    assert phi[20, 20] == pytest.approx(np.sqrt(145) - 0.5)  # nearest outside voxel is (12, 1) away
    m3 = np.zeros((9, 12, 12), bool)
    m3[2:7, 3:9, 3:9] = True
    assert np.array_equal(sdf_to_mask(signed_distance(m3, (2.0, 1.0, 1.0))), m3)


def test_sdf_is_spacing_aware():
    m = np.zeros((21, 21), bool)
    m[10, 10] = True
    phi = signed_distance(m, spacing=(3.0, 1.0))
    assert phi[10, 0] == pytest.approx(-(10 - 0.5))     # 10 px along x at 1 mm
    assert phi[0, 10] == pytest.approx(-(30 - 0.5))     # 10 px along y at 3 mm


def test_truncated_range():
    t = truncated_sdf(disk(), truncation=3.0)
    assert t.min() == -1.0 and t.max() == 1.0
    assert np.array_equal(t > 0, disk())


def test_sdf_errors():
    with pytest.raises(InputError, match="empty"):
        signed_distance(np.zeros((4, 4), bool))
    with pytest.raises(InputError, match="2D or 3D"):
        signed_distance(np.ones((2, 2, 2, 2), bool))
    with pytest.raises(InputError, match="truncation"):
        truncated_sdf(disk(), 0)


def test_closed_contour_has_subpixel_radius_in_mm():
    phi = signed_distance(disk(r=12))
    geom = Image(np.zeros((1, 41, 41)), spacing=(0.5, 0.5, 1.0), origin=(100.0, 0.0, 0.0))
    contours = zero_contours(phi, geom)
    assert len(contours) == 1
    c = contours[0]
    np.testing.assert_allclose(c[0], c[-1])  # closed
    centre = np.array([100 + 20 * 0.5, 20 * 0.5, 0.0])
    radii = np.linalg.norm(c - centre, axis=1)
    assert radii.mean() == pytest.approx(12 * 0.5, abs=0.15)  # 12 px at 0.5 mm


def test_contour_closed_when_touching_border():
    m = np.zeros((10, 10), bool)
    m[:, :4] = True
    contours = zero_contours(signed_distance(m))
    assert len(contours) == 1 and np.allclose(contours[0][0], contours[0][-1])


def test_surface_of_ball():
    z, y, x = np.mgrid[:24, :24, :24]
    ball = (z - 12) ** 2 + (y - 12) ** 2 + (x - 12) ** 2 <= 8 ** 2
    mesh = zero_surface(signed_distance(ball), Image(np.zeros(ball.shape), spacing=(2.0, 2.0, 2.0)))
    r = np.linalg.norm(mesh.vertices - 24.0, axis=1)
    assert r.mean() == pytest.approx(16.0, abs=0.3) and len(mesh.faces) > 100  # 8 voxels at 2 mm
