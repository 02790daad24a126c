"""Angular sampling: projection directions restricted to a symmetry group's asymmetric unit, and
uniformly random rotations.

Directions are ``(x, y, z)`` unit vectors, the third row of the Euler matrix
(``projection_direction(rot, tilt)``). With a symmetry group ``G`` (matrices ``g``, see
:mod:`xmipp_accel.em.symmetry`) the directions ``d`` and ``g d`` give the same projection up to an
in-plane rotation, so only one direction per orbit is needed. The asymmetric unit used here is the
Dirichlet cell of a fixed generic pole ``p0``: ``d`` belongs to it when ``d · p0 >= (g d) · p0`` for
every ``g`` (``d`` is the canonical representative of its orbit). Points are a Fibonacci
(golden-spiral) lattice of the whole sphere with one point per ``step^2`` steradians, kept when they
fall in the unit. Tests: ``xmipp_accel/tests/test_sampling.py`` (coverage, counts, Xmipp references).
"""
from __future__ import annotations

import numpy as np

from ..errors import InputError
from .geometry import matrix_to_euler
from .symmetry import symmetry_matrices

__all__ = ["sphere_sampling", "fibonacci_sphere", "canonical_directions", "in_asymmetric_unit",
           "directions_to_angles", "angles_to_directions", "random_rotations", "quaternion_to_matrix"]

_POLE = np.array([0.13, 0.071, 0.9889])
_POLE = _POLE / np.linalg.norm(_POLE)  # generic: on no symmetry axis or mirror of the supported groups


def fibonacci_sphere(n: int) -> np.ndarray:
    """``n`` nearly evenly spread unit vectors ``(n, 3)`` (golden-spiral lattice), float64."""
    if n < 1:
        raise InputError(f"number of directions must be >= 1, got {n}")
    i = np.arange(n, dtype=np.float64) + 0.5
    z = 1.0 - 2.0 * i / n
    phi = np.pi * (3.0 - np.sqrt(5.0)) * i
    rho = np.sqrt(np.clip(1.0 - z * z, 0.0, None))
    return np.stack([rho * np.cos(phi), rho * np.sin(phi), z], axis=1)


def angles_to_directions(rot_deg, tilt_deg) -> np.ndarray:
    """Unit directions ``(n, 3)`` of (rot, tilt) in degrees: ``(cos rot sin tilt, sin rot sin tilt, cos tilt)``."""
    a, b = np.deg2rad(np.asarray(rot_deg, float)), np.deg2rad(np.asarray(tilt_deg, float))
    return np.stack([np.cos(a) * np.sin(b), np.sin(a) * np.sin(b), np.cos(b)], axis=-1)


def directions_to_angles(d) -> tuple:
    """(rot_deg, tilt_deg) of unit directions ``(n, 3)``; rot in (-180, 180], tilt in [0, 180]."""
    d = np.asarray(d, dtype=np.float64).reshape(-1, 3)
    rot = np.rad2deg(np.arctan2(d[:, 1], d[:, 0]))
    tilt = np.rad2deg(np.arccos(np.clip(d[:, 2], -1.0, 1.0)))
    return rot, tilt


def canonical_directions(d, sym: str = "c1") -> np.ndarray:
    """The representative of each direction's orbit inside the asymmetric unit.

    Parameters
    ----------
    d : ``(n, 3)`` unit directions. sym : symmetry group name.

    Returns
    -------
    ``(n, 3)``: for each ``d`` the image ``g d`` closest to the pole ``p0`` of the unit.
    """
    d = np.asarray(d, dtype=np.float64).reshape(-1, 3)
    g = symmetry_matrices(sym)
    images = np.einsum("kij,nj->nki", g, d)  # (n, k, 3)
    best = np.argmax(images @ _POLE, axis=1)
    return images[np.arange(d.shape[0]), best]


def in_asymmetric_unit(d, sym: str = "c1", *, tol: float = 1e-9) -> np.ndarray:
    """Boolean ``(n,)``: whether each direction is the canonical representative of its orbit."""
    d = np.asarray(d, dtype=np.float64).reshape(-1, 3)
    g = symmetry_matrices(sym)
    scores = np.einsum("kij,nj,i->nk", g, d, _POLE)
    return d @ _POLE >= scores.max(axis=1) - tol


def _expand(d, g) -> np.ndarray:
    """All symmetry images ``(n * k, 3)`` of directions ``d`` ``(n, 3)``."""
    return np.einsum("kij,nj->nki", g, d).reshape(-1, 3)


def _chord(step_deg: float) -> float:
    return 2.0 * np.sin(np.deg2rad(step_deg) / 2.0)


