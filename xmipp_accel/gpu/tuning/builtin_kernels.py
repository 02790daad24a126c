"""Tunable kernels that ship with the tuner: the cross-correlation spectra of frame pairs.

``correlate_pairs`` is the inner step of FlexAlign's global and local alignment
(every pair i < j of frames or patches is correlated in Fourier space before
the inverse FFT): ``out[p] = w · F[a_p] · conj(F[b_p])``. It is memory bound,
and its best block size, pixels per thread and pairs per block depend on the GPU
and the problem size, which makes it a good proof of the tuning machinery. The
CUDA source is ``builtin_kernels.cu``; the NumPy twin below is the CPU path and
the test oracle.
"""
from __future__ import annotations

import functools
import os
from typing import Any, Dict, Optional

import numpy as np

from .. import backend
from .autotune import TunableKernel, register, tuned_params

__all__ = ["correlate_pairs", "correlate_pairs_reference", "CORRELATE_TUNING_SPACE", "CORRELATE_KERNEL",
           "all_pairs"]

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
                   (spectra, chunk, weights if weights is not None else 0, out[first:first + step],
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
