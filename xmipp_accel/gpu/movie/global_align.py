"""Global (whole-frame) alignment: all-pairs cross-correlation at a coarse resolution, robust least squares.

FlexAlign (Střelák et al., Electronics 9(6):1040, 2020, doi:10.3390/electronics9061040), as Xmipp's
``xmipp_cuda_movie_alignment_correlation`` does it:

1. Each frame is Fourier-cropped to a pixel size ``R / (8 c)`` (``c = sqrt(-1 / (2 ln 0.5))``) and
   multiplied by a Gaussian low-pass whose value is 0.5 at the correlation resolution ``R`` (default 30 Å):
   :func:`correlation_shape`, :func:`lowpass_filter`. Before correlating, the coarse frames have their mean
   removed and their edges tapered (:func:`correlation_spectra`) so the frame border, fixed on the
   detector, does not pull the peaks towards zero.
2. Every pair ``i < j`` is correlated in Fourier space, in batches (:func:`correlate_pairs`); the integer
   maximum inside an ellipse of radius ``max_shift`` around zero is refined to a small fraction of a
   pixel by evaluating the band-limited correlation on finer grids with matrix-multiply DFTs
   (Guizar-Sicairos et al., Opt. Lett. 33:156, 2008, doi:10.1364/OL.33.000156), then a parabola.
3. The N-1 frame-to-frame shifts are the least-squares solution of one equation per pair (ones for the
   frames in ``[i, j)``); rows whose residual exceeds 3σ get weight 0 and the system is solved again,
   twice (:mod:`.shift_solver`: one batched solver, a single system is a batch of one).
4. The reference frame is the one whose largest shift to any other frame is smallest
   (:func:`reference_frame`); shifts are reported relative to it.

Shift sign (MotionCor2, RELION): frame n satisfies ``frame_n(x) = reference(x + s_n)``, so moving the
content of frame n by ``+s_n`` aligns it. The correlation ``ifft(F_i · conj(F_j))`` of frames i and j
peaks at ``s_j - s_i``. Shifts are ``(x, y)`` pairs in pixels.
"""
from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass
from typing import Sequence, Tuple

import numpy as np

from ... import backend
from ...em.projection import rfft_column_weights
from ...threads import cpu_workers, map_in_order
from ._fft import fast_size, irfft2, rfft2, rfft_freqs
from .shift_solver import reference_frame, solve_relative_shifts, solve_relative_shifts_batched  # noqa: F401

__all__ = ["GAUSS_C", "CPU_BATCH_BYTES", "correlation_pixel_size", "correlation_shape", "lowpass_filter", "refine_band",
           "edge_taper",
           "correlation_spectra", "frame_pairs", "BandSpectra", "correlate_pairs", "refine_peaks_dft",
           "solve_relative_shifts", "solve_relative_shifts_batched", "reference_frame", "GlobalAlignment",
           "estimate_global_shifts"]

logger = logging.getLogger(__name__)

#: Budget (bytes) of one batch of pairs on the CPU (:func:`correlate_pairs`): each temporary stays well below
#: the 32 MB above which glibc maps fresh pages (:data:`xmipp_accel.threads.MALLOC_KEEP`), so the batches reuse
#: the heap's pages. One batch of all 2079 patch pairs of a 1024² × 24 movie (3 × 3 patches) spent 150-320 ms of
#: system time faulting ~300 MB of temporaries in; batches of 16 MB: 0.13 instead of 0.26-0.5 CPU-s, equal
#: shifts (to 1e-13 px: the pairs are independent) and peak heights.
CPU_BATCH_BYTES = 16.0e6

#: c in FlexAlign's downscaling rule: the Gaussian low-pass exp(-k²/(2σ²)) with σ = c / R is 0.5 at 1/R
GAUSS_C = math.sqrt(-1.0 / (2.0 * math.log(0.5)))


def correlation_pixel_size(max_res_A: float) -> float:
    """Pixel size (Å) at which frames are correlated for a correlation resolution ``max_res_A`` (Å)."""
    return float(max_res_A) / (8.0 * GAUSS_C)


