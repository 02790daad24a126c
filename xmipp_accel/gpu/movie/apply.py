"""Applying the motion: Fourier shifts, local (B-spline) correction by interpolation, sums and PSD.

* Global shifts are applied in Fourier space (:func:`shift_spectra`): exact for any sub-pixel shift.
* Local shifts (the B-spline field of :mod:`.bspline`, what remains after the global shifts) are
  applied by Keys cubic convolution (a = -0.5; or, as an option, bilinear interpolation) in real space
  (:func:`correct_local_motion`): on the
  GPU by the CUDA kernel in ``apply.cu`` (one thread per output pixel, the spline evaluated on the fly
  from the frame's 4×4 active control points), on the CPU by :func:`correct_local_motion_reference`,
  the same arithmetic in compiled loops (Numba, :mod:`._interp_cpu`) or in NumPy, the same bits.
* :func:`power_spectrum` gives the averaged periodogram of a micrograph for CTF estimation.

Sign: moving the content of frame n by ``+s`` gives ``aligned(p) = frame(p - s(p))``.
"""
from __future__ import annotations

import functools
import logging
import os
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np

from ... import backend
from ...threads import cpu_workers
from ..tuning.autotune import TunableKernel, register, size_class, tuned_params
from ._fft import rfft2, rfft_freqs
from ...em.interpolation import keys_weights, sample_keys  # noqa: F401  (keys_weights re-exported)

__all__ = ["shift_spectra", "keys_weights", "correct_local_motion", "correct_local_motion_reference",
           "LOCAL_INTERPOLATIONS", "CPU_ENGINES", "prepare_cpu_engine",
           "power_spectrum", "local_motion_block", "LOCAL_MOTION_DEFAULT_BLOCK"]

logger = logging.getLogger(__name__)

_KERNEL_FILE = os.path.join(os.path.dirname(__file__), "apply.cu")


def shift_spectra(spectra, shifts_xy, shape: Sequence[int], *, out=None):
    """Move the content of images by ``+shift`` by multiplying their rfft2 spectra by phase ramps.

    Parameters
    ----------
    spectra : complex64 array (N, ny, nx//2 + 1)
    shifts_xy : float array (N, 2)
        (x, y) shift per image in pixels; ``image'(p) = image(p - shift)``.
    shape : (ny, nx)
        Real-space size.
    out : array like ``spectra``, optional
        Destination (may be ``spectra`` itself for an in-place shift).

    Returns
    -------
    complex64 array (N, ny, nx//2 + 1)
    """
    xp = backend.get_xp(spectra)
    ny, nx = (int(s) for s in shape)
    s = np.asarray(backend.to_host(shifts_xy), dtype=np.float64).reshape(-1, 2)
    ky, kx = rfft_freqs((ny, nx), xp=xp, dtype=np.float64)               # (ny,1), (1,nxh)
    sx = xp.asarray(s[:, 0]).reshape(-1, 1, 1)
    sy = xp.asarray(s[:, 1]).reshape(-1, 1, 1)
    ramp_x = xp.exp(-2j * np.pi * kx[None] * sx).astype(np.complex64)      # (N, 1, nxh)
    ramp_y = xp.exp(-2j * np.pi * ky[None] * sy).astype(np.complex64)      # (N, ny, 1)
    if out is None:
        out = spectra * ramp_y
    else:
        xp.multiply(spectra, ramp_y, out=out)
    out *= ramp_x
    return out


#: Interpolations of the local-motion correction: Keys cubic convolution (16 taps, the default) or
#: bilinear (4 taps; what RELION's own motion correction uses, ~3× less CPU time, a little more blur).
LOCAL_INTERPOLATIONS = ("keys", "linear")


def _check_interpolation(interpolation: str) -> str:
    if interpolation not in LOCAL_INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {LOCAL_INTERPOLATIONS}, got {interpolation!r}")
    return interpolation


