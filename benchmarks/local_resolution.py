"""Benchmark: local resolution, ours against ``relion_postprocess --locres`` on the same half maps.

Half maps with known regions: a particle in solvent (``em.synthetic.two_resolution_half_maps``) whose
side A (x < box/2) keeps detail to 4.0 Å and side B is low-passed to 7.5 Å (sharp cut-offs), 1.5 Å/px,
spectral SNR 1. Both programs run as command lines on the same MRC files, one after the other, pinned
to the same CPU cores (``--cores``); the table gives both wall times, their ratio, and the median
resolution of each side (the particle's core, >= box/8 px from the plane between the sides) against
the truth. RELION runs at its default sampling (25 Å) and, with ``--relion-sampling``, at others.
Where CuPy is present the GPU path is timed in memory at ``--gpu-box`` (256³), with its accuracy.

    python benchmarks/local_resolution.py                       # 96³ on all cores, + GPU 256³ if any
    python benchmarks/local_resolution.py --box 128 --cores 2 --relion-sampling 25 15 --json out.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import tempfile
import time

import numpy as np

import side_by_side as sbs
from xmipp_accel import backend
from xmipp_accel.em.synthetic import two_resolution_half_maps
from xmipp_accel.gpu.resolution.local import local_resolution
from xmipp_accel.io.mrc import read_mrc, write_mrc

TRUTH_A = (4.0, 7.5)
PIXEL_A = 1.5


def _sides(res: np.ndarray, region: np.ndarray) -> dict:
    a, b = float(np.median(res[region == 1])), float(np.median(res[region == 2]))
    return {"median_A_side_a": a, "median_A_side_b": b, "error_a": a / TRUTH_A[0] - 1, "error_b": b / TRUTH_A[1] - 1,
            "solvent_reported": float(np.mean(res[region == 0] > 0))}


def cpu_side_by_side(box: int, cores, samplings, repeats: int) -> dict:
    d = tempfile.mkdtemp(prefix="locres_bench_")
    h1, h2, region = two_resolution_half_maps(box, pixel_size_A=PIXEL_A, resolutions_A=TRUTH_A, seed=0)
    write_mrc(os.path.join(d, "half1.mrc"), h1, PIXEL_A)
    write_mrc(os.path.join(d, "half2.mrc"), h2, PIXEL_A)
    out = {"box": box, "cores": list(cores), "dir": d}
    run = sbs.run_timed(sbs.ours("local-resolution", "half1.mrc", "half2.mrc", "-o", "ours.mrc"), d, cores, repeats)
    out["ours"] = {"seconds": run["seconds"], "cpu_seconds": run["cpu_seconds"],
                   "compute_seconds": sbs.last_json(run["stdout"])["seconds"],
                   **_sides(read_mrc(os.path.join(d, "ours.mrc"))[0], region)}
    out["relion"] = []
    exe = sbs.relion("relion_postprocess")
    for sampling in samplings if exe else []:
        name = f"pp{sampling:g}"
        os.makedirs(os.path.join(d, name), exist_ok=True)
        cmd = [exe, "--i", "half1.mrc", "--i2", "half2.mrc", "--angpix", PIXEL_A, "--locres",
               "--locres_sampling", sampling, "--o", f"{name}/postprocess"]
        run = sbs.run_timed(cmd, d, cores, 1)
        res = read_mrc(os.path.join(d, name, "postprocess_locres.mrc"))[0]
        out["relion"].append({"sampling_A": sampling, "seconds": run["seconds"], "cpu_seconds": run["cpu_seconds"],
                              **_sides(res, region)})
    return out


def gpu_timing(box: int, repeats: int) -> dict:
    cp = backend.cupy_module()
    h1, h2, region = two_resolution_half_maps(box, pixel_size_A=PIXEL_A, resolutions_A=TRUTH_A, seed=0)
    g1, g2 = cp.asarray(h1), cp.asarray(h2)
    sync = cp.cuda.get_current_stream().synchronize
    times, result = [], None
    for i in range(repeats + 1):  # one warm-up (kernels, FFT plans)
        sync()
        t0 = time.perf_counter()
        result = local_resolution(g1, g2, pixel_size_A=PIXEL_A)
        res = backend.to_host(result.resolution_A)
        if i:
            times.append(time.perf_counter() - t0)
    return {"box": box, "device": backend.gpu_info(0)["name"], "seconds": statistics.median(times),
            "n_bands": int(result.band_frequencies.size), **_sides(res, region)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--box", type=int, default=96, help="box of the CPU side by side (default %(default)s)")
    p.add_argument("--cores", type=int, default=None, help="CPU cores for both programs (default: all)")
    p.add_argument("--relion-sampling", type=float, nargs="*", default=[25.0],
                   help="RELION --locres_sampling values, Å (default: its default, 25)")
    p.add_argument("--repeats", type=int, default=1, help="runs of ours (best time); RELION runs once")
    p.add_argument("--gpu-box", type=int, default=256)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    cores = sbs.cores_to_use(args.cores)
    result = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "cpu": sbs.cpu_name(),
              "versions": backend.versions(), "truth_A": TRUTH_A, "pixel_A": PIXEL_A,
              "cpu_side_by_side": cpu_side_by_side(args.box, cores, args.relion_sampling, args.repeats)}
    if backend.gpu_available():
        result["gpu"] = gpu_timing(args.gpu_box, 3)
    c = result["cpu_side_by_side"]
    print(f"local resolution, {c['box']}³ at {PIXEL_A} Å/px, truth {TRUTH_A[0]} Å | {TRUTH_A[1]} Å; "
          f"{len(cores)} cores of {result['cpu']}")
    print(f"{'program':52s} {'wall (s)':>9s} {'RELION/ours':>11s} {'CPU (s)':>8s} {'side A (Å)':>10s} "
          f"{'side B (Å)':>10s} {'solvent':>8s}")
    o = c["ours"]
    rows = [(f"ours: xmipp-accel local-resolution (compute {o['compute_seconds']:.2f} s)", o)]
    rows += [(f"relion_postprocess --locres (sampling {r['sampling_A']:g} Å)", r) for r in c["relion"]]
    for name, r in rows:
        ratio = r["seconds"] / o["seconds"]
        print(f"{name:52s} {r['seconds']:9.2f} {ratio:11.1f} {r['cpu_seconds']:8.2f} {r['median_A_side_a']:10.2f} "
              f"{r['median_A_side_b']:10.2f} {100 * r['solvent_reported']:7.0f}%")
    if not c["relion"]:
        print("relion_postprocess not found: RELION rows skipped")
    if "gpu" in result:
        g = result["gpu"]
        print(f"GPU {g['device']}, {g['box']}³ in memory: {g['seconds']:.3f} s ({g['n_bands']} bands), "
              f"sides {g['median_A_side_a']:.2f} | {g['median_A_side_b']:.2f} Å")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)


if __name__ == "__main__":
    main()
