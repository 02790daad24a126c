"""Point-group symmetry: the rotation matrices of Cn, Dn, T, O and I in Xmipp's orientation.

Orientation (Xmipp's ``SymList``, also RELION's):

- ``cN``: N-fold axis along z.
- ``dN``: N-fold axis along z, 2-fold axis along x.
- ``t``: 3-fold axis along z, 2-fold axis along ``(0, sqrt(2/3), sqrt(1/3))``.
- ``o``: 4-fold axis along z, 3-fold axis along ``(1, 1, 1)/sqrt(3)``.
- ``i`` (= ``i2``): 2-fold axes along x, y and z, 5-fold axis along ``(1, 0, phi)`` (phi the golden ratio).
- ``i1``: 2-fold axes along x, y and z, 5-fold axis along ``(phi, 0, -1)``.
- ``i3``: 5-fold axis along z, 2-fold axis along ``(-1, 0, phi)``.
- ``i4``: 5-fold axis along ``(2, 0, 1)/sqrt(5)``, 2-fold axis along ``(1, 0, phi)``.

A map ``V`` with symmetry ``sym`` satisfies ``V(g r) = V(r)`` for every matrix ``g`` returned by
:func:`symmetry_matrices` (the list is a group, so ``g`` and ``g^T`` both belong to it). Equivalent
projection directions are ``g d`` and equivalent orientations ``A g`` (see
:func:`xmipp_accel.em.geometry.angular_distance_deg`).

Only proper rotation groups are offered (cryo-EM maps of biological molecules are chiral); Xmipp's
groups with mirrors or inversions (``cnv``, ``dnh``, ``ih``, ...) raise :class:`InputError`.

Checked by ``xmipp_accel/tests/test_symmetry.py`` against ``xmippLib.SymList`` (as sets of matrices).
"""
from __future__ import annotations

import functools
import re

import numpy as np

from ..errors import InputError

__all__ = ["symmetry_matrices", "symmetry_order", "is_valid_symmetry", "normalize_symmetry", "symmetrize_volume",
           "rotation_about_axis", "VALID_SYMMETRIES"]

VALID_SYMMETRIES = "c1, cN (N >= 1), dN (N >= 1), t, o, i (= i2), i1, i2, i3, i4"

_PHI = (1.0 + 5.0 ** 0.5) / 2.0
_NAME = re.compile(r"^(c|d)(\d+)$|^(t|o|i)([1-4]?)$")


def normalize_symmetry(sym: str) -> str:
    """Canonical lower-case name of a symmetry group (``"I"`` → ``"i2"``, ``" C4 "`` → ``"c4"``).

    Raises
    ------
    InputError
        for names that are not a proper point group known here; the message lists the valid names.
    """
    name = str(sym).strip().lower()
    m = _NAME.match(name)
    if m is None or (m.group(2) is not None and int(m.group(2)) < 1):
        raise InputError(f"unknown symmetry {sym!r}: use one of {VALID_SYMMETRIES} "
                         "(groups with mirrors or inversions are not supported)")
    if m.group(3) == "i" and m.group(4) == "":
        return "i2"  # Xmipp and RELION: plain I means the I2 orientation
    if m.group(1):
        return f"{m.group(1)}{int(m.group(2))}"
    return name


def is_valid_symmetry(sym: str) -> bool:
    """True when ``sym`` names a group :func:`symmetry_matrices` accepts."""
    try:
        normalize_symmetry(sym)
    except InputError:
        return False
    return True


def rotation_about_axis(axis, angle_deg: float) -> np.ndarray:
    """Rotation matrix ``(3, 3)`` float64 by ``angle_deg`` (right-handed) about ``axis`` ``(x, y, z)``."""
    u = np.asarray(axis, dtype=np.float64)
    u = u / np.linalg.norm(u)
    a = np.deg2rad(angle_deg)
    k = np.array([[0.0, -u[2], u[1]], [u[2], 0.0, -u[0]], [-u[1], u[0], 0.0]])
    return np.eye(3) + np.sin(a) * k + (1.0 - np.cos(a)) * (k @ k)


def _generators(name: str) -> list:
    """(fold, axis) pairs generating the group ``name`` (canonical name)."""
    z, x = (0.0, 0.0, 1.0), (1.0, 0.0, 0.0)
    kind = name[0]
    if kind in "cd":
        n = int(name[1:])
        gens = [(n, z)] if n > 1 else []
        if kind == "d":
            gens.append((2, x))
        return gens
    if name == "t":
        return [(3, z), (2, (0.0, 2.0 ** 0.5, 1.0))]
    if name == "o":
        return [(4, z), (3, (1.0, 1.0, 1.0))]
    if name == "i1":
        return [(2, x), (5, (_PHI, 0.0, -1.0)), (3, (_PHI ** 2, 1.0, 0.0))]
    if name == "i2":
        return [(2, z), (5, (1.0, 0.0, _PHI)), (3, (0.0, 1.0, _PHI ** 2))]
    if name == "i3":
        return [(5, z), (2, (-1.0, 0.0, _PHI))]
    if name == "i4":
        return [(5, (2.0, 0.0, 1.0)), (2, (1.0, 0.0, _PHI))]
    raise InputError(f"unknown symmetry {name!r}: use one of {VALID_SYMMETRIES}")  # pragma: no cover


