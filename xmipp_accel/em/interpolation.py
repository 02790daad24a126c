"""Keys cubic convolution interpolation (a = -0.5), shared by the movie corrector and the synthetic
movie generator. Array-module agnostic (NumPy or CuPy through ``xp``).

Reference: R. Keys, "Cubic convolution interpolation for digital image processing", IEEE Trans.
ASSP 29(6):1153, 1981, doi:10.1109/TASSP.1981.1163711.
"""
from __future__ import annotations

import numpy as np

__all__ = ["keys_weights", "sample_keys"]


def keys_weights(t, xp=np):
    """Keys (a = -0.5) cubic convolution weights for taps at offsets -1, 0, 1, 2 from ``floor(u)``.

    Parameters
    ----------
    t : float array
        Fractional part ``u - floor(u)`` in [0, 1).

    Returns
    -------
    tuple of four arrays like ``t``
    """
    t2 = t * t
    t3 = t2 * t
    return (-0.5 * t3 + t2 - 0.5 * t,
            1.5 * t3 - 2.5 * t2 + 1.0,
            -1.5 * t3 + 2.0 * t2 + 0.5 * t,
            0.5 * t3 - 0.5 * t2)


def sample_keys(image, ys, xs, xp=np):
    """Keys cubic samples of a 2-D ``image`` (y, x) at float pixel positions; indices clamped to the image.

    Parameters
    ----------
    image : ``(ny, nx)`` array.
    ys, xs : float arrays of equal shape: positions in pixels (array indices).

    Returns
    -------
    float32 array of the shape of ``ys``.
    """
    ny, nx = image.shape
    fy = xp.floor(ys)
    fx = xp.floor(xs)
    wy = keys_weights((ys - fy).astype(np.float32), xp)
    wx = keys_weights((xs - fx).astype(np.float32), xp)
    iy = fy.astype(np.int64)
    ix = fx.astype(np.int64)
    flat = image.ravel()
    cols = [xp.clip(ix + (b - 1), 0, nx - 1) for b in range(4)]
    out = xp.zeros(ys.shape, dtype=np.float32)
    for a in range(4):
        base = xp.clip(iy + (a - 1), 0, ny - 1) * nx
        row = wx[0] * xp.take(flat, base + cols[0])
        for b in range(1, 4):
            row += wx[b] * xp.take(flat, base + cols[b])
        out += wy[a] * row
    return out
