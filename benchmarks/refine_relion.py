"""Gold-standard 3D auto-refinement side by side: RELION's ``relion_refine --auto_refine --split_random_halves``
(CPU) and ``xmipp-accel refine`` (CPU and/or GPU), on the same particles and initial model, same machine, same run.

The data set (written once into ``--workdir``): a random asymmetric phantom (``--box`` px, ``--apix`` Å/px) as the
truth, ``--particles`` projections of it at uniform random orientations, random shifts up to ``--max-shift`` px,
RELION's CTF with defocus ``--defocus`` (µm range), white noise at ``--snr``; a RELION 3.1 STAR file with CTF and
random half sets; the initial model is the truth low-passed to ``--initial-lowpass`` Å (30 by default).

For each program it prints: the reported (gold-standard, 0.143) resolution, the resolution of its final map against
the truth (FSC 0.5, soft spherical mask of ``--diameter``), the median angular error of its poses against the true
ones, the iterations, the wall time (process start to finish, reading and writing included), and RELION's time over
ours. ``--json FILE`` writes the same as JSON.

RELION runs as ``mpirun -np 3 relion_refine_mpi ... --j T`` (one leader and one rank per half set: RELION 3.1 refuses
``--split_random_halves`` without MPI), with ``T = --relion-threads`` threads per rank; ours with ``--threads`` BLAS/FFT
threads.

On the GPU machine RELION comes from ``../shared/tools/device-relion.sh`` (carry ``.relion``, then
``export PATH=$PWD/.relion/bin:$PATH LD_LIBRARY_PATH=$PWD/.relion/lib``); 16 cores: ``--threads 16 --mpi 3
--relion-threads 5`` (the two followers do the work).

Usage (the issue's case, tens of minutes on a 16-core machine; then the smoke run of RESULTS.md)::

    python benchmarks/refine_relion.py --box 64 --particles 4000 --snr 0.05 --threads 16 --relion-threads 5 \
        --ours cpu,gpu
    python benchmarks/refine_relion.py --box 32 --apix 4 --particles 300 --snr 0.1 --threads 1 --max-iterations 6
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import time
import warnings

import numpy as np

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from xmipp_accel.em.geometry import angular_distance_deg, euler_to_matrix  # noqa: E402
from xmipp_accel.em.symmetry import symmetry_matrices  # noqa: E402
from xmipp_accel.em.synthetic import make_particles, phantom_volume  # noqa: E402
from xmipp_accel.gpu.refine import lowpass_volume, soft_spherical_mask  # noqa: E402
from xmipp_accel.gpu.resolution.fsc import fsc, resolution_at  # noqa: E402
from xmipp_accel.io.images import write_stack  # noqa: E402
from xmipp_accel.io.mrc import read_mrc, write_mrc  # noqa: E402
from xmipp_accel.io.particles import read_particles, write_particles_from_arrays  # noqa: E402
from xmipp_accel.io.star import read_star  # noqa: E402


# ------------------------------------------------------------------------------------------------ data

def write_dataset(folder: str, args) -> dict:
    """Truth, particles (stack + STAR 3.1 with CTF and half sets) and initial model in ``folder``."""
    os.makedirs(folder, exist_ok=True)
    truth = phantom_volume(args.box, seed=args.seed)
    lo, hi = (float(v) * 1e4 for v in args.defocus.split(","))
    images, tr = make_particles(truth, args.particles, pixel_size_A=args.apix, snr=args.snr, ctf=True,
                                max_shift_px=args.max_shift, seed=args.seed + 1, defocus_range_A=(lo, hi))
    write_stack(os.path.join(folder, "particles.mrcs"), images, args.apix)
    star = os.path.join(folder, "particles.star")
    write_particles_from_arrays(star, [f"{i + 1}@particles.mrcs" for i in range(args.particles)], args.apix,
                                ctf=tr, subset=tr["subset"], box_size=args.box)
    write_mrc(os.path.join(folder, "truth.mrc"), truth, args.apix)
    init = os.path.join(folder, "initial.mrc")
    write_mrc(init, lowpass_volume(truth, args.initial_lowpass, args.apix), args.apix)
    np.save(os.path.join(folder, "true_matrices.npy"), tr["matrices"])
    return {"star": star, "initial": init, "truth": truth, "matrices": tr["matrices"]}


# ------------------------------------------------------------------------------------------------ runs

def run_timed(cmd: list, *, cwd: str, env: dict, timeout: float, log: str) -> float:
    """Wall seconds of ``cmd``; its output goes to ``log``; raises with the log's tail when it fails."""
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.run(cmd, cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        with open(log) as fh:
            tail = fh.read()[-3000:]
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{tail}")
    return seconds


def thread_env(threads: int) -> dict:
    env = dict(os.environ)
    for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[k] = str(threads)
    env["PYTHONPATH"] = os.pathsep.join([os.path.abspath(os.path.join(os.path.dirname(__file__), "..")),
                                         env.get("PYTHONPATH", "")])
    return env


def run_relion(data: dict, folder: str, args) -> dict:
    """``relion_refine(_mpi) --auto_refine --split_random_halves``; returns map, poses, resolution, iterations."""
    out = os.path.join(folder, "relion")
    os.makedirs(out, exist_ok=True)
    exe = shutil.which("relion_refine_mpi")
    if exe is None:
        raise RuntimeError("relion_refine_mpi not found on PATH (apt-get install relion)")
    cmd = [shutil.which("mpirun") or "mpirun", "-np", str(args.mpi), "--oversubscribe", exe,
           "--o", os.path.join(out, "run"), "--auto_refine", "--split_random_halves",
           "--i", data["star"], "--ref", data["initial"], "--firstiter_cc", "--ini_high", str(args.initial_lowpass),
           "--dont_combine_weights_via_disc", "--pool", "30", "--pad", "2", "--ctf",
           "--particle_diameter", str(args.diameter), "--flatten_solvent", "--zero_mask",
           "--oversampling", "1", "--healpix_order", "2", "--auto_local_healpix_order", "4",
           "--offset_range", str(max(3, int(round(args.max_shift * 2)))), "--offset_step", "2",
           "--sym", args.sym.upper(), "--low_resol_join_halves", "40", "--norm", "--scale",
           "--j", str(args.relion_threads)]
    env = thread_env(args.relion_threads)
    env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
    env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    # RELION reads image names relative to its working folder: run it where the STAR file is
    seconds = run_timed(cmd, cwd=os.path.dirname(data["star"]), env=env, timeout=args.timeout,
                        log=os.path.join(out, "relion.log"))
    its = sorted(int(m.group(1)) for f in glob.glob(os.path.join(out, "run_it*_optimiser.star"))
                 if (m := re.search(r"_it(\d+)_optimiser", f)))
    model = read_star(os.path.join(out, "run_model.star"))
    general = model["model_general"]
    reported = float(np.asarray(general["rlnCurrentResolution"]).ravel()[0])
    parts = read_particles(os.path.join(out, "run_data.star"))
    return {"map": os.path.join(out, "run_class001.mrc"), "particles": parts, "reported_A": reported,
            "iterations": its[-1] if its else None, "seconds": seconds}


def run_ours(data: dict, folder: str, device: str, args) -> dict:
    """``xmipp-accel refine`` on ``device``; returns map, poses, resolution, iterations."""
    out = os.path.join(folder, f"ours_{device}")
    if os.path.exists(out):
        shutil.rmtree(out)
    cmd = [sys.executable, "-m", "xmipp_accel", "refine", data["star"], "--initial-volume", data["initial"],
           "--diameter", str(args.diameter), "--symmetry", args.sym, "--initial-lowpass", str(args.initial_lowpass),
           "--max-iterations", str(args.max_iterations), "-o", out, "--device", device, "--json", "--quiet"]
    log = os.path.join(folder, f"ours_{device}.log")
    seconds = run_timed(cmd, cwd=folder, env=thread_env(args.threads), timeout=args.timeout, log=log)
    with open(log) as fh:
        summary = json.loads([line for line in fh.read().splitlines() if line.startswith("{")][-1])
    return {"map": summary["outputs"]["volume"], "particles": read_particles(summary["outputs"]["particles"]),
            "reported_A": summary["resolution_A"], "iterations": summary["iterations"], "seconds": seconds,
            "device": summary["device"]}


# ------------------------------------------------------------------------------------------------ scores

def score(result: dict, data: dict, args) -> dict:
    """FSC-to-truth resolution (0.5, masked) and the median angular error (degrees, symmetry-aware)."""
    vol, _ = read_mrc(result["map"])
    mask = soft_spherical_mask(args.box, 0.5 * args.diameter / args.apix, 3.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        truth_res = resolution_at(fsc(np.asarray(vol, np.float32), data["truth"], mask=mask), 0.5, args.apix)
    parts = result["particles"]
    a = parts.angles_deg
    # RELION reorders the particles (half set 1 first): match them to the truth by image number
    index = np.array([int(str(ref).split("@")[0]) - 1 for ref in parts.image_refs])
    err = angular_distance_deg(euler_to_matrix(a[:, 0], a[:, 1], a[:, 2]), data["matrices"][index],
                               symmetry_matrices(args.sym))
    return {"reported_A": result["reported_A"], "truth_fsc05_A": float(truth_res),
            "median_angular_error_deg": float(np.median(err)), "iterations": result["iterations"],
            "seconds": round(result["seconds"], 2)}


def table(rows: dict) -> str:
    head = f"{'program':<22}{'reported Å':>11}{'vs truth Å':>11}{'med. err °':>11}{'iters':>7}{'wall s':>9}" \
           f"{'RELION/us':>10}"
    lines = [head, "-" * len(head)]
    relion_s = rows.get("relion", {}).get("seconds")
    for name, r in rows.items():
        ratio = f"{relion_s / r['seconds']:.2f}" if relion_s and name != "relion" else ""
        rep = r["reported_A"]
        lines.append(f"{name:<22}{(f'{rep:.2f}' if rep else '-'):>11}{r['truth_fsc05_A']:>11.2f}"
                     f"{r['median_angular_error_deg']:>11.2f}{str(r['iterations']):>7}{r['seconds']:>9.1f}{ratio:>10}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--box", type=int, default=64, help="px (default: %(default)s)")
    p.add_argument("--apix", type=float, default=3.0, help="Å/px (default: %(default)s)")
    p.add_argument("--particles", type=int, default=4000, help="(default: %(default)s)")
    p.add_argument("--snr", type=float, default=0.05, help="(default: %(default)s)")
    p.add_argument("--max-shift", type=float, default=3.0, help="px (default: %(default)s)")
    p.add_argument("--defocus", default="1.0,2.5", help="defocus range, µm (default: %(default)s)")
    p.add_argument("--initial-lowpass", type=float, default=30.0, help="Å (default: %(default)s)")
    p.add_argument("--diameter", type=float, default=None, help="Å (default: 0.85 of the box)")
    p.add_argument("--sym", default="c1")
    p.add_argument("--max-iterations", type=int, default=15, help="ours (default: %(default)s)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads of ours (BLAS/FFT)")
    p.add_argument("--relion-threads", type=int, default=None, help="threads per RELION rank (default: --threads)")
    p.add_argument("--mpi", type=int, default=3, help="RELION MPI ranks, at least 3 (default: %(default)s)")
    p.add_argument("--ours", default="cpu", help="comma-separated devices for ours: cpu, gpu (default: cpu)")
    p.add_argument("--no-relion", action="store_true", help="run only ours")
    p.add_argument("--timeout", type=float, default=7200, help="seconds per program")
    p.add_argument("--seed", type=int, default=3)
    p.add_argument("--workdir", default=None, help="folder for data and runs (default: a new temporary one)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = p.parse_args(argv)
    if args.mpi < 3 and not args.no_relion:
        p.error("--mpi must be at least 3: RELION's auto-refine needs a leader and one rank per half set")
    if args.relion_threads is None:
        args.relion_threads = args.threads
    if args.diameter is None:
        args.diameter = 0.85 * args.box * args.apix
    import tempfile
    folder = os.path.abspath(args.workdir or tempfile.mkdtemp(prefix="refine_relion_"))
    data = write_dataset(os.path.join(folder, "data"), args)
    print(f"data: {args.particles} particles, {args.box} px, {args.apix} Å/px, SNR {args.snr}, CTF "
          f"{args.defocus} µm, initial model = truth at {args.initial_lowpass} Å; in {folder}", flush=True)
    rows = {}
    if not args.no_relion:
        rows["relion"] = score(run_relion(data, folder, args), data, args)
        print("relion:", rows["relion"], flush=True)
    for device in [d.strip() for d in args.ours.split(",") if d.strip()]:
        res = run_ours(data, folder, device, args)
        rows[f"xmipp-accel {device}"] = score(res, data, args)
        print(f"xmipp-accel {device} ({res['device']}):", rows[f"xmipp-accel {device}"], flush=True)
    print(table(rows))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"settings": {k: v for k, v in vars(args).items() if k != "json"}, "results": rows}, fh,
                      indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