def correlation_shape(work_shape: Sequence[int], pixel_size_A: float, max_res_A: float) -> Tuple[int, int]:
    """Size (y, x) of the coarse frames used for correlation.

    Parameters
    ----------
    work_shape : (ny, nx)
        Frame size in pixels (after binning and FFT padding).
    pixel_size_A : float
        Pixel size of those frames in Å.
    max_res_A : float
        Correlation resolution R in Å (default 30).

    Returns
    -------
    (cy, cx) : even sizes that cuFFT transforms fast, never larger than ``work_shape``
        (for 4096 px at 1 Å/px and R = 30 Å: 926 rounded up to 960).
    """
    scale = pixel_size_A / correlation_pixel_size(max_res_A)
    out = []
    for i, n in enumerate(work_shape):
        n = int(n)
        if scale >= 1.0:
            out.append(n)
            continue
        m = fast_size(int(math.ceil(n * scale)), real=(i == 1))
        out.append(min(m, n))
    return int(out[0]), int(out[1])


def lowpass_filter(shape: Sequence[int], pixel_size_yx_A: Sequence[float], max_res_A: float, xp=np):
    """Gaussian low-pass on an rfft2 half spectrum, 0.5 at the frequency ``1/max_res_A``.

    Parameters
    ----------
    shape : (ny, nx)
        Real-space size of the spectrum's frames.
    pixel_size_yx_A : (float, float)
        Pixel size along y and x in Å (they differ slightly after padding and cropping).
    max_res_A : float
        Resolution R (Å) where the filter is 0.5.

    Returns
    -------
    float32 array, shape (ny, nx//2 + 1)
    """
    ky, kx = rfft_freqs(shape, xp=xp, dtype=np.float64)
    sigma = GAUSS_C / float(max_res_A)
    k2 = (ky / pixel_size_yx_A[0]) ** 2 + (kx / pixel_size_yx_A[1]) ** 2
    return xp.exp(-k2 / (2.0 * sigma * sigma)).astype(np.float32)


def refine_band(coarse_pixel_size_A: float, max_res_A: float) -> float:
    """Fraction of Nyquist beyond which the low-passed cross-power spectra are negligible.

    The product of two spectra carries the square of the Gaussian low-pass, ``exp(-k²/σ²)`` with
    ``σ = c / R``; at ``2.6 σ`` it is 0.1% of its peak. At FlexAlign's coarse pixel size ``R / (8c)``
    this is 65% of Nyquist.
    """
    sigma = GAUSS_C / float(max_res_A)
    return float(min(1.0, 2.6 * sigma * 2.0 * coarse_pixel_size_A))


