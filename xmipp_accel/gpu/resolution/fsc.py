"""Fourier shell correlation (FSC) of two half maps, on NumPy or CuPy arrays.

FSC(k) = Re Σ F1 F2* / sqrt(Σ |F1|² Σ |F2|²) over one-voxel shells k = round(|q| N)
(q in cycles/pixel, N the box), shell k labelled by its centre frequency k/N (1/pixel).
Sums run over the non-redundant half of Fourier space (``rfftn``) with Hermitian
weights, so they equal those over the full transform. On the GPU one CUDA kernel
(``fsc.cu``) reduces both spectra into shell sums with block-private shared-memory
histograms; on the CPU ``numpy.bincount`` does it (:func:`_shell_sums_xp`, also the
test oracle of the kernel).

Also here: RELION's masked FSC with phase randomisation
(:func:`masked_fsc_corrected`) and cone-restricted directional FSCs
(:func:`directional_fsc`). The curves, criteria and the resolution at a criterion with interpolation
between shells are in :mod:`.fsc_curves`.

References
----------
Harauz & van Heel (1986) Optik 73:146. van Heel & Schatz (2005) J Struct Biol 151:250,
doi:10.1016/j.jsb.2005.05.009 (half-bit, 3σ). Rosenthal & Henderson (2003) J Mol Biol
333:721, doi:10.1016/j.jmb.2003.07.013 (0.143). Chen et al. (2013) Ultramicroscopy
135:24, doi:10.1016/j.ultramic.2013.06.004 (phase randomisation). Tan et al. (2017)
Nat Methods 14:793, doi:10.1038/nmeth.4347 (3DFSC, cones).
"""
from __future__ import annotations

import functools
import logging
import math
import os
from typing import Sequence, Tuple

import numpy as np

from ...em.projection import rfft_column_weights
from ...errors import InputError
from ... import backend
from ...threads import fft_workers
from .fsc_curves import (CRITERIA, DirectionalFSC, FSCResult, MaskedFSC, Threshold, crossing_frequency,  # noqa: F401
                         resolution_at, threshold_curve)

__all__ = ["CRITERIA", "FSCResult", "MaskedFSC", "DirectionalFSC", "fsc", "resolution_at", "crossing_frequency",
           "threshold_curve", "masked_fsc_corrected", "directional_fsc", "hemisphere_directions"]

logger = logging.getLogger(__name__)

#: RELION's default: phases are randomised beyond the first shell where the unmasked FSC drops below this.
RANDOMISE_BELOW_FSC = 0.8


# ------------------------------------------------------------------------------------ shell reduction
def _n_ref(shape: Sequence[int]) -> int:
    return int(max(shape))


