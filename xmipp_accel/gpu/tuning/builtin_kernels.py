"""Tunable kernels known to ``xmipp-accel tune``: our pair-correlation kernel and adapters for the
reconstruction insertion kernel and the movie local-motion kernel.

``correlate_pairs`` is the inner step of FlexAlign's global and local alignment
(every pair i < j of frames or patches is correlated in Fourier space before
the inverse FFT): ``out[p] = w · F[a_p] · conj(F[b_p])``. It is memory bound,
and its best block size, pixels per thread and pairs per block depend on the GPU
and the problem size, which makes it a good proof of the tuning machinery. The
CUDA source is ``builtin_kernels.cu``; the NumPy twin below is the CPU path and
the test oracle.

The adapters (``insert``, ``movie-local-motion``) describe kernels written elsewhere
(:mod:`xmipp_accel.gpu.reconstruct.insert`, :mod:`xmipp_accel.gpu.movie.apply`) to the
tuner: their spaces, realistic inputs and a launcher. They import those modules
only when used, so this module stays cheap to import.
"""
from __future__ import annotations

import functools
import os
from typing import Any, Dict, Optional

import numpy as np

from ... import backend
from .autotune import TunableKernel, register, tuned_params

__all__ = ["correlate_pairs", "correlate_pairs_reference", "CORRELATE_TUNING_SPACE", "CORRELATE_KERNEL",
           "all_pairs", "INSERT_KERNEL", "MOVIE_LOCAL_MOTION_KERNEL", "random_rotations"]

_SOURCE = os.path.join(os.path.dirname(__file__), "builtin_kernels.cu")
_MAX_GRID_Y = 65535

#: Tuning space of the pair-correlation kernel (compile-time constants of builtin_kernels.cu).
CORRELATE_TUNING_SPACE: Dict[str, tuple] = {
    "BLOCK_SIZE": (64, 128, 256, 512, 1024),
    "ITEMS": (1, 2, 4, 8),
    "PAIRS_PER_BLOCK": (1, 2, 4, 8),
}
CORRELATE_DEFAULT = {"BLOCK_SIZE": 256, "ITEMS": 1, "PAIRS_PER_BLOCK": 1}


def all_pairs(n: int) -> np.ndarray:
    """Every pair ``(i, j)`` with ``i < j < n``, as an int32 array of shape ``(n (n - 1) / 2, 2)`` in row order."""
    i, j = np.triu_indices(int(n), k=1)
    return np.stack([i, j], axis=1).astype(np.int32)


def correlate_pairs_reference(spectra, pairs, weights=None):
    """NumPy/CuPy twin of the kernel: ``w · spectra[a] · conj(spectra[b])`` for each pair ``(a, b)``.

    Parameters
    ----------
    spectra : array, shape (n, ...) complex64
        Fourier transforms of n frames (any trailing shape).
    pairs : int array, shape (p, 2)
        Frame indices ``(a, b)``.
    weights : real array of the trailing shape, optional
        Filter applied to every product (e.g. the Gaussian low-pass).

    Returns
    -------
    array, shape (p, ...) complex64
    """
    xp = backend.get_xp(spectra)
    pairs = xp.asarray(pairs)
    out = spectra[pairs[:, 0]] * xp.conj(spectra[pairs[:, 1]])
    if weights is not None:
        out *= weights
    return out.astype(np.complex64, copy=False)


@functools.lru_cache(maxsize=256)
def _compiled(block_size: int, items: int, pairs_per_block: int, device_id: int):
    cp = backend.cupy_module()
    with open(_SOURCE, encoding="utf-8") as f:
        source = f.read()
    options = ("-std=c++14", f"-DBLOCK_SIZE={block_size}", f"-DITEMS={items}",
               f"-DPAIRS_PER_BLOCK={pairs_per_block}")
    module = cp.RawModule(code=source, options=options)
    return module.get_function("correlate_pairs")  # compiles and loads now, not at the first launch


