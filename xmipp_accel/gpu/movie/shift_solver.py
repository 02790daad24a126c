"""Frame-to-frame shifts from the shifts measured between pairs of frames: robust least squares.

The N-1 frame-to-frame shifts are the least-squares solution of one equation per pair ``(i, j)``
(ones for the frames in ``[i, j)``); rows whose residual exceeds 3σ get weight 0 and the system is solved
again (FlexAlign, as Xmipp). One solver, batched over independent systems (the patches of the local
alignment, or a whole movie's global system as a batch of one). Shifts are ``(x, y)`` pairs in pixels.
"""
from __future__ import annotations

import logging
from typing import Tuple

import numpy as np


__all__ = ["solve_relative_shifts_batched", "solve_relative_shifts", "reference_frame"]

logger = logging.getLogger(__name__)


def _design_matrix(idx_a: np.ndarray, idx_b: np.ndarray, n_frames: int) -> np.ndarray:
    cols = np.arange(n_frames - 1)
    return ((cols[None, :] >= idx_a[:, None]) & (cols[None, :] < idx_b[:, None])).astype(np.float64)


def _solve_weighted(A: np.ndarray, d: np.ndarray, w: np.ndarray, systems: np.ndarray):
    """Weighted normal equations of the chosen ``systems``: ``(delta (S, N-1, 2), solvable (S,) bool)``.

    A system whose kept rows leave its normal matrix singular (no Cholesky factor) is not solvable; its
    ``delta`` is zero.
    """
    aw = (A[None] * w[systems][:, :, None]).transpose(0, 2, 1)          # (S, N-1, Q)
    normal = aw @ A                                                     # (S, N-1, N-1)
    rhs = aw @ d[systems]                                               # (S, N-1, 2)
    ok = np.ones(len(systems), dtype=bool)
    try:
        np.linalg.cholesky(normal)
    except np.linalg.LinAlgError:                                       # find which ones, system by system
        for s in range(len(systems)):
            try:
                np.linalg.cholesky(normal[s])
            except np.linalg.LinAlgError:
                ok[s] = False
    delta = np.zeros(rhs.shape)
    if ok.any():
        delta[ok] = np.linalg.solve(normal[ok], rhs[ok])
    return delta, ok


def solve_relative_shifts_batched(idx_a, idx_b, pair_shifts, n_frames: int, *, n_passes: int = 2,
                                  n_sigma: float = 3.0, weights=None) -> Tuple[np.ndarray, np.ndarray]:
    """Per-frame shifts from pairwise relative shifts, by least squares with outlier rejection, for
    many independent systems with the same pairs (e.g. the patches of a movie).

    Unknowns are the N-1 frame-to-frame shifts ``δ_m = s_{m+1} - s_m``; pair ``(i, j)`` gives one equation
    ``Σ_{m=i}^{j-1} δ_m = d_ij`` for x and one for y. After each solve, rows whose x or y residual exceeds
    ``n_sigma`` standard deviations of the system's residuals get weight 0 (unless that would leave the
    system underdetermined: it then keeps its rows and stops) and the system is solved again;
    ``n_passes`` rejection rounds (Xmipp: 2, 3σ).

    Parameters
    ----------
    idx_a, idx_b : int arrays (Q,)
        Frame indices of each pair, ``idx_a < idx_b``.
    pair_shifts : float array (P, Q, 2)
        Measured ``s_b - s_a`` as (x, y) in pixels, for P systems.
    n_frames : int
    weights : float array (P, Q), optional
        Initial row weights (rows with weight <= 0 are left out; default: every row).

    Returns
    -------
    shifts : float64 (P, N, 2)
        ``s_n`` relative to frame 0 (``s_0 = 0``).
    inliers : bool (P, Q)
        Rows kept in the final solve.

    Raises
    ------
    numpy.linalg.LinAlgError (a ValueError)
        When the pairs of a system do not determine every frame-to-frame shift.
    """
    idx_a = np.asarray(idx_a, dtype=np.int64)
    idx_b = np.asarray(idx_b, dtype=np.int64)
    d = np.asarray(pair_shifts, dtype=np.float64)
    n_sys = d.shape[0]
    A = _design_matrix(idx_a, idx_b, n_frames)                          # (Q, N-1)
    w = np.ones(d.shape[:2]) if weights is None else \
        (np.broadcast_to(np.asarray(weights, dtype=np.float64), d.shape[:2]) > 0).astype(np.float64)
    delta, ok = _solve_weighted(A, d, w, np.arange(n_sys))
    if not ok.all():
        which = "" if n_sys == 1 else f" (system {int(np.argmin(ok))})"
        raise np.linalg.LinAlgError(f"the frame pairs do not determine every frame-to-frame shift{which}")
    active = np.ones(n_sys, dtype=bool)                                 # systems still rejecting outliers
    for _ in range(int(n_passes)):
        res = d - A[None] @ delta                                       # (P, Q, 2)
        keep = w > 0
        cnt = np.maximum(keep.sum(axis=1, keepdims=True), 1)
        mean = (res * keep[:, :, None]).sum(axis=1, keepdims=True) / cnt[:, :, None]
        sd = np.sqrt((((res - mean) ** 2) * keep[:, :, None]).sum(axis=1, keepdims=True) / cnt[:, :, None])
        out = (np.abs(res) > n_sigma * sd).any(axis=2)
        new_w = np.where(out, 0.0, w)
        active &= (new_w != w).any(axis=1)                              # nothing rejected: converged
        systems = np.nonzero(active)[0]
        if systems.size == 0:
            break
        new_delta, ok = _solve_weighted(A, d, new_w, systems)
        if not ok.all():
            logger.debug("outlier rejection would leave %d shift system(s) underdetermined; keeping their rows",
                         int((~ok).sum()))
        active[systems[~ok]] = False
        accepted = systems[ok]
        w[accepted] = new_w[accepted]
        delta[accepted] = new_delta[ok]
    shifts = np.zeros((n_sys, n_frames, 2))
    shifts[:, 1:] = np.cumsum(delta, axis=1)
    return shifts, w > 0


def solve_relative_shifts(idx_a, idx_b, pair_shifts, n_frames: int, *, n_passes: int = 2,
                          n_sigma: float = 3.0, weights=None) -> Tuple[np.ndarray, np.ndarray]:
    """:func:`solve_relative_shifts_batched` for one system (e.g. the whole frames).

    Parameters
    ----------
    idx_a, idx_b : int arrays (Q,)
    pair_shifts : float array (Q, 2)
        Measured ``s_b - s_a`` as (x, y) in pixels.
    n_frames : int
    weights : float array (Q,), optional

    Returns
    -------
    shifts : float64 (N, 2) relative to frame 0; inliers : bool (Q,)
    """
    d = np.asarray(pair_shifts, dtype=np.float64).reshape(1, -1, 2)
    w = None if weights is None else np.asarray(weights, dtype=np.float64).reshape(1, -1)
    shifts, inliers = solve_relative_shifts_batched(idx_a, idx_b, d, n_frames, n_passes=n_passes, n_sigma=n_sigma,
                                                    weights=w)
    return shifts[0], inliers[0]


def reference_frame(shifts) -> int:
    """FlexAlign's reference: the frame whose largest shift to any other frame is smallest.

    Parameters
    ----------
    shifts : array (N, 2)
        Per-frame shifts (any common origin).
    """
    s = np.asarray(shifts, dtype=np.float64)
    dist = np.sqrt(((s[:, None, :] - s[None, :, :]) ** 2).sum(axis=-1))
    return int(np.argmin(dist.max(axis=1)))
