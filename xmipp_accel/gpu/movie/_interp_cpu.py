"""Compiled CPU loops (Numba) of the local-motion correction: Keys cubic and bilinear sampling of one frame.

The CPU engine of :func:`xmipp_accel.gpu.movie.apply.correct_local_motion_reference`. Two passes per
output row (positions and weights, then taps) instead of NumPy's ~80 passes over temporaries: 24 × 1024²
frames, Keys, one thread on the 2-core development machine (AMD EPYC): 0.17 CPU-s against 0.80 for the
NumPy engine (bilinear: 0.135 vs 0.27), with the same bits.

The arithmetic is the NumPy engine's, operation by operation in float32 (positions ``x - sx``, the
fractional part ``p - floor(p)``, the Keys weights of :func:`xmipp_accel.em.interpolation.keys_weights`,
each row of taps summed left to right, then weighted and summed over the rows), and the shift field comes
in from the caller (the same BLAS products, chunk by chunk): the outputs equal the NumPy engine's bit for
bit. Sample indices are clamped to the frame, as the CUDA kernel (``apply.cu``) and ``sample_keys`` do.

Imported only when the CPU path interpolates (Numba's import costs ~0.15 s); ``cache=True`` keeps the
compiled code on disk, so only the first run on a machine compiles (~1 s).
"""
from __future__ import annotations

import numpy as np
from numba import njit

__all__ = ["keys_rows", "linear_rows"]


@njit(nogil=True, cache=True, inline="always")
def _keys_weights_into(t, w, x):
    """Keys (a = -0.5) weights of taps -1, 0, 1, 2 at the fraction ``t`` (float32) into ``w[:, x]``, the
    operations of ``keys_weights``."""
    t2 = t * t
    t3 = t2 * t
    w[0, x] = np.float32(-0.5) * t3 + t2 - np.float32(0.5) * t
    w[1, x] = np.float32(1.5) * t3 - np.float32(2.5) * t2 + np.float32(1.0)
    w[2, x] = np.float32(-1.5) * t3 + np.float32(2.0) * t2 + np.float32(0.5) * t
    w[3, x] = np.float32(0.5) * t3 - np.float32(0.5) * t2


@njit(nogil=True, cache=True, inline="always")
def _row4(flat, base, w0, w1, w2, w3):
    """``w0 f[base] + w1 f[base+1] + w2 f[base+2] + w3 f[base+3]``, summed left to right."""
    r = w0 * flat[base]
    r += w1 * flat[base + 1]
    r += w2 * flat[base + 2]
    r += w3 * flat[base + 3]
    return r


@njit(nogil=True, cache=True, inline="always")
def _clamp(i, n):
    return min(max(i, 0), n - 1)


@njit(nogil=True, cache=True, boundscheck=False)
def keys_rows(flat, nx, ny, out, sx, sy, r0):
    """Keys samples of rows ``r0 .. r0 + len(sx)`` of one frame: ``out[i, x] = frame(y - sy, x - sx)``.

    Each row in two passes: the positions and the 4 + 4 weights of every pixel (a loop without branches),
    then the 16 taps (24 × 1024², one thread: 0.17-0.20 CPU-s against 0.25-0.26 in one pass; the same bits).

    Parameters
    ----------
    flat : float32 (ny · nx,), the frame, C order.
    nx, ny : int, the frame's size (px).
    out : float32 (rows, nx), written.
    sx, sy : float32 (rows, nx), the shift field (px) of these rows.
    r0 : int, the frame row of ``out[0]``.
    """
    rows = sx.shape[0]
    ix, iy = np.empty(nx, np.intp), np.empty(nx, np.intp)
    wx, wy = np.empty((4, nx), np.float32), np.empty((4, nx), np.float32)
    for i in range(rows):
        y = np.float32(r0 + i)
        for x in range(nx):                                   # positions and weights
            px = np.float32(x) - sx[i, x]
            py = y - sy[i, x]
            fx = np.floor(px)
            fy = np.floor(py)
            _keys_weights_into(px - fx, wx, x)
            _keys_weights_into(py - fy, wy, x)
            ix[x] = np.intp(fx)
            iy[x] = np.intp(fy)
        for x in range(nx):
            wx0, wx1, wx2, wx3 = wx[0, x], wx[1, x], wx[2, x], wx[3, x]
            jx, jy = ix[x], iy[x]
            if jx >= 1 and jx + 2 < nx and jy >= 1 and jy + 2 < ny:      # all 16 taps inside
                b = (jy - 1) * nx + jx - 1
                acc = wy[0, x] * _row4(flat, b, wx0, wx1, wx2, wx3)
                acc += wy[1, x] * _row4(flat, b + nx, wx0, wx1, wx2, wx3)
                acc += wy[2, x] * _row4(flat, b + 2 * nx, wx0, wx1, wx2, wx3)
                acc += wy[3, x] * _row4(flat, b + 3 * nx, wx0, wx1, wx2, wx3)
            else:                                                        # clamp every tap's index
                c0, c1 = _clamp(jx - 1, nx), _clamp(jx, nx)
                c2, c3 = _clamp(jx + 1, nx), _clamp(jx + 2, nx)
                acc = np.float32(0.0)
                for a in range(4):
                    rb = _clamp(jy - 1 + a, ny) * nx
                    r = wx0 * flat[rb + c0]
                    r += wx1 * flat[rb + c1]
                    r += wx2 * flat[rb + c2]
                    r += wx3 * flat[rb + c3]
                    if a == 0:
                        acc = wy[a, x] * r
                    else:
                        acc += wy[a, x] * r
            out[i, x] = acc


@njit(nogil=True, cache=True, boundscheck=False)
def linear_rows(flat, nx, ny, out, sx, sy, r0):
    """Bilinear samples, as :func:`keys_rows`: ``((1 - tx) f00 + tx f01) (1 - ty) + ((1 - tx) f10 + tx f11) ty``."""
    rows = sx.shape[0]
    one = np.float32(1.0)
    t_x, t_y = np.empty(nx, np.float32), np.empty(nx, np.float32)
    ix, iy = np.empty(nx, np.intp), np.empty(nx, np.intp)
    for i in range(rows):
        y = np.float32(r0 + i)
        for x in range(nx):                                   # positions
            px = np.float32(x) - sx[i, x]
            py = y - sy[i, x]
            fx = np.floor(px)
            fy = np.floor(py)
            t_x[x] = px - fx
            t_y[x] = py - fy
            ix[x] = np.intp(fx)
            iy[x] = np.intp(fy)
        for x in range(nx):
            tx, ty = t_x[x], t_y[x]
            ux = one - tx
            uy = one - ty
            c0, c1 = _clamp(ix[x], nx), _clamp(ix[x] + 1, nx)
            b0, b1 = _clamp(iy[x], ny) * nx, _clamp(iy[x] + 1, ny) * nx
            r = ux * flat[b0 + c0]
            r += tx * flat[b0 + c1]
            acc = r * uy
            r = ux * flat[b1 + c0]
            r += tx * flat[b1 + c1]
            acc += r * ty
            out[i, x] = acc
