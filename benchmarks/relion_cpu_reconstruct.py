"""CPU reconstruction side by side: ``xmipp-accel reconstruct --device cpu`` against ``relion_reconstruct --ctf``.

One data set, made by RELION: a phantom (``em.synthetic.phantom_volume``, ``--box`` px, ``--pixel`` Å)
projected by ``relion_project --ctf --add_noise`` at ``--particles`` random orientations with random
origins, defocus (0.8-2.5 µm) and astigmatism, white noise of ``--noise`` (image units; the projections'
standard deviation is about 4 at 64 px). Both programs read the same STAR and run as subprocesses on the
same cores (``--cpus``, default all; ``relion_reconstruct`` is single-threaded, ours uses every core it
is given: FFT workers and one helper thread). For each, the best of ``--repeats`` runs:

- wall time and CPU time (user + system, of the child process) in seconds, and the ratio RELION / ours;
- FSC to the true map at 0.5 (Å) and the real-space correlation with it; ours also with ``--no-mask``
  (the soft spherical mask is our default; relion_reconstruct masks outside the inscribed sphere too).

Usage::

    python benchmarks/relion_cpu_reconstruct.py [--particles 3000] [--box 64] [--repeats 3] [--cpus 0,1]
        [--interp auto] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from xmipp_accel.em.synthetic import phantom_volume  # noqa: E402
from xmipp_accel.gpu.resolution.fsc import fsc, resolution_at  # noqa: E402
from xmipp_accel.io.mrc import read_mrc  # noqa: E402
from xmipp_accel.tests.relion_peer import relion_ctf_particles  # noqa: E402

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


def timed(cmd, cwd: str, cpus=None, env=None) -> dict:
    """Run ``cmd``; wall seconds and the child's CPU seconds (user + system)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()

    def pin():
        if cpus:
            os.sched_setaffinity(0, cpus)
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, preexec_fn=pin)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, cmd))} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall_s": wall, "cpu_s": cpu}


def quality(path: str, truth: np.ndarray, pixel_A: float) -> dict:
    """FSC 0.5 to the truth (Å) and the real-space correlation of a map."""
    vol, _ = read_mrc(path)
    vol = np.asarray(vol, dtype=np.float64)
    res = fsc(vol, truth)
    corr = float(np.corrcoef(vol.ravel(), truth.ravel())[0, 1])
    return {"fsc05_A": float(resolution_at(res, 0.5, pixel_A)), "corr": corr}


def best(runs):
    return {k: min(r[k] for r in runs) for k in runs[0]}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--particles", type=int, default=3000)
    p.add_argument("--box", type=int, default=64)
    p.add_argument("--pixel", type=float, default=2.0, help="Å per pixel (default: %(default)s)")
    p.add_argument("--noise", type=float, default=4.0, help="white noise sigma (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cpus", default=None, help="cores both programs run on, e.g. 0,1 (default: all)")
    p.add_argument("--interp", default="auto", help="our --interp (default: %(default)s)")
    p.add_argument("--workdir", default=None, help="keep the data here (default: a temporary folder)")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    cpus = None if not args.cpus else {int(c) for c in args.cpus.split(",")}
    folder = args.workdir or tempfile.mkdtemp(prefix="relion_cpu_reconstruct_")
    os.makedirs(folder, exist_ok=True)
    truth = phantom_volume(args.box, seed=3)
    star = relion_ctf_particles(folder, truth, args.particles, pixel_size_A=args.pixel, noise_sigma=args.noise)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    relion_cmd = ["relion_reconstruct", "--i", star, "--o", "relion.mrc", "--ctf"]
    ours_cmd = [sys.executable, "-m", "xmipp_accel", "reconstruct", star, "-o", "ours.mrc", "--device", "cpu",
                "--ctf", "wiener", "--interp", args.interp, "--json", "-q"]
    relion_runs, ours_runs = [], []
    for _ in range(max(1, args.repeats)):      # alternate, so that both see the same machine load
        relion_runs.append(timed(relion_cmd, folder, cpus, env))
        ours_runs.append(timed(ours_cmd, folder, cpus, env))
    timed(ours_cmd[:6] + ["ours_nomask.mrc"] + ours_cmd[7:] + ["--no-mask"], folder, cpus, env)
    truth64 = truth.astype(np.float64)
    out = {"particles": args.particles, "box": args.box, "pixel_A": args.pixel, "noise_sigma": args.noise,
           "cores": sorted(cpus) if cpus else os.cpu_count(), "interp": args.interp, "repeats": args.repeats,
           "relion": {**best(relion_runs), **quality(os.path.join(folder, "relion.mrc"), truth64, args.pixel)},
           "ours": {**best(ours_runs), **quality(os.path.join(folder, "ours.mrc"), truth64, args.pixel)},
           "ours_no_mask": quality(os.path.join(folder, "ours_nomask.mrc"), truth64, args.pixel),
           "folder": folder}
    out["ratio_wall"] = out["relion"]["wall_s"] / out["ours"]["wall_s"]
    out["ratio_cpu"] = out["relion"]["cpu_s"] / out["ours"]["cpu_s"]
    print(f"{args.particles} particles of {args.box} px with CTF and noise (relion_project), cores: {out['cores']}, "
          f"best of {args.repeats}")
    print(f"{'':22s} {'wall s':>8s} {'CPU s':>8s} {'FSC0.5 Å':>9s} {'corr':>7s}")
    for name, key in (("relion_reconstruct", "relion"), ("xmipp-accel (mask)", "ours")):
        r = out[key]
        print(f"{name:22s} {r['wall_s']:8.2f} {r['cpu_s']:8.2f} {r['fsc05_A']:9.2f} {r['corr']:7.4f}")
    r = out["ours_no_mask"]
    print(f"{'xmipp-accel --no-mask':22s} {'':8s} {'':8s} {r['fsc05_A']:9.2f} {r['corr']:7.4f}")
    print(f"ratio RELION / ours: wall {out['ratio_wall']:.2f}x, CPU {out['ratio_cpu']:.2f}x")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=2)
    return out


if __name__ == "__main__":
    main()
