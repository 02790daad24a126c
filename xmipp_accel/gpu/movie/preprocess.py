"""Movie preprocessing: checks, dark and gain correction, defects and hot pixels, Fourier binning.

All functions take NumPy or CuPy arrays (``xp = backend.get_xp(frames)``) of
shape ``(n, y, x)`` and work in float32. The order is the one MotionCor2 and
RELION use: ``frame = (raw - dark) * gain``, then defect and hot pixels are
replaced by noise drawn per frame with that frame's mean and standard
deviation (a constant value would be a fixed pattern that pulls every
correlation peak towards zero shift).

Gain orientation (``rotation``, ``flip``) follows MotionCor2's ``-RotGain`` and
``-FlipGain`` and RELION's ``--gain_rot``/``--gain_flip``: rotate by
``rotation × 90°`` clockwise as displayed with the first row at the top, then
flip (1: upside down, 2: left to right).
"""
from __future__ import annotations

import logging

import numpy as np

from ...errors import InputError
from ... import backend
from ...em.detector import check_reference_shape, defect_mask_from_rectangles  # noqa: F401  (API)

__all__ = ["MIN_FRAMES", "orient_reference", "check_reference_shape", "check_frames", "correct_dark_gain",
           "defect_mask_from_rectangles", "find_hot_pixels", "replace_defect_pixels"]

logger = logging.getLogger(__name__)

#: fewer frames than this cannot be aligned (all-pairs with temporal windows need a few)
MIN_FRAMES = 3


def orient_reference(image, *, rotation: int = 0, flip: int = 0):
    """Rotate then flip a gain (or dark) reference.

    Parameters
    ----------
    image : array, shape (y, x)
        Gain or dark reference as stored in its file.
    rotation : {0, 1, 2, 3}
        Number of 90° clockwise rotations as displayed with row 0 at the top
        (``np.rot90(image, -rotation)``); MotionCor2 ``-RotGain``.
    flip : {0, 1, 2}
        0 none, 1 upside down (rows reversed), 2 left to right (columns reversed);
        applied after the rotation; MotionCor2 ``-FlipGain``.

    Returns
    -------
    array, shape (y, x) or (x, y) after an odd rotation; a copy.
    """
    xp = backend.get_xp(image)
    if rotation not in (0, 1, 2, 3):
        raise InputError(f"--gain-rot must be 0, 1, 2 or 3 (times 90° clockwise), got {rotation}")
    if flip not in (0, 1, 2):
        raise InputError(f"--gain-flip must be 0 (none), 1 (upside down) or 2 (left-right), got {flip}")
    out = xp.rot90(image, -rotation, axes=(0, 1)) if rotation else image
    if flip == 1:
        out = out[::-1, :]
    elif flip == 2:
        out = out[:, ::-1]
    return xp.ascontiguousarray(out)


def check_frames(frames, *, name: str = "movie", min_frames: int = MIN_FRAMES) -> None:
    """Refuse movies that cannot be aligned: too few frames, NaN/inf, empty (all-zero) frames.

    Parameters
    ----------
    frames : array, shape (n, y, x)
        Raw or corrected frames (any real dtype).
    name : str
        The movie's name, used in the messages.

    Raises
    ------
    InputError
        Naming the movie and the frames at fault (1-based) and what to do.
    """
    xp = backend.get_xp(frames)
    if frames.ndim != 3:
        raise InputError(f"{name}: expected a stack of frames (n, y, x), got an array of shape {frames.shape}")
    n = int(frames.shape[0])
    if n < min_frames:
        raise InputError(f"{name} has {n} frame(s); movie alignment needs at least {min_frames}")
    # reduce the last axis first: many short reductions run well on a GPU, a few long ones do not
    if frames.dtype.kind in "fc":
        bad = backend.to_host((~xp.isfinite(frames)).any(axis=2).any(axis=1))
        if bad.any():
            which = ", ".join(str(i + 1) for i in np.flatnonzero(bad)[:10])
            raise InputError(f"{name}: {int(bad.sum())} frame(s) contain NaN or infinite values (frames {which}, "
                             "1-based); the file is damaged: re-export it or exclude those frames with --frames")
    empty = backend.to_host(~(frames != 0).any(axis=2).any(axis=1))
    if empty.all():
        raise InputError(f"{name} has no signal: every pixel of every frame is zero")
    if empty.any():
        which = ", ".join(str(i + 1) for i in np.flatnonzero(empty)[:10])
        raise InputError(f"{name}: {int(empty.sum())} frame(s) are all zeros (frames {which}, 1-based); "
                         "exclude them with --frames A:B")


