"""Benchmark: FSC of two maps already in (GPU) memory, plain and masked + phase-randomisation corrected.

Prints one table: our time, the floor we count (the FFTs measured alone + the bytes the shell
reduction must read at the measured copy bandwidth), the NumPy path on the same machine, and the
ratios. Figures also go to a JSON file (``--json``).

    python benchmarks/fsc.py                    # 512³ on the GPU (256³ on a CPU-only machine)
    python benchmarks/fsc.py --box 256 --numpy-box 256 --json out.json
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
from xmipp_accel.gpu.resolution import fsc as fscmod


def _timeit(fn, repeats: int, sync) -> float:
    """Median wall time (s) of ``fn`` over ``repeats`` runs after one warm-up."""
    fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _maps(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    signal = rng.standard_normal((n, n, n), dtype=np.float32)
    h1 = signal + rng.standard_normal((n, n, n), dtype=np.float32)
    h2 = signal + rng.standard_normal((n, n, n), dtype=np.float32)
    x = np.arange(n, dtype=np.float32) - n / 2
    r2 = x[:, None, None] ** 2 + x[None, :, None] ** 2 + x[None, None, :] ** 2
    edge = 0.5 - 0.5 * np.cos(np.pi * np.clip((0.45 * n - np.sqrt(r2)) / (0.05 * n), 0, 1))
    return h1, h2, edge.astype(np.float32)


def bench_gpu(n: int, repeats: int) -> dict:
    cp = backend.cupy_module()
    h1, h2, mask = _maps(n)
    g1, g2, gm = cp.asarray(h1), cp.asarray(h2), cp.asarray(mask)
    del h1, h2, mask
    sync = cp.cuda.get_current_stream().synchronize
    out = {"box": n, "device": backend.gpu_info(0)["name"]}
    out["fsc_s"] = _timeit(lambda: fscmod.fsc(g1, g2), repeats, sync)
    out["masked_corrected_s"] = _timeit(lambda: fscmod.masked_fsc_corrected(g1, g2, gm, seed=1), repeats, sync)
    out["rfftn_s"] = _timeit(lambda: cp.fft.rfftn(g1), repeats, sync)
    f1, f2 = cp.fft.rfftn(g1), cp.fft.rfftn(g2)
    out["irfftn_s"] = _timeit(lambda: cp.fft.irfftn(f1, s=g1.shape), repeats, sync)
    out["shell_sums_s"] = _timeit(lambda: fscmod._shell_sums_gpu(f1, f2, g1.shape), repeats, sync)
    big = cp.empty(256 * 2 ** 20, dtype=cp.float32)
    dst = cp.empty_like(big)
    t_copy = _timeit(lambda: cp.copyto(dst, big), repeats, sync)
    out["copy_bandwidth_GBps"] = 2 * big.nbytes / t_copy / 1e9
    spectra_bytes = 2 * f1.nbytes
    out["shell_sums_floor_s"] = spectra_bytes / (out["copy_bandwidth_GBps"] * 1e9)
    out["fsc_floor_s"] = 2 * out["rfftn_s"] + out["shell_sums_floor_s"]
    # masked + corrected: 6 rfftn + 2 irfftn + 3 reductions are the irreducible part
    out["masked_floor_s"] = 6 * out["rfftn_s"] + 2 * out["irfftn_s"] + 3 * out["shell_sums_floor_s"]
    cpu_curve = fscmod.fsc(cp.asnumpy(g1[: min(n, 128), : min(n, 128), : min(n, 128)]),
                           cp.asnumpy(g2[: min(n, 128), : min(n, 128), : min(n, 128)])).fsc
    gpu_curve = fscmod.fsc(g1[: min(n, 128), : min(n, 128), : min(n, 128)],
                           g2[: min(n, 128), : min(n, 128), : min(n, 128)]).fsc
    out["gpu_vs_numpy_max_abs_diff_128"] = float(np.abs(cpu_curve - gpu_curve).max())
    return out


def bench_numpy(n: int, masked: bool = True) -> dict:
    h1, h2, mask = _maps(n)
    out = {"box": n}
    t0 = time.perf_counter()
    fscmod.fsc(h1, h2)
    out["fsc_s"] = time.perf_counter() - t0
    if masked:
        t0 = time.perf_counter()
        fscmod.masked_fsc_corrected(h1, h2, mask, seed=1)
        out["masked_corrected_s"] = time.perf_counter() - t0
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--box", type=int, default=None, help="box of the GPU run (default 512)")
    p.add_argument("--numpy-box", type=int, default=None, help="box of the NumPy run (default: same as --box)")
    p.add_argument("--no-numpy-masked", action="store_true", help="skip the (slow) NumPy masked run")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--json", default=None, help="write the figures to this JSON file")
    args = p.parse_args()
    gpu = backend.gpu_available()
    n = args.box or (512 if gpu else 128)
    result = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "host": platform.node(),
              "versions": backend.versions()}
    if gpu:
        result["gpu"] = bench_gpu(n, args.repeats)
    result["numpy"] = bench_numpy(args.numpy_box or n, masked=not args.no_numpy_masked)
    rows = []
    if gpu:
        g, c = result["gpu"], result["numpy"]
        same = c["box"] == g["box"]
        rows.append(("FSC", g["fsc_s"], g["fsc_floor_s"], c["fsc_s"] if same else None))
        rows.append(("masked + corrected", g["masked_corrected_s"], g["masked_floor_s"],
                     c.get("masked_corrected_s") if same else None))
        rows.append(("  shell sums (kernel)", g["shell_sums_s"], g["shell_sums_floor_s"], None))
        rows.append(("  rfftn (one map)", g["rfftn_s"], None, None))
        print(f"FSC benchmark, {g['box']}³ float32 maps on {g['device']} "
              f"(copy bandwidth {g['copy_bandwidth_GBps']:.0f} GB/s)")
    else:
        c = result["numpy"]
        rows.append(("FSC (numpy)", c["fsc_s"], None, c["fsc_s"]))
        rows.append(("masked + corrected (numpy)", c.get("masked_corrected_s"), None, c.get("masked_corrected_s")))
        print(f"FSC benchmark, {c['box']}³ float32 maps on the CPU (no GPU)")
    print(f"{'step':28s} {'ours (ms)':>10s} {'floor (ms)':>11s} {'ours/floor':>10s} {'numpy (ms)':>11s} "
          f"{'numpy/ours':>10s}")
    for name, ours, floor, peer in rows:
        def ms(x):
            return f"{1e3 * x:10.2f}" if x is not None else f"{'-':>10s}"
        ratio = f"{ours / floor:10.2f}" if floor else f"{'-':>10s}"
        speedup = f"{peer / ours:10.1f}" if peer and ours else f"{'-':>10s}"
        print(f"{name:28s} {ms(ours)} {ms(floor):>11s} {ratio} {ms(peer):>11s} {speedup}")
    if gpu:
        print(f"GPU vs NumPy FSC (128³ crop): max |difference| {result['gpu']['gpu_vs_numpy_max_abs_diff_128']:.2e}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)


if __name__ == "__main__":
    main()
