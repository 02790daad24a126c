"""Kernel autotuning: tuned vs default vs best-possible time, dynamic tuning, and portability across sizes.

For each registered kernel (the reconstruction insertion kernel, the movie local-motion kernel) and
each of its usual sizes, the whole tuning space is measured (CUDA events,
median of --repeats launches, every variant checked against the default's output). From those tables:

- default, best-possible (exhaustive) and speed-up; the floor of the kernel (bytes it must move at the
  copy bandwidth measured here, or for the insertion its arithmetic at the FP32 rate of a matrix product
  measured here, whichever is longer) and the best time's ratio to it;
- dynamic tuning as KTT does it (the first --budget calls of a run each try one configuration, the rest
  use the fastest): the fraction of the best-possible time reached, over 200 random orders (thesis:
  50 configurations reached 88-96%), and one real :class:`DynamicTuner` run of 2 x budget calls;
- portability: the configuration tuned at one size run at another, as a fraction of that size's best
  (thesis: 32-100% across sizes).

Usage::

    python benchmarks/tuning.py [--kernels insert,movie-local-motion] [--budget 50]
                                [--repeats 3] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import random
import time

import numpy as np

from xmipp_accel import backend
from xmipp_accel.cli.tune import load_kernels
from xmipp_accel.gpu.tuning import autotune as at
from xmipp_accel.gpu.tuning.cache import TuningCache, make_key


def copy_bandwidth(cp) -> float:
    a = cp.ones(256 * 2**20 // 4, dtype=cp.float32)
    b = cp.empty_like(a)
    t = at.time_callable(lambda: cp.copyto(b, a), xp=cp, repeats=10, warmup=2).median_s
    return 2 * a.nbytes / t


def fp32_peak(cp) -> float:
    """FP32 FLOP/s of a large single-precision matrix product here (the peer for compute-bound kernels)."""
    a = cp.random.standard_normal((8192, 8192), dtype=cp.float32)
    t = at.time_callable(lambda: a @ a, xp=cp, repeats=5, warmup=1).median_s
    return 2 * 8192 ** 3 / t


def floor_flops(name: str, size: dict) -> float:
    """Arithmetic a kernel must do at least (0 when it is memory bound by construction)."""
    if name == "insert":
        from xmipp_accel.gpu.reconstruct.blob import KaiserBesselBlob
        from xmipp_accel.gpu.reconstruct.insert import FourierGrid, insertion_count
        m = int(size["padded_box"])
        c = insertion_count(FourierGrid(m, m / 4.0), KaiserBesselBlob())
        # per voxel of the slab: rotate k (9 FMA); per pixel contribution: distance (4), blob table (4),
        # accumulate real, imaginary and weight (3 FMA)
        return int(size["images"]) * (18 * c["voxels"] + 14 * c["contributions"])
    return 0.0


def floor_bytes(name: str, size: dict) -> float:
    """Bytes a kernel must move at least (each input read once, each output written once)."""
    if name == "insert":
        m, b = int(size["padded_box"]), int(size["images"])
        vol = m * m * (m // 2 + 1) * (8 + 4)
        return vol * 2 + b * m * (m // 2 + 1) * (8 + 4)  # volumes read + written, projections read
    if name == "movie-local-motion":
        return 2 * 4 * int(size["frames"]) * int(size["height"]) * int(size["width"])
    return float("nan")


def table_for(kernel, size, repeats, cp, store=False):
    cache = None if store else TuningCache(memory_only=True)  # None: the user's cache for this GPU
    res = at.Tuner(kernel, max_configs=None, repeats=repeats, cache=cache).tune(size, xp=cp, store=store)
    times = {make_key(t.params): t.seconds for t in res.trials}
    return res, times


def dynamic_fraction(times: dict, default_key: str, budget: int, trials: int = 200, seed: int = 0):
    keys = list(times)
    good = {k: v for k, v in times.items() if v is not None}
    best = min(good.values())
    rng = random.Random(seed)
    fr = []
    for _ in range(trials):
        others = [k for k in keys if k != default_key]
        pick = [default_key] + rng.sample(others, min(len(others), budget - 1))
        chosen = min(good[k] for k in pick if k in good)
        fr.append(best / chosen)
    return float(np.mean(fr)), float(np.min(fr))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernels", default=None, help="comma-separated names (default: all registered)")
    parser.add_argument("--budget", type=int, default=50, help="configurations tried by dynamic tuning")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budget-s", type=float, default=200.0, help="skip remaining kernels after this time")
    parser.add_argument("--store", action="store_true",
                        help="keep the best configurations in the tuning cache of this GPU ($XMIPP_ACCEL_CACHE)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    cp = backend.cupy_module()
    if cp is None:
        raise SystemExit("benchmarks/tuning.py measures CUDA kernels: it needs a GPU")
    kernels = load_kernels()
    names = args.kernels.split(",") if args.kernels else sorted(kernels)
    bw = copy_bandwidth(cp)
    peak = fp32_peak(cp)
    dev = backend.list_gpus()[0]["name"]
    out = {"device": dev, "versions": backend.versions(), "copy_bandwidth_GBps": bw / 1e9,
           "fp32_matmul_TFLOPs": peak / 1e12, "kernels": {}}
    print(f"kernel autotuning on {dev}; copy bandwidth {bw / 1e9:.0f} GB/s, FP32 matrix product "
          f"{peak / 1e12:.1f} TFLOP/s (the floors below use these)")
    t_start = time.perf_counter()
    for name in names:
        if name not in kernels:
            print(f"{name}: not registered, skipped")
            continue
        if time.perf_counter() - t_start > args.budget_s:
            print(f"{name}: skipped (time budget)")
            continue
        k = kernels[name]
        dkey = make_key(k.default)
        tables, results = [], []
        t0 = time.perf_counter()
        for size in k.sizes:
            try:
                res, times = table_for(k, size, args.repeats, cp, store=args.store)
            except Exception as exc:
                print(f"{name} {size}: failed: {exc}")
                continue
            tables.append((size, times))
            results.append(res)
            cp.get_default_memory_pool().free_all_blocks()
        if not results:
            continue
        kout = {"space": len(at.configurations(k.space, k.constraints)), "sizes": [], "portability": [],
                "tuning_s": time.perf_counter() - t0}
        print(f"\n{name}: {k.description}; {kout['space']} configurations, tuned in {kout['tuning_s']:.0f} s")
        print(f"{'size':<44} {'default ms':>10} {'best ms':>9} {'speedup':>8} {'dyn-' + str(args.budget):>8} "
              f"{'(worst)':>8} {'floor ms':>9} {'best/floor':>10}  best configuration")
        for (size, times), res in zip(tables, results):
            mean_fr, min_fr = dynamic_fraction(times, dkey, args.budget)
            floor_ms = max(floor_bytes(name, size) / bw, floor_flops(name, size) / peak) * 1e3
            failed = sum(1 for v in times.values() if v is None)
            row = {"size": size, "size_class": res.size_class, "default_ms": res.default_s * 1e3,
                   "best_ms": res.best_s * 1e3, "best": res.best, "speedup": res.speedup,
                   "dynamic_mean_fraction": mean_fr, "dynamic_worst_fraction": min_fr, "floor_ms": floor_ms,
                   "failed_configs": failed}
            kout["sizes"].append(row)
            print(f"{json.dumps(size):<44} {row['default_ms']:>10.3f} {row['best_ms']:>9.3f} "
                  f"{res.speedup:>7.2f}x {100 * mean_fr:>7.1f}% {100 * min_fr:>7.1f}% {floor_ms:>9.3f} "
                  f"{row['best_ms'] / floor_ms:>9.2f}x  {res.best}")
        # portability: tuned at size i, run at size j
        if len(tables) > 1:
            print("portability (configuration tuned at row size, run at column size; % of that size's best):")
            for i, (si, _) in enumerate(tables):
                cells = []
                for j, (sj, tj) in enumerate(tables):
                    t_cross = tj.get(make_key(results[i].best))
                    frac = results[j].best_s / t_cross if t_cross else float("nan")
                    cells.append(frac)
                    kout["portability"].append({"tuned_at": si, "run_at": sj, "fraction_of_best": frac})
                print(f"  {results[i].size_class:<38} " + " ".join(f"{100 * c:>6.1f}%" for c in cells))
        # one real dynamic run at the first size
        size0 = tables[0][0]
        inputs = k.make_inputs(size0, cp)
        dyn = at.DynamicTuner(k, size0, budget=args.budget, cache=TuningCache(memory_only=True), xp=cp, retune=True)
        calls = 2 * args.budget  # the variants are compiled already (as CuPy's disk cache makes them in a real run)
        t = time.perf_counter()
        for _ in range(calls):
            dyn.run(inputs)
        cp.cuda.get_current_stream().synchronize()
        wall = time.perf_counter() - t
        best_ms = results[0].best_s * 1e3
        dyn_best_ms = times_of(tables[0][1], dyn.best)
        kout["dynamic_run"] = {"calls": calls, "tried": len(dyn.trials), "wall_s": wall,
                               "ideal_s": calls * best_ms / 1e3, "default_s": calls * results[0].default_s,
                               "chosen": dyn.best, "chosen_ms": dyn_best_ms, "best_ms": best_ms}
        print(f"dynamic run at {results[0].size_class}: {calls} calls, {len(dyn.trials)} tried, wall {wall:.3f} s "
              f"vs {calls * best_ms / 1e3:.3f} s all-best and "
              f"{calls * results[0].default_s:.3f} s all-default; chose {dyn.best} "
              f"({dyn_best_ms:.3f} ms vs best {best_ms:.3f} ms)")
        out["kernels"][name] = kout
        del inputs
        cp.get_default_memory_pool().free_all_blocks()
    print("\nthesis (KTT): dynamic tuning of 50 configurations reached 88-96% of the best; tuned configurations "
          "port across sizes at 32-100%")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, default=str)


def times_of(times: dict, params: dict):
    v = times.get(make_key(params))
    return v * 1e3 if v is not None else float("nan")


if __name__ == "__main__":
    main()
