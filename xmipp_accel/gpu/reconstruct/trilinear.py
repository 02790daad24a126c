"""Trilinear insertion (RELION's backprojection) of particle transforms into the Fourier volume, NumPy.

The scatter twin of the gather insertion of :mod:`.insert`, with RELION's kernel instead of the blob:
each pixel ``p = (px, py)`` of the half plane of a padded transform (rfft layout, ``M`` the padded box)
lands at ``k = Aᵀ (px, py, 0)`` in the volume (``A`` the projection's rotation,
:mod:`xmipp_accel.em.geometry`) and is spread over the 8 voxels around it with weights
``(1 − |dx|)(1 − |dy|)(1 − |dz|)``:

    data(v)   += t(v − k) F(p)            weight(v) += t(v − k) W(p)

(``W`` the per-pixel weight, ``CTF²`` for Wiener). Points of negative ``kx`` are stored as their
Hermitian mate ``(−k, conj F)`` (the volume is the Hermitian half, ``kx >= 0``); the mates' share of
the ``kx = 0`` plane is then added back by folding that plane onto itself (``v ↔ −v``, conjugated),
so every point of the full plane ``{p} ∪ {−p}`` is inserted once. The half plane is ``px > 0``,
``px = 0, py > 0`` and the origin at half weight (it is its own mate). Pixels and voxels with
``|k|² <= kmax²`` and all components within ``K`` take part (:class:`.insert.FourierGrid`).

Implementation: per chunk of particles, the 8 corners of every point are scattered with
:func:`numpy.bincount` on flat indices of a local grid ``[0, o] × [−o, o]²`` (``o = ceil(kmax) + 1``,
no wrap-around or bounds tests per corner), which is added into the accumulators once per call
(``np.add.at`` is ~10x slower). The interpolation multiplies the real-space volume by the kernel's
transform, ``sinc²`` along each axis (:func:`trilinear_gridding_correction`).

Cost per particle: ``π kmax² / 2`` points (6 400 for a 64-pixel box at pad 2), 24 scattered values
each; the transform, phase ramp and CTF are computed at those pixels only (:func:`half_plane_values`).

References
----------
S. H. W. Scheres, "RELION", J. Struct. Biol. 180 (2012) 519, doi:10.1016/j.jsb.2012.09.006
(``BackProjector::backproject2Dto3D``: trilinear insertion, Hermitian half, sinc² gridding correction).
"""
from __future__ import annotations

import concurrent.futures
import functools
import math
from dataclasses import dataclass
from typing import Dict, Optional

import numpy as np

from ...threads import cpu_workers, fft_workers
from .insert import FourierGrid, insertion_entries

__all__ = ["HalfPlane", "TrilinearSums", "half_plane", "half_plane_values", "insert_trilinear_numpy",
           "insert_images_trilinear",
           "trilinear_gridding_correction", "INTERP_MODES"]

#: Interpolation kernels of the insertion: ``"blob"`` (Kaiser-Bessel gather, Xmipp), ``"trilinear"``
#: (scatter, RELION), ``"auto"`` (trilinear on the CPU, the blob on GPUs).
INTERP_MODES = ("auto", "blob", "trilinear")


@dataclass(frozen=True)
class HalfPlane:
    """The pixels of a padded rfft2 image that a trilinear insertion inserts.

    Attributes
    ----------
    flat : ndarray ``(P,)`` int64: flat indices into an ``(M, M//2+1)`` rfft2 image.
    px, py : ndarray ``(P,)`` float64: the pixels' frequencies (voxels of the padded grid).
    factor : ndarray ``(P,)`` float64: 1, and 0.5 at the origin (its own Hermitian mate).
    row, column : ndarray ``(P,)`` int64: the pixels' row (FFT order) and column in the rfft2 image.
    """

    flat: np.ndarray
    px: np.ndarray
    py: np.ndarray
    factor: np.ndarray
    row: np.ndarray
    column: np.ndarray


