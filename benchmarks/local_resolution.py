"""Benchmark: local resolution of a two-region map (true 3.5 Å | 6.6 Å at 1 Å/px, spectral SNR 1).

Prints one table: our time on the GPU, the floor we count (the same sequence of FFTs measured alone:
per band two inverse FFTs of the band-passed halves and three forward FFTs of their products on the
band's grid, three inverse FFTs on the coarse grid), the NumPy path on the same machine, the ratios,
and the accuracy (median resolution inside each region against the truth). The peer figure
(torch-local-resolution, 2 CPU cores, measured by the project: 69 s at 256³, medians 4.0 / 7.0 Å)
is quoted, not re-run.

    python benchmarks/local_resolution.py                 # 256³ (GPU) ; NumPy at 128³ and 256³
    python benchmarks/local_resolution.py --box 128 --numpy-boxes 128 --json out.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import time

import numpy as np

from xmipp_accel import backend
from xmipp_accel.gpu.resolution import local as localmod

TRUTH = (3.5, 6.6)
PEER = {"name": "torch-local-resolution (2 CPU cores)", "box": 256, "seconds": 69.0, "medians_A": (4.0, 7.0)}


def _accuracy(res: np.ndarray) -> dict:
    n = res.shape[-1]
    x = np.arange(n)
    a = (x > 0.1 * n) & (x < 0.4 * n)
    b = (x > 0.6 * n) & (x < 0.9 * n)
    med_a, med_b = float(np.median(res[..., a])), float(np.median(res[..., b])),
    return {"median_A_region_a": med_a, "median_A_region_b": med_b,
            "error_a": med_a / TRUTH[0] - 1, "error_b": med_b / TRUTH[1] - 1,
            "p10_p90_a": np.percentile(res[..., a], [10, 90]).tolist(),
            "p10_p90_b": np.percentile(res[..., b], [10, 90]).tolist()}


def _fft_floor(xp, n: int, window: float, repeats: int = 3) -> float:
    """Time of the FFTs local_resolution performs, measured alone (same sizes, batched the same way)."""
    centres, half_width, _ = localmod._bands(n, window)
    m = localmod._coarse_grid_size(n, window)
    sizes = [localmod._band_grid_size(n, f, half_width, m) for f in centres]
    sync = (lambda: xp.cuda.get_current_stream().synchronize()) if xp is not np else (lambda: None)
    per_size = {}
    for size in sorted(set(sizes)):
        a2 = xp.zeros((2, size, size, size), dtype=np.float32)
        a3 = xp.zeros((3, size, size, size), dtype=np.float32)
        s2 = localmod._rfftn3(a2)
        localmod._irfftn3(s2, size), localmod._rfftn3(a3)
        sync()
        t0 = time.perf_counter()
        for _ in range(repeats):
            localmod._irfftn3(s2, size)
            localmod._rfftn3(a3)
        sync()
        per_size[size] = (time.perf_counter() - t0) / repeats
        del a2, a3, s2
    c3 = localmod._rfftn3(xp.zeros((3, m, m, m), dtype=np.float32))
    sync()
    t0 = time.perf_counter()
    for _ in range(repeats):
        localmod._irfftn3(c3, m)
    sync()
    t_coarse = (time.perf_counter() - t0) / repeats
    return sum(per_size[s] for s in sizes) + len(sizes) * t_coarse


def bench(xp, n: int, window: float, repeats: int) -> dict:
    h1, h2, _ = localmod.synthetic_two_region_halves(n, pixel_size_A=1.0, resolutions_A=TRUTH, snr=1.0, seed=0)
    g1, g2 = xp.asarray(h1), xp.asarray(h2)
    sync = (lambda: xp.cuda.get_current_stream().synchronize()) if xp is not np else (lambda: None)
    times = []
    result = None
    for i in range(repeats + (1 if xp is not np else 0)):  # GPU: one warm-up (kernels, FFT plans)
        sync()
        t0 = time.perf_counter()
        result = localmod.local_resolution(g1, g2, pixel_size_A=1.0, window_px=window)
        res = backend.to_host(result.resolution_A)
        if xp is np or i > 0:
            times.append(time.perf_counter() - t0)
    out = {"box": n, "window_px": window, "seconds": statistics.median(times),
           "n_bands": int(result.band_frequencies.size), **_accuracy(res)}
    out["fft_floor_s"] = _fft_floor(xp, n, window)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--box", type=int, default=256)
    p.add_argument("--window", type=float, default=20.0)
    p.add_argument("--numpy-boxes", type=int, nargs="*", default=[128, 256])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    result = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "host": platform.node(),
              "versions": backend.versions(), "peer": PEER, "numpy": []}
    cp = backend.cupy_module()
    if cp is not None:
        result["gpu"] = bench(cp, args.box, args.window, args.repeats)
        result["gpu"]["device"] = backend.gpu_info(0)["name"]
    for n in args.numpy_boxes:
        result["numpy"].append(bench(np, n, args.window, 1))
    print(f"local resolution benchmark: two regions, truth {TRUTH[0]} | {TRUTH[1]} Å, window {args.window:g} px")
    print(f"{'run':34s} {'box':>4s} {'ours (s)':>9s} {'FFT floor (s)':>13s} {'ours/floor':>10s} "
          f"{'median A (Å)':>12s} {'median B (Å)':>12s}")
    runs = ([("GPU " + result["gpu"]["device"], result["gpu"])] if "gpu" in result else []) + \
        [("NumPy (this machine's CPU)", r) for r in result["numpy"]]
    for name, r in runs:
        print(f"{name:34s} {r['box']:4d} {r['seconds']:9.3f} {r['fft_floor_s']:13.3f} "
              f"{r['seconds'] / r['fft_floor_s']:10.2f} {r['median_A_region_a']:12.2f} {r['median_A_region_b']:12.2f}")
    print(f"{'peer: ' + PEER['name']:34s} {PEER['box']:4d} {PEER['seconds']:9.1f} {'-':>13s} {'-':>10s} "
          f"{PEER['medians_A'][0]:12.2f} {PEER['medians_A'][1]:12.2f}")
    if "gpu" in result:
        same = [r for r in result["numpy"] if r["box"] == result["gpu"]["box"]]
        if same:
            speedup = same[0]["seconds"] / result["gpu"]["seconds"]
            print(f"GPU speed-up over NumPy at {same[0]['box']}³: {speedup:.1f}×; "
                  f"over the peer: {PEER['seconds'] / result['gpu']['seconds']:.0f}×")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)


if __name__ == "__main__":
    main()