def _axis_frequencies(shape: Sequence[int], xp, dtype=np.float64):
    """Signed Fourier indices scaled to the reference box, broadcastable to the rfftn shape."""
    nref = _n_ref(shape)
    nz, ny, nx = shape

    def signed(n):
        i = xp.arange(n)
        return xp.where(2 * i < n, i, i - n)

    kz = (signed(nz) * (nref / nz)).astype(dtype)[:, None, None]
    ky = (signed(ny) * (nref / ny)).astype(dtype)[None, :, None]
    kx = (xp.arange(nx // 2 + 1) * (nref / nx)).astype(dtype)[None, None, :]
    return kz, ky, kx


def _shell_index(shape: Tuple[int, int, int], xp, direction=None, cos_half_angle: float = -2.0):
    """Shell index round(|k|) per rfftn voxel; ``n_shells`` marks voxels skipped (beyond Nyquist, off-cone)."""
    nshell = _n_ref(shape) // 2 + 1
    kz, ky, kx = _axis_frequencies(shape, xp)
    r2 = kz * kz + ky * ky + kx * kx
    r = xp.sqrt(r2)
    s = xp.floor(r + 0.5).astype(np.int64)
    s = xp.where(s >= nshell, nshell, s)
    if direction is not None and cos_half_angle > -1.0:
        dx, dy, dz = (float(v) for v in direction)
        proj = xp.abs(kx * dx + ky * dy + kz * dz)
        off = (proj < cos_half_angle * r) & (r2 > 0)
        s = xp.where(off, nshell, s)
    return s


@functools.lru_cache(maxsize=2)
def _host_shell_index_and_count(shape: Tuple[int, int, int]) -> Tuple[np.ndarray, np.ndarray]:
    """NumPy shell index (flat, intp) and per-shell voxel counts (Hermitian-weighted) of an unconed shape,
    memoised: the masked, corrected FSC sums the same shells three times."""
    nshell = _n_ref(shape) // 2 + 1
    if len(set(shape)) == 1:
        # cubic: the scaled frequencies are integers, so round(sqrt(k²)) is a table lookup on the integer
        # k² (the same float64 sqrt of the same exact values as _shell_index, so the same indices)
        k = np.arange(shape[0])
        k = np.where(2 * k < shape[0], k, k - shape[0]).astype(np.int32)
        kx = np.arange(shape[2] // 2 + 1, dtype=np.int32)
        r2 = (k[:, None, None] ** 2 + k[None, :, None] ** 2) + kx[None, None, :] ** 2
        table = np.floor(np.sqrt(np.arange(int(r2.max()) + 1, dtype=np.float64)) + 0.5).astype(np.intp)
        idx = np.minimum(table, nshell)[r2].ravel()
    else:
        idx = _shell_index(shape, np).ravel().astype(np.intp)
    w = rfft_column_weights(shape[2])
    weights = np.broadcast_to(w[None, None, :], _rfft_shape(shape)).ravel()
    count = np.bincount(idx, weights=weights, minlength=nshell + 1)[:nshell]
    idx.flags.writeable = False
    return idx, count


def _rfft_shape(shape: Tuple[int, int, int]) -> Tuple[int, int, int]:
    return shape[0], shape[1], shape[2] // 2 + 1


def _shell_sums_xp(f1, f2, shape, direction=None, cos_half_angle: float = -2.0) -> np.ndarray:
    """Shell sums with ``bincount``: (4, n_shells) float64 [Re F1F2*, |F1|², |F2|², voxel count].

    The reference of the CUDA kernel in ``fsc.cu``; used on the CPU (where the shell index of an
    unconed shape is memoised).
    """
    xp = backend.get_xp(f1)
    nshell = _n_ref(shape) // 2 + 1
    real_dtype = f1.real.dtype
    w = rfft_column_weights(shape[2], xp=xp, dtype=real_dtype)[None, None, :]
    if xp is np and direction is None:
        idx, count = _host_shell_index_and_count(tuple(shape))
        sums = []
        for a, b in ((f1, f2), (f1, f1), (f2, f2)):  # in place: Re a b*, weighted
            prod = np.multiply(a.real, b.real)
            prod += np.multiply(a.imag, b.imag)
            prod *= w
            sums.append(np.bincount(idx, weights=prod.ravel(), minlength=nshell + 1)[:nshell])
        return np.stack(sums + [count])
    cross = (f1.real * f2.real + f1.imag * f2.imag) * w
    p1 = (f1.real * f1.real + f1.imag * f1.imag) * w
    p2 = (f2.real * f2.real + f2.imag * f2.imag) * w
    idx = _shell_index(shape, xp, direction, cos_half_angle).ravel()
    count = xp.broadcast_to(w, f1.shape)
    out = xp.stack([xp.bincount(idx, weights=a.ravel().astype(np.float64), minlength=nshell + 1)[:nshell]
                    for a in (cross, p1, p2, count)])
    return backend.to_host(out)


@functools.lru_cache(maxsize=None)
def _shell_sum_kernels(device_id: int):
    """The compiled ``fsc.cu`` module for a device (memoised)."""
    with open(os.path.join(os.path.dirname(__file__), "fsc.cu")) as fh:
        source = fh.read()
    # C++17: CuPy 14's complex.cuh comes from CCCL (Thrust), which refuses older dialects
    return backend.get_raw_module(source, options=("-std=c++17",))


def _shell_sums_gpu(f1, f2, shape, direction=None, cos_half_angle: float = -2.0) -> np.ndarray:
    """Shell sums with the CUDA kernel: (4, n_shells) float64 on the host."""
    cp = backend.cupy_module()
    nz, ny, nx = shape
    nxh = nx // 2 + 1
    nref = _n_ref(shape)
    nshell = nref // 2 + 1
    total = nz * ny * nxh
    complex128 = f1.dtype == np.complex128
    module = _shell_sum_kernels(cp.cuda.Device().id)
    kernel = module.get_function("fsc_shell_sums_complex128" if complex128 else "fsc_shell_sums_complex64")
    f1 = cp.ascontiguousarray(f1)
    f2 = cp.ascontiguousarray(f2)
    sums = cp.zeros(4 * nshell, dtype=cp.float64)
    threads = 256
    # about 64 voxels per thread: short per-block partial sums (precision) and few global atomics
    blocks = int(min(max(1, -(-total // (threads * 64))), 65535 * 16))
    blocks = max(blocks, -(-total // (1 << 22)))
    acc_bytes = 8 if complex128 else 4
    if direction is None or cos_half_angle <= -1.0:
        cx = cy = cz = 0.0
        cos_half_angle = -2.0
    else:
        cx, cy, cz = (float(v) for v in direction)
    kernel((blocks,), (threads,),
           (f1, f2, np.uint32(nz), np.uint32(ny), np.uint32(nxh), np.uint32(nx),
            np.float64(nref / nz), np.float64(nref / ny), np.float64(nref / nx), np.int32(nshell),
            np.float64(cx), np.float64(cy), np.float64(cz), np.float64(cos_half_angle), sums),
           shared_mem=4 * nshell * acc_bytes)
    return cp.asnumpy(sums).reshape(4, nshell)


def _shell_sums(f1, f2, shape, direction=None, cos_half_angle: float = -2.0) -> np.ndarray:
    xp = backend.get_xp(f1)
    nz, ny, nx = shape
    if xp is not np and nz * ny * (nx // 2 + 1) < 2 ** 32 and f1.dtype in (np.complex64, np.complex128):
        return _shell_sums_gpu(f1, f2, shape, direction, cos_half_angle)
    return _shell_sums_xp(f1, f2, shape, direction, cos_half_angle)


def _result_from_sums(sums: np.ndarray, shape) -> FSCResult:
    if not np.all(np.isfinite(sums)):
        raise InputError("the FSC is not finite: the half maps (or the mask) contain NaN or infinite values")
    cross, p1, p2, count = sums
    denom = np.sqrt(p1 * p2)
    with np.errstate(invalid="ignore", divide="ignore"):
        curve = np.where(denom > 0, cross / np.where(denom > 0, denom, 1.0), 0.0)
    nref = _n_ref(shape)
    freq = np.arange(curve.size, dtype=np.float64) / nref
    return FSCResult(frequency=freq, fsc=np.clip(curve, -1.0, 1.0), n_voxels=np.rint(count), box=nref)


# ------------------------------------------------------------------------------------------- FFTs
def _rfftn(a):
    xp = backend.get_xp(a)
    if xp is np:
        import scipy.fft
        return scipy.fft.rfftn(a, workers=fft_workers())
    return xp.fft.rfftn(a)


def _irfftn(f, shape):
    xp = backend.get_xp(f)
    if xp is np:
        import scipy.fft
        return scipy.fft.irfftn(f, s=shape, workers=fft_workers())
    return xp.fft.irfftn(f, s=shape)


# --------------------------------------------------------------------------------------- validation
def _as_volume(a, name: str, xp):
    a = xp.asarray(a)
    if a.ndim == 2:
        a = a[None]
    if a.ndim != 3:
        raise InputError(f"{name} must be a 2-D image or 3-D map, got an array of shape {tuple(a.shape)}")
    if a.dtype != np.float64:
        a = a.astype(np.float32, copy=False)
    return a


def _check_halves(half1, half2, mask=None):
    """Validate and convert: float32 (float64 if both halves are float64) volumes of one shape."""
    xp = backend.get_xp(half1, half2, mask) if mask is not None else backend.get_xp(half1, half2)
    if tuple(np.shape(half1)) != tuple(np.shape(half2)):
        raise InputError(f"the half maps have different sizes {tuple(np.shape(half1))} and "
                         f"{tuple(np.shape(half2))}: resample one so both have the same box")
    h1 = _as_volume(half1, "half map 1", xp)
    h2 = _as_volume(half2, "half map 2", xp)
    if h1.dtype != h2.dtype:
        h1, h2 = h1.astype(np.float32, copy=False), h2.astype(np.float32, copy=False)
    if min(h1.shape[1:]) < 2:
        raise InputError(f"the half maps are too small for an FSC: shape {tuple(h1.shape)}")
    m = None
    if mask is not None:
        if tuple(np.shape(mask)) != tuple(np.shape(half1)):
            raise InputError(f"the mask has shape {tuple(np.shape(mask))} but the half maps {tuple(np.shape(half1))}: "
                             f"give a mask of the same box (and voxel size) as the maps")
        m = _as_volume(mask, "mask", xp).astype(h1.dtype, copy=False)
        if not float(m.max()) > 0:
            raise InputError("the mask is empty (no voxel > 0): check the mask file or its threshold")
    return h1, h2, m


def _check_finite(result: FSCResult) -> FSCResult:
    if not np.all(np.isfinite(result.fsc)):
        raise InputError("the FSC is not finite: the half maps (or the mask) contain NaN or infinite values")
    return result


# ------------------------------------------------------------------------------------------ FSC
def fsc(half1, half2, *, mask=None) -> FSCResult:
    """Fourier shell correlation of two half maps over one-voxel shells.

    Parameters
    ----------
    half1, half2 : (z, y, x) or (y, x) array, NumPy or CuPy
        Half maps of the same shape; float64 inputs are computed in float64, others in float32
        (accumulation is always float64).
    mask : array of the same shape, optional
        Real-space (soft) mask multiplied into both halves first (no correction; see
        :func:`masked_fsc_corrected`).

    Returns
    -------
    FSCResult
        Host (NumPy) arrays: shell centre frequencies (1/pixel), FSC, voxels per shell.

    Raises
    ------
    InputError
        Different shapes, a mask of another shape or empty, or non-finite values.

    Notes
    -----
    Cost: two ``rfftn`` and one pass over both spectra (on the GPU a shared-memory histogram
    kernel; see ``fsc.cu``).
    """
    h1, h2, m = _check_halves(half1, half2, mask)
    if m is not None:
        h1, h2 = h1 * m, h2 * m
    f1, f2 = _rfftn(h1), _rfftn(h2)
    return _check_finite(_result_from_sums(_shell_sums(f1, f2, h1.shape), h1.shape))


def _fsc_of_spectra(f1, f2, shape) -> FSCResult:
    return _check_finite(_result_from_sums(_shell_sums(f1, f2, shape), shape))


# ----------------------------------------------------------------------- phase randomisation (RELION)
_M1 = np.uint64(0x9E3779B97F4A7C15)
_M2 = np.uint64(0xBF58476D1CE4E5B9)
_M3 = np.uint64(0x94D049BB133111EB)


def _random_phases(shape, seed: int, stream: int, xp, dtype):
    """Uniform phases in [0, 2π) per element, from a SplitMix64 hash of (seed, stream, index).

    Counter-based, so NumPy and CuPy give the same phases for the same seed.
    """
    n = int(np.prod(shape))
    key = (int(seed) * 2 + int(stream) + 1) * int(_M1) & 0xFFFFFFFFFFFFFFFF
    z = xp.arange(n, dtype=np.uint64)
    z += np.uint64(key)
    for shift, mult in ((30, _M2), (27, _M3)):  # in place: the same values, fewer temporaries
        z ^= z >> np.uint64(shift)
        z *= mult
    z ^= z >> np.uint64(31)
    z >>= np.uint64(40)
    phase = z.astype(dtype)
    phase *= dtype(2.0 * math.pi / (1 << 24))
    return phase.reshape(shape)


def _randomise_phases_beyond(f, shape, shell: int, seed: int, stream: int):
    """Copy of spectrum ``f`` with random phases where ``|k| >= shell`` (voxel units).

    RELION's ``randomizePhasesBeyond(v, index)`` tests ``kx² + ky² + kz² >= index²``, so about half of
    shell ``shell`` itself (``shell - 0.5 <= |k| < shell + 0.5``) is randomised too; we follow it so the
    phase-randomised FSC equals RELION's shell by shell (``tests/test_relion_fsc.py``).
    """
    xp = backend.get_xp(f)
    real = f.real.dtype.type
    kz, ky, kx = _axis_frequencies(shape, xp, dtype=real)
    beyond = (kz * kz + ky * ky + kx * kx) >= real(shell ** 2)
    phase = _random_phases(f.shape, seed, stream, xp, real)
    if xp is not np:   # the form measured on the GPU
        return xp.where(beyond, f * xp.exp(phase * f.dtype.type(1j)), f)
    rotor = np.empty(f.shape, dtype=f.dtype)   # exp(i phase) from cos and sin of the real phase: faster
    rotor.real = np.cos(phase)
    rotor.imag = np.sin(phase)
    del phase
    rotor *= f
    return np.where(beyond, rotor, f)


def masked_fsc_corrected(half1, half2, mask, *, seed: int = 0,
                         randomise_below: float = RANDOMISE_BELOW_FSC) -> MaskedFSC:
    """Masked FSC corrected for mask-induced correlation by phase randomisation (RELION post-processing).

    The phases of both unmasked halves are randomised beyond the first shell where the unmasked
    FSC drops below ``randomise_below``; the randomised halves are masked and their FSC,
    FSC_rand, measures the correlation the mask alone creates. Then
    FSC_true = (FSC_masked − FSC_rand) / (1 − FSC_rand) in shells ≥ randomise shell + 2, and
    FSC_true = FSC_masked below.

    Parameters
    ----------
    half1, half2 : (z, y, x) array, NumPy or CuPy
        Unmasked half maps.
    mask : (z, y, x) array
        Soft mask in [0, 1].
    seed : int
        Seed of the random phases (counter-based: NumPy and CuPy give the same phases).
    randomise_below : float
        FSC level of the unmasked curve where randomisation starts (RELION: 0.8).

    Returns
    -------
    MaskedFSC

    References
    ----------
    Chen S. et al. (2013) Ultramicroscopy 135:24-35, doi:10.1016/j.ultramic.2013.06.004.
    """
    h1, h2, m = _check_halves(half1, half2, mask)
    if m is None:
        raise InputError("masked_fsc_corrected needs a mask")
    shape = h1.shape
    f1, f2 = _rfftn(h1), _rfftn(h2)
    unmasked = _fsc_of_spectra(f1, f2, shape)
    masked = _fsc_of_spectra(_rfftn(h1 * m), _rfftn(h2 * m), shape)
    below = np.nonzero(unmasked.fsc[1:] < randomise_below)[0]
    if below.size == 0:
        logger.warning("the unmasked FSC never drops below %.2f: no phase randomisation, the masked FSC is "
                       "reported uncorrected", randomise_below)
        return MaskedFSC(unmasked, masked, masked, masked, None)
    shell = int(below[0]) + 1
    r1 = _irfftn(_randomise_phases_beyond(f1, shape, shell, seed, 0), shape).astype(h1.dtype, copy=False)
    r2 = _irfftn(_randomise_phases_beyond(f2, shape, shell, seed, 1), shape).astype(h1.dtype, copy=False)
    del f1, f2
    rand = _fsc_of_spectra(_rfftn(r1 * m), _rfftn(r2 * m), shape)
    corrected = masked.fsc.copy()
    k = np.arange(corrected.size)
    sel = k >= shell + 2
    denom = 1.0 - rand.fsc[sel]
    with np.errstate(invalid="ignore", divide="ignore"):
        corrected[sel] = np.where(np.abs(denom) > 1e-12, (masked.fsc[sel] - rand.fsc[sel]) / denom, 0.0)
    corr = FSCResult(masked.frequency, np.clip(corrected, -1.0, 1.0), masked.n_voxels, masked.box)
    return MaskedFSC(unmasked, masked, rand, corr, shell)


# ----------------------------------------------------------------------------------------- directional
def hemisphere_directions(n: int) -> np.ndarray:
    """About ``n`` nearly uniform unit vectors on the upper hemisphere (z ≥ 0), Fibonacci lattice.

    Returns
    -------
    (n, 3) float64
        Unit vectors in (x, y, z) order (a cone axis and its opposite are equivalent).
    """
    if n < 1:
        raise InputError(f"number of directions must be >= 1, got {n}")
    i = np.arange(n, dtype=np.float64)
    z = 1.0 - (i + 0.5) / n
    rho = np.sqrt(np.maximum(0.0, 1.0 - z * z))
    phi = i * math.pi * (3.0 - math.sqrt(5.0))
    return np.stack([rho * np.cos(phi), rho * np.sin(phi), z], axis=1)


def directional_fsc(half1, half2, directions, *, cone_half_angle_deg: float = 20.0, mask=None) -> DirectionalFSC:
    """FSC restricted to double cones of Fourier space around given directions (3DFSC style).

    Parameters
    ----------
    half1, half2 : (z, y, x) array, NumPy or CuPy
        Half maps.
    directions : (m, 3) array_like
        Cone axes in (x, y, z) order (normalised here).
    cone_half_angle_deg : float
        Half angle of each cone, degrees (3DFSC: 20; Xmipp FSO: 17).
    mask : array, optional
        Real-space mask applied to both halves first.

    Returns
    -------
    DirectionalFSC
        One :class:`FSCResult` per direction, shells as in :func:`fsc`.
    """
    d = np.asarray(directions, dtype=np.float64)
    if d.ndim == 1:
        d = d[None]
    if d.ndim != 2 or d.shape[1] != 3:
        raise InputError(f"directions must have shape (m, 3) in (x, y, z) order, got {d.shape}")
    norms = np.linalg.norm(d, axis=1)
    if np.any(norms == 0):
        raise InputError("a cone direction is the zero vector")
    if not 0 < cone_half_angle_deg <= 90:
        raise InputError(f"cone half angle must be in (0, 90] degrees, got {cone_half_angle_deg}")
    d = d / norms[:, None]
    h1, h2, m = _check_halves(half1, half2, mask)
    if m is not None:
        h1, h2 = h1 * m, h2 * m
    shape = h1.shape
    f1, f2 = _rfftn(h1), _rfftn(h2)
    cos_a = math.cos(math.radians(cone_half_angle_deg))
    curves = [_check_finite(_result_from_sums(_shell_sums(f1, f2, shape, tuple(v), cos_a), shape))
              for v in d]
    return DirectionalFSC(d, float(cone_half_angle_deg), curves)