@functools.lru_cache(maxsize=8)
def half_plane(grid: FourierGrid) -> HalfPlane:
    """Half-plane pixels (``px > 0``, or ``px = 0`` and ``py >= 0``) within ``kmax`` and ``K``, row by row."""
    M, Mh, K = grid.padded_box, grid.half, grid.K
    py, px = np.meshgrid(np.arange(-K, K + 1), np.arange(0, K + 1), indexing="ij")
    py, px = py.ravel(), px.ravel()
    keep = (px * px + py * py <= grid.kmax2) & ((px > 0) | (py >= 0))
    py, px = py[keep], px[keep]
    row = np.where(py < 0, py + M, py).astype(np.int64)
    factor = np.where((px == 0) & (py == 0), 0.5, 1.0)
    return HalfPlane(row * Mh + px, px.astype(np.float64), py.astype(np.float64), factor, row, px.astype(np.int64))


@dataclass(frozen=True)
class _LocalGrid:
    """Scatter target ``(2o+1, 2o+1, o+1)`` (z, y, x) covering every corner, and where it goes in the volume."""

    o: int
    shape: tuple
    local_flat: np.ndarray   # inside voxels, flat in the local grid
    volume_flat: np.ndarray  # the same voxels, flat in the (M, M, M//2+1) half volume
    corners: np.ndarray      # (8,) flat offsets of the corners (dz, dy, dx) from the lower one


@functools.lru_cache(maxsize=8)
def _local_grid(grid: FourierGrid) -> _LocalGrid:
    M, Mh, K = grid.padded_box, grid.half, grid.K
    o = int(math.ceil(math.sqrt(grid.kmax2))) + 1
    sy, sx = 2 * o + 1, o + 1
    z, y, x = np.meshgrid(np.arange(-o, o + 1), np.arange(-o, o + 1), np.arange(0, o + 1), indexing="ij")
    z, y, x = z.ravel(), y.ravel(), x.ravel()
    inside = (x <= K) & (np.abs(y) <= K) & (np.abs(z) <= K) & (x * x + y * y + z * z <= grid.kmax2)
    local_flat = np.nonzero(inside)[0]
    zi, yi, xi = z[inside], y[inside], x[inside]
    volume_flat = ((zi % M) * M + (yi % M)) * Mh + xi
    corners = np.array([dz * sy * sx + dy * sx + dx for dz in (0, 1) for dy in (0, 1) for dx in (0, 1)],
                       dtype=np.int64)
    return _LocalGrid(o, (sy, sy, sx), local_flat, volume_flat.astype(np.int64), corners)


def _fold_kx0_plane(local: np.ndarray) -> None:
    """``local[:, :, 0] += conj(local[::-1, ::-1, 0])`` (in place; the mates' share of the ``kx = 0`` plane)."""
    plane = local[:, :, 0]
    mate = plane[::-1, ::-1].copy()
    plane += np.conj(mate) if np.iscomplexobj(local) else mate


class _Workspace:
    """Buffers of one chunk in flight, reused from chunk to chunk (fresh pages cost as much as the arithmetic)."""

    def __init__(self):
        self.arrays: dict = {}

    def get(self, name: str, shape: tuple, dtype=np.float64) -> np.ndarray:
        size = int(np.prod(shape))
        buf = self.arrays.get(name)
        if buf is None or buf.size < size or buf.dtype != dtype:
            buf = self.arrays[name] = np.empty(size, dtype=dtype)
        return buf[:size].reshape(shape)


