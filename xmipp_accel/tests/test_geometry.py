"""Euler angles ↔ matrices against xmippLib, and the helpers of em/geometry.py."""
import numpy as np
import pytest

from xmipp_accel.em.geometry import (angular_distance_deg, centered_grid, euler_to_matrix, matrix_to_euler,
                                     projection_direction)
from xmipp_accel.em.symmetry import symmetry_matrices

xmippLib = pytest.importorskip("xmippLib")

RNG = np.random.default_rng(7)
ANGLES = np.column_stack([RNG.uniform(-180, 360, 40), RNG.uniform(0, 180, 40), RNG.uniform(-180, 360, 40)])


def test_euler_to_matrix_equals_xmipp():
    for rot, tilt, psi in ANGLES:
        np.testing.assert_allclose(euler_to_matrix(rot, tilt, psi),
                                   np.asarray(xmippLib.Euler_angles2matrix(rot, tilt, psi)), atol=1e-12)


def test_euler_to_matrix_batched_matches_scalar():
    m = euler_to_matrix(ANGLES[:, 0], ANGLES[:, 1], ANGLES[:, 2])
    assert m.shape == (len(ANGLES), 3, 3) and m.dtype == np.float64
    for i, (rot, tilt, psi) in enumerate(ANGLES):
        np.testing.assert_allclose(m[i], euler_to_matrix(rot, tilt, psi), atol=1e-15)
    np.testing.assert_allclose(m @ m.transpose(0, 2, 1), np.broadcast_to(np.eye(3), m.shape), atol=1e-12)
    np.testing.assert_allclose(np.linalg.det(m), 1.0, atol=1e-12)


def test_euler_is_zyz_composition():
    """A = Rz(psi) Ry(tilt) Rz(rot) with Xmipp's passive (frame) rotations."""
    def rz(a):
        c, s = np.cos(np.deg2rad(a)), np.sin(np.deg2rad(a))
        return np.array([[c, s, 0], [-s, c, 0], [0, 0, 1]])

    def ry(a):
        c, s = np.cos(np.deg2rad(a)), np.sin(np.deg2rad(a))
        return np.array([[c, 0, -s], [0, 1, 0], [s, 0, c]])
    for rot, tilt, psi in ANGLES[:5]:
        np.testing.assert_allclose(euler_to_matrix(rot, tilt, psi), rz(psi) @ ry(tilt) @ rz(rot), atol=1e-12)


def test_matrix_to_euler_round_trip_and_xmipp():
    m = euler_to_matrix(ANGLES[:, 0], ANGLES[:, 1], ANGLES[:, 2])
    rot, tilt, psi = matrix_to_euler(m)
    assert np.all((tilt >= 0) & (tilt <= 180))
    np.testing.assert_allclose(euler_to_matrix(rot, tilt, psi), m, atol=1e-10)
    for i in range(5):
        xr, xt, xpsi = xmippLib.Euler_matrix2angles(m[i])
        np.testing.assert_allclose(euler_to_matrix(xr, xt, xpsi), m[i], atol=1e-8)


@pytest.mark.parametrize("tilt", [0.0, 180.0])
def test_matrix_to_euler_degenerate_tilt(tilt):
    m = euler_to_matrix(30.0, tilt, 50.0)
    np.testing.assert_allclose(euler_to_matrix(*matrix_to_euler(m)), m, atol=1e-10)


def test_projection_direction_equals_xmipp():
    for rot, tilt, _ in ANGLES[:10]:
        np.testing.assert_allclose(projection_direction(rot, tilt), xmippLib.Euler_direction(rot, tilt, 0.0),
                                   atol=1e-12)


def test_angular_distance():
    a = euler_to_matrix(10.0, 40.0, 70.0)
    b = a @ euler_to_matrix(0.0, 0.0, 12.0)  # 12 degrees about z
    assert angular_distance_deg(a, b) == pytest.approx(12.0, abs=1e-6)
    g = symmetry_matrices("c4")
    c = a @ g[1]  # a symmetry mate: distance 90 without, 0 with symmetry
    assert angular_distance_deg(a, c) == pytest.approx(90.0, abs=1e-6)
    assert angular_distance_deg(a, c, sym_matrices=g) == pytest.approx(0.0, abs=1e-5)


def test_centered_grid():
    z, y, x = centered_grid((5, 4, 3))
    assert z.tolist() == [-2, -1, 0, 1, 2] and y.tolist() == [-2, -1, 0, 1] and x.tolist() == [-1, 0, 1]
