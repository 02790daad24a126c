"""Synthetic movies with known global drift, doming-like local motion and Poisson noise.

The accuracy recipe of ``algorithms.md`` §1 (no paper reports an RMS shift error; we do):

* reference "ice": Gaussian noise low-passed (Gaussian, σ = ``ice_sigma_px``) and rescaled to [0, 2],
  plus a grid of lines (step 50 px, thickness 5 px, signal 0.15) rendered by exact pixel-area
  integration, so a sub-pixel shift moves the pattern continuously;
* global drift with ``t = N - 1 - n`` (largest motion early):
  ``x(t) = a1 t + a2 t² + cos(t/10)/10``, ``y(t) = b1 t + b2 t² + sin(t²)/5`` with
  ``a1 = -0.6, a2 = 0.005, b1 = 0.4, b2 = -0.004`` times ``drift_scale`` (~20-27 px over 40 frames);
* doming: a radial term ``1 + k1 ρ² + k2 ρ⁴`` about the frame centre (ρ = distance / half the larger
  side) whose coefficients decay over the movie;
* Poisson noise at ``dose_per_pixel`` electrons per pixel per frame.

Sign convention (MotionCor2, RELION): ``frame_n(p) = REF(p + g_n + l_n(p))`` where ``g_n`` is the
global shift and ``l_n(p)`` the local (doming) displacement, both ``(x, y)`` in pixels; moving the
content of frame n by ``+g_n`` aligns it (globally) to the reference.

Frames are rendered by sampling the reference at moved points: the smooth ice with Keys cubic
convolution on a padded grid, the lines analytically. Works with NumPy or CuPy (``xp``), so the GPU
benchmark can make 4096² × 40 movies in a second.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import numpy as np
from .interpolation import keys_weights, sample_keys

__all__ = ["global_drift", "doming_displacement", "make_movie", "frc"]

LINE_STEP_PX = 50.0
LINE_WIDTH_PX = 5.0
LINE_SIGNAL = 0.15


def global_drift(n_frames: int, *, drift_scale: float = 1.0) -> np.ndarray:
    """Per-frame global shifts ``g_n`` (x, y) in pixels, MotionCor2 sign, ``g`` of the last frame 0.

    Returns
    -------
    float64 array (n_frames, 2)
    """
    n = np.arange(n_frames, dtype=np.float64)
    t = (n_frames - 1) - n
    a1, a2, b1, b2 = -0.6 * drift_scale, 0.005 * drift_scale, 0.4 * drift_scale, -0.004 * drift_scale
    x = a1 * t + a2 * t ** 2 + np.cos(t / 10.0) / 10.0
    y = b1 * t + b2 * t ** 2 + np.sin(t ** 2) / 5.0
    return np.stack([x - x[-1], y - y[-1]], axis=1)


def _doming_coefficients(n_frames: int, amplitude_px: float, shape: Sequence[int]) -> np.ndarray:
    """(n_frames, 2) coefficients (k1, k2) such that the corner displacement of frame 0 is ~amplitude."""
    t = ((n_frames - 1) - np.arange(n_frames, dtype=np.float64)) / max(n_frames - 1, 1)
    half = max(shape) / 2.0
    # corner: ρ = sqrt(2) at distance half*sqrt(2): displacement = half*sqrt(2) * (2 k1 + 4 k2)
    k_total = amplitude_px / (half * np.sqrt(2.0) * 6.0)
    k1 = k_total * (t ** 1.5)
    k2 = k_total * (t ** 2) * 1.0
    return np.stack([k1, k2], axis=1)


def doming_displacement(x, y, n, *, coefficients: np.ndarray, shape: Sequence[int], xp=np):
    """Local displacement ``l_n(p)`` (x, y) of points p = (x, y) in frame n (pixels, MotionCor2 sign).

    ``l = (p - c) (k1 ρ² + k2 ρ⁴)`` with c the frame centre (W/2, H/2) and ρ = |p - c| / (max(H, W)/2).
    ``x, y, n`` broadcast; returns an array of shape ``broadcast + (2,)``.
    """
    ny, nx = shape
    cx, cy = nx / 2.0, ny / 2.0
    half = max(ny, nx) / 2.0
    coeffs = xp.asarray(coefficients)
    n = xp.asarray(n, dtype=np.int64)
    k1 = coeffs[n, 0]
    k2 = coeffs[n, 1]
    dx = xp.asarray(x, dtype=np.float64) - cx
    dy = xp.asarray(y, dtype=np.float64) - cy
    r2 = (dx * dx + dy * dy) / (half * half)
    f = k1 * r2 + k2 * r2 * r2
    return xp.stack(xp.broadcast_arrays(dx * f, dy * f), axis=-1)


def _line_coverage(u, xp):
    """Fraction of the pixel [u - 1/2, u + 1/2] covered by lines [50 m, 50 m + 5) (exact)."""
    def cumulative(v):
        q = xp.floor(v / LINE_STEP_PX)
        return q * LINE_WIDTH_PX + xp.minimum(v - q * LINE_STEP_PX, LINE_WIDTH_PX)
    return cumulative(u + 0.5) - cumulative(u - 0.5)


def _make_ice(shape: Tuple[int, int], sigma_px: float, rng: np.random.Generator, xp):
    """Low-passed Gaussian noise rescaled to [0, 2] (float32, shape)."""
    noise = xp.asarray(rng.standard_normal(shape).astype(np.float32))
    ky = xp.asarray(np.fft.fftfreq(shape[0]).astype(np.float32))[:, None]
    kx = xp.asarray(np.fft.rfftfreq(shape[1]).astype(np.float32))[None, :]
    filt = xp.exp(-2.0 * (np.pi * sigma_px) ** 2 * (ky ** 2 + kx ** 2))
    ice = xp.fft.irfft2(xp.fft.rfft2(noise) * filt, s=shape).astype(np.float32)
    lo, hi = float(ice.min()), float(ice.max())
    return ((ice - lo) * (2.0 / (hi - lo))).astype(np.float32)


def make_movie(shape: Sequence[int] = (512, 512), n_frames: int = 16, *, dose_per_pixel: float = 1.0,
               drift_scale: float = 1.0, doming_px: float = 2.0, ice_sigma_px: float = 4.0,
               noise: bool = True, seed: int = 0, xp=np) -> Tuple[object, Dict]:
    """Render a movie with known motion.

    Parameters
    ----------
    shape : (ny, nx)
        Frame size in pixels.
    n_frames : int
    dose_per_pixel : float
        Mean electrons per pixel per frame (Poisson noise; the reference has mean ~1).
    drift_scale : float
        Multiplies the recipe's drift coefficients (1: ~20-27 px over 40 frames).
    doming_px : float
        Local displacement of the frame corners in the first frame (0 disables doming).
    ice_sigma_px : float
        Gaussian low-pass σ (pixels) of the ice.
    noise : bool
        False gives the expected counts (no Poisson noise).
    seed : int
    xp : numpy or cupy

    Returns
    -------
    frames : float32 array (n_frames, ny, nx)
        Electron counts (integers stored as float32 when ``noise``).
    truth : dict
        ``global_shifts_px`` (n, 2) float64, MotionCor2 sign, last frame 0;
        ``local_shift(x, y, n)`` -> (..., 2) doming displacement (pixels);
        ``total_shift(x, y, n)`` -> global + local;
        ``expected_frame(n)`` -> noise-free expected counts of frame n (xp array);
        ``motion_free_sum`` (ny, nx) expected counts of the sum without motion (xp array);
        ``reference`` REF on the frame grid; ``dose_per_pixel``, ``doming_coefficients``.
    """
    ny, nx = (int(s) for s in shape)
    rng = np.random.default_rng(seed)
    g = global_drift(n_frames, drift_scale=drift_scale)
    coeffs = _doming_coefficients(n_frames, doming_px, (ny, nx))
    corner = float(np.hypot(nx, ny) / 2.0) * 6.0 * coeffs[0].max() if doming_px else 0.0
    margin = int(np.ceil(np.abs(g).max() + corner + 8))
    ice = _make_ice((ny + 2 * margin, nx + 2 * margin), ice_sigma_px, rng, xp)
    gy, gx = xp.meshgrid(xp.arange(ny, dtype=np.float64), xp.arange(nx, dtype=np.float64), indexing="ij")

    def reference_at(px, py):
        lines = 1.0 - (1.0 - _line_coverage(px, xp)) * (1.0 - _line_coverage(py, xp))
        return sample_keys(ice, py + margin, px + margin, xp) + np.float32(LINE_SIGNAL) * lines.astype(np.float32)

    def local_shift(x, y, n):
        if not doming_px:
            return xp.zeros(np.broadcast_shapes(np.shape(x), np.shape(y), np.shape(n)) + (2,))
        return doming_displacement(x, y, n, coefficients=coeffs, shape=(ny, nx), xp=xp)

    def shifted_reference(d):
        """REF(p + d) for a constant shift d = (dx, dy): separable, exact for the lines."""
        ys = xp.arange(ny, dtype=np.float64) + d[1]
        xs = xp.arange(nx, dtype=np.float64) + d[0]
        fy, fx = np.floor(d[1]), np.floor(d[0])
        wy = keys_weights(np.float32(d[1] - fy), np)
        wx = keys_weights(np.float32(d[0] - fx), np)
        y0, x0 = int(fy) + margin, int(fx) + margin
        rows = sum(np.float32(wy[a]) * ice[y0 + a - 1:y0 + a - 1 + ny, :] for a in range(4))
        smooth = sum(np.float32(wx[b]) * rows[:, x0 + b - 1:x0 + b - 1 + nx] for b in range(4))
        cy_ = _line_coverage(ys, xp)[:, None]
        cx_ = _line_coverage(xs, xp)[None, :]
        lines = 1.0 - (1.0 - cx_) * (1.0 - cy_)
        return smooth + np.float32(LINE_SIGNAL) * lines.astype(np.float32)

    def expected_frame(n):
        if not doming_px:
            return xp.maximum(shifted_reference(g[n]), 0) * np.float32(dose_per_pixel)
        d = xp.asarray(g[n])
        px, py = gx + d[0], gy + d[1]
        loc = doming_displacement(gx, gy, n, coefficients=coeffs, shape=(ny, nx), xp=xp)
        px = px + loc[..., 0]
        py = py + loc[..., 1]
        return xp.maximum(reference_at(px, py), 0) * np.float32(dose_per_pixel)

    frames = xp.empty((n_frames, ny, nx), dtype=np.float32)
    for n in range(n_frames):
        lam = expected_frame(n)
        if noise:
            if xp is np:
                frames[n] = rng.poisson(lam).astype(np.float32)
            else:
                frames[n] = xp.random.poisson(lam.astype(np.float64)).astype(np.float32)
        else:
            frames[n] = lam
    ref = shifted_reference((0.0, 0.0))
    truth = {
        "global_shifts_px": g,
        "local_shift": local_shift,
        "total_shift": lambda x, y, n: xp.asarray(g)[xp.asarray(n)] + local_shift(x, y, n),
        "expected_frame": expected_frame,
        "motion_free_sum": ref * np.float32(dose_per_pixel * n_frames),
        "reference": ref,
        "dose_per_pixel": float(dose_per_pixel),
        "doming_coefficients": coeffs,
    }
    return frames, truth


def frc(image1, image2, *, n_shells: Optional[int] = None) -> np.ndarray:
    """Fourier ring correlation of two square-ish images, one value per ring of width 1/N.

    Returns
    -------
    float64 ndarray (n_shells,): FRC of rings 0..n_shells-1 (ring k spans radius [k, k+1) in
    frequency-index units of the smaller side; ring N/2 is Nyquist).
    """
    a = np.asarray(image1, dtype=np.float64)
    b = np.asarray(image2, dtype=np.float64)
    fa = np.fft.rfft2(a - a.mean())
    fb = np.fft.rfft2(b - b.mean())
    ny, nx = a.shape
    ky = np.fft.fftfreq(ny)[:, None]
    kx = np.fft.rfftfreq(nx)[None, :]
    r = np.sqrt(ky ** 2 + kx ** 2) * min(ny, nx)
    ring = np.floor(r).astype(np.int64)
    n_shells = n_shells or min(ny, nx) // 2
    num = np.bincount(ring.ravel(), (fa * np.conj(fb)).real.ravel(), minlength=n_shells)[:n_shells]
    da = np.bincount(ring.ravel(), (np.abs(fa) ** 2).ravel(), minlength=n_shells)[:n_shells]
    db = np.bincount(ring.ravel(), (np.abs(fb) ** 2).ravel(), minlength=n_shells)[:n_shells]
    with np.errstate(invalid="ignore", divide="ignore"):
        return num / np.sqrt(da * db)