def correct_local_motion_reference(frames, frame_coefficients, spacing_yx: Sequence[float], *, out=None,
                                   rows_per_chunk: int = 128, workers: Optional[int] = None,
                                   interpolation: str = "keys", engine: str = "auto"):
    """CPU twin of the CUDA kernel: undo a smooth local shift field by Keys cubic (or bilinear) interpolation.

    Parameters
    ----------
    frames : float32 array (N, ny, nx), NumPy
        Frames already corrected for the global shifts.
    frame_coefficients : float array (N, 2, Ly, Lx)
        Per frame, the B-spline coefficients in x and y of the remaining shift (pixels) after summing
        over the time basis (:meth:`BSplineShiftModel.frame_coefficients`).
    spacing_yx : (hy, hx)
        Control-point spacing in pixels; control point j sits at ``(j - 1) h``.
    out : float32 array (N, ny, nx), optional
    rows_per_chunk : int
        Rows interpolated at once (bounds the temporaries).
    workers : int, optional
        Frames interpolated at once in threads (default :func:`xmipp_accel.threads.cpu_workers`: the cores
        of this process, at most ``OMP_NUM_THREADS``).
    interpolation : {"keys", "linear"}
        ``"keys"``: Keys cubic convolution (a = -0.5, 4 × 4 taps); ``"linear"``: bilinear (2 × 2 taps,
        ``((1 - tx) f00 + tx f01) (1 - ty) + ((1 - tx) f10 + tx f11) ty``, the kernel's order of operations).
    engine : {"auto", "numba", "numpy"}
        ``"numba"``: the compiled loops of :mod:`._interp_cpu` (two passes per row; ~4.8× less CPU time
        for Keys, 2× for bilinear); ``"numpy"``: offset-view gathers and element-wise passes (below);
        ``"auto"`` (default): Numba when it imports, else NumPy. Both give the same bits.

    Returns
    -------
    float32 array (N, ny, nx): ``out[n](p) = frames[n](p - s_n(p))``, sampled with Keys (or bilinear) weights,
    sample indices clamped to the frame (as :func:`xmipp_accel.em.interpolation.sample_keys` and the kernel).

    Notes
    -----
    The shift field is made ``rows_per_chunk`` rows at a time (small BLAS products, while in cache) by both
    engines. In the NumPy engine, each frame is padded by ``ceil(max |s|) + 3`` edge pixels, which equals
    clamping the indices of every tap, so the 16 taps are gathers from offset views of one flat array at one
    shared index (no clipping and no index arithmetic per tap): ~6× faster than sampling with clamped
    indices per tap.
    """
    from concurrent.futures import ThreadPoolExecutor

    from .bspline import basis_matrix
    linear = _check_interpolation(interpolation) == "linear"
    n, ny, nx = frames.shape
    coef = np.asarray(frame_coefficients, dtype=np.float32)
    ly, lx = coef.shape[-2:]
    hy, hx = (float(v) for v in spacing_yx)
    bx = basis_matrix(np.arange(nx, dtype=np.float64), lx, hx).astype(np.float32)   # (nx, Lx)
    by = basis_matrix(np.arange(ny, dtype=np.float64), ly, hy).astype(np.float32)   # (ny, Ly)
    if out is None:
        out = np.empty(frames.shape, dtype=np.float32)
    compiled = _compiled_engine(engine)
    if compiled is not None:
        sample_rows = compiled.linear_rows if linear else compiled.keys_rows
        rows = max(1, min(int(rows_per_chunk), ny))

    def one_compiled(f: int) -> None:
        cx = coef[f, 0] @ bx.T               # (Ly, nx), as in the NumPy engine
        cy = coef[f, 1] @ bx.T
        flat = np.ascontiguousarray(frames[f], dtype=np.float32).ravel()
        sx, sy = np.empty((rows, nx), np.float32), np.empty((rows, nx), np.float32)
        for r0 in range(0, ny, rows):
            r1 = min(ny, r0 + rows)
            np.matmul(by[r0:r1], cx, out=sx[:r1 - r0])
            np.matmul(by[r0:r1], cy, out=sy[:r1 - r0])
            sample_rows(flat, nx, ny, out[f, r0:r1], sx[:r1 - r0], sy[:r1 - r0], r0)

    def one(f: int) -> None:
        cx = coef[f, 0] @ bx.T               # (Ly, nx): the shift field (pixels) is by @ cx, made per chunk
        cy = coef[f, 1] @ bx.T
        # B-spline values are >= 0 and sum to 1, so |field| <= max |c| (one pixel more for rounding): the
        # padding is wide enough without a pass over the fields (a wider one changes no result)
        pad = int(np.ceil(max(float(np.abs(cx).max()), float(np.abs(cy).max())))) + 4
        flat = np.pad(np.asarray(frames[f], dtype=np.float32), pad, mode="edge").ravel()
        width = nx + 2 * pad
        taps = [flat[a * width + b:] for a in range(4) for b in range(4)]   # tap (a, b): offset view
        _interpolate_rows(taps, by, cx, cy, pad - 1, width, out[f], rows_per_chunk, linear=linear)

    run_frame = one if compiled is None else one_compiled
    n_workers = max(1, min(int(workers or cpu_workers()), n))
    if n_workers == 1:
        for f in range(n):
            run_frame(f)
    else:
        with ThreadPoolExecutor(n_workers) as pool:
            list(pool.map(run_frame, range(n)))
    return out