def correct_dark_gain(frames, *, gain=None, dark=None):
    """``(frames - dark) * gain`` in place when possible; returns float32 frames (n, y, x).

    Parameters
    ----------
    frames : array, shape (n, y, x)
        Raw frames (integer counts or float); converted to float32.
    gain : array, shape (y, x), optional
        Multiplicative gain reference, already oriented (:func:`orient_reference`).
    dark : array, shape (y, x), optional
        Dark reference subtracted before the gain.
    """
    xp = backend.get_xp(frames)
    out = frames if frames.dtype == np.float32 else frames.astype(np.float32)
    if dark is not None:
        out -= xp.asarray(dark, dtype=np.float32)[None]
    if gain is not None:
        out *= xp.asarray(gain, dtype=np.float32)[None]
    return out


def find_hot_pixels(frame_sum, *, n_sigma: float = 10.0, exclude=None):
    """Pixels of the frame sum far above (hot) or below (dead) the rest.

    A pixel is flagged when it lies more than ``n_sigma`` robust standard deviations (1.4826 × the median
    absolute deviation, estimated on a subsample) from the median of the sum over frames.

    Parameters
    ----------
    frame_sum : array, shape (y, x)
        Sum (or mean) of the gain-corrected frames.
    n_sigma : float
        Threshold in robust standard deviations; 0 or less disables the search.
    exclude : bool array (y, x), optional
        Pixels already known to be bad (left out of the statistics).

    Returns
    -------
    bool array (y, x)
    """
    xp = backend.get_xp(frame_sum)
    if n_sigma <= 0:
        return xp.zeros(frame_sum.shape, dtype=bool)
    step = max(1, int(np.sqrt(frame_sum.size / 2.0e5)))
    sub = frame_sum[::step, ::step]
    if exclude is not None:
        sub = sub[~exclude[::step, ::step]]
    sub = sub.ravel().astype(np.float64)
    med = float(xp.median(sub))
    mad = float(xp.median(xp.abs(sub - med)))
    sigma = 1.4826 * mad
    if sigma <= 0:  # very sparse counts: fall back to the standard deviation
        sigma = float(sub.std())
    if sigma <= 0:
        return xp.zeros(frame_sum.shape, dtype=bool)
    return xp.abs(frame_sum - med) > n_sigma * sigma


def replace_defect_pixels(frames, mask, *, seed: int = 0):
    """Replace masked pixels in every frame by noise with that frame's mean and standard deviation.

    The noise is drawn on the host with a fixed seed (the same values on the CPU and the GPU).

    Parameters
    ----------
    frames : float32 array, shape (n, y, x), modified in place
    mask : bool array, shape (y, x)
    seed : int

    Returns
    -------
    int : the number of pixels replaced per frame.
    """
    xp = backend.get_xp(frames)
    idx = xp.flatnonzero(xp.asarray(mask).ravel())
    k = int(idx.size)
    if k == 0:
        return 0
    n = frames.shape[0]
    flat = frames.reshape(n, -1)
    good_mask = ~xp.asarray(mask)
    step = max(1, int(np.sqrt(good_mask.size / 2.0e5)))
    sub = frames[:, ::step, ::step][:, good_mask[::step, ::step]]
    mean = sub.mean(axis=1, dtype=np.float64).astype(np.float32)
    std = sub.std(axis=1, dtype=np.float64).astype(np.float32)
    z = np.random.default_rng(seed).standard_normal((n, k), dtype=np.float32)
    flat[:, idx] = mean[:, None] + std[:, None] * xp.asarray(z)
    return k
