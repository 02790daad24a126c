"""Where the time of a GPU reconstruction goes: each stage timed alone with CUDA events, and kernel variants.

For ``--box`` x ``--particles`` (default 256² x 10 000, random images, uniform orientations, shifts,
Wiener CTF with 1-3 µm defocus as in ``benchmarks/reconstruct.py``) the batches of the real driver are
run stage by stage on GPU-resident images, each stage over all batches between two CUDA events
(nothing overlaps, so the stages add up to the GPU busy time of one reconstruction):

- ``rfft2`` of the padded images (CuPy/cuFFT, as ``fourier.packed_projections``);
- the CTF as a full (n, M, M/2+1) image (``ctf_weighting.ctf_images``, the previous packing input) and the
  packing with it, against the packing that evaluates the CTF from five coefficients per particle;
- the gather insertion for each variant of the kernel (run-time loop vs unrolled candidate square,
  block shapes, tiles, table in L1 or shared memory), all on the same packed batch;
- the finish (normalise, inverse FFT, gridding correction) for C1 and with icosahedral symmetry.

Then the end-to-end times of ``batches.reconstruct`` from host and from device memory, so that
``end-to-end - sum of stages`` is what is not overlapped (host work, synchronisation, staging).

Usage::

    python benchmarks/reconstruct_stages.py [--box 256] [--particles 10000] [--variants default,rolled,...]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))
sys.path.insert(0, os.path.abspath(os.path.dirname(__file__)))

from reconstruct import APIX, host_particles, time_gpu  # noqa: E402

from xmipp_accel import backend  # noqa: E402
from xmipp_accel.gpu.reconstruct import batches as rb  # noqa: E402
from xmipp_accel.gpu.reconstruct import fourier as fr  # noqa: E402
from xmipp_accel.gpu.reconstruct import ctf_weighting as cw  # noqa: E402
from xmipp_accel.gpu.reconstruct import insert as ins  # noqa: E402

VARIANTS = {
    "default": {},
    "rolled": {"unroll": 0},
    "rolled-32x8": {"unroll": 0, "block_y": 8},
    "32x8": {"block_y": 8},
    "64x4": {"block_x": 64},
    "16x8": {"block_x": 16, "block_y": 8},
    "tile16": {"tile": 16},
    "tile64": {"tile": 64},
    "shared-table": {"table_memory": "shared"},
    "lanes8": {"lanes_per_voxel": 8},
    "lanes1": {"lanes_per_voxel": 1},
}


def gpu_seconds(cp, fn, reps: int = 1) -> float:
    """Seconds of GPU work queued by ``fn`` (CUDA events on the current stream), mean over ``reps``."""
    fn()   # warm-up: compile, plan
    start, stop = cp.cuda.Event(), cp.cuda.Event()
    cp.cuda.Device().synchronize()
    start.record()
    for _ in range(reps):
        fn()
    stop.record()
    stop.synchronize()
    return cp.cuda.get_elapsed_time(start, stop) / 1e3 / reps


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--box", type=int, default=256)
    p.add_argument("--particles", type=int, default=10_000)
    p.add_argument("--variants", default=",".join(VARIANTS), help="insertion variants (default: all)")
    p.add_argument("--no-end-to-end", action="store_true")
    args = p.parse_args(argv)
    cp = backend.cupy_module()
    if cp is None:
        print("no usable GPU: this benchmark needs CuPy and a CUDA device", file=sys.stderr)
        return 1
    box, n = args.box, args.particles
    settings = fr.ReconstructionSettings()
    grid = fr.fourier_grid(box, settings)
    M = grid.padded_box
    chunk = rb.default_batch_size(box, settings, gpu=True)
    images, mats, shifts, ctf = host_particles(box, n)
    resident = cp.asarray(images)
    bounds = list(range(0, n, chunk)) + [n]
    parts = list(zip(bounds[:-1], bounds[1:]))
    ctf_of = lambda a, b: {k: v[a:b] for k, v in ctf.items()}  # noqa: E731
    print(f"# {time.strftime('%Y-%m-%d %H:%M')} {box}² x {n}, M = {M}, K = {grid.K}, "
          f"W = {ins.packed_width(grid, settings.blob)}, batches of {chunk} ({len(parts)})")
    rows = []

    def stage(name, fn):
        t = gpu_seconds(cp, fn)
        rows.append((name, t))
        print(f"| {name} | {t * 1e3:.1f} ms |", flush=True)
        return t

    print("| stage (all batches) | GPU time |\n|---|---|")
    stage("rfft2 padded", lambda: [cp.fft.rfft2(resident[a:b], s=(M, M)) for a, b in parts])
    ft0 = cp.fft.rfft2(resident[:chunk], s=(M, M))
    stage("CTF image (n, M, M/2+1) (previous packing input)",
          lambda: [cw.ctf_images(ctf_of(a, b), b - a, M, APIX, cp) for a, b in parts])
    centre = cp.asarray(shifts[:chunk] - box // 2)
    img0 = cw.ctf_images(ctf_of(0, chunk), chunk, M, APIX, cp)
    stage("pack with the CTF image",
          lambda: [ins.pack_projections_gpu(ft0, img0, centre, grid, settings.blob, "wiener") for _ in parts])
    coef0 = cw.ctf_coefficients_of(ctf_of(0, chunk), chunk)
    stage("pack with CTF coefficients (current)",
          lambda: [ins.pack_projections_gpu(ft0, None, centre, grid, settings.blob, "wiener",
                                            ctf_coefficients=coef0, pixel_size_A=APIX) for _ in parts])
    packed = ins.pack_projections_gpu(ft0, None, centre, grid, settings.blob, "wiener", ctf_coefficients=coef0,
                                      pixel_size_A=APIX)
    reps = fr.replica_count(grid)
    data = cp.zeros((reps,) + grid.shape, cp.complex64)
    weight = cp.zeros((reps,) + grid.shape, cp.float32)
    for name in [v for v in args.variants.split(",") if v]:
        tuning = VARIANTS[name]

        def insert_all(tuning=tuning):
            for a, b in parts:
                ins.insert_packed_gpu(data, weight, packed, mats[a:b], np.arange(b - a) % chunk, grid,
                                      settings.blob, tuning=tuning)
        stage(f"insert, {name} {tuning or ''}", insert_all)
    packed = data = weight = ft0 = img0 = None
    cp.get_default_memory_pool().free_all_blocks()
    for sym in ("c1", "i"):
        rec = fr.FourierReconstructor(box, settings=settings.__class__(sym=sym), pixel_size_A=APIX, xp=cp)
        rec.insert(resident[:64], mats[:64], shifts_px=shifts[:64], ctf=ctf_of(0, 64))
        stage(f"finish {sym}", lambda rec=rec: rec.volume())
    if not args.no_end_to_end:
        devices = [backend.resolve_device("gpu", 0)]
        for sym in ("c1", "i"):
            t_host, tim = time_gpu(images, mats, shifts, ctf, sym, "volume", devices)
            t_res, _ = time_gpu(resident, mats, shifts, ctf, sym, "volume", devices)
            print(f"| end to end {sym}: from host {t_host:.3f} s (insert {tim.get('insert', 0):.3f} + finish "
                  f"{tim.get('finish', 0):.3f}), resident {t_res:.3f} s |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