#: The CPU engines of :func:`correct_local_motion_reference`.
CPU_ENGINES = ("auto", "numba", "numpy")


@functools.lru_cache(maxsize=None)
def _numba_module():
    """:mod:`._interp_cpu` (compiled by Numba), or None when Numba is missing or does not import here."""
    try:
        from . import _interp_cpu
    except Exception as exc:            # not installed, built for another NumPy, or no writable cache folder
        logger.warning("Numba is not usable (%s): local motion is interpolated by the NumPy engine, "
                       "~5x more CPU time for Keys. To speed it up: 'pip install numba' (a release that supports "
                       "this NumPy), or point NUMBA_CACHE_DIR at a writable folder", exc)
        return None
    return _interp_cpu


def prepare_cpu_engine(interpolation: str = "keys") -> bool:
    """Load (or, the first time on a machine, compile) the compiled CPU loops for ``interpolation`` with a
    call on a tiny frame, so that the first movie does not wait for it (~0.3 s: Numba's import and its
    cached code). Returns whether the compiled engine is in use (False: NumPy engine). Thread-safe."""
    linear = _check_interpolation(interpolation) == "linear"
    module = _numba_module()
    if module is None:
        return False
    n = 8
    flat, field = np.zeros(n * n, np.float32), np.zeros((2, n), np.float32)
    out = np.empty((2 * n, n), np.float32)[:2]           # as the frames' rows: a C-ordered slice of a frame
    (module.linear_rows if linear else module.keys_rows)(flat, n, n, out, field, field, 0)
    return True


def _compiled_engine(engine: str):
    """The compiled module for ``engine`` ("auto", "numba"), or None for the NumPy engine."""
    if engine not in CPU_ENGINES:
        raise ValueError(f"engine must be one of {CPU_ENGINES}, got {engine!r}")
    if engine == "numpy":
        return None
    module = _numba_module()
    if module is None and engine == "numba":
        raise RuntimeError("engine='numba' asked for, but Numba does not import here: pip install numba")
    return module


def _keys_weights_into(t, w, tmp) -> None:
    """:func:`keys_weights` of float32 ``t`` (M,) into the rows of ``w`` (4, M), in place.

    The same float32 operations in the same order as :func:`keys_weights` (bit-identical results) without
    its temporaries; ``tmp`` (2, M) is scratch.
    """
    t2, t3 = tmp[0], tmp[1]
    np.multiply(t, t, out=t2)
    np.multiply(t2, t, out=t3)
    w0, w1, w2, w3 = w
    np.multiply(t3, -0.5, out=w0)            # -0.5 t³ + t² - 0.5 t
    w0 += t2
    np.multiply(t, 0.5, out=w3)
    w0 -= w3
    np.multiply(t3, 1.5, out=w1)             # 1.5 t³ - 2.5 t² + 1
    np.multiply(t2, 2.5, out=w3)
    w1 -= w3
    w1 += 1.0
    np.multiply(t3, -1.5, out=w2)            # -1.5 t³ + 2 t² + 0.5 t
    np.multiply(t2, 2.0, out=w3)
    w2 += w3
    np.multiply(t, 0.5, out=w3)
    w2 += w3
    np.multiply(t3, 0.5, out=w3)             # 0.5 t³ - 0.5 t²
    np.multiply(t2, 0.5, out=t2)
    w3 -= t2