def _launcher(params: Dict[str, Any]):
    cp = backend.cupy_module()
    if cp is None:
        raise backend.BackendError("the CUDA pair-correlation kernel needs a GPU")
    bs, items, ppb = int(params["BLOCK_SIZE"]), int(params["ITEMS"]), int(params["PAIRS_PER_BLOCK"])
    kernel = _compiled(bs, items, ppb, cp.cuda.Device().id)

    def launch(spectra, pairs, weights, out):
        n_pixels = int(np.prod(spectra.shape[1:]))
        n_pairs = int(pairs.shape[0])
        grid_x = -(-n_pixels // (bs * items))
        step = _MAX_GRID_Y * ppb
        for first in range(0, n_pairs, step):  # more pairs than one grid's y extent: several launches
            chunk = pairs[first:first + step]
            grid_y = -(-int(chunk.shape[0]) // ppb)
            kernel((grid_x, grid_y), (bs,),
                   (spectra, chunk, weights if weights is not None else np.uint64(0), out[first:first + step],
                    np.int64(n_pixels), np.int32(chunk.shape[0])))
        return out
    return launch


def correlate_pairs(spectra, pairs, weights=None, *, out=None, params: Optional[Dict[str, Any]] = None):
    """Cross-correlation spectra of frame pairs, ``w · F[a] · conj(F[b])``, with the tuned kernel on a GPU.

    Parameters
    ----------
    spectra : numpy or cupy array, shape (n, ...) complex64
        Fourier transforms of n frames (e.g. ``(n, y, x // 2 + 1)`` half spectra).
    pairs : int array, shape (p, 2)
        Frame indices ``(a, b)`` (see :func:`all_pairs`).
    weights : float32 array of shape ``spectra.shape[1:]``, optional
        Filter multiplied into every product.
    out : array, shape (p, ...) complex64, optional
        Output buffer (GPU path).
    params : dict, optional
        Kernel configuration; default the tuned one for this GPU and size (:func:`tuned_params`).

    Returns
    -------
    array, shape (p, ...) complex64, on the input's device.
    """
    xp = backend.get_xp(spectra)
    if spectra.ndim < 2:
        raise ValueError(f"spectra must be (n, ...) with n frames, got shape {spectra.shape}")
    if xp is np:
        return correlate_pairs_reference(spectra, pairs, weights)
    spectra = xp.ascontiguousarray(spectra, dtype=np.complex64)
    pairs = xp.ascontiguousarray(xp.asarray(pairs), dtype=np.int32)
    if pairs.ndim != 2 or pairs.shape[1] != 2:
        raise ValueError(f"pairs must have shape (p, 2), got {pairs.shape}")
    if weights is not None:
        weights = xp.ascontiguousarray(xp.broadcast_to(xp.asarray(weights, dtype=np.float32), spectra.shape[1:]))
    if out is None:
        out = xp.empty((pairs.shape[0],) + spectra.shape[1:], np.complex64)
    if pairs.shape[0] == 0:
        return out
    n_pixels = int(np.prod(spectra.shape[1:]))
    if params is None:
        params = tuned_params(CORRELATE_KERNEL, {"pixels": n_pixels, "pairs": int(pairs.shape[0])})
    return _launcher(params)(spectra, pairs, weights, out)


def _make_inputs(size: Dict[str, int], xp) -> Dict[str, Any]:
    frames, pixels = int(size.get("frames", 30)), int(size["pixels"])
    rng = np.random.default_rng(0)
    spectra = (rng.standard_normal((frames, pixels), dtype=np.float32)
               + 1j * rng.standard_normal((frames, pixels), dtype=np.float32)).astype(np.complex64)
    pairs = all_pairs(frames)
    weights = rng.random(pixels, dtype=np.float32)
    spectra, pairs, weights = xp.asarray(spectra), xp.asarray(pairs), xp.asarray(weights)
    return {"spectra": spectra, "pairs": pairs, "weights": weights,
            "out": xp.empty((pairs.shape[0], pixels), np.complex64)}


def _run(fn, inputs):
    return fn(inputs["spectra"], inputs["pairs"], inputs["weights"], inputs["out"])


def _size_class(size: Dict[str, int]) -> str:
    from .autotune import size_class  # noqa: PLC0415
    pairs = int(size.get("pairs", int(size.get("frames", 30)) * (int(size.get("frames", 30)) - 1) // 2))
    return size_class({"pixels": int(size["pixels"]), "pairs": pairs})


CORRELATE_KERNEL = register(TunableKernel(
    name="correlate-pairs",
    space=dict(CORRELATE_TUNING_SPACE),
    default=dict(CORRELATE_DEFAULT),
    build=_launcher,
    make_inputs=_make_inputs,
    run=_run,
    constraints=(lambda p: p["BLOCK_SIZE"] * p["ITEMS"] <= 4096,),
    size_class=_size_class,
    sizes=({"frames": 30, "pixels": 512 * 257}, {"frames": 30, "pixels": 1024 * 513},
           {"frames": 40, "pixels": 926 * 464}),
    description="movie alignment: cross-correlation spectra w*F[a]*conj(F[b]) of all frame pairs",
))


# ---------------------------------------------------------------------------------------------- insertion
def _insert_space() -> Dict[str, tuple]:
    from ..reconstruct.insert import INSERT_TUNING_SPACE  # noqa: PLC0415
    return {k: tuple(v) for k, v in INSERT_TUNING_SPACE.items()}


def _insert_default() -> Dict[str, Any]:
    from ..reconstruct.insert import DEFAULT_INSERT_TUNING  # noqa: PLC0415
    return dict(DEFAULT_INSERT_TUNING)


def random_rotations(n: int, seed: int = 0) -> np.ndarray:
    """``n`` rotation matrices ``(n, 3, 3)`` float64, uniform on SO(3) (unit quaternions)."""
    q = np.random.default_rng(seed).normal(size=(n, 4))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    w, x, y, z = q.T
    return np.stack([
        np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], -1),
        np.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], -1),
        np.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], -1)], axis=1)


