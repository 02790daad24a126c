"""A soft solvent mask from a map, so that local resolution is reported on the particle only.

The map (normally the average of the two half maps) is low-passed with a Gaussian of σ = ``smooth_A``
(noise in the solvent averages out, the particle becomes one connected blob) and thresholded at
the solvent's level + 4σ, both measured in the corners of the box (outside the inscribed sphere,
where a centred particle is not); a particle that reaches the corners raises that level, so the
threshold is never above Otsu's level (the one that best separates the two modes of the
histogram: solvent and particle). The binary mask is given a soft edge by a Gaussian of
σ = ``edge_px`` / 2. Voxels where the soft mask is ≥ 0.5 are the particle (about the thresholded
region, corners rounded).
"""
from __future__ import annotations

import math

import numpy as np

from ... import backend

__all__ = ["solvent_mask", "otsu_threshold"]


def _gaussian_blur(volume, sigma_px: float):
    """Periodic Gaussian blur of a (N, N, N) map (NumPy or CuPy), σ in px; float32."""
    xp = backend.get_xp(volume)
    n = volume.shape
    axes = [xp.fft.fftfreq(s).astype(np.float32) for s in n[:-1]] + [xp.fft.rfftfreq(n[-1]).astype(np.float32)]
    k2 = axes[0][:, None, None] ** 2 + axes[1][None, :, None] ** 2 + axes[2][None, None, :] ** 2
    kernel = xp.exp(np.float32(-2.0 * math.pi ** 2 * sigma_px ** 2) * k2)
    if xp is np:
        import scipy.fft
        return scipy.fft.irfftn(scipy.fft.rfftn(volume.astype(np.float32), workers=-1) * kernel, s=n,
                                workers=-1).astype(np.float32)
    return xp.fft.irfftn(xp.fft.rfftn(volume.astype(np.float32)) * kernel, s=n).astype(np.float32)


def otsu_threshold(values, bins: int = 256) -> float:
    """Otsu's threshold of an array (NumPy or CuPy): maximises the between-class variance."""
    xp = backend.get_xp(values)
    v = values.ravel()
    lo, hi = float(v.min()), float(v.max())
    if hi <= lo:
        return lo
    hist, edges = xp.histogram(v, bins=bins, range=(lo, hi))
    hist = backend.to_host(hist).astype(np.float64)
    centres = 0.5 * (backend.to_host(edges)[1:] + backend.to_host(edges)[:-1])
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    s0 = np.cumsum(hist * centres)
    mu0 = s0 / np.maximum(w0, 1)
    mu1 = (s0[-1] - s0) / np.maximum(w1, 1)
    between = w0 * w1 * (mu0 - mu1) ** 2
    return float(backend.to_host(edges)[int(np.argmax(between[:-1])) + 1])


def solvent_mask(volume, pixel_size_A: float, *, smooth_A: float = 5.0, edge_px: float = 4.0):
    """Soft mask (N, N, N) float32 in [0, 1] of the particle in ``volume`` (NumPy or CuPy, as the input).

    Parameters
    ----------
    volume : (N, N, N) array
        A map of the particle (e.g. the average of the half maps), positive density.
    pixel_size_A : float
        Voxel size, Å.
    smooth_A : float
        σ (Å) of the Gaussian low-pass before thresholding (at least 1 px).
    edge_px : float
        Width of the soft edge, px (Gaussian σ = edge_px / 2).
    """
    xp = backend.get_xp(volume)
    smooth = _gaussian_blur(xp.asarray(volume, dtype=np.float32), max(1.0, smooth_A / pixel_size_A))
    n = smooth.shape[-1]
    c = xp.arange(n, dtype=np.float32) - np.float32(n / 2.0 - 0.5)
    corners = (c[:, None, None] ** 2 + c[None, :, None] ** 2 + c[None, None, :] ** 2) > np.float32((n / 2.0) ** 2)
    solvent = smooth[corners]
    level = float(solvent.mean()) + 4.0 * float(solvent.std())
    binary = (smooth > min(level, otsu_threshold(smooth))).astype(np.float32)
    return xp.clip(_gaussian_blur(binary, max(0.5, edge_px / 2.0)), 0.0, 1.0)