def _interpolate_rows(taps, by, cx, cy, offset: int, width: int, out, rows_per_chunk: int, *,
                      linear: bool = False) -> None:
    """Keys samples ``out(y, x) = frame(y - sy, x - sx)`` of one frame, ``rows_per_chunk`` rows at a time.

    With ``linear``, bilinear samples: only taps (1, 1), (1, 2), (2, 1), (2, 2) (the pixel below and to the
    left of the sample position and its three neighbours up and to the right), weights ``1 - t`` and ``t``.

    The shift field ``sx = by @ cx``, ``sy = by @ cy`` (``by`` (ny, Ly) B-spline values, ``cx``, ``cy``
    (Ly, nx)) is made chunk by chunk, while in cache (no full-frame field is written and read back).

    ``taps[4a + b]`` is the padded frame (row length ``width``) flattened and offset by ``a`` rows and ``b``
    columns; ``offset`` is the padding less one, so tap (0, 0) of output pixel (y, x) is at flat index
    ``(floor(y - sy) + offset) · width + floor(x - sx) + offset``. All buffers are allocated once per frame
    and the indices are in range by construction, so the gathers skip the bounds check (``mode="clip"``
    changes nothing): with the field made per chunk, 24-30 % less CPU time than fresh temporaries, checked
    gathers and full-frame fields (24 × 1024² frames, 2 threads: 0.87 vs 1.27 CPU-s), bit-identical results at
    1024² (the field's products may differ in the last bit for other chunk sizes). The first row of taps is
    written straight into the output rows (no zeroed accumulator, no final copy when ``out`` is contiguous)
    and the bilinear x weight ``t`` is the x fraction's own buffer: the same bits, 20 % less CPU time for
    ``linear`` (24 × 1024², 2 threads: 0.24 vs 0.30 CPU-s), 11 % for Keys (0.78 vs 0.88).
    """
    ny, nx = out.shape
    rows = max(1, min(int(rows_per_chunk), ny))
    m = rows * nx
    buf = np.empty((16, m), dtype=np.float32)
    pos, fl, acc, row, v, pos_x = buf[0], buf[1], buf[2], buf[3], buf[4], buf[15]
    wx, wy, tmp = buf[5:9], buf[9:13], buf[13:15]
    index = np.empty(m, dtype=np.intp)
    field = np.empty((rows, nx), dtype=np.float32)
    ix = np.empty(m, dtype=np.intp)
    xs_all = np.arange(nx, dtype=np.float32)[None, :]
    direct = out.flags.c_contiguous          # accumulate straight into the output rows
    first, last = (1, 3) if linear else (0, 4)
    for r0 in range(0, ny, rows):
        r1 = min(ny, r0 + rows)
        k = (r1 - r0) * nx
        p, q = pos[:k].reshape(r1 - r0, nx), fl[:k].reshape(r1 - r0, nx)
        idx, ixk = index[:k], ix[:k]
        # y: fractional part -> weights, integer part -> row index
        s = field[:r1 - r0]
        np.matmul(by[r0:r1], cy, out=s)
        np.subtract(np.arange(r0, r1, dtype=np.float32)[:, None], s, out=p)
        np.floor(p, out=q)
        np.add(q.ravel(), offset, out=idx, casting="unsafe")
        idx *= width
        p -= q
        if linear:                                  # weights 1 - t and t (t: the y fraction's buffer itself)
            np.subtract(1.0, pos[:k], out=wy[1, :k])
            wys = (None, wy[1, :k], pos[:k], None)
        else:
            _keys_weights_into(pos[:k], wy[:, :k], tmp[:, :k])
            wys = tuple(wy[:, :k])
        # x (its fractional part in its own buffer, so the bilinear weight t is that buffer itself)
        px = pos_x[:k].reshape(r1 - r0, nx)
        np.matmul(by[r0:r1], cx, out=s)
        np.subtract(xs_all, s, out=px)
        np.floor(px, out=q)
        np.add(q.ravel(), offset, out=ixk, casting="unsafe")
        idx += ixk
        px -= q
        if linear:
            np.subtract(1.0, pos_x[:k], out=wx[1, :k])
            wxs = (None, wx[1, :k], pos_x[:k], None)
        else:
            _keys_weights_into(pos_x[:k], wx[:, :k], tmp[:, :k])
            wxs = tuple(wx[:, :k])
        a_k = out[r0:r1].reshape(k) if direct else acc[:k]
        r_k, v_k = row[:k], v[:k]
        for a in range(first, last):
            dest = a_k if a == first else r_k      # the first row of taps straight into the sum (0 + r = r)
            np.take(taps[4 * a + first], idx, out=dest, mode="clip")
            dest *= wxs[first]
            for b in range(first + 1, last):
                np.take(taps[4 * a + b], idx, out=v_k, mode="clip")
                v_k *= wxs[b]
                dest += v_k
            dest *= wys[a]
            if a != first:
                a_k += r_k
        if not direct:
            out[r0:r1] = a_k.reshape(r1 - r0, nx)


@functools.lru_cache(maxsize=None)
def _module(device_id: int):
    with open(_KERNEL_FILE) as fh:
        src = fh.read()
    return backend.get_raw_module(src, name_expressions=None)