def _insert_inputs(size: Dict[str, int], xp) -> Dict[str, Any]:
    """Projections of a ``padded_box`` grid (``images`` of them) at random orientations, Xmipp's defaults:
    padding 2 and maximum resolution 0.5 (``kmax = M / 4``), blob radius 1.9, alpha 15, table mode; on a GPU
    the accumulators are the replica stacks ``(R, M, M, M//2+1)`` the reconstruction uses."""
    from ..reconstruct.blob import KaiserBesselBlob  # noqa: PLC0415
    from ..reconstruct.insert import FourierGrid  # noqa: PLC0415
    m, b = int(size["padded_box"]), int(size["images"])
    grid = FourierGrid(m, m / 4.0)
    rng = np.random.default_rng(0)
    half = m // 2 + 1
    proj = (rng.standard_normal((b, m, half), dtype=np.float32)
            + 1j * rng.standard_normal((b, m, half), dtype=np.float32)).astype(np.complex64)
    pw = rng.random((b, m, half), dtype=np.float32)
    shape = grid.shape
    if xp is not np:   # what the reconstruction inserts into: a stack of replicas (fourier.replica_count)
        from ..reconstruct.fourier import replica_count  # noqa: PLC0415
        shape = (replica_count(grid),) + shape
    return {"data": xp.zeros(shape, np.complex64), "weight": xp.zeros(shape, np.float32),
            "proj": xp.asarray(proj), "proj_weight": xp.asarray(pw), "matrices": random_rotations(b),
            "image_index": np.arange(b), "grid": grid, "blob": KaiserBesselBlob()}


