"""Compiled CPU loops (Numba) of the local-motion correction: Keys cubic and bilinear sampling of one frame.

The CPU engine of :func:`xmipp_accel.gpu.movie.apply.correct_local_motion_reference`. One pass over the
output pixels instead of NumPy's ~80 passes over temporaries: 24 × 1024² frames, Keys, one thread on the
2-core development machine (AMD EPYC): 0.25 CPU-s against 0.91 for the NumPy engine (bilinear: 0.12 vs
0.25), with the same bits.

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
def _keys_weights(t):
    """Keys (a = -0.5) weights of taps -1, 0, 1, 2 at the fraction ``t`` (float32), as ``keys_weights``."""
    t2 = t * t
    t3 = t2 * t
    return (np.float32(-0.5) * t3 + t2 - np.float32(0.5) * t,
            np.float32(1.5) * t3 - np.float32(2.5) * t2 + np.float32(1.0),
            np.float32(-1.5) * t3 + np.float32(2.0) * t2 + np.float32(0.5) * t,
            np.float32(0.5) * t3 - np.float32(0.5) * t2)


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

    Parameters
    ----------
    flat : float32 (ny · nx,), the frame, C order.
    nx, ny : int, the frame's size (px).
    out : float32 (rows, nx), written.
    sx, sy : float32 (rows, nx), the shift field (px) of these rows.
    r0 : int, the frame row of ``out[0]``.
    """
    rows = sx.shape[0]
    for i in range(rows):
        y = np.float32(r0 + i)
        for x in range(nx):
            px = np.float32(x) - sx[i, x]
            py = y - sy[i, x]
            fx = np.floor(px)
            fy = np.floor(py)
            wx0, wx1, wx2, wx3 = _keys_weights(px - fx)
            wy0, wy1, wy2, wy3 = _keys_weights(py - fy)
            ix = np.intp(fx)
            iy = np.intp(fy)
            if ix >= 1 and ix + 2 < nx and iy >= 1 and iy + 2 < ny:      # all 16 taps inside
                b = (iy - 1) * nx + ix - 1
                acc = wy0 * _row4(flat, b, wx0, wx1, wx2, wx3)
                acc += wy1 * _row4(flat, b + nx, wx0, wx1, wx2, wx3)
                acc += wy2 * _row4(flat, b + 2 * nx, wx0, wx1, wx2, wx3)
                acc += wy3 * _row4(flat, b + 3 * nx, wx0, wx1, wx2, wx3)
            else:                                                        # clamp every tap's index
                c0, c1 = _clamp(ix - 1, nx), _clamp(ix, nx)
                c2, c3 = _clamp(ix + 1, nx), _clamp(ix + 2, nx)
                acc = np.float32(0.0)
                for a in range(4):
                    rb = _clamp(iy - 1 + a, ny) * nx
                    w = wy0 if a == 0 else (wy1 if a == 1 else (wy2 if a == 2 else wy3))
                    r = wx0 * flat[rb + c0]
                    r += wx1 * flat[rb + c1]
                    r += wx2 * flat[rb + c2]
                    r += wx3 * flat[rb + c3]
                    if a == 0:
                        acc = w * r
                    else:
                        acc += w * r
            out[i, x] = acc


@njit(nogil=True, cache=True, boundscheck=False)
def linear_rows(flat, nx, ny, out, sx, sy, r0):
    """Bilinear samples, as :func:`keys_rows`: ``((1 - tx) f00 + tx f01) (1 - ty) + ((1 - tx) f10 + tx f11) ty``."""
    rows = sx.shape[0]
    one = np.float32(1.0)
    for i in range(rows):
        y = np.float32(r0 + i)
        for x in range(nx):
            px = np.float32(x) - sx[i, x]
            py = y - sy[i, x]
            fx = np.floor(px)
            fy = np.floor(py)
            tx = px - fx
            ty = py - fy
            ux = one - tx
            uy = one - ty
            ix = np.intp(fx)
            iy = np.intp(fy)
            c0, c1 = _clamp(ix, nx), _clamp(ix + 1, nx)
            b0, b1 = _clamp(iy, ny) * nx, _clamp(iy + 1, ny) * nx
            r = ux * flat[b0 + c0]
            r += tx * flat[b0 + c1]
            acc = r * uy
            r = ux * flat[b1 + c0]
            r += tx * flat[b1 + c1]
            acc += r * ty
            out[i, x] = acc
