"""Dose weighting: the exposure filter of Grant & Grigorieff (eLife 4:e06980, 2015, doi:10.7554/eLife.06980).

The critical exposure at spatial frequency k (1/Å) is ``Ne(k) = (a k^b + c) · f(V)`` with ``a = 0.245``,
``b = -1.665``, ``c = 2.81`` e/Å² (measured at 300 kV) and ``f = 1`` at 300 kV, 0.8 at 200 kV
(Unblur's voltage scaling, linear in between and beyond). Frame n, whose cumulative exposure at its end
is ``E_n = pre + (n + 1) · dose_per_frame``, is weighted by the optimal filter
``q_n(k) = exp(-E_n / (2 Ne(k)))``.

The dose-weighted sum is ``Σ_n q_n F_n · sqrt(N / Σ_n q_n²)``: the normalisation keeps the noise power
of the plain sum at every frequency (Unblur's "restore power") and equals the plain sum where all
``q_n = 1``.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ... import backend
from ._fft import rfft_freqs

__all__ = ["CRITICAL_A", "CRITICAL_B", "CRITICAL_C", "voltage_scale", "critical_exposure", "frame_exposures",
           "exposure_filter", "dose_weighted_sum"]

CRITICAL_A = 0.245
CRITICAL_B = -1.665
CRITICAL_C = 2.81


def voltage_scale(voltage_kV: float) -> float:
    """Factor on the critical exposure: 1 at 300 kV, 0.8 at 200 kV, linear (Unblur)."""
    return 1.0 + (float(voltage_kV) - 300.0) * 0.002


def critical_exposure(freq_per_A, voltage_kV: float = 300.0):
    """Critical exposure Ne(k) in e/Å² for spatial frequencies ``freq_per_A`` (1/Å); inf at k = 0."""
    xp = backend.get_xp(freq_per_A)
    k = xp.asarray(freq_per_A, dtype=np.float64)
    with np.errstate(divide="ignore"):
        ne = (CRITICAL_A * xp.where(k > 0, k, 1.0) ** CRITICAL_B + CRITICAL_C) * voltage_scale(voltage_kV)
    return xp.where(k > 0, ne, np.inf)


def frame_exposures(n_frames: int, dose_per_frame: float, pre_exposure: float = 0.0) -> np.ndarray:
    """Cumulative exposure (e/Å²) at the end of each frame: ``pre + (n + 1) · dose``."""
    return float(pre_exposure) + float(dose_per_frame) * (np.arange(n_frames) + 1.0)


def exposure_filter(shape: Sequence[int], pixel_size_A: float, exposure_e_per_A2: float, *,
                    voltage_kV: float = 300.0, xp=np):
    """Optimal exposure filter ``exp(-E / (2 Ne(k)))`` on an rfft2 half spectrum.

    Parameters
    ----------
    shape : (ny, nx)
        Real-space image size.
    pixel_size_A : float
    exposure_e_per_A2 : float
        Cumulative exposure E of the frame.

    Returns
    -------
    float32 array (ny, nx//2 + 1)
    """
    ky, kx = rfft_freqs(shape, xp=xp, dtype=np.float64)
    k = xp.sqrt(ky ** 2 + kx ** 2) / float(pixel_size_A)
    return xp.exp(-float(exposure_e_per_A2) / (2.0 * critical_exposure(k, voltage_kV))).astype(np.float32)


def dose_weighted_sum(spectra, pixel_size_A: float, dose_per_frame: float, *, pre_exposure: float = 0.0,
                      voltage_kV: float = 300.0):
    """Dose-weighted sum of aligned frames in Fourier space.

    Parameters
    ----------
    spectra : complex64 array (N, ny, nx//2 + 1)
        rfft2 of the aligned frames.
    pixel_size_A : float
        Pixel size of those frames (Å).
    dose_per_frame : float
        Exposure per frame (e/Å²).
    pre_exposure : float
        Exposure before the first frame (e/Å²), including frames left out at the start.
    voltage_kV : float

    Returns
    -------
    complex64 array (ny, nx//2 + 1): ``Σ q_n F_n · sqrt(N / Σ q_n²)``.
    """
    xp = backend.get_xp(spectra)
    n, ny, nxh = spectra.shape
    nx = (nxh - 1) * 2
    ky, kx = rfft_freqs((ny, nx), xp=xp, dtype=np.float32)
    k = xp.sqrt(ky ** 2 + kx ** 2) / np.float32(pixel_size_A)
    half_inv_ne = (0.5 / critical_exposure(k, voltage_kV)).astype(np.float32)   # (ny, nxh)
    exposures = frame_exposures(n, dose_per_frame, pre_exposure)
    acc = xp.zeros((ny, nxh), dtype=np.complex64)
    norm = xp.zeros((ny, nxh), dtype=np.float32)
    for i in range(n):
        q = xp.exp(-np.float32(exposures[i]) * half_inv_ne)
        acc += spectra[i] * q
        norm += q * q
    acc *= xp.sqrt(np.float32(n) / xp.maximum(norm, np.float32(1e-30)))
    return acc
