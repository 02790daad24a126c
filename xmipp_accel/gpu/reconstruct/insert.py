"""Gather insertion of projections into a Fourier volume, and its symmetrisation.

Two implementations of the same math, selected by the array module of ``data``:
a CUDA kernel (``insert.cu``, CuPy ``RawModule``) and a vectorised NumPy twin that
is both the CPU path and the oracle of the GPU tests.

The volume is the Hermitian half (rfft layout) of the padded volume's transform:
``data (M, M, M//2+1) complex64`` and ``weight (M, M, M//2+1) float32``, indexed
``[kz, ky, kx]`` with ``kz, ky`` in FFT order. Projection transforms are the rfft2 of
the padded, centred projections, ``(B, M, M//2+1) complex64`` indexed ``[ky, kx]``.
A voxel ``k = (kx, ky, kz)`` lies at ``q = A k`` in the frame of a projection of
rotation ``A`` (:mod:`xmipp_accel.em.geometry`): ``q_z`` is its distance to the
central plane and ``(q_x, q_y)`` its place in the 2-D transform. Each voxel within
the blob radius ``a`` of a plane gathers

    data(k)   += sum_p b(|q - (p, 0)|) F(p)
    weight(k) += sum_p b(|q - (p, 0)|) W(p)

over the pixels ``p`` within the blob, with ``F(-p) = conj F(p)`` for pixels of
negative x, ``W`` the per-pixel weight (``CTF²`` for Wiener, else 1) and ``b`` the
Kaiser-Bessel blob (:mod:`.blob`). Only voxels and pixels with ``|k|² <= kmax²`` and
every component within ``K = min(floor(kmax), M/2 - 1)`` take part (the ambiguous
Nyquist row ``-M/2`` is left out).

References
----------
D. Střelák, C. O. S. Sorzano, J. M. Carazo, J. Filipovič, "A GPU acceleration of 3-D
Fourier reconstruction in cryo-EM", IJHPCA 33 (2019) 948, doi:10.1177/1094342019832958.
S. H. W. Scheres, "RELION", J. Struct. Biol. 180 (2012) 519 (symmetrising the
accumulated data and weights), doi:10.1016/j.jsb.2012.09.006.

The module is a little longer than 600 lines: the NumPy twin and the CUDA kernel's driver are one idea,
kept side by side so that the twin stays the kernel's oracle.
"""
from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np

from ... import backend
from ...threads import cpu_workers, map_in_order
from .blob import DEFAULT_TABLE_SIZE, KaiserBesselBlob

__all__ = ["FourierGrid", "INSERT_TUNING_SPACE", "DEFAULT_INSERT_TUNING", "BLOB_MODES", "PACK_MODES", "dominant_axis",
           "insert_gather", "insert_gather_numpy", "insert_gather_gpu", "insert_packed_gpu", "pack_projections_gpu",
           "pack_projections_numpy", "packed_width", "insertion_count", "insertion_entries"]

#: ``"table"``: blob values interpolated linearly from a 10 000-entry table indexed by squared
#: distance; ``"onthefly"``: the Bessel function evaluated for each pixel.
BLOB_MODES = ("table", "onthefly")

#: Parameters of the insertion kernel the autotuner may vary (all give the same result up to
#: float32 rounding). ``block_x``/``block_y``: threads per block over the face of the volume
#: (x is the fast memory axis); ``tile``: entries staged in shared memory per pass;
#: ``table_memory``: where the blob table is read from in ``"table"`` mode; ``lanes_per_voxel``: 1 runs
#: ``insert_gather`` (one thread sums a voxel's pixels), 4/8/16 run ``insert_gather_coop`` (that many lanes
#: of a warp share a voxel's pixels; the block must hold whole warps). Measured on an H100 at 256² (M = 512):
#: 4 lanes with 32 x 4 blocks is the fastest (docs/reconstruction.md).
INSERT_TUNING_SPACE = {
    "block_x": [8, 16, 32, 64, 128],
    "block_y": [1, 2, 4, 8, 16],
    "tile": [8, 16, 32, 64],
    "table_memory": ["shared", "global"],
    "lanes_per_voxel": [1, 4, 8, 16],
    "unroll": [0, 1],
}
DEFAULT_INSERT_TUNING = {"block_x": 32, "block_y": 4, "tile": 32, "table_memory": "global", "lanes_per_voxel": 4,
                         "unroll": 1}

