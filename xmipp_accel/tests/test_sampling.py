"""Angular sampling: coverage and counts per symmetry, Xmipp's reference samplings, uniform rotations."""
import os

import numpy as np
import pytest
from scipy.spatial import cKDTree

from xmipp_accel.em.sampling import (angles_to_directions, canonical_directions, in_asymmetric_unit,
                                     random_rotations, sphere_sampling)
from xmipp_accel.em.symmetry import symmetry_matrices, symmetry_order
from xmipp_accel.errors import InputError
from xmipp_accel.io.xmd import read_xmd


def _random_directions(n, seed=0):
    d = np.random.default_rng(seed).standard_normal((n, 3))
    return d / np.linalg.norm(d, axis=1, keepdims=True)


def _expand(d, sym):
    return np.einsum("kij,nj->nki", symmetry_matrices(sym), d).reshape(-1, 3)


def _max_gap_deg(points, samples):
    """Largest angle from any of ``points`` to its nearest sample (degrees)."""
    dist, _ = cKDTree(samples).query(points)
    return float(np.rad2deg(2 * np.arcsin(dist.max() / 2)))


@pytest.mark.parametrize("sym,step", [("c1", 5), ("c1", 15), ("c2", 5), ("c5", 4), ("d3", 5), ("d7", 6),
                                      ("t", 5), ("o", 4), ("i", 3), ("i1", 4), ("i3", 3), ("i4", 5)])
def test_coverage_and_count(sym, step):
    rot, tilt = sphere_sampling(step, sym)
    d = angles_to_directions(rot, tilt)
    expected = 4 * np.pi / (np.deg2rad(step) ** 2 * symmetry_order(sym))
    assert 0.9 * expected < len(d) < 1.2 * expected
    assert _max_gap_deg(_random_directions(20000), _expand(d, sym)) < 0.95 * step
    assert in_asymmetric_unit(d, sym).all()
    # no sample is a near copy of another after symmetry
    pairs = cKDTree(_expand(d, sym)).query_pairs(2 * np.sin(np.deg2rad(0.4 * step) / 2), output_type="ndarray")
    owners = pairs // symmetry_order(sym)
    assert np.all(owners[:, 0] == owners[:, 1])  # only a sample and its own image, near a symmetry axis


def test_sampling_is_restricted_by_symmetry():
    """The asymmetric unit is one orbit representative: c4 samples cover only a quarter of the sphere."""
    d = angles_to_directions(*sphere_sampling(5, "c4"))
    q = _random_directions(5000, seed=1)
    assert _max_gap_deg(q, d) > 40  # not covering without symmetry
    np.testing.assert_allclose(canonical_directions(d, "c4"), d, atol=1e-12)


def _read_xmd_block(path, block):
    """Unit direction vectors (x, y, z) of a block of an Xmipp sampling file."""
    table = read_xmd(path)[block]
    return np.column_stack([np.asarray(table[c], dtype=float) for c in ("X", "Y", "Z")])


def test_against_xmipp_c1_reference(shared_data):
    ref = _read_xmd_block(os.path.join(shared_data, "xmipp-sampling", "ref_c1_sampling.xmd"), "projectionDirections")
    ours = angles_to_directions(*sphere_sampling(3, "c1"))
    assert len(ref) > 4000
    assert 0.9 < len(ours) / len(ref) < 1.1
    assert _max_gap_deg(ref, ours) < 3 and _max_gap_deg(ours, ref) < 3


def test_against_xmipp_i3h_reference(shared_data):
    """Xmipp's i3h (I3 plus a mirror, order 120) sampling at 3°: its unit holds ~half as many directions as our
    i3 unit; the whole-sphere expansions agree in count and cover each other within the step."""
    path = os.path.join(shared_data, "xmipp-sampling", "ref_i3h_sampling.xmd")
    unit = _read_xmd_block(path, "projectionDirections")
    sphere = _read_xmd_block(path, "projectionDirectionsSphere")
    ours = angles_to_directions(*sphere_sampling(3, "i3"))
    assert 1.5 < len(ours) / len(unit) < 3.5
    expanded = _expand(ours, "i3")
    assert 0.8 < len(expanded) / len(sphere) < 1.25
    assert _max_gap_deg(sphere, expanded) < 3 and _max_gap_deg(expanded, sphere) < 3


def test_random_rotations_uniform():
    r = random_rotations(20000, np.random.default_rng(3))
    assert r.shape == (20000, 3, 3) and r.dtype == np.float64
    np.testing.assert_allclose(r @ r.transpose(0, 2, 1), np.broadcast_to(np.eye(3), r.shape), atol=1e-12)
    np.testing.assert_allclose(np.linalg.det(r), 1.0, atol=1e-12)
    assert np.abs(r.mean(axis=0)).max() < 0.02  # E[R] = 0 under the Haar measure
    angle = np.arccos(np.clip((np.trace(r, axis1=1, axis2=2) - 1) / 2, -1, 1))
    assert np.rad2deg(angle.mean()) == pytest.approx(np.rad2deg(np.pi / 2 + 2 / np.pi), abs=1.0)  # 126.5 deg
    dirs = r[:, 2, :]  # projection directions: uniform on the sphere, so z is uniform in [-1, 1]
    assert np.histogram(dirs[:, 2], bins=10, range=(-1, 1))[0].min() > 1800
    np.testing.assert_array_equal(random_rotations(5, 11), random_rotations(5, np.random.default_rng(11)))


@pytest.mark.parametrize("step", [0, -1, 91])
def test_bad_step(step):
    with pytest.raises(InputError):
        sphere_sampling(step)
