"""The insertion kernel (:mod:`.insert`, ``insert.cu``) described to the autotuner: its tuning space,
realistic inputs and a launcher, registered as ``"insert"`` when this module is imported.

``xmipp-accel tune`` imports this module (:data:`xmipp_accel.cli.tune.KERNEL_MODULES`); the
reconstruction imports it to look up its tuned parameters (:func:`.fourier.FourierReconstructor`).
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional

import numpy as np

from ... import backend
from ..tuning.autotune import TunableKernel, register, size_class
from .blob import KaiserBesselBlob
from .insert import DEFAULT_INSERT_TUNING, INSERT_TUNING_SPACE, FourierGrid, insert_gather_gpu

__all__ = ["INSERT_KERNEL"]


def _insert_inputs(size: Dict[str, int], xp) -> Dict[str, Any]:
    """Projections of a ``padded_box`` grid (``images`` of them) at random orientations, Xmipp's defaults:
    padding 2 and maximum resolution 0.5 (``kmax = M / 4``), blob radius 1.9, alpha 15, table mode; on a GPU
    the accumulators are the replica stacks ``(R, M, M, M//2+1)`` the reconstruction uses."""
    from ...em.sampling import random_rotations  # noqa: PLC0415
    m, b = int(size["padded_box"]), int(size["images"])
    grid = FourierGrid(m, m / 4.0)
    rng = np.random.default_rng(0)
    half = m // 2 + 1
    proj = (rng.standard_normal((b, m, half), dtype=np.float32)
            + 1j * rng.standard_normal((b, m, half), dtype=np.float32)).astype(np.complex64)
    pw = rng.random((b, m, half), dtype=np.float32)
    shape = grid.shape
    if xp is not np:   # what the reconstruction inserts into: a stack of replicas (fourier.replica_count)
        shape = (replica_count(grid),) + shape
    return {"data": xp.zeros(shape, np.complex64), "weight": xp.zeros(shape, np.float32),
            "proj": xp.asarray(proj), "proj_weight": xp.asarray(pw), "matrices": random_rotations(b, 0),
            "image_index": np.arange(b), "grid": grid, "blob": KaiserBesselBlob()}


def _insert_build(params: Dict[str, Any]):
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


INSERT_KERNEL = register(TunableKernel(
    name="insert", space={k: tuple(v) for k, v in INSERT_TUNING_SPACE.items()},
    default=dict(DEFAULT_INSERT_TUNING), build=_insert_build, make_inputs=_insert_inputs,
    run=_insert_run, constraints=(lambda p: p["block_x"] * p["block_y"] <= 1024,
                                  lambda p: p.get("lanes_per_voxel", 1) == 1 or p["block_x"] * p["block_y"] % 32 == 0),
    size_class=lambda size: size_class({"padded_box": size["padded_box"], "images": size["images"]}),
    sizes=({"padded_box": 128, "images": 2000}, {"padded_box": 256, "images": 500},
           {"padded_box": 512, "images": 100}),
    description="reconstruction: gather insertion of projections into the Fourier volume (insert.cu)"))


def replica_count(grid: FourierGrid, *, target_threads: int = 1 << 19, budget_bytes: Optional[float] = None) -> int:
    """Replicas of a GPU accumulator so that about ``target_threads`` columns run at once.

    One thread owns a column of the half volume, ``(K+1)(2K+1)`` of them: a 64-pixel box
    (``M = 128``) has 8 000, too few to fill a GPU; replicas multiply the threads while the
    extra memory stays within ``budget_bytes`` (default: 4 GB or a fifth of the free memory).
    """
    if budget_bytes is None:
        budget_bytes = 4.0e9
        cp = backend.cupy_module()
        if cp is not None:
            budget_bytes = min(budget_bytes, 0.2 * cp.cuda.runtime.memGetInfo()[0])
    K = grid.K
    face = (K + 1) * (2 * K + 1)
    want = int(math.ceil(target_threads / face))
    vol_bytes = int(np.prod(grid.shape)) * 12
    cap = max(1, int(budget_bytes // vol_bytes))
    return int(max(1, min(want, cap, 64)))