#: Candidate-square sides (``floor(2 radius) + 1``) with an unrolled instance of the cooperative kernel.
UNROLLED_SIDES = (3, 4, 5)

_CU_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "insert.cu")


@dataclass(frozen=True)
class FourierGrid:
    """The padded Fourier grid and the frequencies that take part in a reconstruction.

    Attributes
    ----------
    padded_box : int
        ``M``, the padded box (voxels); even.
    kmax : float
        Largest frequency inserted, in voxels of the padded grid (``<= M / 2``).
    """

    padded_box: int
    kmax: float

    def __post_init__(self):
        if self.padded_box < 4 or self.padded_box % 2:
            raise ValueError(f"padded box must be even and >= 4, got {self.padded_box}")
        if not 0 < self.kmax <= self.padded_box / 2:
            raise ValueError(f"kmax must be in (0, {self.padded_box / 2}], got {self.kmax}")

    @property
    def half(self) -> int:
        """``M // 2 + 1``: length of the rfft (x) axis."""
        return self.padded_box // 2 + 1

    @property
    def shape(self) -> tuple:
        """Shape ``(M, M, M//2+1)`` of the half-volume accumulators."""
        return (self.padded_box, self.padded_box, self.half)

    @property
    def K(self) -> int:
        """Largest |component| of a voxel or pixel taking part."""
        return int(min(math.floor(self.kmax), self.padded_box // 2 - 1))

    @property
    def kmax2(self) -> int:
        """``floor(kmax²)``: integer bound on ``|k|²`` (exact for integer frequencies)."""
        return int(math.floor(self.kmax * self.kmax + 1e-9))


def dominant_axis(matrices) -> np.ndarray:
    """Axis (0: x, 1: y, 2: z) along which each projection's plane normal is largest.

    Parameters
    ----------
    matrices : array ``(n, 3, 3)``; the normal is the third row.

    Returns
    -------
    ndarray ``(n,)`` int64 (ties go to the lower axis).
    """
    m = backend.to_host(matrices)
    return np.argmax(np.abs(m[:, 2, :]), axis=1)


def insertion_count(grid: FourierGrid, blob: KaiserBesselBlob) -> dict:
    """Expected work of inserting one projection: voxels in the slab and pixel contributions.

    Returns a dict with ``voxels`` (half-volume voxels within the blob radius of a plane and
    within ``kmax``: ``pi kmax² a``) and ``contributions`` (pixel-voxel pairs inside the blob:
    voxels times the mean disc area ``2/3 pi a²``), used for the FLOP/byte floor.
    """
    a = blob.radius
    voxels = math.pi * grid.kmax ** 2 * a  # half of the slab pi kmax^2 * 2a
    return {"voxels": voxels, "contributions": voxels * (2.0 / 3.0) * math.pi * a * a}


# ---------------------------------------------------------------------------------------------- NumPy twin

def _face(grid: FourierGrid, axis: int):
    """Face coordinates ``(u, v)`` (columns) inside the sphere and each column's range ``[c_lo, c_hi]``."""
    K = grid.K
    u = np.arange(-K if axis == 0 else 0, K + 1)
    v = np.arange(-K, K + 1)
    uu, vv = np.meshgrid(u, v, indexing="xy")
    uu, vv = uu.ravel(), vv.ravel()
    rem = grid.kmax2 - uu * uu - vv * vv
    keep = rem >= 0
    uu, vv, rem = uu[keep], vv[keep], rem[keep]
    cs = np.floor(np.sqrt(rem.astype(np.float64))).astype(np.int64)
    cs += (cs + 1) ** 2 <= rem
    cs -= cs * cs > rem
    cs = np.minimum(cs, K)
    c_lo = np.zeros_like(cs) if axis == 0 else -cs
    return uu, vv, c_lo, cs


def _axis_components(axis: int):
    """Indices (c, u, v) of the vector components for a column axis."""
    return {2: (2, 0, 1), 1: (1, 0, 2), 0: (0, 1, 2)}[axis]


def _blob_lookup(blob: KaiserBesselBlob, blob_mode: str, table_size: int):
    """A function of squared distances (float64 array, all <= radius²) giving blob values (float64)."""
    if blob_mode == "onthefly":
        return blob.value_squared
    tab = blob.table(table_size).astype(np.float64)
    step = np.append(np.diff(tab), 0.0)
    scale = blob.table_scale(table_size)
    last = table_size - 1

    def lookup(d2: np.ndarray) -> np.ndarray:
        t = d2 * scale
        i = np.minimum(t.astype(np.int64), last)
        return tab[i] + (t - i) * step[i]
    return lookup



def insertion_entries(matrices, image_index) -> tuple:
    """``(n, 3, 3)`` float64 rotations and ``(n,)`` int64 image indices of the entries to insert, checked."""
    matrices = np.asarray(matrices, dtype=np.float64).reshape(-1, 3, 3)
    image_index = np.asarray(image_index, dtype=np.int64).reshape(-1)
    if matrices.shape[0] != image_index.shape[0]:
        raise ValueError(f"{matrices.shape[0]} matrices but {image_index.shape[0]} image indices")
    return matrices, image_index

def insert_gather_numpy(data: np.ndarray, weight: np.ndarray, proj: np.ndarray, proj_weight: Optional[np.ndarray],
                        matrices: np.ndarray, image_index: np.ndarray, grid: FourierGrid,
                        blob: KaiserBesselBlob = KaiserBesselBlob(), *, blob_mode: str = "table",
                        table_size: int = DEFAULT_TABLE_SIZE, chunk_elements: int = 1 << 17,
                        threads: Optional[int] = None) -> None:
    """NumPy twin of the gather kernel: accumulate projections into ``data`` and ``weight`` in place.

    Parameters
    ----------
    data : ndarray ``(M, M, M//2+1)`` complex64 (or complex128), updated in place.
    weight : ndarray ``(M, M, M//2+1)`` float32 (or float64), updated in place.
    proj : ndarray ``(B, M, M//2+1)`` complex: rfft2 of the padded projections (CTF-multiplied
        for Wiener, sign-flipped for phase flipping).
    proj_weight : ndarray ``(B, M, M//2+1)`` real or None: per-pixel weights (``CTF²``); None means 1.
    matrices : ndarray ``(E, 3, 3)``: rotation of each entry (an image times a symmetry operator).
    image_index : ndarray ``(E,)`` int: image of ``proj`` each entry inserts.
    grid : FourierGrid
    blob : KaiserBesselBlob
    blob_mode : {"table", "onthefly"}
    table_size : int
        Entries of the blob table (``"table"`` mode).
    chunk_elements : int
        Bound on the column candidates handled at once (memory use and cache locality).
    threads : int or None
        Chunks gathered at once (default :func:`~xmipp_accel.threads.cpu_workers`); their sums are added
        in the chunks' order: the same result whatever the count.

    Notes
    -----
    The sums are done in float64 and added to the accumulators once per call; the voxels visited and the
    pixels gathered are the kernel's (``insert.cu``). The chunks run on the threads; the caller's thread adds
    each chunk's sums over its distinct voxels (the same bits as adding a bincount over the whole volume).
    """
    if blob_mode not in BLOB_MODES:
        raise ValueError(f"blob_mode must be one of {BLOB_MODES}, got {blob_mode!r}")
    matrices, image_index = insertion_entries(matrices, image_index)
    if matrices.shape[0] == 0:
        return
    src = _GatherSource(grid, blob, _blob_lookup(blob, blob_mode, table_size), matrices, image_index,
                        np.ascontiguousarray(proj.real, dtype=np.float64).reshape(-1),
                        np.ascontiguousarray(proj.imag, dtype=np.float64).reshape(-1),
                        None if proj_weight is None else np.asarray(proj_weight, dtype=np.float64).reshape(-1))
    acc = np.zeros((3, data.size))                     # real part, imaginary part, weight
    workers = cpu_workers() if threads is None else max(1, int(threads))
    for sums in map_in_order(src.gather, _gather_chunks(grid, blob, matrices, chunk_elements), workers):
        if sums is not None:
            acc[:, sums[0]] += sums[1]
    data += (acc[0] + 1j * acc[1]).reshape(data.shape).astype(data.dtype)
    weight += acc[2].reshape(weight.shape).astype(weight.dtype)


def _gather_chunks(grid: FourierGrid, blob: KaiserBesselBlob, matrices: np.ndarray, chunk_elements: int) -> list:
    """The chunks of :func:`insert_gather_numpy`, in order: ``(axis, face, entries)`` with the entries whose
    plane normal is largest along ``axis`` (a few at a time) and that axis's face (:func:`_face`)."""
    n_c = _slab_column_voxels(blob.radius)
    axes = dominant_axis(matrices)
    chunks = []
    for axis in range(3):
        sel = np.nonzero(axes == axis)[0]
        if sel.size == 0:
            continue
        face = _face(grid, axis)
        step = max(1, chunk_elements // max(1, face[0].size * n_c))
        chunks += [(axis, face, sel[start:start + step]) for start in range(0, sel.size, step)]
    return chunks


def _slab_column_voxels(radius: float) -> int:
    """Voxels a column can have inside the slab of half-width ``radius`` (voxels) around a plane."""
    return int(math.ceil(2 * radius * math.sqrt(3.0))) + 2


@dataclass(frozen=True)
class _GatherSource:
    """What every chunk of :func:`insert_gather_numpy` reads (shared, read-only, by the threads)."""

    grid: FourierGrid
    blob: KaiserBesselBlob
    blob_at: object
    matrices: np.ndarray
    image_index: np.ndarray
    proj_re: np.ndarray
    proj_im: np.ndarray
    pw_flat: Optional[np.ndarray]

    def gather(self, chunk) -> Optional[tuple]:
        """Voxel sums of a chunk ``(axis, face, entries)``: its distinct voxels (flat indices into the half
        volume) and their gathered real part, imaginary part and weight ``(vox, (3, V) sums)``; None if empty."""
        axis, (uu, vv, c_lo, c_hi), ent = chunk
        grid = self.grid
        M, Mh = grid.padded_box, grid.half
        K, kmax2 = grid.K, grid.kmax2
        r, r2 = self.blob.radius, self.blob.radius * self.blob.radius
        n_c = _slab_column_voxels(r)
        n_p = int(math.floor(2 * r)) + 1                     # pixels per axis a blob can cover
        offsets = np.arange(n_p)
        ic, iu, iv = _axis_components(axis)
        A = self.matrices[ent]
        n = A[:, 2, :]
        t = n[:, iu, None] * uu[None, :] + n[:, iv, None] * vv[None, :]
        inv = 1.0 / n[:, ic, None]
        a = (-r - t) * inv
        b = (r - t) * inv
        c0 = np.maximum(np.ceil(np.minimum(a, b)).astype(np.int64), c_lo[None, :])
        c1 = np.minimum(np.floor(np.maximum(a, b)).astype(np.int64), c_hi[None, :])
        # voxels of each (entry, column) inside the slab
        cand = c0[:, :, None] + np.arange(n_c)[None, None, :]
        e_i, f_i, j_i = np.nonzero(cand <= c1[:, :, None])
        if e_i.size == 0:
            return None
        k = np.empty((e_i.size, 3), dtype=np.int64)
        k[:, ic] = cand[e_i, f_i, j_i]
        k[:, iu] = uu[f_i]
        k[:, iv] = vv[f_i]
        q = np.einsum("nij,nj->ni", A[e_i], k.astype(np.float64))
        qz2 = q[:, 2] ** 2
        inslab = qz2 <= r2
        e_i, k, q, qz2 = e_i[inslab], k[inslab], q[inslab], qz2[inslab]
        # candidate pixels: an n_p x n_p square from (x0, y0) around (qx, qy), separable distances
        x0 = np.ceil(q[:, 0] - r).astype(np.int64)
        y0 = np.ceil(q[:, 1] - r).astype(np.int64)
        px = x0[:, None] + offsets[None, :]
        py = y0[:, None] + offsets[None, :]
        dx2 = (px - q[:, 0, None]) ** 2
        dy2 = (py - q[:, 1, None]) ** 2 + qz2[:, None]
        d2 = dy2[:, :, None] + dx2[:, None, :]
        valid = d2 <= r2
        # pixels beyond kmax or K: tested only in the squares that reach past them (near the rim)
        mx = np.maximum(np.abs(x0), np.abs(x0 + n_p - 1))           # largest |px|, |py| of each square
        my = np.maximum(np.abs(y0), np.abs(y0 + n_p - 1))
        rim = np.nonzero((mx * mx + my * my > kmax2) | (mx > K) | (my > K))[0]
        if rim.size:
            bx, by = px[rim], py[rim]
            valid[rim] &= (((by * by)[:, :, None] + (bx * bx)[:, None, :] <= kmax2)
                           & (np.abs(by) <= K)[:, :, None] & (np.abs(bx) <= K)[:, None, :])
        flat = np.flatnonzero(valid)
        vi, rest = np.divmod(flat, n_p * n_p)
        yi, xi = np.divmod(rest, n_p)
        w = self.blob_at(d2.reshape(-1)[flat])
        pxv = x0[vi] + xi
        pyv = y0[vi] + yi
        neg = pxv < 0
        ay = np.where(neg, -pyv, pyv)
        pix = (self.image_index[ent[e_i]] * (M * Mh))[vi] + np.where(ay < 0, ay + M, ay) * Mh + np.abs(pxv)
        # sum over each voxel's pixels first, then over the chunk's visits of each voxel (in their order, as a
        # bincount over the whole volume would); the caller adds those into the volume
        nv = e_i.size
        vox = ((np.where(k[:, 2] < 0, k[:, 2] + M, k[:, 2]) * M
                + np.where(k[:, 1] < 0, k[:, 1] + M, k[:, 1])) * Mh + k[:, 0])
        vox, visit = np.unique(vox, return_inverse=True)
        return vox, np.stack([np.bincount(visit, weights=np.bincount(vi, weights=values, minlength=nv),
                                          minlength=vox.size)
                              for values in (w * self.proj_re[pix], np.where(neg, -w, w) * self.proj_im[pix],
                                             w if self.pw_flat is None else w * self.pw_flat[pix])])


# ---------------------------------------------------------------------------------------------- CUDA

def _read_source() -> str:
    with open(_CU_FILE) as fh:
        return fh.read()


def _insert_name(tile: int, blob_mode: int, order: int, lanes_per_voxel: int = 1, side: int = 0) -> str:
    """Template instance of the insertion kernel; ``side`` > 0 picks the cooperative kernel unrolled for a
    candidate square of that side (0: run-time loop)."""
    if int(lanes_per_voxel) <= 1:
        return f"insert_gather<{int(tile)}, {int(blob_mode)}, {int(order)}>"
    return (f"insert_gather_coop<{int(tile)}, {int(blob_mode)}, {int(order)}, {int(lanes_per_voxel)}, "
            f"{int(side)}>")


def candidate_side(blob: KaiserBesselBlob) -> int:
    """Side of the square of pixels that can lie within a blob centred anywhere: ``floor(2 radius) + 1``."""
    return int(math.floor(2.0 * float(blob.radius))) + 1


@functools.lru_cache(maxsize=None)
def _module(device_id: int, names: tuple):
    """Compiled module for one device and one set of template instances (CuPy caches the binary on disk)."""
    return backend.get_raw_module(_read_source(), name_expressions=list(names) or None, options=("-std=c++14",))


def _kernel(name: str):
    """A kernel of ``insert.cu``: template instances by their name expression, others by their C name."""
    cp = backend.cupy_module()
    dev = cp.cuda.Device().id
    names = (name,) if "<" in name else ()
    return _module(dev, names).get_function(name)


@functools.lru_cache(maxsize=None)
def _device_tables(device_id: int, blob: KaiserBesselBlob, size: int):
    """The blob table on a device: values ``(n,)`` and (value, slope-to-next) pairs ``(n, 2)``, float32."""
    cp = backend.cupy_module()
    tab = blob.table(size)
    pairs = np.stack([tab, np.append(np.diff(tab), np.float32(0.0))], axis=1).astype(np.float32)
    return cp.asarray(tab), cp.asarray(pairs)


def _tuning(tuning: Optional[dict]) -> dict:
    out = dict(DEFAULT_INSERT_TUNING)
    if tuning:
        unknown = set(tuning) - set(out)
        if unknown:
            raise ValueError(f"unknown insertion tuning parameter(s) {sorted(unknown)}; "
                             f"known: {sorted(out)}")
        out.update(tuning)
    return out


#: Modes of :func:`pack_projections_gpu`: what multiplies the data and what the weight channel holds.
PACK_MODES = {"none": 0, "wiener": 1, "wiener-premultiplied": 2, "phase-flip": 3, "weights": 4}


def packed_pad(blob: KaiserBesselBlob) -> int:
    """Pixels beyond ``K`` a blob centred inside the sphere can reach: ``ceil(radius) + 1``."""
    return int(math.ceil(blob.radius)) + 1


def packed_width(grid: FourierGrid, blob: KaiserBesselBlob) -> int:
    """Side ``W = 2 (K + pad) + 1`` of a packed projection."""
    return 2 * (grid.K + packed_pad(blob)) + 1


def pack_projections_numpy(proj: np.ndarray, proj_weight: Optional[np.ndarray], grid: FourierGrid,
                           blob: KaiserBesselBlob = KaiserBesselBlob()) -> np.ndarray:
    """Packed projections ``(B, W, W, 4)`` float32 from rfft-layout transforms (the oracle of the GPU packer).

    Element ``[b, py + Kp, px + Kp]`` holds (re, im, weight, 0) of pixel ``(px, py)``: the transform for
    ``px >= 0``, its Hermitian mate ``conj F(-p)`` for ``px < 0``, the weight (1 when ``proj_weight`` is
    None), and zeros for pixels that do not take part (``|p|² > kmax²`` or a component beyond ``K``).
    """
    B, M, Mh = proj.shape
    Kp = grid.K + packed_pad(blob)
    c = np.arange(-Kp, Kp + 1)
    py, px = np.meshgrid(c, c, indexing="ij")
    valid = (px * px + py * py <= grid.kmax2) & (np.abs(px) <= grid.K) & (np.abs(py) <= grid.K)
    neg = px < 0
    ax = np.where(neg, -px, px)
    ay = np.where(neg, -py, py) % M
    ax = np.where(valid, ax, 0)
    ay = np.where(valid, ay, 0)
    f = proj[:, ay, ax]
    f = np.where(neg[None], np.conj(f), f)
    w = np.ones(f.shape, np.float32) if proj_weight is None else proj_weight[:, ay, ax]
    out = np.zeros((B,) + px.shape + (4,), np.float32)
    out[..., 0] = np.where(valid[None], f.real, 0)
    out[..., 1] = np.where(valid[None], f.imag, 0)
    out[..., 2] = np.where(valid[None], w, 0)
    return out


def pack_projections_gpu(ft, aux, shifts_centre_px, grid: FourierGrid, blob: KaiserBesselBlob = KaiserBesselBlob(),
                         mode: str = "none", *, ctf_coefficients=None, pixel_size_A: float = 1.0):
    """Pack rfft transforms for the insertion kernel, applying the shift phase and the CTF treatment.

    Parameters
    ----------
    ft : cupy ``(B, M, M//2+1)`` complex64: rfft2 of the padded images.
    aux : cupy ``(B, M, M//2+1)`` float32 or None: the CTF (modes wiener, wiener-premultiplied,
        phase-flip) or explicit weights (mode weights).
    shifts_centre_px : array ``(B, 2)`` float64 or None: ``(x, y)`` content shifts minus the image
        centre, in pixels; the pixel ``p`` is multiplied by ``exp(-2 pi i p . s / M)``.
    grid, blob : the reconstruction grid and blob (they fix ``W``).
    mode : one of :data:`PACK_MODES`.
    ctf_coefficients : array ``(B, 5)`` float64 or None: per-image coefficients of the CTF phase
        (:func:`xmipp_accel.em.ctf.ctf_coefficients`); when given, the CTF of the wiener and phase-flip
        modes is evaluated by the kernel at each packed pixel and ``aux`` is not needed.
    pixel_size_A : pixel size of the (unpadded) images, Å: frequencies are ``p / (M pixel_size_A)``.

    Returns
    -------
    cupy ``(B, W, W, 4)`` float32 (see :func:`pack_projections_numpy`).
    """
    cp = backend.cupy_module()
    if mode not in PACK_MODES:
        raise ValueError(f"pack mode must be one of {sorted(PACK_MODES)}, got {mode!r}")
    B, M, Mh = ft.shape
    if ft.dtype != cp.complex64 or not ft.flags.c_contiguous:
        ft = cp.ascontiguousarray(ft, dtype=cp.complex64)
    code = PACK_MODES[mode]
    coef = None
    if ctf_coefficients is not None and code in (1, 2, 3):
        coef = cp.ascontiguousarray(cp.asarray(ctf_coefficients, dtype=cp.float64))
        if coef.shape != (B, 5):
            raise ValueError(f"ctf_coefficients must be ({B}, 5), got {coef.shape}")
    needs_aux = code != 0 and coef is None
    if needs_aux:
        if aux is None:
            raise ValueError(f"pack mode {mode!r} needs the CTF (image or coefficients) or weights")
        aux = cp.ascontiguousarray(aux, dtype=cp.float32)
    Kp = grid.K + packed_pad(blob)
    W = 2 * Kp + 1
    out = cp.empty((B, W, W, 4), dtype=cp.float32)
    sh = None if shifts_centre_px is None else cp.ascontiguousarray(cp.asarray(shifts_centre_px, dtype=cp.float64))
    total = B * W * W
    block = 256
    _kernel("pack_projections")(((total + block - 1) // block,), (block,),
                                (ft, aux if needs_aux else np.uint64(0), sh if sh is not None else np.uint64(0), out,
                                 np.int32(B), np.int32(M), np.int32(Mh), np.int32(grid.K), np.int32(grid.kmax2),
                                 np.int32(Kp), np.int32(code), coef if coef is not None else np.uint64(0),
                                 np.float64(1.0 / (M * float(pixel_size_A)))))
    return out


def _sorted_entries(matrices, image_index):
    m_host = np.asarray(backend.to_host(matrices), dtype=np.float64).reshape(-1, 3, 3)
    idx_host = np.asarray(backend.to_host(image_index), dtype=np.int64).reshape(-1)
    if m_host.shape[0] != idx_host.shape[0]:
        raise ValueError(f"{m_host.shape[0]} matrices but {idx_host.shape[0]} image indices")
    axes = dominant_axis(m_host)
    order = np.argsort(axes, kind="stable")
    return (np.ascontiguousarray(m_host[order].reshape(-1, 9), dtype=np.float32),
            np.ascontiguousarray(idx_host[order], dtype=np.int32), np.bincount(axes, minlength=3))


def insert_packed_gpu(data, weight, packed, matrices, image_index, grid: FourierGrid,
                      blob: KaiserBesselBlob = KaiserBesselBlob(), *, blob_mode: str = "table",
                      table_size: int = DEFAULT_TABLE_SIZE, tuning: Optional[dict] = None) -> None:
    """Gather-insert packed projections (:func:`pack_projections_gpu`) into ``data``/``weight`` in place.

    ``data`` (complex64) and ``weight`` (float32) are CuPy arrays of shape ``(M, M, M//2+1)`` or stacks of
    ``R`` replicas ``(R, M, M, M//2+1)``: the entries are then split into ``R`` shares inserted in
    parallel, one per replica (their sum is the result), which fills the GPU for small boxes without
    atomics. ``matrices (E, 3, 3)``/``image_index (E,)`` are host arrays. One kernel launch per dominant
    axis, on the current stream. ``tuning`` overrides :data:`DEFAULT_INSERT_TUNING`.
    """
    cp = backend.cupy_module()
    if blob_mode not in BLOB_MODES:
        raise ValueError(f"blob_mode must be one of {BLOB_MODES}, got {blob_mode!r}")
    if blob_mode == "onthefly" and blob.order > 2:
        raise ValueError(f"on-the-fly blob evaluation supports orders 0-2, got {blob.order}: use the table")
    tun = _tuning(tuning)
    for name, arr, dt in (("data", data, cp.complex64), ("weight", weight, cp.float32)):
        if arr.dtype != dt or not arr.flags.c_contiguous:
            raise ValueError(f"{name} must be a C-contiguous {np.dtype(dt).name} CuPy array, got {arr.dtype}")
    replicas = int(data.shape[0]) if data.ndim == 4 else 1
    if tuple(data.shape[-3:]) != grid.shape or weight.shape != data.shape:
        raise ValueError(f"data and weight must have shape {grid.shape} or (R,) + that, got {data.shape}, "
                         f"{weight.shape}")
    W = packed_width(grid, blob)
    if packed.ndim != 4 or packed.shape[1:] != (W, W, 4) or packed.dtype != cp.float32:
        raise ValueError(f"packed projections must be (B, {W}, {W}, 4) float32, got {packed.shape} {packed.dtype}")
    mats, idx, counts = _sorted_entries(matrices, image_index)
    if mats.shape[0] == 0:
        return
    if idx.min() < 0 or idx.max() >= packed.shape[0]:
        raise ValueError(f"image indices must lie in [0, {packed.shape[0]}), got {idx.min()}..{idx.max()}")
    m_dev = cp.asarray(mats)
    i_dev = cp.asarray(idx)
    mode = 0 if blob_mode == "onthefly" else (2 if tun["table_memory"] == "shared" else 1)
    lpv = int(tun["lanes_per_voxel"])
    if lpv not in (1, 2, 4, 8, 16, 32):
        raise ValueError(f"lanes_per_voxel must be 1 or a power of two up to 32, got {lpv}")
    if lpv > 1 and (int(tun["block_x"]) * int(tun["block_y"])) % 32:
        raise ValueError("the cooperative insertion kernel needs whole warps: block_x * block_y % 32 == 0")
    side = candidate_side(blob)
    unrolled = side if (int(tun["unroll"]) and lpv > 1 and side in UNROLLED_SIDES) else 0
    kern = _kernel(_insert_name(tun["tile"], mode, blob.order if mode == 0 else 0, lpv, unrolled))
    table, table2 = _device_tables(cp.cuda.Device().id, blob, int(table_size))
    shared = int(table_size) * 4 if mode == 2 else 0
    if shared > 48 * 1024:
        kern.max_dynamic_shared_size_bytes = shared
    K, M, Mh = grid.K, grid.padded_box, grid.half
    Kp = K + packed_pad(blob)
    bx, by = int(tun["block_x"]), int(tun["block_y"])
    r = float(blob.radius)
    start = 0
    for axis in range(3):
        n = int(counts[axis])
        if n == 0:
            continue
        nu = (2 * K + 1) if axis == 0 else (K + 1)
        nv = 2 * K + 1
        grid_dims = ((nu + bx - 1) // bx, (nv + by - 1) // by, min(replicas, n))
        kern(grid_dims, (bx, by, 1),
             (data, weight, packed, m_dev[start:], i_dev[start:], np.int32(n), np.int32(axis),
              np.int64(int(np.prod(grid.shape))), np.int32(K), np.int32(grid.kmax2), np.int32(M), np.int32(Mh),
              np.int32(Kp), np.float32(r), np.float32(r * r), np.float32(blob.alpha), np.float32(1.0 / blob.norm),
              table, table2, np.int32(table_size), np.float32(blob.table_scale(table_size))),
             shared_mem=shared)
        start += n


def insert_gather_gpu(data, weight, proj, proj_weight, matrices, image_index, grid: FourierGrid,
                      blob: KaiserBesselBlob = KaiserBesselBlob(), *, blob_mode: str = "table",
                      table_size: int = DEFAULT_TABLE_SIZE, tuning: Optional[dict] = None) -> None:
    """CUDA gather insertion (``insert.cu``); same arguments and result as :func:`insert_gather_numpy`.

    ``proj`` (complex64) and ``proj_weight`` (float32 or None) are CuPy arrays in rfft layout; they are
    packed (:func:`pack_projections_gpu`) and inserted (:func:`insert_packed_gpu`, which also takes
    replica stacks for ``data``/``weight``).
    """
    packed = pack_projections_gpu(proj, proj_weight, None, grid, blob,
                                  "weights" if proj_weight is not None else "none")
    insert_packed_gpu(data, weight, packed, matrices, image_index, grid, blob, blob_mode=blob_mode,
                      table_size=table_size, tuning=tuning)


# ---------------------------------------------------------------------------------------------- dispatch

def insert_gather(data, weight, proj, proj_weight, matrices, image_index, grid: FourierGrid,
                  blob: KaiserBesselBlob = KaiserBesselBlob(), *, blob_mode: str = "table",
                  table_size: int = DEFAULT_TABLE_SIZE, tuning: Optional[dict] = None) -> None:
    """Gather-insert projections into ``data``/``weight`` in place, on the arrays' device.

    See :func:`insert_gather_numpy` for the arguments; CuPy arrays run the CUDA kernel.
    """
    if backend.get_xp(data) is np:
        insert_gather_numpy(data, weight, proj, proj_weight, matrices, image_index, grid, blob,
                            blob_mode=blob_mode, table_size=table_size)
    else:
        insert_gather_gpu(data, weight, proj, proj_weight, matrices, image_index, grid, blob,
                          blob_mode=blob_mode, table_size=table_size, tuning=tuning)