#: The entry point of ``apply.cu`` for each of :data:`LOCAL_INTERPOLATIONS` (all take the same arguments).
_KERNEL_NAMES = {"keys": "correct_local_motion", "linear": "correct_local_motion_linear"}


@functools.lru_cache(maxsize=None)
def _kernel(device_id: int, interpolation: str = "keys"):
    """The local-motion kernel of ``apply.cu`` for ``interpolation`` ("keys" or "linear") on this device."""
    return _module(device_id).get_function(_KERNEL_NAMES[interpolation])


#: Launch geometry of the local-motion kernel when nothing is tuned (also the adapter's default).
LOCAL_MOTION_DEFAULT_BLOCK = (32, 8)
#: Name of the kernel in the autotuner's registry (registered at the end of this module).
LOCAL_MOTION_KERNEL = "movie-local-motion"


def local_motion_block(n_frames: int, height: int, width: int) -> Tuple[int, int]:
    """Thread-block shape ``(block_x, block_y)`` of the local-motion kernel for a movie of this size.

    The autotuner's best configuration for this GPU and size class
    (:func:`xmipp_accel.gpu.tuning.autotune.tuned_params` of ``"movie-local-motion"``, cached by
    ``xmipp-accel tune`` or a :class:`~xmipp_accel.gpu.tuning.autotune.DynamicTuner`), else
    :data:`LOCAL_MOTION_DEFAULT_BLOCK`. Every block shape computes the same result (one thread per
    output pixel); only the speed changes.

    Parameters
    ----------
    n_frames, height, width : int
        Movie size (frames, pixels).

    Returns
    -------
    (int, int)
    """
    try:
        params = tuned_params(MOVIE_LOCAL_MOTION_KERNEL, {"frames": int(n_frames), "height": int(height),
                                                          "width": int(width)})
        return int(params["block_x"]), int(params["block_y"])
    except (ImportError, ValueError, KeyError, OSError) as exc:  # no tuner or no adapter: keep the default
        logger.debug("local-motion kernel: default launch geometry (%s)", exc)
        return LOCAL_MOTION_DEFAULT_BLOCK


def correct_local_motion(frames, frame_coefficients, spacing_yx: Sequence[float], *, out=None,
                         block: Optional[Tuple[int, int]] = None, interpolation: str = "keys"):
    """Undo a smooth local shift field by Keys cubic interpolation (GPU kernel; NumPy twin on the CPU).

    Same parameters and result as :func:`correct_local_motion_reference`, which runs for NumPy input;
    ``interpolation="linear"`` runs the bilinear kernel (``correct_local_motion_linear``) instead.

    Parameters
    ----------
    block : (block_x, block_y), optional
        CUDA thread-block shape (GPU only; the result does not depend on it). Default
        :func:`local_motion_block`: the autotuned configuration for this GPU and movie size.
    """
    xp = backend.get_xp(frames)
    _check_interpolation(interpolation)
    if xp is np:
        return correct_local_motion_reference(frames, frame_coefficients, spacing_yx, out=out,
                                              interpolation=interpolation)
    frames = xp.ascontiguousarray(frames, dtype=np.float32)
    coef = xp.ascontiguousarray(xp.asarray(frame_coefficients, dtype=np.float32))
    if out is None:
        out = xp.empty_like(frames)
    bx, by = (int(v) for v in (block if block is not None else local_motion_block(*frames.shape)))
    if bx < 1 or by < 1 or bx * by > 1024:
        raise ValueError(f"block must be two positive ints with a product <= 1024, got {block}")
    _launch(_kernel(xp.cuda.Device().id, interpolation), frames, coef, out, spacing_yx, (bx, by))
    return out


