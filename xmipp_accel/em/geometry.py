"""Euler angles and rotation matrices, the one definition used everywhere.

Convention (Xmipp and RELION): ZYZ Euler angles ``(rot, tilt, psi)`` in degrees;
``A = euler_to_matrix(rot, tilt, psi)`` equals ``xmippLib.Euler_angles2matrix``.
The projection of a volume ``V`` along ``A`` is ``P(x, y) = sum_z V(A^T (x, y, z))``:
a point ``r`` of the projection frame comes from ``A^T r`` in the volume frame.
Arrays are indexed ``(z, y, x)`` with the centre at ``N // 2`` on every axis.
Vectors are ``(x, y, z)``.
"""
from __future__ import annotations

import numpy as np

__all__ = ["euler_to_matrix", "matrix_to_euler", "projection_direction", "angular_distance_deg",
           "centered_grid"]


def euler_to_matrix(rot, tilt, psi, xp=np) -> np.ndarray:
    """Rotation matrices for ZYZ Euler angles (degrees).

    Parameters
    ----------
    rot, tilt, psi : scalars or arrays of shape ``(n,)``, degrees.

    Returns
    -------
    ndarray of shape ``(3, 3)`` for scalar input, ``(n, 3, 3)`` otherwise, float64.
    Equal to ``xmippLib.Euler_angles2matrix(rot, tilt, psi)``.
    """
    scalar = np.ndim(rot) == 0 and np.ndim(tilt) == 0 and np.ndim(psi) == 0
    a = xp.deg2rad(xp.atleast_1d(xp.asarray(rot, dtype=xp.float64)))
    b = xp.deg2rad(xp.atleast_1d(xp.asarray(tilt, dtype=xp.float64)))
    g = xp.deg2rad(xp.atleast_1d(xp.asarray(psi, dtype=xp.float64)))
    a, b, g = xp.broadcast_arrays(a, b, g)
    ca, sa, cb, sb, cg, sg = xp.cos(a), xp.sin(a), xp.cos(b), xp.sin(b), xp.cos(g), xp.sin(g)
    cc, cs, sc, ss = cb * ca, cb * sa, sb * ca, sb * sa
    m = xp.empty(a.shape + (3, 3), dtype=xp.float64)
    m[..., 0, 0] = cg * cc - sg * sa
    m[..., 0, 1] = cg * cs + sg * ca
    m[..., 0, 2] = -cg * sb
    m[..., 1, 0] = -sg * cc - cg * sa
    m[..., 1, 1] = -sg * cs + cg * ca
    m[..., 1, 2] = sg * sb
    m[..., 2, 0] = sc
    m[..., 2, 1] = ss
    m[..., 2, 2] = cb
    return m[0] if scalar else m


def matrix_to_euler(m) -> tuple:
    """ZYZ Euler angles (degrees) of rotation matrices, tilt in ``[0, 180]``.

    Parameters
    ----------
    m : array ``(3, 3)`` or ``(n, 3, 3)``.

    Returns
    -------
    (rot, tilt, psi) : floats or arrays of shape ``(n,)``, degrees, with
    ``euler_to_matrix(rot, tilt, psi) == m`` (for tilt 0 or 180 the split of
    the in-plane angle between rot and psi is arbitrary; psi takes it).
    """
    m = np.asarray(m, dtype=np.float64)
    single = m.ndim == 2
    m = m.reshape(-1, 3, 3)
    sb = np.hypot(m[:, 0, 2], m[:, 1, 2])
    tilt = np.arctan2(sb, m[:, 2, 2])
    rot = np.arctan2(m[:, 2, 1], m[:, 2, 0])
    psi = np.arctan2(m[:, 1, 2], -m[:, 0, 2])
    degenerate = sb < 1e-9
    if np.any(degenerate):
        d = degenerate
        rot[d] = 0.0
        # tilt 0: A = Rz(psi) Rz(rot) -> psi = atan2(-A10, A00); tilt 180 similar with sign
        up = m[d, 2, 2] > 0
        psi_d = np.where(up, np.arctan2(-m[d, 1, 0], m[d, 0, 0]), np.arctan2(m[d, 1, 0], -m[d, 0, 0]))
        psi[d] = psi_d
        tilt[d] = np.where(up, 0.0, np.pi)
    out = np.rad2deg(rot), np.rad2deg(tilt), np.rad2deg(psi)
    if single:
        return tuple(float(v[0]) for v in out)
    return out


def projection_direction(rot, tilt) -> np.ndarray:
    """Unit projection direction(s) ``(x, y, z)``: the third row of the Euler matrix."""
    return euler_to_matrix(rot, tilt, np.zeros_like(np.asarray(rot, dtype=float)))[..., 2, :]


def angular_distance_deg(m1, m2, sym_matrices=None) -> np.ndarray:
    """Smallest rotation angle (degrees) between rotations ``m1`` and ``m2``.

    With ``sym_matrices`` of shape ``(k, 3, 3)`` (the group, identity included)
    the distance is the minimum over ``g`` of the angle of ``m1^T g m2`` taken
    on the side where the group acts on the volume: ``m2 g`` (errors modulo symmetry).
    Shapes ``(n, 3, 3)`` or ``(3, 3)``; returns ``(n,)`` or a float.
    """
    m1 = np.asarray(m1, dtype=np.float64)
    m2 = np.asarray(m2, dtype=np.float64)
    single = m1.ndim == 2 and m2.ndim == 2
    m1, m2 = np.broadcast_arrays(m1.reshape(-1, 3, 3), m2.reshape(-1, 3, 3))
    syms = np.eye(3)[None] if sym_matrices is None else np.asarray(sym_matrices, dtype=np.float64)
    best = np.full(m1.shape[0], np.inf)
    for g in syms:
        r = np.einsum("nji,njk->nik", m1, m2 @ g)
        cos = np.clip((np.trace(r, axis1=1, axis2=2) - 1.0) / 2.0, -1.0, 1.0)
        best = np.minimum(best, np.rad2deg(np.arccos(cos)))
    return float(best[0]) if single else best


def centered_grid(shape, xp=np, dtype=None):
    """Integer coordinates relative to ``N // 2`` for each axis of ``shape`` (z, y, x order).

    Returns a list of 1-D arrays, one per axis, to be broadcast by the caller.
    """
    dtype = dtype or xp.float32
    return [xp.arange(n, dtype=dtype) - (n // 2) for n in shape]
