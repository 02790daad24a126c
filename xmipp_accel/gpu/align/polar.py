"""Fourier-space sampling shared by projection matching and DeepAlign.

Two samplers, one frequency convention:

* :class:`CentralSlicer` samples central slices of a map's 3-D Fourier
  transform at arbitrary 2-D frequencies (polar rings for the global search,
  the Cartesian half-plane for local refinement) by trilinear interpolation of
  a zero-padded, gridding-corrected transform. It replaces "project in real
  space, then Fourier transform, then resample" (three transforms per
  reference) by one gather per sample, which is what makes per-particle
  reference sets affordable during local refinement.
* :func:`oversampled_spectrum` + :func:`sample_rfft` sample the 2-D Fourier
  transform of particle images at the same frequencies (bilinear, on a
  zero-padded, gridding-corrected transform; Hermitian symmetry for ``kx < 0``).

Frequencies ``(kx, ky)`` are in cycles per box (the integer indices of the
DFT of the original ``N``-pixel box); the spectrum of an image is taken with
its centre (``N // 2``) at the origin, so that for a projection along ``A``
(:mod:`xmipp_accel.em.geometry`) ``P^(k) = V^(A^T (kx, ky, 0))`` (Fourier slice
theorem with the package's projection convention).
"""
from __future__ import annotations

import math
from typing import Tuple

import numpy as np

from ... import backend
from ...threads import fft_workers
from ..tuning.fft_advisor import good_fft_size

__all__ = ["fft_last", "centred_rfft2", "fourier_crop", "good_size", "polar_points", "polar_samples_hermitian",
           "halfplane_points",
           "shift_phases", "oversampled_spectrum", "sample_rfft", "CentralSlicer", "angular_spectrum"]

# ------------------------------------------------------------------------------------------------------------
# FFT helpers (scipy.fft on the CPU keeps single precision; cuFFT on the GPU)
# ------------------------------------------------------------------------------------------------------------

def _fft_module(xp):
    if xp is np:
        import scipy.fft as sfft
        return sfft, {"workers": fft_workers()}   # 1 inside the batch threads of map_in_order
    return xp.fft, {}


def fft_last(a, n: int | None = None):
    """Complex FFT along the last axis (complex64 kept for complex64 input)."""
    xp = backend.get_xp(a)
    mod, kw = _fft_module(xp)
    return mod.fft(a, n=n, axis=-1, **kw)


def centred_rfft2(images):
    """``rfft2`` of images ``(..., y, x)`` whose centre ``(N//2, N//2)`` is taken as the origin.

    Returns ``(..., y, x//2 + 1)`` complex (complex64 for float32 input).
    """
    xp = backend.get_xp(images)
    mod, kw = _fft_module(xp)
    return mod.rfft2(xp.fft.ifftshift(images, axes=(-2, -1)), axes=(-2, -1), **kw)


def good_size(n: float, *, real: bool = False) -> int:
    """An even transform length >= ``n`` that cuFFT runs fast, from the FFT size advisor.

    :func:`xmipp_accel.gpu.tuning.fft_advisor.good_fft_size` (cost model only: deterministic, the same
    on every machine, so results do not depend on the GPU), even, with up to 20 % padding.

    Parameters
    ----------
    n : float
        Smallest acceptable length (rounded up).
    real : bool
        The length is the halved axis of a real-to-complex transform.

    Returns
    -------
    int
    """
    m = max(2, int(math.ceil(n)))
    return int(good_fft_size(m, real=real, multiple_of=2))


def fourier_crop(data, box: int, *, ndim: int = 2):
    """Resample images ``(..., N, N)`` or a volume ``(N, N, N)`` to ``box`` pixels by Fourier cropping/padding.

    Parameters
    ----------
    data : float array; the last ``ndim`` axes are resampled (2: image stacks, 3: a volume).
    box : int
        New side in pixels; the centre ``N//2`` maps to ``box//2`` and the pixel size
        becomes ``pixel_size * N / box``. Values are scaled so that real-space
        intensities (not sums) are kept.
    ndim : 2 or 3.

    Returns
    -------
    float32 array with the last ``ndim`` axes of side ``box``.
    """
    xp = backend.get_xp(data)
    data = xp.asarray(data, dtype=xp.float32)
    if ndim not in (2, 3):
        raise ValueError(f"ndim must be 2 or 3, got {ndim}")
    return _fourier_resample(data, int(box), ndim)


