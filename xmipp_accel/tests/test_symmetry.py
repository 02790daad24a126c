"""Symmetry groups against xmippLib.SymList (as sets), and their orientation and action side."""
import numpy as np
import pytest

from xmipp_accel.em.geometry import euler_to_matrix
from xmipp_accel.em.symmetry import (is_valid_symmetry, normalize_symmetry, rotation_about_axis, symmetry_matrices,
                                     symmetry_order)
from xmipp_accel.errors import InputError

GROUPS = ["c1", "c2", "c3", "c4", "c5", "c6", "c7", "d2", "d3", "d4", "d5", "d6", "d7", "o", "i", "i1", "i2",
          "i3", "i4"]  # "t" hangs in xmippLib's SymList (its 2-fold axis is given to 6 digits): tested below


def _xmipp_matrices(sym):
    xmippLib = pytest.importorskip("xmippLib")
    s = xmippLib.SymList()
    s.readSymmetryFile(sym)
    m = np.asarray(s.getSymmetryMatrices(sym), dtype=np.float64)
    m = m[:, :3, :3]  # homogeneous 4x4 in some versions
    if not any(np.allclose(g, np.eye(3), atol=1e-6) for g in m):
        m = np.concatenate([np.eye(3)[None], m])
    return m


def _same_set(a, b, tol=1e-5):
    if len(a) != len(b):
        return False
    return all(np.abs(b - g).max(axis=(1, 2)).min() < tol for g in a)


@pytest.mark.parametrize("sym", GROUPS)
def test_equals_xmipp_as_a_set(sym):
    ours = symmetry_matrices(sym)
    assert ours.shape == (symmetry_order(sym), 3, 3) and ours.dtype == np.float64
    np.testing.assert_allclose(ours[0], np.eye(3), atol=1e-15)
    assert _same_set(ours, _xmipp_matrices(sym))


@pytest.mark.parametrize("a,b", [("i1", "i2"), ("i3", "i4"), ("i2", "i3"), ("d2", "c4")])
def test_orientation_distinguishes_groups(a, b):
    """The comparison can fail: same order, different axes, is not the same set."""
    assert not _same_set(symmetry_matrices(a), _xmipp_matrices(b))


@pytest.mark.parametrize("sym", ["c3", "d2", "d5", "t", "o", "i", "i1", "i3", "i4"])
def test_is_a_group_of_rotations(sym):
    g = symmetry_matrices(sym)
    np.testing.assert_allclose(g @ g.transpose(0, 2, 1), np.broadcast_to(np.eye(3), g.shape), atol=1e-12)
    np.testing.assert_allclose(np.linalg.det(g), 1.0, atol=1e-12)
    prods = np.einsum("aij,bjk->abik", g, g).reshape(-1, 3, 3)
    assert all(np.abs(g - p).max(axis=(1, 2)).min() < 1e-9 for p in prods)  # closed
    assert len({tuple(np.round(m, 6).ravel()) for m in g}) == len(g)  # no duplicates


def test_tetrahedral_orientation_is_xmipps():
    """Xmipp's T: 3-fold about z and 2-fold about (0, 0.816496, 0.577350) (symmetries.cpp)."""
    g = symmetry_matrices("t")
    assert len(g) == 12
    for fold, axis in [(3, (0, 0, 1)), (2, (0, 0.816496, 0.577350))]:
        r = rotation_about_axis(axis, 360.0 / fold)
        assert np.abs(g - r).max(axis=(1, 2)).min() < 1e-5
    assert np.abs(g - rotation_about_axis((0, 0, 1), 90.0)).max(axis=(1, 2)).min() > 0.1  # no 4-fold on z


@pytest.mark.parametrize("sym", ["d3", "o", "i", "i3"])
def test_equivalent_orientations_are_A_g(sym):
    """xmippLib.SymList.symmetricAngles lists the Euler angles of A g for g in the group."""
    xmippLib = pytest.importorskip("xmippLib")
    s = xmippLib.SymList()
    s.readSymmetryFile(sym)
    ang = (37.0, 61.0, -112.0)
    a = euler_to_matrix(*ang)
    g = symmetry_matrices(sym)
    mates = [euler_to_matrix(*e) for e in s.symmetricAngles(*ang)]
    assert len(mates) == len(g)
    assert max(np.abs(a @ g - m).max(axis=(1, 2)).min() for m in mates) < 1e-5
    assert max(np.abs(np.einsum("kij,jl->kil", g, a) - m).max(axis=(1, 2)).min() for m in mates) > 0.1


def test_names_and_orders():
    assert normalize_symmetry(" I ") == "i2" and normalize_symmetry("C04") == "c4"
    assert [symmetry_order(s) for s in ("c1", "C6", "d7", "T", "O", "I", "i4")] == [1, 6, 14, 12, 24, 60, 60]
    assert is_valid_symmetry("D3") and not is_valid_symmetry("i5") and not is_valid_symmetry("c0")


@pytest.mark.parametrize("bad", ["x3", "c", "d2h", "ih", "i5", "c0", "cn"])
def test_unknown_names_raise_input_error(bad):
    with pytest.raises(InputError, match="c1, cN"):
        symmetry_matrices(bad)


def test_returns_a_copy():
    g = symmetry_matrices("c2")
    g[:] = 0
    np.testing.assert_allclose(symmetry_matrices("c2")[0], np.eye(3))


def test_symmetrize_volume_is_invariant_under_the_group():
    """A symmetrised phantom is unchanged by each group rotation (and the phantom itself is not)."""
    from scipy.ndimage import map_coordinates

    from xmipp_accel.em.symmetry import symmetrize_volume
    from xmipp_accel.em.synthetic import phantom_volume
    vol = phantom_volume(32, seed=3)
    sym = symmetrize_volume(vol, "d3")
    g = symmetry_matrices("d3")[1]
    c = 16
    z, y, x = np.meshgrid(*(np.arange(32.0) - c,) * 3, indexing="ij")
    gx, gy, gz = g @ np.stack([x.ravel(), y.ravel(), z.ravel()])

    def rotated(v):
        return map_coordinates(v, [gz + c, gy + c, gx + c], order=3).reshape(v.shape)
    corr = lambda a, b: np.corrcoef(a.ravel(), b.ravel())[0, 1]  # noqa: E731
    assert corr(rotated(sym), sym) > 0.995
    assert corr(rotated(vol), vol) < 0.95
