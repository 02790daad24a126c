"""The local-motion kernel (:mod:`.apply`, ``apply.cu``) described to the autotuner: its launch geometry,
realistic inputs and a launcher, registered as ``"movie-local-motion"`` when this module is imported.

``xmipp-accel tune`` imports this module (:data:`xmipp_accel.cli.tune.KERNEL_MODULES`);
:func:`.apply.local_motion_block` imports it to look up the tuned block shape.
"""
from __future__ import annotations

from typing import Any, Dict

import numpy as np

from ... import backend
from ..tuning.autotune import TunableKernel, register, size_class
from . import apply

__all__ = ["MOVIE_LOCAL_MOTION_SPACE", "MOVIE_LOCAL_MOTION_DEFAULT", "MOVIE_LOCAL_MOTION_KERNEL"]

MOVIE_LOCAL_MOTION_SPACE: Dict[str, tuple] = {"block_x": (8, 16, 32, 64, 128, 256), "block_y": (1, 2, 4, 8, 16, 32)}
#: what movie/apply.py launches when nothing is tuned
MOVIE_LOCAL_MOTION_DEFAULT = {"block_x": apply.LOCAL_MOTION_DEFAULT_BLOCK[0],
                              "block_y": apply.LOCAL_MOTION_DEFAULT_BLOCK[1]}


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


MOVIE_LOCAL_MOTION_KERNEL = register(TunableKernel(
    name=apply.LOCAL_MOTION_KERNEL, space=dict(MOVIE_LOCAL_MOTION_SPACE), default=dict(MOVIE_LOCAL_MOTION_DEFAULT),
    build=_movie_build, make_inputs=_movie_inputs, run=lambda fn, inp: fn(inp),
    constraints=(lambda p: 32 <= p["block_x"] * p["block_y"] <= 1024,),
    size_class=lambda size: size_class({"frames": size["frames"], "pixels": size["height"] * size["width"]}),
    sizes=({"frames": 30, "height": 4096, "width": 4096}, {"frames": 40, "height": 2048, "width": 2048},
           {"frames": 30, "height": 4092, "width": 5760}),
    description="movie alignment: local motion correction by B-spline shifts and Keys interpolation "
                "(movie/apply.cu)"))