def edge_taper(shape: Sequence[int], *, width_fraction: float = 0.05, margin_yx: Sequence[int] = (0, 0), xp=np):
    """Separable raised-cosine window (y, x) float32.

    0 over an outer margin of ``margin_yx`` pixels, rising over a band of ``width_fraction`` of the size
    (at least 2 pixels) to 1 inside.
    """
    def axis(n, margin):
        w = np.ones(n, dtype=np.float64)
        margin = int(min(max(margin, 0), n // 2 - 2))
        e = max(2, int(round(width_fraction * n)))
        e = min(e, n // 2 - margin)
        ramp = 0.5 - 0.5 * np.cos(np.pi * (np.arange(e) + 0.5) / e)
        w[:margin] = 0.0
        w[n - margin:] = 0.0
        w[margin:margin + e] = ramp
        w[n - margin - e:n - margin] = ramp[::-1]
        return w
    ny, nx = (int(s) for s in shape)
    my, mx = (int(v) for v in margin_yx)
    return xp.asarray(np.outer(axis(ny, my), axis(nx, mx)).astype(np.float32))


def correlation_spectra(frames, *, margin_yx: Sequence[int] = (0, 0)):
    """Spectra ready for correlation: weighted mean removed, edges tapered, rfft2.

    Parameters
    ----------
    frames : float32 array, shape (..., y, x)
        Coarse (already low-passed) frames or patches.
    margin_yx : (int, int)
        Border (pixels) left out entirely, e.g. where pre-aligned frames wrapped around.

    Returns
    -------
    complex64 array, shape (..., y, x//2 + 1)
    """
    xp = backend.get_xp(frames)
    taper = edge_taper(frames.shape[-2:], margin_yx=margin_yx, xp=xp)
    # last axis first (short reductions are fast on the GPU)
    weighted = (frames * taper).sum(axis=-1, dtype=np.float32).sum(axis=-1, dtype=np.float32)
    mean = (weighted / taper.sum(dtype=np.float32))[..., None, None]
    centred = frames - mean
    centred *= taper
    return rfft2(centred)


def frame_pairs(n_frames: int, *, min_gap: int = 1) -> Tuple[np.ndarray, np.ndarray]:
    """All pairs ``i < j`` with ``j - i >= min_gap`` (int64 arrays, frame indices from 0)."""
    i, j = np.triu_indices(int(n_frames), k=max(1, int(min_gap)))
    return i.astype(np.int64), j.astype(np.int64)


def _no_timer(name: str):
    return contextlib.nullcontext()


class BandSpectra:
    """rfft2 half spectra restricted to the frequencies below ``band`` × Nyquist.

    The correlation of two such spectra, ``c(x) = Re Σ_k w(k) F_a(k) conj(F_b(k)) exp(2πi k·x / n)``, is
    then evaluated directly on small grids of points by two matrix products (a matrix-multiply DFT):
    with the grid offsets shared by all pairs (:meth:`grid`), a whole batch is two large GEMMs.

    Attributes
    ----------
    data : complex64 array (M, Ky, Kx)
    ky, kx : float64 arrays (Ky,), (Kx,): signed row and non-negative column frequency indices.
    weights : float64 array (Kx,): Hermitian weights (1 for the zero and Nyquist columns, else 2).
    shape : (ny, nx): real-space size.
    """

    def __init__(self, spectra, shape: Sequence[int], band: float = 1.0):
        xp = backend.get_xp(spectra)
        ny, nx = (int(v) for v in shape)
        ky_all = np.fft.fftfreq(ny) * ny
        keep_y = np.flatnonzero(np.abs(ky_all) <= band * ny / 2.0)
        keep_x = int(min(nx // 2, math.ceil(band * nx / 2.0))) + 1
        if keep_y.size == ny:
            self.data = spectra[:, :, :keep_x]
        else:
            self.data = spectra[:, xp.asarray(keep_y), :keep_x]
        self.data = xp.ascontiguousarray(self.data, dtype=np.complex64)
        self.xp = xp
        self.shape = (ny, nx)
        self.ky = xp.asarray(ky_all[keep_y])
        self.kx = xp.asarray(np.arange(keep_x, dtype=np.float64))
        self.weights = rfft_column_weights(nx, xp=xp)[:keep_x]

    def phase_x(self, offsets, dtype=np.complex64):
        """(Kx, m) matrix ``w(kx) exp(2πi kx x / nx)`` for x in ``offsets`` (pixels)."""
        xp = self.xp
        offs = xp.asarray(offsets, dtype=np.float64)
        e = xp.exp((2j * np.pi / self.shape[1]) * self.kx[:, None] * offs[None, :]) * self.weights[:, None]
        return e.astype(dtype)

    def phase_y(self, offsets, dtype=np.complex64):
        """(m, Ky) matrix ``exp(2πi ky y / ny)`` for y in ``offsets`` (pixels)."""
        xp = self.xp
        offs = xp.asarray(offsets, dtype=np.float64)
        return xp.exp((2j * np.pi / self.shape[0]) * offs[:, None] * self.ky[None, :]).astype(dtype)

    def ramps(self, centres_xy, dtype=np.complex64):
        """(B, Kx) and (B, Ky) phase ramps that move cross-power spectra so that ``centres_xy`` (B, 2) become
        the origin (multiplied in along x and along y)."""
        xp = self.xp
        c = xp.asarray(centres_xy, dtype=np.float64)
        rx = xp.exp((2j * np.pi / self.shape[1]) * c[:, 0:1] * self.kx[None, :]).astype(dtype)   # (B, Kx)
        ry = xp.exp((2j * np.pi / self.shape[0]) * c[:, 1:2] * self.ky[None, :]).astype(dtype)   # (B, Ky)
        return rx, ry

    def grid(self, products, ey, ex):
        """Correlation values ``(B, my, mx)`` at the points of the phase matrices ``ey`` (my, Ky), ``ex`` (Kx, mx).

        Two GEMMs for the whole batch: ``(B·Ky, Kx) @ (Kx, mx)``, then ``(my, Ky) @ (Ky, B·mx)``.
        """
        b, ky, kx = products.shape
        t = self.xp.matmul(products.reshape(b * ky, kx), ex).reshape(b, ky, ex.shape[1])     # (B, Ky, mx)
        return self._along_y(t, ey)

    def _along_y(self, t, ey):
        """The second GEMM of :meth:`grid`: ``t`` (B, Ky, mx) against ``ey`` (my, Ky) -> (B, my, mx) real."""
        xp = self.xp
        b, ky, mx = t.shape
        t = xp.ascontiguousarray(t.transpose(1, 0, 2)).reshape(ky, b * mx)
        g = xp.matmul(ey, t).reshape(ey.shape[0], b, mx)
        return xp.ascontiguousarray(g.real.transpose(1, 0, 2))

    def grid_at(self, products, centres_xy, ey, ex, *, scratch=None):
        """:meth:`grid` of ``products`` moved so that ``centres_xy`` (B, 2) are the origin, i.e.
        ``grid`` of a copy of ``products`` multiplied by both :meth:`ramps`, without that copy.

        Only the x ramp is applied to the spectra (into ``scratch``, an array like ``products`` of the
        dtype of ``ex``, or a new one); the y ramp multiplies the (B, Ky, mx) result of the first GEMM,
        which is ``Kx / mx`` times smaller. Equal to the two-step form to rounding (the factors are the
        same, only the order of the multiplications differs).
        """
        xp = self.xp
        b, ky, kx = products.shape
        rx, ry = self.ramps(centres_xy, ex.dtype)
        if scratch is None:
            scratch = xp.empty(products.shape, dtype=ex.dtype)
        xp.multiply(products, rx[:, None, :], out=scratch)
        t = xp.matmul(scratch.reshape(b * ky, kx), ex).reshape(b, ky, ex.shape[1])     # (B, Ky, mx)
        t *= ry[:, :, None]
        return self._along_y(t, ey)


def refine_peaks_dft(band: BandSpectra, products, centres_xy, *,
                     stages: Sequence[Tuple[int, float, object]] = ((9, 0.25, np.complex64),
                                                                    (9, 0.03125, np.complex128))):
    """Sub-pixel maxima of correlations given by their cross-power spectra, near integer maxima.

    The correlation is band limited, so it can be evaluated at any point. Each stage moves every
    spectrum so that its current best point is the origin (a phase ramp) and evaluates the correlation on
    an ``m × m`` grid of spacing ``step`` around it with :meth:`BandSpectra.grid_at` (matrices shared by
    the whole batch); the grids whose maximum sits on their border are re-centred (3 times at most). A
    parabola through the final 3×3 neighbourhood gives the last digits. The last stage runs in double
    precision: single-precision sums over ~10^5 frequencies are not precise enough at 1/32 pixel.

    Parameters
    ----------
    band : BandSpectra
        Frequencies and weights of ``products``.
    products : complex64 array, shape (B, Ky, Kx)
        Cross-power spectra ``F_a · conj(F_b)`` on ``band``'s frequencies.
    centres_xy : float array, shape (B, 2)
        Starting points (x, y) in pixels (integer maxima), signed.
    stages : sequence of (m, step, dtype)
        Grid points per axis (odd), spacing in pixels and complex dtype of each refinement stage.

    Returns
    -------
    float64 array (B, 2): refined (x, y) maxima in pixels, within 1 pixel of ``centres_xy``.
    """
    xp = band.xp
    B = products.shape[0]
    start = xp.asarray(centres_xy, dtype=np.float64).reshape(B, 2)
    best = start.copy()
    rows = xp.arange(B)
    grid = last = None
    last_step = 1.0
    for m, step, dtype in stages:
        offs = (np.arange(m) - m // 2) * float(step)
        ex = band.phase_x(offs, dtype)
        ey = band.phase_y(offs, dtype)
        offs_d = xp.asarray(offs)
        # the spectra in this stage's precision once (not per re-centring), and one scratch for the x ramp
        spectra = products if products.dtype == dtype else products.astype(dtype)
        scratch = xp.empty(products.shape, dtype=dtype)
        # re-centre while the maximum sits on the grid's border (3 times at most), only the pairs whose
        # maximum does: a grid re-centred on an inner maximum has that maximum at its centre and the same
        # 3 × 3 neighbourhood for the parabola (the same points, equal values to rounding)
        active = None
        for it in range(3):
            if it == 0:
                g = band.grid_at(spectra, best, ey, ex, scratch=scratch)         # (B, m_y, m_x)
            else:
                g = band.grid_at(spectra[active], best[active], ey, ex, scratch=scratch[:active.size])
            flat = g.reshape(g.shape[0], -1).argmax(axis=1)
            giy, gix = flat // m, flat % m
            moved = best if it == 0 else best[active]
            moved = moved + xp.stack([offs_d[gix], offs_d[giy]], axis=1)
            if it == 0:
                grid, iy, ix = g, giy, gix
                best = xp.clip(moved, start - 1.0, start + 1.0)   # stay by the integer maximum (inside max-shift)
                active = rows
            else:
                grid[active], iy[active], ix[active] = g, giy, gix
                best[active] = xp.clip(moved, start[active] - 1.0, start[active] + 1.0)
            on_border = (giy == 0) | (giy == m - 1) | (gix == 0) | (gix == m - 1)
            if not bool(on_border.any()):
                break
            active = active[on_border]
        del spectra, scratch
        last_step = float(step)
        last = (iy, ix, m)
    iy, ix, m = last
    ox, oy = parabola_offsets(grid, rows, iy, ix, m)
    return xp.clip(best + xp.stack([ox * last_step, oy * last_step], axis=1), start - 1.0, start + 1.0)


def parabola_offsets(grid, rows, iy, ix, m: int):
    """Sub-grid offsets (grid steps, each in [-0.5, 0.5]) of the maxima at ``(iy, ix)`` of ``grid`` (B, m, m): a
    parabola through the 3x3 neighbourhood in x and in y; 0 where the maximum sits on the grid border or the
    curvature is not negative. Returns ``(ox, oy)``, shape (B,)."""
    xp = backend.get_xp(grid)
    inner = (iy > 0) & (iy < m - 1) & (ix > 0) & (ix < m - 1)
    iyc, ixc = xp.clip(iy, 1, m - 2), xp.clip(ix, 1, m - 2)
    c0 = grid[rows, iyc, ixc]
    dx = (grid[rows, iyc, ixc + 1] - grid[rows, iyc, ixc - 1]) / 2.0
    dxx = grid[rows, iyc, ixc + 1] - 2.0 * c0 + grid[rows, iyc, ixc - 1]
    dy = (grid[rows, iyc + 1, ixc] - grid[rows, iyc - 1, ixc]) / 2.0
    dyy = grid[rows, iyc + 1, ixc] - 2.0 * c0 + grid[rows, iyc - 1, ixc]
    ox = xp.where((dxx < 0) & inner, -dx / xp.where(dxx < 0, dxx, -1.0), 0.0)
    oy = xp.where((dyy < 0) & inner, -dy / xp.where(dyy < 0, dyy, -1.0), 0.0)
    return xp.clip(ox, -0.5, 0.5), xp.clip(oy, -0.5, 0.5)


def correlate_pairs(spectra, idx_a, idx_b, shape: Sequence[int], max_shift_px, *, band: float = 1.0,
                    batch_bytes: float = 1.0e9) -> Tuple[np.ndarray, np.ndarray]:
    """Relative shifts of pairs of images from the maxima of their cross-correlations.

    The correlation of each pair is never formed as a whole map: its values on the integer points inside
    the ``max_shift`` ellipse, then on finer grids around the best one (:func:`refine_peaks_dft`), are
    computed from the band-limited cross-power spectrum by matrix-multiply DFTs shared by the batch. The
    peak height is given in standard deviations of the whole map, which Parseval's theorem gives from
    the spectrum.

    Parameters
    ----------
    spectra : complex64 array, shape (M, ny, nx//2 + 1)
        rfft2 of the (low-passed, tapered) images.
    idx_a, idx_b : int arrays, shape (P,)
        Indices into ``spectra`` of the pairs.
    shape : (ny, nx)
        Real-space size of the images.
    max_shift_px : float or (float, float)
        Largest relative shift searched, in pixels of these images (along y, x); the integer maximum is
        searched inside this ellipse around zero.
    band : float
        Fraction of Nyquist kept (see :func:`refine_band`); beyond it the low-passed spectra are
        negligible, and a symmetric cut does not move the peaks.
    batch_bytes : float
        Memory budget of one batch of pairs (on the CPU at most :data:`CPU_BATCH_BYTES`).

    Returns
    -------
    shifts : float64 ndarray (P, 2)
        ``(x, y)`` of the correlation maximum of ``ifft(F_a · conj(F_b))``: ``s_b - s_a`` in the
        MotionCor2 sign (host array).
    peak_z : float64 ndarray (P,)
        Height of the maximum above the map's mean in units of the map's standard deviation.
    """
    xp = backend.get_xp(spectra)
    ny, nx = (int(s) for s in shape)
    ry, rx = (max_shift_px, max_shift_px) if np.isscalar(max_shift_px) else max_shift_px
    ry = float(min(max(ry, 1.0), ny // 2 - 1))
    rx = float(min(max(rx, 1.0), nx // 2 - 1))
    iry, irx = int(math.floor(ry)), int(math.floor(rx))
    oy = np.arange(-iry, iry + 1, dtype=np.float64)
    ox = np.arange(-irx, irx + 1, dtype=np.float64)
    outside = xp.asarray(((oy[:, None] / ry) ** 2 + (ox[None, :] / rx) ** 2) > 1.0)
    bs = BandSpectra(spectra, (ny, nx), band)
    ey, ex = bs.phase_y(oy), bs.phase_x(ox)
    oy_d, ox_d = xp.asarray(oy), xp.asarray(ox)
    w2 = bs.weights.astype(np.float32)
    idx_a = np.asarray(idx_a, dtype=np.int64)
    idx_b = np.asarray(idx_b, dtype=np.int64)
    P = idx_a.size
    _, ky, kx = bs.data.shape
    per_pair = ky * kx * (8 * 3 + 16 * 2)
    if xp is np:
        batch_bytes = min(batch_bytes, CPU_BATCH_BYTES)
    batch = int(max(1, min(P, batch_bytes // per_pair)))

    def one_batch(s: int):
        a = xp.asarray(idx_a[s:s + batch])
        b = xp.asarray(idx_b[s:s + batch])
        prod = bs.data[a] * xp.conj(bs.data[b])
        B = prod.shape[0]
        win = bs.grid(prod, ey, ex)                                   # (B, my, mx): N × the correlation
        win = xp.where(outside[None], -xp.inf, win)
        k = win.reshape(B, -1).argmax(axis=1)
        peak = win.reshape(B, -1)[xp.arange(B), k]
        # Parseval: the map r = N·ifft(P) has mean P(0) and mean square Σ_k |P(k)|² (full plane)
        dc = prod[:, 0, 0].real.astype(np.float64)
        power = (xp.abs(prod) ** 2 * w2[None, None, :]).sum(axis=2, dtype=np.float64).sum(axis=1)
        std = xp.sqrt(xp.maximum(power - dc * dc, 1e-30))
        start = xp.stack([ox_d[k % ox.size], oy_d[k // ox.size]], axis=1)
        return refine_peaks_dft(bs, prod, start), (peak - dc) / std

    starts = range(0, P, batch)
    if xp is np:
        # the batches on the cores, each with single-threaded BLAS (the same products: the pairs are independent)
        done = list(map_in_order(one_batch, starts, min(cpu_workers(), len(starts))))
    else:
        done = [one_batch(s) for s in starts]
    shifts = [d for d, _ in done]
    zs = [z for _, z in done]
    return backend.to_host(xp.concatenate(shifts)), backend.to_host(xp.concatenate(zs))


@dataclass
class GlobalAlignment:
    """Result of the global alignment.

    Attributes
    ----------
    shifts_px : float64 ndarray (N, 2)
        Per-frame (x, y) shifts in pixels of the frames given to :func:`estimate_global_shifts` (full
        resolution, after binning), MotionCor2 sign, zero at the reference frame.
    reference_frame : int
        Index (from 0) of the reference frame.
    pair_a, pair_b : int64 ndarray (P,)
        The correlated pairs.
    pair_shifts_px : float64 ndarray (P, 2)
        Measured relative shifts ``s_b - s_a`` in the same pixels.
    inliers : bool ndarray (P,)
        Pairs kept by the robust least squares.
    peak_z : float64 ndarray (P,)
        Correlation peak heights in standard deviations of the map.
    residual_rms_px : float
        RMS residual of the kept pairs, in pixels.
    """
    shifts_px: np.ndarray
    reference_frame: int
    pair_a: np.ndarray
    pair_b: np.ndarray
    pair_shifts_px: np.ndarray
    inliers: np.ndarray
    peak_z: np.ndarray
    residual_rms_px: float


def estimate_global_shifts(coarse_spectra, coarse_shape: Sequence[int], *, scale_yx: Sequence[float],
                           max_shift_px: float, refine: bool = True, band: float = 1.0, batch_bytes: float = 1.0e9,
                           n_passes: int = 2, n_sigma: float = 3.0, timer=None) -> GlobalAlignment:
    """Global per-frame shifts from the low-passed coarse spectra of the frames.

    A first pass correlates the tapered coarse frames. Because the frames are cut-outs of a moving
    specimen, content entering and leaving the field biases large shifts towards zero by ~0.5% of the
    shift (0.1 px for 20 px on a 512 px frame). With ``refine`` a second pass moves every coarse frame
    by its first estimate (Fourier shift), masks a border wider than the largest shift (where content
    wrapped around) and measures the small residuals the same way; the sum of both passes is returned.

    Parameters
    ----------
    coarse_spectra : complex64 array (N, cy, cx//2 + 1)
        rfft2 of the low-passed coarse frames (no taper).
    coarse_shape : (cy, cx)
    scale_yx : (float, float)
        Coarse pixels per full-resolution pixel along y and x (``cy / ny``, ``cx / nx``).
    max_shift_px : float
        Largest shift between any two frames, in full-resolution pixels.
    refine : bool
        Run the second (pre-aligned) pass.
    band : float
        Fraction of Nyquist used for the sub-pixel refinement (:func:`refine_band`).
    timer : callable ``name -> context manager``, optional
        Records the sub-steps (``global.correlate``, ``global.solve``, ``global.refine``).

    Returns
    -------
    GlobalAlignment (host arrays; shifts in full-resolution pixels).
    """
    from .apply import shift_spectra  # local import: apply imports this module's helpers
    n = int(coarse_spectra.shape[0])
    sy, sx = (float(v) for v in scale_yx)
    to_full = np.array([sx, sy])
    a, b = frame_pairs(n)
    timer = timer or _no_timer
    with timer("global.correlate"):
        coarse = irfft2(coarse_spectra, coarse_shape)
        d, z = correlate_pairs(correlation_spectra(coarse), a, b, coarse_shape,
                               (max_shift_px * sy, max_shift_px * sx), band=band, batch_bytes=batch_bytes)
        del coarse
    with timer("global.solve"):
        d_full = d / to_full
        shifts, inl = solve_relative_shifts(a, b, d_full, n, n_passes=n_passes, n_sigma=n_sigma)
    if refine:
        with timer("global.refine"):
            centred = shifts - shifts.mean(axis=0)
            coarse_px = centred * to_full
            margin = np.ceil(np.abs(coarse_px).max(axis=0)).astype(int) + 1      # (x, y)
            aligned = irfft2(shift_spectra(coarse_spectra, coarse_px, coarse_shape), coarse_shape)
            spectra = correlation_spectra(aligned, margin_yx=(margin[1], margin[0]))
            del aligned
            r, z = correlate_pairs(spectra, a, b, coarse_shape, (max(4.0, 0.1 * max_shift_px * sy),
                                                                  max(4.0, 0.1 * max_shift_px * sx)),
                                   band=band, batch_bytes=batch_bytes)
            del spectra
            r_full = r / to_full
            resid, inl = solve_relative_shifts(a, b, r_full, n, n_passes=n_passes, n_sigma=n_sigma)
            shifts = centred + resid
            d_full = r_full + (centred[b] - centred[a])
    ref = reference_frame(shifts)
    shifts = shifts - shifts[ref]
    res = d_full - (shifts[b] - shifts[a])
    rms = float(np.sqrt((res[inl] ** 2).sum(axis=1).mean())) if inl.any() else float("nan")
    return GlobalAlignment(shifts_px=shifts, reference_frame=ref, pair_a=a, pair_b=b, pair_shifts_px=d_full,
                           inliers=inl, peak_z=z, residual_rms_px=rms)