def _close_group(generators: list, tol: float = 1e-6, max_order: int = 120) -> np.ndarray:
    """All products of the generator matrices (breadth first, identity first)."""
    group = [np.eye(3)]
    frontier = [np.eye(3)]
    while frontier:
        new = []
        for g in frontier:
            for h in generators:
                p = h @ g
                if not any(np.abs(p - q).max() < tol for q in group):
                    group.append(p)
                    new.append(p)
        if len(group) > max_order:  # pragma: no cover - generators are fixed above
            raise RuntimeError("symmetry group did not close: bad generators")
        frontier = new
    out = np.array(group)
    out[np.abs(out) < 1e-15] = 0.0
    return out


@functools.lru_cache(maxsize=64)
def _matrices_cached(name: str) -> np.ndarray:
    gens = [rotation_about_axis(axis, 360.0 / fold) for fold, axis in _generators(name)]
    return _close_group(gens)


def symmetry_matrices(sym: str) -> np.ndarray:
    """Rotation matrices of a point group, in Xmipp's orientation.

    Parameters
    ----------
    sym : ``"c1"``, ``"cN"``, ``"dN"``, ``"t"``, ``"o"``, ``"i"`` (= ``"i2"``), ``"i1"`` ... ``"i4"``;
        case-insensitive.

    Returns
    -------
    ndarray ``(k, 3, 3)`` float64, identity first, ``k`` the order of the group; equal as a set to
    ``xmippLib.SymList().getSymmetryMatrices(sym)``. Matrices act on vectors ``(x, y, z)``.

    Raises
    ------
    InputError
        for an unknown name (the message lists the valid ones).
    """
    return _matrices_cached(normalize_symmetry(sym)).copy()


def symmetry_order(sym: str) -> int:
    """Number of elements of the group (``c4`` → 4, ``d7`` → 14, ``t`` → 12, ``o`` → 24, ``i`` → 60)."""
    name = normalize_symmetry(sym)
    if name[0] == "c":
        return int(name[1:])
    if name[0] == "d":
        return 2 * int(name[1:])
    return {"t": 12, "o": 24}.get(name, 60)


def symmetrize_volume(volume: np.ndarray, sym: str | np.ndarray, *, order: int = 3) -> np.ndarray:
    """Average a map over a symmetry group: ``V_s(r) = mean_g V(g r)``.

    Parameters
    ----------
    volume : ``(N, N, N)`` real array indexed ``(z, y, x)``, centre at ``N // 2``.
    sym : a group name (see :func:`symmetry_matrices`) or matrices ``(k, 3, 3)``.
    order : spline order of the interpolation (scipy.ndimage.map_coordinates).

    Returns
    -------
    ``(N, N, N)`` float32 map that satisfies ``V_s(g r) = V_s(r)`` for every ``g`` of the group
    (up to interpolation error). CPU only: synthetic data, tests, a refinement's initial model.
    """
    from scipy.ndimage import map_coordinates

    mats = symmetry_matrices(sym) if isinstance(sym, str) else np.asarray(sym, dtype=np.float64)
    vol = np.asarray(volume, dtype=np.float64)
    n = vol.shape[0]
    c = n // 2
    z, y, x = np.meshgrid(*(np.arange(s, dtype=np.float64) - c for s in vol.shape), indexing="ij")
    r = np.stack([x.ravel(), y.ravel(), z.ravel()])           # (3, M) vectors (x, y, z)
    acc = np.zeros(vol.size)
    for g in mats:
        gx, gy, gz = g @ r
        acc += map_coordinates(vol, [gz + c, gy + c, gx + c], order=order, mode="constant", cval=0.0)
    return (acc / len(mats)).reshape(vol.shape).astype(np.float32)


def _without_radial_average(volume: np.ndarray) -> np.ndarray:
    """``volume`` minus its spherical average about the centre ``N // 2`` (one-voxel shells)."""
    n = volume.shape[0]
    c = np.arange(n) - n // 2
    r = np.rint(np.sqrt(c[:, None, None] ** 2 + c[None, :, None] ** 2 + c[None, None, :] ** 2)).astype(np.int64)
    profile = np.bincount(r.ravel(), volume.ravel()) / np.maximum(np.bincount(r.ravel()), 1)
    return volume - profile[r]


def symmetry_agreement(volume: np.ndarray, sym: str, *, mask: np.ndarray | None = None) -> float:
    """How well a map has a symmetry: the correlation of its non-spherical part with that of its symmetrised copy.

    The spherical average (identical in both, it would make any round blob look symmetric) is removed first.
    1 for a map with the symmetry; for the asymmetric random phantoms of :mod:`.synthetic` at 30 Å, 0.5-0.7 for
    c2, about 0.5 for c4/d2, 0.1-0.4 for t/o/i.

    Parameters
    ----------
    volume : ``(N, N, N)`` map, centre ``N // 2``.
    sym : group name (:func:`symmetry_matrices`).
    mask : ``(N, N, N)`` weights (e.g. a soft sphere) applied before the comparison; None: the whole box.
    """
    vol = np.asarray(volume, dtype=np.float64)
    m = np.ones_like(vol) if mask is None else np.asarray(mask, dtype=np.float64)
    a = _without_radial_average(vol * m) * m
    b = _without_radial_average(symmetrize_volume(vol, sym, order=1) * m) * m
    den = np.sqrt(np.sum(a * a) * np.sum(b * b))
    return float(np.sum(a * b) / den) if den > 0 else 1.0
