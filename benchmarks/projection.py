"""Projection and synthetic-particle throughput: our FourierProjector (NumPy, and CuPy where a GPU is usable)
against xmippLib.FourierProjector (B-spline, pad 2, one projection per call) measured in the same run.

Floor: each Fourier sample inside the Nyquist circle reads 8 complex64 neighbours (64 B) and writes one
(8 B); the inverse rfft2 is ~2.5 N² log2(N²) flops. The table shows the memory-bound floor at a bandwidth
given with --bandwidth-GBs (default 3350 GB/s, an H100's HBM3) and --cpu-bandwidth-GBs (default 15).

Usage: python benchmarks/projection.py [--box 64 128] [--n 2000] [--bandwidth-GBs 3350]
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np

from xmipp_accel.em.geometry import euler_to_matrix, matrix_to_euler
from xmipp_accel.em.projection import FourierProjector
from xmipp_accel.em.sampling import random_rotations
from xmipp_accel.em.synthetic import make_particles, phantom_volume
from xmipp_accel import backend


def _time(fn, repeat=3, sync=None):
    best = np.inf
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        best = min(best, time.perf_counter() - t0)
    return best


def _xmipp_per_projection(vol, angles):
    try:
        import mrcfile
        import xmippLib
    except ImportError:
        return None
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "v.mrc")
        with mrcfile.new(path) as m:
            m.set_data(vol)
        v = xmippLib.Image(path)
        v.convert2DataType(xmippLib.DT_DOUBLE)
        fp = xmippLib.FourierProjector(v, 2.0, 0.5, 3)
        p = xmippLib.Image()
        p.setDataType(xmippLib.DT_DOUBLE)
        t0 = time.perf_counter()
        for rot, tilt, psi in angles:
            fp.projectVolume(p, float(rot), float(tilt), float(psi))
        return (time.perf_counter() - t0) / len(angles)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--box", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--bandwidth-GBs", type=float, default=3350.0, help="GPU memory bandwidth for the floor")
    ap.add_argument("--cpu-bandwidth-GBs", type=float, default=15.0, help="CPU (one process) bandwidth")
    args = ap.parse_args()
    cp = backend.cupy_module()
    print(f"{'box':>4} {'device':>6} {'n':>6} {'ours ms/proj':>13} {'floor ms/proj':>14} {'ratio':>7} "
          f"{'xmipp ms/proj':>14} {'speed-up':>9} {'make_particles s':>17}")
    for box in args.box:
        vol = phantom_volume(box, seed=0)
        angles = np.column_stack(matrix_to_euler(random_rotations(args.n, 1)))
        mats = euler_to_matrix(*angles.T)
        samples = np.pi * (box / 2) ** 2
        peer = _xmipp_per_projection(vol, angles[:100])
        devices = [("cpu", np, None)] + ([("gpu", cp, lambda: cp.cuda.Device().synchronize())] if cp else [])
        for name, xp, sync in devices:
            fp = FourierProjector(xp.asarray(vol))
            m = xp.asarray(mats)
            fp.project(m[:8])
            t = _time(lambda fp=fp, m=m: fp.project(m), repeat=2 if name == "cpu" else 5, sync=sync)
            per = t / len(mats)
            floor_s = samples * 72 / ((args.bandwidth_GBs if name == "gpu" else args.cpu_bandwidth_GBs) * 1e9)
            tp = _time(lambda xp=xp, vol=vol: make_particles(xp.asarray(vol), args.n, pixel_size_A=2.0, snr=0.1,
                                                    max_shift_px=3), repeat=1, sync=sync)
            speed = f"{peer / per:9.1f}" if peer else f"{'-':>9}"
            xm = f"{peer * 1e3:14.3f}" if peer else f"{'-':>14}"
            print(f"{box:>4} {name:>6} {len(mats):>6} {per * 1e3:13.4f} {floor_s * 1e3:14.5f} {per / floor_s:7.0f} "
                  f"{xm} {speed} {tp:17.2f}")


if __name__ == "__main__":
    main()
