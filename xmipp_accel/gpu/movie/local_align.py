"""Local alignment: per-patch all-pairs correlation of temporally averaged patches.

FlexAlign (Střelák et al., Electronics 2020, §2.3): after the global shifts are applied, the frames are
cut into patches (default: about 500 Å, at least enough to tile the frame with the requested grid);
each patch frame is the average of ``window`` (3) neighbouring frames, which raises the signal of a
patch; the patch frames are correlated pair by pair exactly as in :mod:`.global_align` and the shifts
solved by the same robust least squares. The measurements, one per patch and frame, then feed the
B-spline fit of :mod:`.bspline`.

Work is done on the coarse (low-passed) frames of the global step, already moved by their global
shifts: they hold all the information up to the correlation resolution, so cutting patches there
avoids transforming full-resolution patches.

Two refinements over Xmipp: pairs whose averaging windows share frames (``|i - j| < window``) are
left out, because the shared noise correlates at zero shift and biases the shifts towards zero; and
the signal is checked (:attr:`LocalAlignment.ok`): when the correlation peaks of the patches do not
rise clearly above their maps, the caller falls back to the global alignment with a warning.
"""
from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import numpy as np

from ... import backend
from ._fft import fast_size
from .global_align import correlate_pairs, correlation_spectra, frame_pairs
from .shift_solver import solve_relative_shifts_batched

__all__ = ["PATCH_SIZE_A", "MIN_PEAK_Z", "MIN_PATCH_PX", "max_patches", "patch_starts", "patch_size_px",
           "temporal_average", "LocalAlignment", "estimate_local_shifts"]

logger = logging.getLogger(__name__)

#: default patch side (Å), as Scipion's FlexAlign protocol
PATCH_SIZE_A = 500.0
#: median correlation peak height (standard deviations of the map) below which patches have no signal
MIN_PEAK_Z = 6.0
#: smallest patch side correlated (pixels of the coarse correlation frames)
MIN_PATCH_PX = 16


