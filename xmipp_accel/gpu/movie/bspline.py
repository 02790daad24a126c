"""Cubic B-spline model of the local shift over (x, y, t), fitted robustly to patch measurements.

As in FlexAlign (Střelák et al., Electronics 2020, §2.3; Xmipp ``LocalAlignmentResult``): control points
``L_x × L_y × L_t``; along an axis of extent ``E`` (pixels, or frames - 1) the spacing is
``h = E / (L - 3)`` and control point ``j`` (0-based) sits at ``(j - 1) h``, so the basis functions
``β3(u / h - (j - 1))`` sum to one everywhere on ``[0, E]`` (``L >= 4``). The model gives the shift
``(x, y)`` in pixels, MotionCor2 sign, at pixel ``(x, y)`` of frame ``t``.

The coefficients are fitted by least squares to all (patch, frame) measurements with the same robust
rule as the global shifts: rows with a residual above 3σ get weight 0 and the fit is repeated, twice.
The basis and the fit work on the host (the system is small: patches × frames rows,
``L_x L_y L_t`` unknowns); evaluation is also done on the GPU inside the interpolation kernel.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np

__all__ = ["bspline3", "basis_matrix", "auto_control_points", "BSplineShiftModel", "fit_bspline_shifts",
           "fit_bspline_grid"]

MIN_CONTROL_POINTS = 4


def bspline3(u):
    """Centred cubic B-spline β3(u) (support (-2, 2), β3(0) = 2/3), NumPy or CuPy."""
    a = np.abs(u) if isinstance(u, (float, int, np.ndarray)) else abs(u)
    out = np.where(a < 1.0, 2.0 / 3.0 - a * a + 0.5 * a ** 3,
                   np.where(a < 2.0, (2.0 - a) ** 3 / 6.0, 0.0))
    return out


def basis_matrix(u: np.ndarray, n_ctrl: int, spacing: float) -> np.ndarray:
    """Values ``β3(u / h - (j - 1))`` of the ``n_ctrl`` basis functions at positions ``u``.

    Parameters
    ----------
    u : float array (M,)
        Positions in pixels (or frames).
    n_ctrl : int
    spacing : float
        ``h`` in the same unit.

    Returns
    -------
    float64 ndarray (M, n_ctrl)
    """
    u = np.asarray(u, dtype=np.float64).reshape(-1, 1)
    j = np.arange(n_ctrl, dtype=np.float64).reshape(1, -1)
    return bspline3(u / spacing - (j - 1.0))


def auto_control_points(shape_yx: Sequence[int], pixel_size_A: float, n_frames: int) -> Tuple[int, int, int]:
    """Scipion's rule for the number of control points (x, y, t).

    One per 1000 Å plus 2 along x and y, ``ceil(N / 7) + 2`` along time, at least 4 (cubic splines with
    the spacing rule above need 4).
    """
    ny, nx = (int(s) for s in shape_yx)
    lx = max(MIN_CONTROL_POINTS, int(math.ceil(nx * pixel_size_A / 1000.0)) + 2)
    ly = max(MIN_CONTROL_POINTS, int(math.ceil(ny * pixel_size_A / 1000.0)) + 2)
    lt = max(MIN_CONTROL_POINTS, int(math.ceil(n_frames / 7.0)) + 2)
    return lx, ly, lt


@dataclass
class BSplineShiftModel:
    """Local shift field ``s(x, y, t)`` as a cubic B-spline.

    Attributes
    ----------
    n_ctrl : (Lx, Ly, Lt)
    extent : (width_px, height_px, n_frames)
        Frame size in pixels and number of frames; time runs over frames 0 .. n_frames - 1.
    coefficients : float64 ndarray (Lt, Ly, Lx, 2)
        Coefficients of the x and y shifts (pixels).
    """
    n_ctrl: Tuple[int, int, int]
    extent: Tuple[float, float, int]
    coefficients: np.ndarray

    @property
    def spacing(self) -> Tuple[float, float, float]:
        """(hx, hy, ht): control-point spacing in pixels, pixels and frames."""
        lx, ly, lt = self.n_ctrl
        w, h, n = self.extent
        return (w / (lx - 3), h / (ly - 3), max(n - 1, 1) / (lt - 3))

    def design_matrix(self, x, y, t) -> np.ndarray:
        """Rows of basis products for points (x, y, t): (M, Lt·Ly·Lx) float64."""
        lx, ly, lt = self.n_ctrl
        hx, hy, ht = self.spacing
        bx = basis_matrix(x, lx, hx)
        by = basis_matrix(y, ly, hy)
        bt = basis_matrix(t, lt, ht)
        return (bt[:, :, None, None] * by[:, None, :, None] * bx[:, None, None, :]).reshape(len(bx), -1)

    def evaluate(self, x, y, t) -> np.ndarray:
        """Shifts at points: x, y (pixels), t (frame index) broadcast together; returns (..., 2)."""
        x, y, t = np.broadcast_arrays(np.asarray(x, float), np.asarray(y, float), np.asarray(t, float))
        a = self.design_matrix(x.ravel(), y.ravel(), t.ravel())
        return (a @ self.coefficients.reshape(-1, 2)).reshape(x.shape + (2,))

    def frame_coefficients(self, frames: Optional[Sequence[int]] = None) -> np.ndarray:
        """Coefficients summed over the time basis for each frame: (N, 2, Ly, Lx) float32.

        ``s(x, y, n) = Σ_{i,j} C[n, :, j, i] β3(y/hy - (j-1)) β3(x/hx - (i-1))``.
        """
        n = int(self.extent[2])
        frames = np.arange(n) if frames is None else np.asarray(frames)
        lt = self.n_ctrl[2]
        bt = basis_matrix(frames.astype(float), lt, self.spacing[2])            # (N, Lt)
        c = np.tensordot(bt, self.coefficients, axes=(1, 0))                      # (N, Ly, Lx, 2)
        return np.ascontiguousarray(np.moveaxis(c, -1, 1)).astype(np.float32)

    def to_dict(self) -> dict:
        return {"n_ctrl": list(self.n_ctrl), "extent": list(self.extent),
                "coefficients": self.coefficients.tolist()}


def fit_bspline_shifts(points_xyt: np.ndarray, shifts_xy: np.ndarray, *, n_ctrl: Sequence[int],
                       extent: Sequence[float], weights: Optional[np.ndarray] = None, n_passes: int = 2,
                       n_sigma: float = 3.0, smoothness: float = 1e-3) -> Tuple[BSplineShiftModel, np.ndarray]:
    """Fit a :class:`BSplineShiftModel` to local shift measurements.

    Parameters
    ----------
    points_xyt : float array (M, 3)
        Patch centre x, y (pixels) and frame index of each measurement.
    shifts_xy : float array (M, 2)
        Measured local shifts (pixels).
    n_ctrl : (Lx, Ly, Lt)
        Each at least 4.
    extent : (width_px, height_px, n_frames)
    weights : float array (M,), optional
        0 excludes a row from the start.
    n_passes : int
        Rounds of 3σ outlier rejection.
    smoothness : float
        Small ridge on the coefficients relative to the mean diagonal of the normal matrix, so control
        points outside the patch grid stay near zero instead of being undetermined.

    Returns
    -------
    model : BSplineShiftModel
    inliers : bool ndarray (M,)
    """
    lx, ly, lt = (int(v) for v in n_ctrl)
    if min(lx, ly, lt) < MIN_CONTROL_POINTS:
        raise ValueError(f"B-spline control points must be at least {MIN_CONTROL_POINTS} per axis, "
                         f"got {lx}x{ly}x{lt}")
    pts = np.asarray(points_xyt, dtype=np.float64).reshape(-1, 3)
    d = np.asarray(shifts_xy, dtype=np.float64).reshape(-1, 2)
    model = BSplineShiftModel((lx, ly, lt), (float(extent[0]), float(extent[1]), int(extent[2])),
                              np.zeros((lt, ly, lx, 2)))
    A = model.design_matrix(pts[:, 0], pts[:, 1], pts[:, 2])
    w = np.ones(len(d)) if weights is None else (np.asarray(weights) > 0).astype(np.float64)

    def solve(wt):
        Aw = A[wt > 0]
        normal = Aw.T @ Aw
        ridge = smoothness * max(float(np.trace(normal)) / normal.shape[0], 1e-12)
        return np.linalg.solve(normal + ridge * np.eye(normal.shape[0]), Aw.T @ d[wt > 0])

    coef = solve(w)
    for _ in range(int(n_passes)):
        res = d - A @ coef
        keep = w > 0
        sx, sy = res[keep, 0].std(), res[keep, 1].std()
        out = (np.abs(res[:, 0]) > n_sigma * sx) | (np.abs(res[:, 1]) > n_sigma * sy)
        new_w = np.where(out, 0.0, w)
        if new_w.sum() == w.sum() or new_w.sum() < A.shape[1] // 2:
            break
        w = new_w
        coef = solve(w)
    model.coefficients = coef.reshape(lt, ly, lx, 2)
    return model, w > 0


def fit_bspline_grid(centres_xy: np.ndarray, shifts: np.ndarray, *, n_ctrl: Sequence[int], extent: Sequence[float],
                     weights: Optional[np.ndarray] = None, n_passes: int = 2, n_sigma: float = 3.0,
                     smoothness: float = 1e-3) -> Tuple[BSplineShiftModel, np.ndarray]:
    """:func:`fit_bspline_shifts` for measurements on every (patch, frame) pair, using their Kronecker structure.

    The row of patch p and frame t is ``β_t(t) ⊗ β_y(y_p) ⊗ β_x(x_p)``, so the normal matrix is
    ``Σ_p (B_tᵀ W_p B_t) ⊗ (s_p s_pᵀ)`` with ``s_p = β_y(y_p) ⊗ β_x(x_p)``: a few small products instead
    of one with (patches × frames) rows. Same result as :func:`fit_bspline_shifts`.

    Parameters
    ----------
    centres_xy : float array (P, 2)
        Patch centres (pixels).
    shifts : float array (P, N, 2)
        Shift of every patch in every frame.
    weights : float array (P, N), optional

    Returns
    -------
    model : BSplineShiftModel
    inliers : bool ndarray (P, N)
    """
    lx, ly, lt = (int(v) for v in n_ctrl)
    if min(lx, ly, lt) < MIN_CONTROL_POINTS:
        raise ValueError(f"B-spline control points must be at least {MIN_CONTROL_POINTS} per axis, "
                         f"got {lx}x{ly}x{lt}")
    c = np.asarray(centres_xy, dtype=np.float64).reshape(-1, 2)
    d = np.asarray(shifts, dtype=np.float64)
    n_p, n = d.shape[:2]
    model = BSplineShiftModel((lx, ly, lt), (float(extent[0]), float(extent[1]), int(extent[2])),
                              np.zeros((lt, ly, lx, 2)))
    hx, hy, ht = model.spacing
    bt = basis_matrix(np.arange(n, dtype=np.float64), lt, ht)                                  # (N, Lt)
    sp = (basis_matrix(c[:, 1], ly, hy)[:, :, None] * basis_matrix(c[:, 0], lx, hx)[:, None, :]).reshape(n_p, -1)
    q = sp.shape[1]
    w = np.ones((n_p, n)) if weights is None else (np.asarray(weights, dtype=np.float64) > 0).astype(np.float64)

    ss = (sp[:, :, None] * sp[:, None, :]).reshape(n_p, q * q)                                # (P, Q²)

    def solve(wt):
        mt = ((wt[:, :, None] * bt[None]).transpose(0, 2, 1) @ bt).reshape(n_p, lt * lt)      # (P, Lt²)
        normal = (mt.T @ ss).reshape(lt, lt, q, q).transpose(0, 2, 1, 3).reshape(lt * q, lt * q)
        u = np.einsum("pt,ta,ptk->pak", wt, bt, d)                                             # (P, Lt, 2)
        rhs = np.einsum("pak,pc->ack", u, sp).reshape(lt * q, 2)
        ridge = smoothness * max(float(np.trace(normal)) / normal.shape[0], 1e-12)
        return np.linalg.solve(normal + ridge * np.eye(normal.shape[0]), rhs).reshape(lt, q, 2)

    def predict(coef):
        return np.einsum("ta,aqk,pq->ptk", bt, coef, sp)

    coef = solve(w)
    for _ in range(int(n_passes)):
        res = d - predict(coef)
        keep = w > 0
        sx, sy = res[keep][:, 0].std(), res[keep][:, 1].std()
        out = (np.abs(res[..., 0]) > n_sigma * sx) | (np.abs(res[..., 1]) > n_sigma * sy)
        new_w = np.where(out, 0.0, w)
        if new_w.sum() == w.sum() or new_w.sum() < lt * q // 2:
            break
        w = new_w
        coef = solve(w)
    model.coefficients = coef.reshape(lt, ly, lx, 2)
    return model, w > 0
