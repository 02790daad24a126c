"""High-resolution polish of the global shifts: each frame against the sum of the others, Newton steps.

The all-pairs global alignment (:mod:`.global_align`) correlates coarse frames low-passed to
``max_res_A`` (30 Å by default), which finds large shifts robustly but leaves ~0.05-0.1 px of error
that only high frequencies can resolve. Correlating all pairs at high resolution would cost N²/2
full-size correlations; this polish instead moves every frame onto the sum of all the *other* frames
(leave one out, so a frame's own noise does not pull it to its current place), as RELION's motion
correction iterates (Zivanov et al., IUCrJ 6, 2019, §2.2), with the cross-power spectrum weighted by
``exp(-B k² / 4)`` (B in Å², k in 1/Å; RELION's default is 150 px²).

The peak is not searched on a map: starting from the global shifts, the correlation
``c(δ) = Re Σ_k W(k) A_n(k) conj(R_n(k)) exp(-2πi k·δ)`` is climbed by Newton steps computed from its
analytic gradient and Hessian at δ = 0 (five weighted sums over the spectrum per frame), which costs
two spectrum-sized products per iteration for all frames together. Steps are limited to
``max_step_px``; a frame whose Hessian is not negative definite keeps its shift.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np

from ... import backend
from ._fft import fourier_crop_rfft, irfft2, rfft2
from .apply import shift_spectra
from .global_align import edge_taper

__all__ = ["DEFAULT_POLISH_BFACTOR_A2", "polish_global_shifts"]

#: B-factor (Å²) of the polish weight, exp(-B k²/4): 0.5 at 13 Å. On synthetic movies (1 Å/px, 1 e/px per
#: frame) 300-600 Å² give the same accuracy (0.04 px RMS at 1024² × 24) and a larger B crops the spectrum more
DEFAULT_POLISH_BFACTOR_A2 = 450.0
#: weight below which frequencies are cropped away before the polish
_WEIGHT_FLOOR = 1e-2


def _even_ceil(v: float) -> int:
    return max(2, 2 * int(math.ceil(v / 2.0)))


def polish_global_shifts(spectra, shape: Sequence[int], shifts_px, *, pixel_size_A: float,
                         bfactor_A2: float = DEFAULT_POLISH_BFACTOR_A2, iterations: int = 3,
                         max_step_px: float = 1.0, mask_border: bool = True,
                         content_shape: Optional[Sequence[int]] = None) -> np.ndarray:
    """Refine global shifts at high resolution (see the module docstring).

    Parameters
    ----------
    spectra : complex64 array (N, ny, nx//2 + 1), NumPy or CuPy
        rfft2 of the frames (not shifted); not modified.
    shape : (ny, nx)
        Real-space frame size (pixels).
    shifts_px : float array (N, 2)
        Starting (x, y) shifts in pixels of these frames, MotionCor2 sign.
    pixel_size_A : float
        Pixel size of these frames (Å).
    bfactor_A2 : float
        B-factor of the weight ``exp(-B k²/4)`` (Å²); larger = lower resolution.
    iterations : int
        Newton iterations (the reference sum is rebuilt after each).
    max_step_px : float
        Largest change of a shift per iteration (pixels).
    mask_border : bool
        Taper the moved frames to zero over a border wider than the largest shift (in the aligned frame,
        so the same pixels for every frame): the frame edges and the content that wrapped around do not
        correlate, which would pull the shifts towards the frames' own positions.
    content_shape : (cy, cx), optional
        Size of the real content at the top left of frames padded at the bottom/right (the padding is
        masked too); default the whole frame.

    Returns
    -------
    float64 ndarray (N, 2): refined shifts, same pixels and sign (not re-referenced).
    """
    xp = backend.get_xp(spectra)
    ny, nx = (int(v) for v in shape)
    s = np.asarray(backend.to_host(shifts_px), dtype=np.float64).reshape(-1, 2).copy()
    n = s.shape[0]
    if n < 3 or iterations < 1:
        return s
    b_px2 = float(bfactor_A2) / float(pixel_size_A) ** 2
    k_max = min(0.5, math.sqrt(4.0 * math.log(1.0 / _WEIGHT_FLOOR) / max(b_px2, 1e-6)))   # cycles/px
    oy, ox = min(ny, _even_ceil(2.0 * k_max * ny)), min(nx, _even_ceil(2.0 * k_max * nx))
    crop = spectra if (oy, ox) == (ny, nx) else fourier_crop_rfft(spectra, (ny, nx), (oy, ox))
    # frequencies of the cropped half spectrum in cycles per pixel of the frames
    ky = np.fft.fftfreq(oy) * (oy / ny)
    kx = np.fft.rfftfreq(ox) * (ox / nx)
    kyy, kxx = np.meshgrid(ky, kx, indexing="ij")
    weight = np.exp(-b_px2 * (kxx ** 2 + kyy ** 2) / 4.0)
    weight[:, 1:(ox + 1) // 2] *= 2.0             # columns standing for two (Hermitian) frequencies
    weight[0, 0] = 0.0                            # the mean carries no shift
    w = xp.asarray(weight.astype(np.float32))
    basis_im = xp.asarray(np.stack([kxx.ravel(), kyy.ravel()], axis=1).astype(np.float32))        # (M, 2)
    basis_re = xp.asarray(np.stack([kxx.ravel() ** 2, kyy.ravel() ** 2, (kxx * kyy).ravel()],
                                   axis=1).astype(np.float32))                                        # (M, 3)
    scale = np.array([ox / nx, oy / ny])          # frame pixels -> cropped pixels
    two_pi = 2.0 * math.pi
    cy, cx = (ny, nx) if content_shape is None else (int(v) for v in content_shape)
    pad_xy = np.array([nx - cx, ny - cy], dtype=np.float64)
    for _ in range(int(iterations)):
        aligned = shift_spectra(crop, s * scale, (oy, ox))
        if mask_border:
            c = (s - s.mean(axis=0)) * scale
            margin = np.ceil(np.abs(c).max(axis=0) + pad_xy * scale).astype(int) + 2        # (x, y)
            taper = edge_taper((oy, ox), margin_yx=(int(margin[1]), int(margin[0])), xp=xp)
            # the moved spectra are this loop's own: the inverse transform may use them as scratch
            moved = irfft2(aligned, (oy, ox), overwrite=True).astype(np.float32, copy=False)
            moved *= taper
            aligned = rfft2(moved)
            del moved
        ref = aligned.sum(axis=0)
        prod = ref[None] - aligned                 # A_n · conj(R - A_n), in one array
        xp.conjugate(prod, out=prod)
        prod *= aligned
        prod *= w
        flat = prod.reshape(n, -1)
        g = two_pi * backend.to_host(xp.ascontiguousarray(flat.imag) @ basis_im).astype(np.float64)   # (N, 2)
        h = -(two_pi ** 2) * backend.to_host(xp.ascontiguousarray(flat.real) @ basis_re).astype(np.float64)
        del aligned, ref, prod, flat
        hxx, hyy, hxy = h[:, 0], h[:, 1], h[:, 2]
        det = hxx * hyy - hxy * hxy
        ok = (hxx < 0) & (det > 0)                  # a maximum: negative definite Hessian
        safe = np.where(ok, det, 1.0)
        dx = -(hyy * g[:, 0] - hxy * g[:, 1]) / safe
        dy = -(-hxy * g[:, 0] + hxx * g[:, 1]) / safe
        step = np.stack([dx, dy], axis=1)
        step[~ok] = 0.0
        step = np.clip(step, -max_step_px, max_step_px)
        s += step
        if np.abs(step).max() < 1e-3:
            break
    return s