def _fourier_resample(data, box: int, nd: int):
    xp = backend.get_xp(data)
    n = data.shape[-1]
    if box == n:
        return data.astype(xp.float32, copy=True)
    axes = tuple(range(-nd, 0))
    mod, kw = _fft_module(xp)
    spec = xp.fft.fftshift(mod.fftn(xp.fft.ifftshift(data, axes=axes), axes=axes, **kw), axes=axes)
    c_in, c_out = n // 2, box // 2
    m = min(n, box)
    lo = -(m // 2)
    sl_in = tuple(slice(c_in + lo, c_in + lo + m) for _ in axes)
    sl_out = tuple(slice(c_out + lo, c_out + lo + m) for _ in axes)
    out = xp.zeros(data.shape[:-nd] + (box,) * nd, dtype=spec.dtype)
    out[(Ellipsis,) + sl_out] = spec[(Ellipsis,) + sl_in]
    res = mod.ifftn(xp.fft.ifftshift(out, axes=axes), axes=axes, **kw)
    res = xp.fft.fftshift(res, axes=axes).real * (box / n) ** nd
    return res.astype(xp.float32)


# ------------------------------------------------------------------------------------------------------------
# Frequency sets and shift phases
# ------------------------------------------------------------------------------------------------------------

def polar_points(radii, n_theta: int) -> Tuple[np.ndarray, np.ndarray]:
    """Frequencies of a polar grid, ring by ring.

    Parameters
    ----------
    radii : array (n_r,) of radii in cycles per box.
    n_theta : angular samples over ``[0, 2 pi)``; sample ``a`` is at ``theta = 2 pi a / n_theta``
        measured from +kx towards +ky.

    Returns
    -------
    kx, ky : arrays (n_r * n_theta,) float64, ring-major (ring ``l`` occupies ``[l*n_theta, (l+1)*n_theta)``).
    """
    radii = np.asarray(radii, dtype=np.float64)
    theta = 2.0 * np.pi * np.arange(n_theta) / n_theta
    kx = (radii[:, None] * np.cos(theta)[None, :]).ravel()
    ky = (radii[:, None] * np.sin(theta)[None, :]).ravel()
    return kx, ky


def polar_samples_hermitian(sampler, radii, n_theta: int):
    """Polar samples of a real image's spectrum from one half circle (``F(-k) = conj F(k)``).

    Parameters
    ----------
    sampler : callable ``(kx, ky) -> (n, K)`` complex, evaluated on the half circle ``[0, pi)``.
    radii, n_theta : polar grid (``n_theta`` even), see :func:`polar_points`.

    Returns
    -------
    complex array (n, n_r, n_theta), equal to sampling the full circle but with half the work.
    """
    if n_theta % 2:
        raise ValueError(f"n_theta must be even, got {n_theta}")
    radii = np.asarray(radii, dtype=np.float64)
    theta = 2.0 * np.pi * np.arange(n_theta // 2) / n_theta
    kx = (radii[:, None] * np.cos(theta)[None, :]).ravel()
    ky = (radii[:, None] * np.sin(theta)[None, :]).ravel()
    half = sampler(kx, ky)
    half = half.reshape(half.shape[0], radii.size, n_theta // 2)
    xp = backend.get_xp(half)
    return xp.concatenate([half, xp.conj(half)], axis=-1)


def halfplane_points(r_min: float, r_max: float) -> Tuple[np.ndarray, np.ndarray]:
    """Integer frequencies of a half plane inside the annulus ``r_min <= |k| <= r_max``, sorted by radius.

    The half plane is ``kx > 0`` or (``kx == 0`` and ``ky > 0``): with Hermitian symmetry it stands for
    the whole annulus of a real image (inner products over the full plane are twice the real part of
    those over this half). Sorting by radius makes the set for a smaller ``r_max`` a prefix.

    Returns
    -------
    kx, ky : int64 arrays (K,), cycles per box.
    """
    r = int(math.ceil(r_max))
    ky, kx = np.meshgrid(np.arange(-r, r + 1), np.arange(0, r + 1), indexing="ij")
    kx, ky = kx.ravel(), ky.ravel()
    rad = np.hypot(kx, ky)
    keep = (rad >= r_min) & (rad <= r_max) & ((kx > 0) | ((kx == 0) & (ky > 0)))
    kx, ky, rad = kx[keep], ky[keep], rad[keep]
    order = np.lexsort((ky, kx, rad))
    return kx[order].astype(np.int64), ky[order].astype(np.int64)


def shift_phases(kx, ky, origins_px, box: int):
    """Phase factors that move image content by ``+origin`` pixels.

    Multiplying the centred spectrum of an image by ``exp(-2 pi i k . o / N)`` shifts its content by
    ``+o``; with the RELION origin of a particle this centres it.

    Parameters
    ----------
    kx, ky : arrays (K,) of frequencies (cycles per box), numpy or cupy.
    origins_px : array (..., 2) of (x, y) shifts in pixels.
    box : original box ``N`` in pixels.

    Returns
    -------
    complex64 array (..., K).
    """
    xp = backend.get_xp(kx, origins_px)
    o = xp.asarray(origins_px, dtype=xp.float32)
    ang = (-2.0 * np.pi / box) * (o[..., 0:1] * xp.asarray(kx, xp.float32) + o[..., 1:2] * xp.asarray(ky, xp.float32))
    return (xp.cos(ang) + 1j * xp.sin(ang)).astype(xp.complex64)


# ------------------------------------------------------------------------------------------------------------
# 2-D spectra of particle images
# ------------------------------------------------------------------------------------------------------------

def _sinc2_profile(n: int, padded: int, xp):
    """1 / sinc^2 gridding correction along one axis of an ``n``-pixel box later padded to ``padded``."""
    x = (xp.arange(n, dtype=xp.float64) - n // 2) / padded
    s = xp.sinc(x)
    return (1.0 / (s * s)).astype(xp.float32)


def oversampled_spectrum(images, *, box_work: int, pad: int = 2):
    """Centred spectrum of images on a grid ``pad`` times finer than the DFT, for interpolation.

    Images ``(n, N, N)`` are Fourier-cropped to ``box_work`` pixels (their frequencies up to
    ``box_work/2`` cycles per box are kept), divided by the bilinear gridding factor
    (``sinc^2`` per axis) and zero-padded to ``pad * box_work`` before the transform. Frequency
    ``k`` (cycles per original box) sits at index ``pad * k`` of the result.

    Returns
    -------
    complex64 array (n, P, P//2 + 1), ``P = pad * box_work``, unshifted rfft layout.
    """
    xp = backend.get_xp(images)
    img = fourier_crop(images, box_work) if images.shape[-1] != box_work else xp.asarray(images, xp.float32)
    p = pad * box_work
    prof = _sinc2_profile(box_work, p, xp)
    img = img * prof[None, :, None] * prof[None, None, :]
    out = xp.zeros(img.shape[:-2] + (p, p), dtype=xp.float32)
    o = p // 2 - box_work // 2
    out[..., o:o + box_work, o:o + box_work] = img
    return centred_rfft2(out).astype(xp.complex64)


def sample_rfft(spec, kx, ky, *, pad: int = 2):
    """Bilinear samples of rfft-layout spectra at frequencies ``(kx, ky)``.

    Parameters
    ----------
    spec : array (n, P, P//2 + 1), complex or real (e.g. a CTF), with frequency ``k`` at index ``pad*k``
        (see :func:`oversampled_spectrum`).
    kx, ky : arrays (K,) in cycles per box; ``|pad * k| <= P/2 - 2`` required.
    pad : oversampling of ``spec``.

    Returns
    -------
    array (n, K) of the dtype of ``spec``; values at ``kx < 0`` use Hermitian symmetry
    (``conj(F(-k))``, which for a real array such as a CTF is ``F(-k)``).
    """
    xp = backend.get_xp(spec)
    p = spec.shape[-2]
    qx = xp.asarray(kx, dtype=xp.float32) * pad
    qy = xp.asarray(ky, dtype=xp.float32) * pad
    flip = qx < 0
    qx = xp.where(flip, -qx, qx)
    qy = xp.where(flip, -qy, qy)
    x0 = xp.floor(qx)
    y0 = xp.floor(qy)
    fx = (qx - x0)[None, :]
    fy = (qy - y0)[None, :]
    x0 = x0.astype(xp.int64)
    y0 = y0.astype(xp.int64)
    ncol = spec.shape[-1]
    y0m = y0 % p
    y1m = (y0 + 1) % p
    flat = spec.reshape(spec.shape[0], -1)
    def take(yy, xx):
        return flat[:, yy * ncol + xx]
    v = ((1 - fy) * ((1 - fx) * take(y0m, x0) + fx * take(y0m, x0 + 1))
         + fy * ((1 - fx) * take(y1m, x0) + fx * take(y1m, x0 + 1)))
    if xp.iscomplexobj(spec):
        v = xp.where(flip[None, :], xp.conj(v), v)
    return v.astype(spec.dtype)


def angular_spectrum(polar, n_theta: int):
    """Angular Fourier coefficients ``m = 0 .. n_theta/2`` of polar samples.

    Parameters
    ----------
    polar : complex array (..., n_r, n_theta) of samples on rings (see :func:`polar_points`).

    Returns
    -------
    complex64 array (..., n_r, n_theta//2 + 1): ``sum_theta F(r, theta) exp(-i m theta)``. The
    negative ``m`` are not needed for spectra of real images (``F(-m) = (-1)^m conj F(m)``).
    """
    xp = backend.get_xp(polar)
    return fft_last(polar)[..., : n_theta // 2 + 1].astype(xp.complex64)


# ------------------------------------------------------------------------------------------------------------
# Central slices of a 3-D transform
# ------------------------------------------------------------------------------------------------------------

class CentralSlicer:
    """Samples of central slices of a map's Fourier transform at arbitrary in-plane frequencies.

    The map is Fourier-cropped to the smallest fast box holding ``r_max`` (plus margin), divided by
    the trilinear gridding factor, zero-padded ``pad`` times and transformed once; each sample is a
    trilinear interpolation of that transform at ``pad * A^T (kx, ky, 0)``.

    Parameters
    ----------
    volume : array (N, N, N), numpy or cupy (the result lives on the same device).
    r_max : largest frequency (cycles per box) that will be sampled.
    pad : oversampling of the transform (2 keeps trilinear errors around 1 %).

    Notes
    -----
    ``sample`` equals, up to interpolation error, the centred spectrum of
    ``FourierProjector(volume).project(A)`` at the same frequencies (tested).
    """

    def __init__(self, volume, *, r_max: float, pad: int = 2):
        xp = backend.get_xp(volume)
        vol = xp.asarray(volume, dtype=xp.float32)
        n = vol.shape[-1]
        if vol.ndim != 3 or vol.shape[0] != n or vol.shape[1] != n:
            raise ValueError(f"volume must be a cube (N, N, N), got shape {tuple(vol.shape)}")
        box = min(n if n % 2 == 0 else n + 1, good_size(2 * math.ceil(r_max) + 8))
        if box != n:
            vol = _fourier_resample(vol, box, 3)
        p = pad * box
        prof = _sinc2_profile(box, p, xp)
        vol = vol * prof[:, None, None] * prof[None, :, None] * prof[None, None, :]
        padded = xp.zeros((p, p, p), dtype=xp.float32)
        o = p // 2 - box // 2
        padded[o:o + box, o:o + box, o:o + box] = vol
        mod, kw = _fft_module(xp)
        ft = mod.fftn(xp.fft.ifftshift(padded), **kw)
        # the crop kept intensities: rescale so samples equal the transform of the original map's slices
        self.ft = (xp.fft.fftshift(ft) * ((n / box) ** 3)).astype(xp.complex64)
        self.xp = xp
        self.box = n
        self.pad = pad
        self.size = p
        self.r_max = float(r_max)
        if 2 * math.ceil(r_max) + 4 > box:
            raise ValueError(f"r_max {r_max} is beyond the Nyquist frequency of a {n}-pixel map")

    def sample(self, matrices, kx, ky, *, max_points: int = 1 << 24):
        """Central-slice samples.

        Parameters
        ----------
        matrices : array (n, 3, 3), rotation matrices (projection direction = third row).
        kx, ky : arrays (K,) (same points for every matrix) or (n, K), cycles per box.
        max_points : samples interpolated per pass (bounds temporary memory).

        Returns
        -------
        complex64 array (n, K) on the slicer's device.
        """
        xp = self.xp
        a = xp.asarray(matrices, dtype=xp.float32).reshape(-1, 3, 3)
        kx = xp.asarray(kx, dtype=xp.float32)
        ky = xp.asarray(ky, dtype=xp.float32)
        n = a.shape[0]
        k = kx.shape[-1]
        out = xp.empty((n, k), dtype=xp.complex64)
        step = max(1, max_points // max(k, 1))
        for s in range(0, n, step):
            e = min(n, s + step)
            bx = kx[s:e] if kx.ndim == 2 else kx[None, :]
            by = ky[s:e] if ky.ndim == 2 else ky[None, :]
            # 3-D frequency (x, y, z) = kx * A[0, :] + ky * A[1, :]
            q = [(bx * a[s:e, 0, c:c + 1] + by * a[s:e, 1, c:c + 1]) * self.pad + self.size // 2 for c in range(3)]
            out[s:e] = trilinear(self.ft, q[2], q[1], q[0])
        return out


def trilinear(grid, iz, iy, ix):
    """Trilinear interpolation of ``grid`` (Z, Y, X) at fractional indices (any equal shapes).

    Indices must lie in ``[0, size - 2]`` (no bounds checks: callers guarantee it).
    """
    xp = backend.get_xp(grid)
    nz, ny, nx = grid.shape
    z0 = xp.floor(iz)
    y0 = xp.floor(iy)
    x0 = xp.floor(ix)
    fz, fy, fx = iz - z0, iy - y0, ix - x0
    base = (z0.astype(xp.int64) * ny + y0.astype(xp.int64)) * nx + x0.astype(xp.int64)
    flat = grid.ravel()
    sy, sz = nx, nx * ny

    def lerp_x(b):
        return (1 - fx) * flat[b] + fx * flat[b + 1]

    c00 = lerp_x(base)
    c01 = lerp_x(base + sy)
    c10 = lerp_x(base + sz)
    c11 = lerp_x(base + sz + sy)
    c0 = (1 - fy) * c00 + fy * c01
    c1 = (1 - fy) * c10 + fy * c11
    return ((1 - fz) * c0 + fz * c1).astype(grid.dtype)
