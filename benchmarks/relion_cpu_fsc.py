"""Benchmark: masked FSC with phase-randomisation correction, ours against ``relion_postprocess`` on the CPU.

The same half maps and soft mask go to both command lines, run one after the other pinned to the same
cores (``--cores``): ``xmipp-accel fsc --mask`` (masked FSC, phase randomisation from where the
unmasked FSC drops below 0.8, corrected curve; writes the STAR) and ``relion_postprocess --mask``
without ``--auto_bfac`` (the same curves; RELION also writes the masked and filtered maps). Printed:
both wall times, their ratio, and the resolutions at 0.143 (RELION's rule, the last shell at or above
0.143, and ours interpolated between shells).

Half maps as in ``tests/test_relion_fsc.py``: a phantom low-passed to 6 Å at 1.5 Å/px plus independent
white noise per half; mask: a sphere of radius 0.375·box with a raised-cosine edge of box/10 px.

    python benchmarks/relion_cpu_fsc.py                      # 128³ and 256³ on all cores
    python benchmarks/relion_cpu_fsc.py --boxes 128 --cores 2 --json out.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import tempfile

import numpy as np

import side_by_side as sbs
from xmipp_accel import backend
from xmipp_accel.em.synthetic import gaussian_lowpass, phantom_volume
from xmipp_accel.io.mrc import write_mrc
from xmipp_accel.io.star import read_star
from xmipp_accel.tests.test_relion_fsc import soft_sphere

PIXEL_A, NOISE = 1.5, 0.1


def _maps(d: str, box: int) -> None:
    signal = gaussian_lowpass(phantom_volume(box, seed=3), resolution_A=6.0, pixel_size_A=PIXEL_A)
    rng = np.random.default_rng(7)
    for h in (1, 2):
        noisy = signal + NOISE * rng.standard_normal(signal.shape).astype(np.float32)
        write_mrc(os.path.join(d, f"half{h}.mrc"), noisy, PIXEL_A)
    write_mrc(os.path.join(d, "mask.mrc"), soft_sphere(box, 0.375 * box, box / 10.0), PIXEL_A)


def side_by_side(box: int, cores, repeats: int) -> dict:
    d = tempfile.mkdtemp(prefix="fsc_bench_")
    _maps(d, box)
    run = sbs.run_timed(sbs.ours("fsc", "half1.mrc", "half2.mrc", "--mask", "mask.mrc", "-o", "ours.star"),
                        d, cores, repeats)
    summary = sbs.last_json(run["stdout"])
    out = {"box": box, "dir": d,
           "ours": {"seconds": run["seconds"], "cpu_seconds": run["cpu_seconds"], "compute_seconds": summary["seconds"],
                    "resolution_A": summary["resolution_A"],
                    "resolution_A_relion_rule": summary["resolution_A_relion_rule"]}}
    exe = sbs.relion("relion_postprocess")
    if exe:
        os.makedirs(os.path.join(d, "pp"), exist_ok=True)
        run = sbs.run_timed([exe, "--i", "half1.mrc", "--i2", "half2.mrc", "--mask", "mask.mrc", "--angpix", PIXEL_A,
                             "--o", "pp/postprocess"], d, cores, repeats)
        general = read_star(os.path.join(d, "pp", "postprocess.star"))["general"]
        value = general["rlnFinalResolution"]
        value = value[0] if isinstance(value, (list, tuple, np.ndarray)) else value
        out["relion"] = {"seconds": run["seconds"], "cpu_seconds": run["cpu_seconds"],
                         "resolution_A_relion_rule": float(value)}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--boxes", type=int, nargs="*", default=[128, 256])
    p.add_argument("--cores", type=int, default=None, help="CPU cores for both programs (default: all)")
    p.add_argument("--repeats", type=int, default=1, help="runs of each program (best time)")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    cores = sbs.cores_to_use(args.cores)
    result = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "cpu": sbs.cpu_name(),
              "cores": cores, "versions": backend.versions(),
              "runs": [side_by_side(n, cores, args.repeats) for n in args.boxes]}
    print(f"masked + phase-randomised FSC, {len(cores)} cores of {result['cpu']}")
    print(f"{'box':>4s} {'ours (s)':>9s} {'(compute)':>9s} {'RELION (s)':>10s} {'RELION/ours':>11s} "
          f"{'CPU s ours | RELION':>20s} {'ours 0.143 (Å)':>14s} {'ours, RELION rule':>17s} {'RELION (Å)':>10s}")
    for r in result["runs"]:
        o, rel = r["ours"], r.get("relion")
        rel_s = f"{rel['seconds']:10.2f}" if rel else f"{'-':>10s}"
        ratio = f"{rel['seconds'] / o['seconds']:11.1f}" if rel else f"{'-':>11s}"
        rel_a = f"{rel['resolution_A_relion_rule']:10.3f}" if rel else f"{'-':>10s}"
        cpu = f"{o['cpu_seconds']:9.2f} | {rel['cpu_seconds']:8.2f}" if rel else f"{o['cpu_seconds']:9.2f} | {'-':>8s}"
        print(f"{r['box']:4d} {o['seconds']:9.2f} {o['compute_seconds']:9.2f} {rel_s} {ratio} {cpu:>20s} "
              f"{o['resolution_A']:14.3f} {o['resolution_A_relion_rule']:17.3f} {rel_a}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)


if __name__ == "__main__":
    main()