def _launch(kern, frames, coef, out, spacing_yx: Sequence[float], block: Tuple[int, int]) -> None:
    """Run a local-motion kernel of ``apply.cu``: one thread per output pixel, ``block`` (x, y) threads a block.

    ``frames``, ``out`` float32 (N, ny, nx) and ``coef`` float32 (N, 2, Ly, Lx) contiguous CuPy arrays;
    ``spacing_yx`` the control-point spacing (pixels).
    """
    n, ny, nx = frames.shape
    ly, lx = coef.shape[-2:]
    hy, hx = (float(v) for v in spacing_yx)
    bx, by = block
    kern(((nx + bx - 1) // bx, (ny + by - 1) // by, n), (bx, by, 1),
         (frames, out, coef, np.int32(nx), np.int32(ny), np.int32(lx), np.int32(ly),
          np.float32(1.0 / hx), np.float32(1.0 / hy)))


def power_spectrum(image, *, tile: int = 512):
    """Averaged periodogram of a micrograph (Welch: half-overlapping tiles, mean removed per tile).

    Parameters
    ----------
    image : float array (ny, nx)
    tile : int
        Tile (and output) size in pixels; reduced to the image's smaller even side if larger.

    Returns
    -------
    float32 array (tile, tile): power spectrum with zero frequency at ``(tile//2, tile//2)``.
    """
    xp = backend.get_xp(image)
    ny, nx = image.shape
    tile = int(min(tile, ny - ny % 2, nx - nx % 2))
    step = tile // 2
    ys = list(range(0, ny - tile + 1, step))
    xs = list(range(0, nx - tile + 1, step))
    acc = xp.zeros((tile, tile // 2 + 1), dtype=np.float64)
    count = 0
    for y0 in ys:
        row = xp.stack([image[y0:y0 + tile, x0:x0 + tile] for x0 in xs]).astype(np.float32)
        row = row - row.mean(axis=2).mean(axis=1)[:, None, None]
        acc += (xp.abs(rfft2(row)) ** 2).sum(axis=0)
        count += len(xs)
    half = (acc / max(count, 1) / (tile * tile)).astype(np.float32)
    # expand the half spectrum to the full plane, then centre it
    full = xp.empty((tile, tile), dtype=np.float32)
    full[:, :tile // 2 + 1] = half
    kx = np.arange(tile // 2 + 1, tile)
    ky = (-np.arange(tile)) % tile
    full[:, tile // 2 + 1:] = half[xp.asarray(ky)][:, xp.asarray(tile - kx)]
    return xp.fft.fftshift(full)


# ------------------------------------------------------------------ the kernel described to the autotuner
# Registered as "movie-local-motion" when this module is imported (``xmipp-accel tune`` imports it,
# xmipp_accel.cli.tune.KERNEL_MODULES).

MOVIE_LOCAL_MOTION_SPACE: Dict[str, tuple] = {"block_x": (8, 16, 32, 64, 128, 256), "block_y": (1, 2, 4, 8, 16, 32)}
#: what movie/apply.py launches when nothing is tuned
MOVIE_LOCAL_MOTION_DEFAULT = {"block_x": LOCAL_MOTION_DEFAULT_BLOCK[0],
                              "block_y": LOCAL_MOTION_DEFAULT_BLOCK[1]}


def _movie_inputs(size: Dict[str, int], xp) -> Dict[str, Any]:
    """``frames`` frames of ``height x width`` with a 6 x 6 B-spline shift field of a few pixels."""
    n, ny, nx = int(size["frames"]), int(size["height"]), int(size["width"])
    rng = np.random.default_rng(0)
    frames = xp.asarray(rng.standard_normal((n, ny, nx), dtype=np.float32))
    ly = lx = 6
    coef = xp.asarray((rng.standard_normal((n, 2, ly, lx)) * 2.0).astype(np.float32))
    return {"frames": frames, "coef": coef, "spacing": (ny / (ly - 3), nx / (lx - 3)),
            "out": xp.empty_like(frames)}


def _movie_build(params: Dict[str, Any]):
    cp = backend.cupy_module()
    if cp is None:
        raise backend.BackendError("the CUDA local-motion kernel needs a GPU")
    kern = _kernel(cp.cuda.Device().id)
    bx, by = int(params["block_x"]), int(params["block_y"])

    def launch(inp):
        _launch(kern, inp["frames"], inp["coef"], inp["out"], inp["spacing"], (bx, by))
        return inp["out"]
    return launch


MOVIE_LOCAL_MOTION_KERNEL = register(TunableKernel(
    name=LOCAL_MOTION_KERNEL, space=dict(MOVIE_LOCAL_MOTION_SPACE), default=dict(MOVIE_LOCAL_MOTION_DEFAULT),
    build=_movie_build, make_inputs=_movie_inputs, run=lambda fn, inp: fn(inp),
    constraints=(lambda p: 32 <= p["block_x"] * p["block_y"] <= 1024,),
    size_class=lambda size: size_class({"frames": size["frames"], "pixels": size["height"] * size["width"]}),
    sizes=({"frames": 30, "height": 4096, "width": 4096}, {"frames": 40, "height": 2048, "width": 2048},
           {"frames": 30, "height": 4092, "width": 5760}),
    description="movie alignment: local motion correction by B-spline shifts and Keys interpolation "
                "(movie/apply.cu)"))