def _scatter_terms(A: np.ndarray, v: np.ndarray, vw: Optional[np.ndarray], hp: HalfPlane, lg: _LocalGrid,
                   ws: Optional[_Workspace] = None):
    """Corner indices ``(8 E P,)`` int64 into the local grid and what each corner receives ``(3, 8 E P)``
    (trilinear weight times the real part, the imaginary part and the weight of its point) for entries with
    rotations ``A (E, 3, 3)`` and values ``v (E, P)``; the arrays live in ``ws`` (reused by the next call).

    Corner-major layout (all points of corner 0, then corner 1, ...): each pass of the scatter sweeps
    the planes in pixel order, which keeps its writes local.
    """
    ws = _Workspace() if ws is None else ws
    px, py, fac = hp.px, hp.py, hp.factor
    sy, _, sx = lg.shape
    E, P = v.shape
    n = E * P
    tmp = ws.get("tmp", (E, P))
    k = ws.get("k", (3, E, P))
    for j in range(3):   # k_j = px A[0, j] + py A[1, j]
        np.multiply(A[:, 0, j, None], px, out=k[j])
        np.multiply(A[:, 1, j, None], py, out=tmp)
        k[j] += tmp
    flip = ws.get("flip", (E, P))           # points of negative kx are stored as their mates (-k, conj F)
    np.copysign(1.0, k[0], out=flip)
    k *= flip
    terms = ws.get("terms", (3, E, P))
    np.multiply(v.real, fac, out=terms[0])
    np.multiply(flip, fac, out=tmp)
    np.multiply(v.imag, tmp, out=terms[1])
    if vw is None:
        terms[2] = fac
    else:
        np.multiply(vw, fac, out=terms[2])
    k0 = ws.get("k0", (3, E, P))
    np.floor(k, out=k0)
    f = ws.get("f", (3, n))                 # fractional parts, then 1 - f in g
    np.subtract(k.reshape(3, n), k0.reshape(3, n), out=f)
    g = ws.get("g", (3, n))
    np.subtract(1.0, f, out=g)
    base_f = k0[2]                           # flat index of the lower corner, in place
    base_f += lg.o
    base_f *= sy
    base_f += k0[1]
    base_f += lg.o
    base_f *= sx
    base_f += k0[0]
    base = ws.get("base", (n,), np.int64)
    base[:] = base_f.reshape(-1)
    zy = ws.get("zy", (4, n))
    np.multiply(g[2], g[1], out=zy[0])
    np.multiply(g[2], f[1], out=zy[1])
    np.multiply(f[2], g[1], out=zy[2])
    np.multiply(f[2], f[1], out=zy[3])
    idx = ws.get("idx", (8, n), np.int64)
    out = ws.get("out", (3, 8, n))
    t = tmp.reshape(-1)
    terms = terms.reshape(3, n)
    for c in range(8):                       # corner c = (dz, dy, dx) bits
        np.add(base, lg.corners[c], out=idx[c])
        np.multiply(zy[c >> 1], f[0] if c & 1 else g[0], out=t)
        for j in range(3):
            np.multiply(t, terms[j], out=out[j, c])
    return idx.reshape(-1), out.reshape(3, -1)


class TrilinearSums:
    """Float64 scatter sums of a trilinear insertion, kept across calls and added into the accumulators once.

    ``sums (3, size)``: real part, imaginary part and weight on the local grid of :func:`_local_grid`.
    :meth:`flush` folds the ``kx = 0`` plane, adds the voxels that take part into ``data``/``weight``
    (rfft layout ``(M, M, M//2+1)``) and clears the sums.
    """

    def __init__(self, grid: FourierGrid):
        self.grid = grid
        self.sums = np.zeros((3, int(np.prod(_local_grid(grid).shape))))
        self.empty = True
        self.spaces = (_Workspace(), _Workspace())   # one per chunk in flight

    def flush(self, data: np.ndarray, weight: np.ndarray) -> None:
        if self.empty:
            return
        lg = _local_grid(self.grid)
        local_d = (self.sums[0] + 1j * self.sums[1]).reshape(lg.shape)
        local_w = self.sums[2].reshape(lg.shape)
        _fold_kx0_plane(local_d)
        _fold_kx0_plane(local_w)
        d = data.reshape(-1)
        wt = weight.reshape(-1)
        d[lg.volume_flat] += local_d.reshape(-1)[lg.local_flat].astype(data.dtype)
        wt[lg.volume_flat] += local_w.reshape(-1)[lg.local_flat].astype(weight.dtype)
        self.sums[:] = 0.0
        self.empty = True
        self.spaces = (_Workspace(), _Workspace())   # their buffers are given back