def _insert_build(params: Dict[str, Any]):
    from ..reconstruct.insert import insert_gather_gpu  # noqa: PLC0415
    if backend.cupy_module() is None:
        raise backend.BackendError("the CUDA insertion kernel needs a GPU")
    tuning = dict(params)

    def launch(inp):
        insert_gather_gpu(inp["data"], inp["weight"], inp["proj"], inp["proj_weight"], inp["matrices"],
                          inp["image_index"], inp["grid"], inp["blob"], tuning=tuning)
    return launch


def _insert_run(fn, inp):
    inp["data"].fill(0)  # the kernel accumulates: start every call from empty volumes
    inp["weight"].fill(0)
    fn(inp)
    return inp["data"], inp["weight"]


def _register_insert() -> Optional[TunableKernel]:
    try:
        space, default = _insert_space(), _insert_default()
    except ImportError:  # the reconstruction package is not there
        return None
    return register(TunableKernel(
        name="insert", space=space, default=default, build=_insert_build, make_inputs=_insert_inputs,
        run=_insert_run, constraints=(lambda p: p["block_x"] * p["block_y"] <= 1024,
                     lambda p: p.get("lanes_per_voxel", 1) == 1 or p["block_x"] * p["block_y"] % 32 == 0),
        size_class=lambda size: _bucket_class({"padded_box": size["padded_box"], "images": size["images"]}),
        sizes=({"padded_box": 128, "images": 2000}, {"padded_box": 256, "images": 500},
               {"padded_box": 512, "images": 100}),
        description="reconstruction: gather insertion of projections into the Fourier volume (insert.cu)"))


# ---------------------------------------------------------------------------------------------- movie
MOVIE_LOCAL_MOTION_SPACE: Dict[str, tuple] = {"block_x": (8, 16, 32, 64, 128, 256), "block_y": (1, 2, 4, 8, 16, 32)}
MOVIE_LOCAL_MOTION_DEFAULT = {"block_x": 32, "block_y": 8}  # what movie/apply.py launches


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
    from ..movie import apply  # noqa: PLC0415
    cp = backend.cupy_module()
    if cp is None:
        raise backend.BackendError("the CUDA local-motion kernel needs a GPU")
    kern = apply._kernel(cp.cuda.Device().id)
    bx, by = int(params["block_x"]), int(params["block_y"])

    def launch(inp):
        frames, coef, out = inp["frames"], inp["coef"], inp["out"]
        n, ny, nx = frames.shape
        ly, lx = coef.shape[-2:]
        hy, hx = inp["spacing"]
        kern(((nx + bx - 1) // bx, (ny + by - 1) // by, n), (bx, by, 1),
             (frames, out, coef, np.int32(nx), np.int32(ny), np.int32(lx), np.int32(ly),
              np.float32(1.0 / hx), np.float32(1.0 / hy)))
        return out
    return launch


def _register_movie() -> Optional[TunableKernel]:
    try:
        from ..movie import apply  # noqa: F401, PLC0415
    except ImportError:
        return None
    if not hasattr(apply, "_kernel"):
        return None
    return register(TunableKernel(
        name="movie-local-motion", space=dict(MOVIE_LOCAL_MOTION_SPACE), default=dict(MOVIE_LOCAL_MOTION_DEFAULT),
        build=_movie_build, make_inputs=_movie_inputs, run=lambda fn, inp: fn(inp),
        constraints=(lambda p: 32 <= p["block_x"] * p["block_y"] <= 1024,),
        size_class=lambda size: _bucket_class({"frames": size["frames"], "pixels": size["height"] * size["width"]}),
        sizes=({"frames": 30, "height": 4096, "width": 4096}, {"frames": 40, "height": 2048, "width": 2048},
               {"frames": 30, "height": 4092, "width": 5760}),
        description="movie alignment: local motion correction by B-spline shifts and Keys interpolation "
                    "(movie/apply.cu)"))


def _bucket_class(size: Dict[str, int]) -> str:
    from .autotune import size_class  # noqa: PLC0415
    return size_class(size)


INSERT_KERNEL = _register_insert()
MOVIE_LOCAL_MOTION_KERNEL = _register_movie()
