"""FFT size advisor: speed-up of the recommended transform size over the requested one, on many random sizes.

As the cuFFTAdvisor paper did (Střelák & Filipovič, ANDARE 2018: over 2000 random sizes a mean speed-up of
5.05x with one criterion and 6.94x autotuned), random 2D sizes (and cubes with --cubes) are transformed at
the requested size ("naive"), at the next 2^a3^b5^c7^d size of each axis (what ``next_fast_len`` does),
at the cost model's first choice, and at the best of the model's shortlist measured on the GPU
(``recommend(measure=True)``); padding up to --pad-max. Prints the median, quartiles and mean of each
speed-up over naive, the K3 example (30 frames of 5760 x 4092), the floor of that transform (one read of
the input and one write of the output at the copy bandwidth measured here) and the advisor's own cost
(cold, then from its cache). Without a GPU it prints the model's predicted speed-ups only.

Usage::

    python benchmarks/fft_advisor.py [--sizes 300] [--cubes 30] [--pad-max 0.2] [--budget-s 150] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import math
import random
import time

import numpy as np

from xmipp_accel import backend
from xmipp_accel.gpu.tuning import fft_advisor as fa
from xmipp_accel.gpu.tuning.cache import TuningCache


def next_smooth(n: int) -> int:
    m = n
    while not fa.is_smooth(m):
        m += 1
    return m


def batch_for(shape, elements=1 << 24, cap=64) -> int:
    return int(max(1, min(cap, round(elements / float(np.prod(shape))))))


def stats(x):
    x = np.asarray(x, dtype=float)
    q1, med, q3 = np.percentile(x, [25, 50, 75])
    return {"median": med, "q1": q1, "q3": q3, "mean": float(x.mean()), "min": float(x.min()),
            "max": float(x.max()), "slower_than_naive": float(np.mean(x < 0.97))}


def copy_bandwidth(cp) -> float:
    a = cp.ones(256 * 2**20 // 4, dtype=cp.float32)
    b = cp.empty_like(a)
    from xmipp_accel.gpu.tuning.autotune import time_callable
    t = time_callable(lambda: cp.copyto(b, a), xp=cp, repeats=10, warmup=2).median_s
    return 2 * a.nbytes / t


def one_size(shape, batch, pad_max, cache, measure):
    t_model = {}
    naive_model = fa.transform_cost(shape, batch=batch)[0] * 1e3
    nxt = tuple(next_smooth(s) for s in shape)
    ranked_model = fa.recommend(shape, batch=batch, pad_max=pad_max, measure=False)
    model_top = ranked_model[0].shape
    row = {"shape": list(shape), "batch": batch, "next": list(nxt), "model_top": list(model_top),
           "model_pred_speedup": naive_model / ranked_model[0].model_ms}
    if not measure:
        return row
    for name, s in (("naive", shape), ("next", nxt), ("model", model_top)):
        ms, _ = fa._measured(s, batch=batch, real=True, double=False, cache=cache)
        t_model[name] = ms
    ranked = fa.recommend(shape, batch=batch, pad_max=pad_max, measure=True, shortlist=6, cache=cache)
    best = ranked[0]
    row.update({"naive_ms": t_model["naive"], "next_ms": t_model["next"], "model_ms": t_model["model"],
                "measured_best": list(best.shape), "measured_ms": best.measured_ms})
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, default=300, help="random 2D sizes")
    parser.add_argument("--cubes", type=int, default=30, help="random cubic 3D sizes")
    parser.add_argument("--min", type=int, default=128)
    parser.add_argument("--max", type=int, default=4096)
    parser.add_argument("--pad-max", type=float, default=0.2)
    parser.add_argument("--budget-s", type=float, default=150.0, help="stop drawing sizes after this time")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    cp = backend.cupy_module()
    measure = cp is not None
    cache = TuningCache(signature={"device": "benchmark"}, memory_only=True)
    rng = random.Random(args.seed)
    out = {"device": backend.list_gpus()[0]["name"] if measure else "cpu (model only)",
           "versions": backend.versions(), "pad_max": args.pad_max, "rows2d": [], "rows3d": []}
    t0 = time.perf_counter()

    # --- the K3 example and the floor
    k3 = (4092, 5760)
    if measure:
        bw = copy_bandwidth(cp)
        out["copy_bandwidth_GBps"] = bw / 1e9
        k3_rows = []
        for label, kw in (("pad <= 20%", dict(pad_max=0.2)), ("crop <= 10%, no pad", dict(crop_max=0.1, pad_max=0.0))):
            t_cold = time.perf_counter()
            ranked = fa.recommend(k3, batch=30, measure=True, cache=cache, **kw)
            cold = time.perf_counter() - t_cold
            t_warm = time.perf_counter()
            fa.recommend(k3, batch=30, measure=True, cache=cache, **kw)
            warm = time.perf_counter() - t_warm
            req = next(c for c in ranked if c.requested)
            best = ranked[0]
            floor_ms = (30 * 4096 * 5760 * 4 + 30 * 4096 * 2881 * 8) / bw * 1e3
            k3_rows.append({"use": label, "requested_ms": req.measured_ms, "best": best.width_height,
                            "best_ms": best.measured_ms, "floor_ms": floor_ms, "advisor_cold_s": cold,
                            "advisor_cached_s": warm})
        out["k3"] = k3_rows

    # --- random sizes
    while len(out["rows2d"]) < args.sizes and time.perf_counter() - t0 < args.budget_s:
        shape = (rng.randint(args.min, args.max), rng.randint(args.min, args.max))
        try:
            out["rows2d"].append(one_size(shape, batch_for(shape), args.pad_max, cache, measure))
        except Exception as exc:  # out of memory on a huge batch: skip the size
            print(f"skipped {shape}: {exc}")
    while len(out["rows3d"]) < args.cubes and time.perf_counter() - t0 < 1.3 * args.budget_s:
        n = rng.randint(64, 400)
        try:
            out["rows3d"].append(one_size((n, n, n), 1, args.pad_max, cache, measure))
        except Exception as exc:
            print(f"skipped cube {n}: {exc}")
    out["seconds"] = time.perf_counter() - t0

    # --- tables
    print(f"FFT size advisor on {out['device']} (pad <= {100 * args.pad_max:.0f}%), {out['seconds']:.0f} s")
    if measure:
        print(f"copy bandwidth measured here: {out['copy_bandwidth_GBps']:.0f} GB/s")
        print(f"{'K3 30 x 5760 x 4092':<28} {'requested ms':>12} {'best':>12} {'best ms':>8} {'speedup':>8} "
              f"{'floor ms':>8} {'advisor cold/cached s':>22}")
        for r in out["k3"]:
            print(f"{r['use']:<28} {r['requested_ms']:>12.3f} {'x'.join(map(str, r['best'])):>12} "
                  f"{r['best_ms']:>8.3f} {r['requested_ms'] / r['best_ms']:>7.2f}x {r['floor_ms']:>8.3f} "
                  f"{r['advisor_cold_s']:>10.2f} / {r['advisor_cached_s']:.4f}")
    summary = {}
    for label, rows in (("2D", out["rows2d"]), ("3D cubes", out["rows3d"])):
        if not rows:
            continue
        summary[label] = {"n": len(rows), "model_predicted": stats([r["model_pred_speedup"] for r in rows])}
        if measure:
            ok = [r for r in rows if r.get("naive_ms") and r.get("measured_ms") and r.get("model_ms")
                  and r.get("next_ms")]
            summary[label]["next_smooth"] = stats([r["naive_ms"] / r["next_ms"] for r in ok])
            summary[label]["model_top1"] = stats([r["naive_ms"] / r["model_ms"] for r in ok])
            summary[label]["measured_best"] = stats([r["naive_ms"] / r["measured_ms"] for r in ok])
            summary[label]["measured_vs_next"] = stats([r["next_ms"] / r["measured_ms"] for r in ok])
    out["summary"] = summary
    print(f"{'sizes':<10} {'speed-up over naive':<26} {'median':>7} {'q1':>7} {'q3':>7} {'mean':>7} {'max':>7} "
          f"{'<naive':>7}")
    for label, s in summary.items():
        for key, name in (("model_predicted", "model (predicted)"), ("next_smooth", "next 7-smooth size"),
                          ("model_top1", "model's first choice"), ("measured_best", "advisor (measured)"),
                          ("measured_vs_next", "advisor vs next-smooth")):
            if key in s:
                v = s[key]
                print(f"{label + ' ' + str(s['n']):<10} {name:<26} {v['median']:>6.2f}x {v['q1']:>6.2f}x "
                      f"{v['q3']:>6.2f}x {v['mean']:>6.2f}x {v['max']:>6.2f}x {100 * v['slower_than_naive']:>6.0f}%")
    print("thesis (cuFFTAdvisor, 2000 random sizes): mean 5.05x (one criterion) to 6.94x (autotuned)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, default=lambda o: o if not isinstance(o, float) or math.isfinite(o) else None)


if __name__ == "__main__":
    main()