def insert_trilinear_numpy(data: np.ndarray, weight: np.ndarray, values: np.ndarray,
                           value_weights: Optional[np.ndarray], matrices: np.ndarray, image_index: np.ndarray,
                           grid: FourierGrid, *, sums: Optional[TrilinearSums] = None, chunk_points: int = 1 << 17,
                           threads: Optional[int] = None) -> None:
    """Scatter half-plane values into ``data`` and ``weight`` in place (trilinear, see the module notes).

    Parameters
    ----------
    data : ndarray ``(M, M, M//2+1)`` complex64 (or complex128), updated in place.
    weight : ndarray ``(M, M, M//2+1)`` float32 (or float64), updated in place.
    values : ndarray ``(B, P)`` complex: each image's transform at the :func:`half_plane` pixels
        (:func:`half_plane_values`).
    value_weights : ndarray ``(B, P)`` real or None: per-pixel weights (``CTF²``); None means 1.
    matrices : ndarray ``(E, 3, 3)``: rotation of each entry (an image, or an image times a symmetry operator).
    image_index : ndarray ``(E,)`` int: the row of ``values`` each entry inserts.
    grid : FourierGrid
    sums : TrilinearSums or None
        Accumulate there and leave ``data``/``weight`` untouched until ``sums.flush(data, weight)``
        (the reconstructor's accumulators do so when read); None: flushed at the end of this call.
    chunk_points : int
        Points (entries x pixels) scattered at once: fewer, larger ``np.bincount`` calls cost less (each
        also clears and adds a grid of 1.2 M voxels at 64 px); two chunks in flight take ~900 bytes per point.
    threads : int or None
        With more than one (default: when the machine has several cores), the corners of the next chunk
        are computed in a helper thread while this one scatters (``np.bincount`` holds the interpreter
        lock, the array arithmetic does not).
    """
    matrices, image_index = insertion_entries(matrices, image_index)
    if matrices.shape[0] == 0:
        return
    hp = half_plane(grid)
    lg = _local_grid(grid)
    P = hp.flat.size
    if values.ndim != 2 or values.shape[-1] != P:
        raise ValueError(f"values must hold the {P} half-plane pixels of this grid, got shape {values.shape}")
    step = max(1, chunk_points // P)

    def corners(start: int, ws: _Workspace):
        rows = image_index[start:start + step]
        return _scatter_terms(matrices[start:start + step], values[rows],
                              None if value_weights is None else value_weights[rows], hp, lg, ws)

    _scatter_chunks(corners, range(0, matrices.shape[0], step), grid, data, weight, sums, threads)


def insert_images_trilinear(data: np.ndarray, weight: np.ndarray, images: np.ndarray, matrices: np.ndarray,
                            grid: FourierGrid, *, shifts_px=None, ctf: Optional[Dict] = None, pixel_size_A: float = 1.0,
                            mode: str = "none", operators: Optional[np.ndarray] = None,
                            sums: Optional[TrilinearSums] = None, chunk_points: int = 1 << 17,
                            threads: Optional[int] = None) -> None:
    """Transform and scatter particle images (:func:`half_plane_values` then :func:`insert_trilinear_numpy`),
    chunk by chunk: the helper thread transforms the next chunk's images and computes its corners while
    this one scatters, so both cores work.

    Parameters
    ----------
    images : ``(n, N, N)`` float32; matrices : ``(n, 3, 3)``; shifts_px, ctf, pixel_size_A, mode: as for
        :func:`half_plane_values`.
    operators : ``(k, 3, 3)`` or None: insert each image once per operator with rotation ``A g`` (symmetry
        expanded at insertion); None: once.
    data, weight, grid, sums, chunk_points, threads : as for :func:`insert_trilinear_numpy`.
    """
    n = int(images.shape[0])
    if n == 0:
        return
    matrices = np.asarray(matrices, dtype=np.float64).reshape(n, 3, 3)
    ops = None if operators is None else np.asarray(operators, dtype=np.float64).reshape(-1, 3, 3)
    k = 1 if ops is None else ops.shape[0]
    hp = half_plane(grid)
    lg = _local_grid(grid)
    step = max(1, chunk_points // (hp.flat.size * k))
    sh = None if shifts_px is None else np.asarray(shifts_px, dtype=np.float64).reshape(n, 2)
    cols = None if ctf is None else {key: np.broadcast_to(np.asarray(v), (n,)) for key, v in ctf.items()}

    def corners(start: int, ws: _Workspace):
        sl = slice(start, min(n, start + step))
        vals, w = half_plane_values(images[sl], grid, shifts_px=None if sh is None else sh[sl],
                                    ctf=None if cols is None else {key: v[sl] for key, v in cols.items()},
                                    pixel_size_A=pixel_size_A, mode=mode)
        A = matrices[sl]
        if ops is not None:
            A = np.einsum("nij,gjk->ngik", A, ops).reshape(-1, 3, 3)
            rows = np.repeat(np.arange(vals.shape[0]), k)
            vals = vals[rows]
            w = None if w is None else w[rows]
        return _scatter_terms(A, vals, w, hp, lg, ws)

    _scatter_chunks(corners, range(0, n, step), grid, data, weight, sums, threads)


def _scatter_chunks(corners, starts, grid: FourierGrid, data, weight, sums: Optional[TrilinearSums],
                    threads: Optional[int]) -> None:
    """Scatter the chunks ``corners(start, workspace)`` (:func:`_scatter_terms` output) into the sums with
    ``np.bincount``, the next chunk computed in a helper thread; flush into data/weight without ``sums``."""
    target = TrilinearSums(grid) if sums is None else sums
    acc = target.sums
    size = acc.shape[1]
    starts = list(starts)

    def scatter(idx: np.ndarray, weights: np.ndarray) -> None:
        for k in range(3):
            acc[k] += np.bincount(idx, weights=weights[k], minlength=size)

    if threads is None:
        threads = cpu_workers()
    spaces = target.spaces
    if threads > 1 and len(starts) > 1:
        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
            pending = pool.submit(corners, starts[0], spaces[0])
            for i in range(len(starts)):
                done = pending.result()
                if i + 1 < len(starts):
                    pending = pool.submit(corners, starts[i + 1], spaces[(i + 1) % 2])
                scatter(*done)
                del done
    else:
        for start in starts:
            scatter(*corners(start, spaces[0]))
    target.empty = False
    if sums is None:
        target.flush(data, weight)


def half_plane_values(images: np.ndarray, grid: FourierGrid, *, shifts_px=None, ctf: Optional[Dict] = None,
                      pixel_size_A: float = 1.0, mode: str = "none"):
    """Padded, centred, shifted, CTF-treated transforms of images at the :func:`half_plane` pixels (NumPy).

    The same values as :func:`.fourier.projection_transforms` at those pixels, but the phase ramp and the
    CTF are evaluated there only (the CTF as a polynomial phase, :func:`xmipp_accel.em.ctf.ctf_coefficients`).

    Parameters
    ----------
    images : ndarray ``(n, N, N)`` float32, centre ``N // 2``.
    grid : FourierGrid
    shifts_px : ``(n, 2)`` (x, y) pixels or None: the content moves by ``+shift``.
    ctf : dict of per-particle CTF parameters (``defocus_u_A``, ... see :class:`.fourier.ParticleBatch`) or None.
    pixel_size_A : float, Å.
    mode : ``"wiener"``, ``"wiener-premultiplied"``, ``"phase-flip"`` or ``"none"``
        (:func:`.fourier.effective_ctf_mode`).

    Returns
    -------
    (values ``(n, P)`` complex64, weights ``(n, P)`` float32 ``CTF²`` for Wiener modes, else None).
    """
    import scipy.fft  # noqa: PLC0415

    hp = half_plane(grid)
    M, Mh = grid.padded_box, grid.half
    n, N = int(images.shape[0]), int(images.shape[-1])
    # zero-padded rfft2 in two passes: the x transforms of the N image rows only, then y
    rows = scipy.fft.rfft(np.asarray(images, dtype=np.float32), n=M, axis=-1, workers=fft_workers())
    ft = scipy.fft.fft(rows, n=M, axis=-2, workers=fft_workers())
    vals = ft.reshape(n, -1)[:, hp.flat]
    # centre N//2 to the origin and the shift, as two separable phase ramps gathered at the pixels
    c = N // 2
    sh = np.zeros((n, 2)) if shifts_px is None else np.asarray(shifts_px, dtype=np.float64).reshape(n, 2)
    kx = np.arange(Mh, dtype=np.float64)
    ky = np.fft.fftfreq(M, 1.0 / M)
    phx = np.exp((-2j * np.pi / M) * (sh[:, 0:1] - c) * kx).astype(np.complex64)
    phy = np.exp((-2j * np.pi / M) * (sh[:, 1:2] - c) * ky).astype(np.complex64)
    vals *= np.take(phx, hp.column, axis=1)
    vals *= np.take(phy, hp.row, axis=1)
    if mode == "none" or ctf is None:
        return vals, None
    c_ = _ctf_at_pixels(ctf, n, hp, M, pixel_size_A)
    if mode == "wiener":
        vals *= c_
    elif mode == "phase-flip":
        vals *= np.where(c_ < 0, -1.0, 1.0).astype(np.float32)
        return vals, None
    elif mode != "wiener-premultiplied":
        raise ValueError(f"unknown CTF mode {mode!r}")
    return vals, c_ * c_


def _ctf_at_pixels(ctf: Dict, n: int, hp: HalfPlane, M: int, pixel_size_A: float) -> np.ndarray:
    """RELION's CTF ``(n, P)`` float32 at the half-plane pixels: ``-sin(chi)``, ``chi`` a polynomial in ``f``."""
    from ...em.ctf import ctf_coefficients  # noqa: PLC0415

    def col(key, default):
        return np.broadcast_to(np.asarray(ctf.get(key, default), dtype=np.float64), (n,))
    du = col("defocus_u_A", 0.0)
    coef = ctf_coefficients(du, col("defocus_v_A", du), col("defocus_angle_deg", 0.0),
                            voltage_kV=col("voltage_kV", 300.0), cs_mm=col("cs_mm", 2.7),
                            amplitude_contrast=col("amplitude_contrast", 0.1),
                            phase_shift_deg=col("phase_shift_deg", 0.0))
    fx = hp.px / (M * pixel_size_A)
    fy = hp.py / (M * pixel_size_A)
    u2 = fx * fx + fy * fy
    # chi = -(a u2 + b (fx² - fy²) + c 2 fx fy) + d u2² - e, as outer products (no BLAS threads for a (n, 5) x (5, P))
    chi = coef[:, 3:4] * (u2 * u2) - coef[:, 4:5]
    for j, b in enumerate((u2, fx * fx - fy * fy, 2.0 * fx * fy)):
        chi -= coef[:, j:j + 1] * b
    chi -= (2.0 * np.pi) * np.rint(chi * (0.5 / np.pi))   # reduced in double precision, single-precision sine
    return -np.sin(chi.astype(np.float32))


def trilinear_gridding_correction(box: int, padded_box: int, xp=np):
    """Real-space factor ``sinc²(x/M) sinc²(y/M) sinc²(z/M)`` of trilinear interpolation, ``(N, N, N)`` float32.

    ``x, y, z`` in voxels from the centre ``N // 2``; divide the volume by it (1 at the centre).
    """
    c = np.arange(box, dtype=np.float64) - box // 2
    s = np.sinc(c / padded_box) ** 2
    out = s[:, None, None] * s[None, :, None] * s[None, None, :]
    return xp.asarray(out.astype(np.float32))