def max_patches(correlation_length: int) -> int:
    """Most patches along an axis of ``correlation_length`` coarse pixels: patches of at least
    :data:`MIN_PATCH_PX` whose centres are at least half of that apart (neighbours overlap by at most half)."""
    return max(1, (int(correlation_length) - MIN_PATCH_PX) // (MIN_PATCH_PX // 2) + 1)


def patch_starts(length: int, n_patches: int, size: int) -> List[int]:
    """First pixel of each of ``n_patches`` patches of ``size`` spread evenly over ``length`` pixels."""
    size = min(size, length)
    if n_patches <= 1:
        return [(length - size) // 2]
    return [int(round(i * (length - size) / (n_patches - 1))) for i in range(n_patches)]


def patch_size_px(length: int, n_patches: int, pixel_size_A: float, *, patch_size_A: float = PATCH_SIZE_A) -> int:
    """Patch side (pixels): about ``patch_size_A``, but at least enough for the grid to cover the frame."""
    cover = int(math.ceil(length / max(n_patches, 1)))
    return int(min(length, max(cover, int(round(patch_size_A / pixel_size_A)))))


def temporal_average(frames, window: int):
    """Average of ``window`` neighbouring frames along axis 0 (truncated at the ends).

    Parameters
    ----------
    frames : array (N, ...)
    window : int
        Odd number of frames (1 returns the input).
    """
    if window <= 1:
        return frames
    xp = backend.get_xp(frames)
    n = frames.shape[0]
    half = window // 2
    csum = xp.concatenate([xp.zeros_like(frames[:1]), xp.cumsum(frames, axis=0, dtype=np.float32)])
    lo = np.clip(np.arange(n) - half, 0, n)
    hi = np.clip(np.arange(n) + half + 1, 0, n)
    count = xp.asarray((hi - lo).astype(np.float32)).reshape((n,) + (1,) * (frames.ndim - 1))
    return (csum[xp.asarray(hi)] - csum[xp.asarray(lo)]) / count


@dataclass
class LocalAlignment:
    """Local shift measurements.

    Attributes
    ----------
    patch_centres_px : float64 ndarray (P, 2)
        (x, y) centre of each patch in full-resolution pixels.
    patch_size_px : (int, int)
        (y, x) patch size in full-resolution pixels (approximately: cut on the coarse grid).
    shifts_px : float64 ndarray (P, N, 2)
        Shift of each patch in each frame that remains after the global shift, relative to the
        reference frame (zero there), MotionCor2 sign, full-resolution pixels.
    peak_z : float64 ndarray (P,)
        Median correlation peak height per patch (standard deviations of the map).
    patch_ok : bool ndarray (P,)
        Patches with enough signal (peak_z >= MIN_PEAK_Z).
    ok : bool
        Enough patches have signal for a local model.
    reason : str
        Why not, when ``ok`` is False.
    """
    patch_centres_px: np.ndarray
    patch_size_px: Tuple[int, int]
    shifts_px: np.ndarray
    peak_z: np.ndarray
    patch_ok: np.ndarray
    ok: bool = True
    reason: str = ""
    inliers: Optional[np.ndarray] = field(default=None, repr=False)


def estimate_local_shifts(aligned_coarse, *, scale_yx: Sequence[float], n_patches_xy: Sequence[int],
                          patch_size_px_yx: Sequence[int], reference_frame: int, window: int = 3,
                          max_shift_px: float = 25.0, band: float = 1.0, batch_bytes: float = 1.0e9,
                          min_peak_z: float = MIN_PEAK_Z, timer=None) -> LocalAlignment:
    """Measure the residual shift of every patch in every frame.

    Parameters
    ----------
    aligned_coarse : float32 array (N, cy, cx)
        Low-passed coarse frames already moved by their global shifts.
    scale_yx : (float, float)
        Coarse pixels per full-resolution pixel.
    n_patches_xy : (int, int)
        Patch grid (along x, along y).
    patch_size_px_yx : (int, int)
        Patch size in full-resolution pixels (y, x).
    reference_frame : int
        Frame whose local shifts are zero.
    window : int
        Frames averaged per patch frame (odd).
    max_shift_px : float
        Largest residual shift searched between two patch frames (full-resolution pixels).
    band : float
        Fraction of Nyquist used for the sub-pixel refinement (see :func:`.global_align.refine_band`).
    timer : callable ``name -> context manager``, optional
        Records the sub-steps (``local.patches``, ``local.correlate``, ``local.solve``).

    Returns
    -------
    LocalAlignment
    """
    xp = backend.get_xp(aligned_coarse)
    n, cy, cx = aligned_coarse.shape
    sy, sx = (float(v) for v in scale_yx)
    npx, npy = (int(v) for v in n_patches_xy)
    # patch size on the coarse grid: even, fast for the FFT, within the frame
    py = min(cy - cy % 2, fast_size(max(MIN_PATCH_PX, int(math.ceil(patch_size_px_yx[0] * sy)))))
    px = min(cx - cx % 2, fast_size(max(MIN_PATCH_PX, int(math.ceil(patch_size_px_yx[1] * sx))),
                                       real=True))
    ys = patch_starts(cy, npy, py)
    xs = patch_starts(cx, npx, px)
    timer = timer or (lambda name: contextlib.nullcontext())
    with timer("local.patches"):
        averaged = temporal_average(aligned_coarse, window)
        patches = xp.stack([averaged[:, y0:y0 + py, x0:x0 + px] for y0 in ys for x0 in xs])   # (P, N, py, px)
        n_p = patches.shape[0]
        spectra = correlation_spectra(patches.reshape(n_p * n, py, px))
        del patches, averaged
    min_gap = window if n >= window + 3 else 1
    a, b = frame_pairs(n, min_gap=min_gap)
    offs = (np.arange(n_p) * n)[:, None]
    fa = (offs + a[None]).ravel()
    fb = (offs + b[None]).ravel()
    with timer("local.correlate"):
        d, z = correlate_pairs(spectra, fa, fb, (py, px), (max(2.0, max_shift_px * sy), max(2.0, max_shift_px * sx)),
                               band=band, batch_bytes=batch_bytes)
        del spectra
    with timer("local.solve"):
        d = d.reshape(n_p, len(a), 2) / np.array([sx, sy])
        z = z.reshape(n_p, len(a))
        shifts, inliers = solve_relative_shifts_batched(a, b, d, n)
        shifts -= shifts[:, reference_frame:reference_frame + 1]
    peak_z = np.median(z, axis=1)
    patch_ok = peak_z >= min_peak_z
    centres = np.array([((x0 + px / 2.0) / sx, (y0 + py / 2.0) / sy) for y0 in ys for x0 in xs])
    result = LocalAlignment(patch_centres_px=centres, patch_size_px=(int(round(py / sy)), int(round(px / sx))),
                            shifts_px=shifts, peak_z=peak_z, patch_ok=patch_ok, inliers=inliers)
    if patch_ok.sum() < max(4, (n_p + 1) // 2):
        result.ok = False
        result.reason = (f"only {int(patch_ok.sum())} of {n_p} patches have a clear correlation peak "
                         f"(median peak {np.median(peak_z):.1f} σ, need {min_peak_z:.0f} σ)")
    return result