def sphere_sampling(step_deg: float, sym: str = "c1") -> tuple:
    """Projection directions about ``step_deg`` apart, covering the asymmetric unit of ``sym``.

    Parameters
    ----------
    step_deg : angular step in degrees (0 < step <= 90). sym : ``"c1"``, ``"c4"``, ``"d2"``, ``"i"``, ...

    Returns
    -------
    (rot_deg, tilt_deg) : float64 arrays ``(m,)``, ``m ≈ 4π / (step² · order)``. Every direction on the
    sphere lies within about ``0.9 * step`` of one of the ``g · d`` (``g`` in the group).

    Notes
    -----
    The Fibonacci points inside the unit are kept, except those closer than ``0.5 * step`` to a symmetry
    image of another kept point (such pairs meet across the unit's edges); then the gaps that the images
    leave along the edges are filled with canonical images of the other lattice points that lie more
    than ``0.75 * step`` from every image of a kept point (added greedily, nearest the pole first).
    """
    if not 0 < step_deg <= 90:
        raise InputError(f"angular step must be in (0, 90] degrees, got {step_deg}")
    n = max(1, int(round(4.0 * np.pi / np.deg2rad(step_deg) ** 2)))
    pts = fibonacci_sphere(n)
    g = symmetry_matrices(sym)
    keep = in_asymmetric_unit(pts, sym)
    base = pts[keep]
    if len(g) > 1 and not keep.all():
        base = _thin_across_edges(base, g, _chord(0.5 * step_deg))
        base = _fill_edge_gaps(base, canonical_directions(pts[~keep], sym), g, _chord(0.75 * step_deg))
    return directions_to_angles(base)


def _thin_across_edges(base, g, min_chord: float) -> np.ndarray:
    """Drop points closer than ``min_chord`` to an image of another point (greedy, nearest the pole kept)."""
    from scipy.spatial import cKDTree

    k = len(g)
    images = _expand(base, g)
    pairs = cKDTree(images).query_pairs(min_chord, output_type="ndarray")
    owners = pairs // k
    owners = owners[owners[:, 0] != owners[:, 1]]
    if len(owners) == 0:
        return base
    neighbours = {}
    for a, b in owners:
        neighbours.setdefault(a, set()).add(b)
        neighbours.setdefault(b, set()).add(a)
    kept = np.ones(len(base), dtype=bool)
    decided = np.zeros(len(base), dtype=bool)
    for i in np.argsort(-(base @ _POLE)):
        if any(decided[j] and kept[j] for j in neighbours.get(i, ())):
            kept[i] = False
        decided[i] = True
    return base[kept]


def _fill_edge_gaps(base, candidates, g, gap_chord: float) -> np.ndarray:
    """Add candidates (canonical directions) farther than ``gap_chord`` from every image of ``base``."""
    from scipy.spatial import cKDTree

    dist, _ = cKDTree(_expand(base, g)).query(candidates)
    candidates = candidates[dist > gap_chord]
    added = []
    for c in candidates[np.argsort(-(candidates @ _POLE))]:
        if added and np.linalg.norm(_expand(np.array(added), g) - c, axis=1).min() <= gap_chord:
            continue
        added.append(c)
    return np.concatenate([base, np.array(added)]) if added else base


def quaternion_to_matrix(q) -> np.ndarray:
    """Rotation matrices ``(n, 3, 3)`` from quaternions ``(n, 4)`` ``(w, x, y, z)`` (normalised here)."""
    q = np.asarray(q, dtype=np.float64).reshape(-1, 4)
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    w, x, y, z = q.T
    return np.stack([
        np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], axis=1),
        np.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], axis=1),
        np.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], axis=1),
    ], axis=1)


def random_rotations(n: int, rng=None) -> np.ndarray:
    """``n`` rotation matrices ``(n, 3, 3)`` float64 drawn uniformly (Haar measure) on SO(3).

    Parameters
    ----------
    n : how many. rng : ``numpy.random.Generator``, an int seed, or None (fresh entropy).

    Notes
    -----
    Normalised 4-D Gaussian vectors are uniform on the unit quaternion sphere, whose image in SO(3) is
    the Haar measure.
    """
    rng = np.random.default_rng(rng)
    return quaternion_to_matrix(rng.standard_normal((int(n), 4)))


def random_euler_angles(n: int, rng=None) -> tuple:
    """(rot, tilt, psi) in degrees, arrays ``(n,)``, of :func:`random_rotations`."""
    return matrix_to_euler(random_rotations(n, rng))
