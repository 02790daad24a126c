"""Symmetrisation of accumulated Fourier data and weights: ``out(k) = Σ_g in(g k)`` with trilinear
interpolation over the half volume (Hermitian mates read for points of negative x); the CUDA kernel
``symmetrize_half_volume`` (``insert.cu``) and its NumPy twin.
"""
from __future__ import annotations

import numpy as np

from ... import backend
from .insert import FourierGrid, _kernel

__all__ = ["symmetrize_fourier_volume", "symmetrize_fourier_volume_numpy", "symmetrize_fourier_volume_gpu"]


def _sphere_voxels(grid: FourierGrid):
    """Flat indices and frequency vectors ``(n, 3)`` (x, y, z) of the half-volume voxels that take part."""
    M, Mh, K = grid.padded_box, grid.half, grid.K
    f = np.fft.fftfreq(M, 1.0 / M).round().astype(np.int64)
    kz, ky, kx = np.meshgrid(f, f, np.arange(Mh), indexing="ij")
    inside = ((kx <= K) & (np.abs(ky) <= K) & (np.abs(kz) <= K) & (kx * kx + ky * ky + kz * kz <= grid.kmax2))
    flat = np.nonzero(inside.ravel())[0]
    k = np.stack([kx.ravel()[flat], ky.ravel()[flat], kz.ravel()[flat]], axis=1)
    return flat, k


def symmetrize_fourier_volume_numpy(data: np.ndarray, weight: np.ndarray, sym_matrices, grid: FourierGrid):
    """NumPy twin of ``symmetrize_half_volume``: ``out(k) = sum_g in(g k)`` for data and weight.

    Parameters
    ----------
    data : ndarray ``(M, M, M//2+1)`` complex; weight : same shape, real.
    sym_matrices : array ``(S, 3, 3)``: the symmetry group (identity included).
    grid : FourierGrid

    Returns
    -------
    (data, weight) : new arrays of the inputs' dtypes; trilinear interpolation, Hermitian
    mates read for points of negative x, zero outside the voxels that take part.
    """
    M, K = grid.padded_box, grid.K
    syms = np.asarray(sym_matrices, dtype=np.float64).reshape(-1, 3, 3)
    flat, k = _sphere_voxels(grid)
    # the voxels with every component within K, copied into a zero-padded grid [-o, o]² x [0, o] (z, y, x) so
    # that the taps need no bounds tests: rotated points have |p| <= kmax <= K + 1, taps reach K + 2
    o = K + 2
    side, sx = 2 * o + 1, o + 1
    f = np.fft.fftfreq(M, 1.0 / M).round().astype(np.int64)
    rows = np.nonzero(np.abs(f) <= K)[0]
    pad_d = np.zeros((side, side, sx), dtype=data.dtype)
    pad_w = np.zeros((side, side, sx), dtype=weight.dtype)
    sel = np.ix_(rows, rows, np.arange(K + 1))
    dst = np.ix_(f[rows] + o, f[rows] + o, np.arange(K + 1))
    pad_d[dst] = data[sel]
    pad_w[dst] = weight[sel]
    d_in = pad_d.ravel()
    w_in = pad_w.ravel()
    acc_d = np.zeros(flat.size, dtype=np.complex128)
    acc_w = np.zeros(flat.size, dtype=np.float64)
    kf = k.astype(np.float64)
    offsets = [dz * side * sx + dy * sx + dx for dz in (0, 1) for dy in (0, 1) for dx in (0, 1)]
    for g in syms:
        p = kf @ g.T
        neg = p[:, 0] < 0
        p[neg] *= -1.0
        p0 = np.floor(p)
        t = p - p0
        u = 1.0 - t
        base = (((p0[:, 2] + o) * side + (p0[:, 1] + o)) * sx + p0[:, 0]).astype(np.int64)
        zy = (u[:, 2] * u[:, 1], u[:, 2] * t[:, 1], t[:, 2] * u[:, 1], t[:, 2] * t[:, 1])
        sd = np.zeros(flat.size, dtype=np.complex128)
        for c, off in enumerate(offsets):   # corner c = (dz, dy, dx) bits
            j = base + off
            w = zy[c >> 1] * (t[:, 0] if c & 1 else u[:, 0])
            sd += w * d_in[j]
            acc_w += w * w_in[j]
        np.conjugate(sd, out=sd, where=neg)
        acc_d += sd
    out_d = np.zeros_like(data)
    out_w = np.zeros_like(weight)
    out_d.ravel()[flat] = acc_d
    out_w.ravel()[flat] = acc_w
    return out_d, out_w


def symmetrize_fourier_volume_gpu(data, weight, sym_matrices, grid: FourierGrid):
    """CUDA symmetrisation (``symmetrize_half_volume``); same result as the NumPy twin. New CuPy arrays."""
    cp = backend.cupy_module()
    syms = cp.asarray(np.asarray(backend.to_host(sym_matrices), dtype=np.float64).reshape(-1, 9),
                      dtype=cp.float32)
    out_d = cp.empty_like(data)
    out_w = cp.empty_like(weight)
    M, Mh = grid.padded_box, grid.half
    block = (8, 8, 4)
    kern = _kernel("symmetrize_half_volume")
    kern(((Mh + 7) // 8, (M + 7) // 8, (M + 3) // 4), block,
         (data, weight, out_d, out_w, syms, np.int32(syms.shape[0]), np.int32(grid.padded_box),
          np.int32(grid.half), np.int32(grid.K), np.int32(grid.kmax2)))
    return out_d, out_w


def symmetrize_fourier_volume(data, weight, sym_matrices, grid: FourierGrid):
    """Symmetrise accumulated data and weights: ``out(k) = sum_g in(g k)`` (trilinear), on their device."""
    if backend.get_xp(data) is np:
        return symmetrize_fourier_volume_numpy(data, weight, sym_matrices, grid)
    return symmetrize_fourier_volume_gpu(data, weight, sym_matrices, grid)
