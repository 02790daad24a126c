"""CPU movie alignment side by side: ``xmipp-accel align-movies --device cpu`` and ``relion_run_motioncorr --use_own``.

Both align the same files (``--movies`` distinct synthetic movies from :mod:`xmipp_accel.em.synthetic_movies`,
default 5 × 1024² × 24 frames, 1 Å/px, 1 e⁻/px per frame, drift ~35 px, doming 2 px, written as float32
MRC in a project folder), with 3 × 3 patches and dose weighting, on the same ``--cores`` (both pinned with
``taskset``; RELION ``--j`` threads, ours ``OMP_NUM_THREADS`` and SciPy FFT workers). Per movie:

* ours: read, compute and write time (ms, from ``--json``), and the run's wall per movie including the
  process start (imports) amortised over the batch;
* RELION: per-movie time from the modification times of its per-movie STAR files (RELION reports no stage
  times: read and compute are not separated), and the run's wall per movie;
* RMS error of the global shifts against the truth (px, each set relative to its mean).

Both run with their default alignment settings, in three settings (``CONFIGS``): the defaults with 3 × 3
patches, and with the same outputs (both sums, no power spectrum: RELION ``--save_noDW``, ours
``--psd-size 0``) with 3 × 3 patches (ours with Keys and with bilinear interpolation, ``--interpolation
linear``, RELION's) and with global alignment only (RELION 1 × 1 patches, ours ``--no-local``).
What each program does beyond the other is printed under the table: by
default ours does more (a non-dose-weighted sum besides the dose-weighted one, a PSD, and Keys cubic
interpolation of the local motion where RELION's ``--use_own`` interpolates the dose-weighted frames
bilinearly, ``realSpaceInterpolation_ThirdOrderPolynomial`` in ``src/motioncorr_runner.cpp``).
The programs run alternately ``--repeats`` times; the table
gives the fastest run of each, as wall time and as CPU time (user + system seconds of the process and its
threads, which other jobs on a shared machine inflate far less than the wall time). Prints one table and,
with ``--results FILE``, appends it to FILE (Markdown) with the date, machine and commit.

Usage::

    python benchmarks/relion_cpu_motioncorr.py [--movies 5] [--size 1024] [--frames 24] [--cores 0,1]
                                               [--workdir /tmp/relion_cpu_mc] [--results benchmarks/results_movie.md]
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import shutil
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.side_by_side import children_cpu_s  # noqa: E402
from xmipp_accel.em.synthetic_movies import make_movie  # noqa: E402
from xmipp_accel.io.mrc import write_mrc  # noqa: E402
from xmipp_accel.io.relion_motion import read_global_shifts  # noqa: E402
from xmipp_accel.io.star import Table, read_star, write_star  # noqa: E402

PIXEL_A, DOSE, KV = 1.0, 1.0, 300.0


def make_project(d: str, n_movies: int, size: int, frames: int) -> list:
    """Movies/m<i>.mrcs and movies.star in ``d``; returns the true global shifts (px) per movie."""
    os.makedirs(os.path.join(d, "Movies"), exist_ok=True)
    truths = []
    for i in range(n_movies):
        f, t = make_movie((size, size), frames, dose_per_pixel=DOSE, drift_scale=2.0, doming_px=2.0, seed=11 + i)
        write_mrc(os.path.join(d, "Movies", f"m{i}.mrcs"), f.astype(np.float32), PIXEL_A)
        truths.append(t["global_shifts_px"])
    write_movies_star(d, n_movies)
    return truths


def write_movies_star(d: str, n_movies: int) -> None:
    """``d``/movies.star naming Movies/m0.mrcs ... m<n-1>.mrcs (one optics group, ``PIXEL_A``, ``KV``)."""
    optics = Table({"rlnOpticsGroupName": np.array(["opticsGroup1"]), "rlnOpticsGroup": np.array([1]),
                    "rlnMicrographOriginalPixelSize": np.array([PIXEL_A]), "rlnVoltage": np.array([KV]),
                    "rlnSphericalAberration": np.array([2.7]), "rlnAmplitudeContrast": np.array([0.1])})
    names = np.array([f"Movies/m{i}.mrcs" for i in range(n_movies)])
    write_star(os.path.join(d, "movies.star"), {"optics": optics, "movies": Table(
        {"rlnMicrographMovieName": names, "rlnOpticsGroup": np.ones(n_movies, np.int64)})})


def shift_errors(shifts: np.ndarray, truth: np.ndarray) -> tuple:
    """(RMS, max) over frames of the length of the error (px) of (n, 2) shifts, each set relative to its
    mean (so the reference frame each program chose does not matter)."""
    err = (np.asarray(shifts) - np.mean(shifts, 0)) - (truth - truth.mean(0))
    e = np.sqrt((err ** 2).sum(axis=1))
    return float(np.sqrt((e ** 2).mean())), float(e.max())


def rms_error(shifts: np.ndarray, truth: np.ndarray) -> float:
    return shift_errors(shifts, truth)[0]


def _env(cores: str) -> dict:
    n = len(cores.split(","))
    return dict(os.environ, OMP_NUM_THREADS=str(n), OPENBLAS_NUM_THREADS=str(n), MKL_NUM_THREADS=str(n))


def run_relion(d: str, n_movies: int, cores: str, extra: tuple = ("--patch_x", "3", "--patch_y", "3")) -> dict:
    out = os.path.join(d, "MotionCorr")
    shutil.rmtree(out, ignore_errors=True)
    cmd = ["taskset", "-c", cores, "relion_run_motioncorr", "--i", "movies.star", "--o", "MotionCorr/", "--use_own",
           "--j", str(len(cores.split(","))), *extra, "--bin_factor", "1",
           "--bfactor", "150", "--dose_weighting", "--dose_per_frame", str(DOSE), "--voltage", str(KV)]
    t0, c0 = time.time(), children_cpu_s()
    subprocess.run(cmd, cwd=d, env=_env(cores), check=True, capture_output=True)
    wall, cpu = time.time() - t0, children_cpu_s() - c0
    stars = [os.path.join(out, "Movies", f"m{i}.star") for i in range(n_movies)]
    done = [os.path.getmtime(s) for s in stars]
    per = np.diff([t0] + done)   # movies are processed in order, one after the other
    return {"wall_s": wall, "cpu_s": cpu, "per_movie_s": per.tolist(),
            "shifts": [read_global_shifts(read_star(s))[1] for s in stars]}


def _fastest(runs: list) -> dict:
    best = dict(min(runs, key=lambda r: r["wall_s"]))
    best["cpu_s"] = min(r["cpu_s"] for r in runs)
    return best


def run_ours(d: str, n_movies: int, cores: str, extra: tuple = ("--patches", "3x3"), device: str = "cpu") -> dict:
    out = os.path.join(d, "Ours")
    shutil.rmtree(out, ignore_errors=True)
    movies = sorted(glob.glob(os.path.join(d, "Movies", "m*.mrcs")), key=lambda p: int(os.path.basename(p)[1:-5]))
    cmd = ["taskset", "-c", cores, sys.executable, "-m", "xmipp_accel", "align-movies", *movies, "-o", out,
           *extra, "--dose-per-frame", str(DOSE), "--voltage", str(KV), "--device", device, "--json", "-q"]
    t0, c0 = time.time(), children_cpu_s()
    proc = subprocess.run(cmd, cwd=d, env=_env(cores), check=True, capture_output=True, text=True)
    wall, cpu = time.time() - t0, children_cpu_s() - c0
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    ms = summary["movies"]
    return {"wall_s": wall, "cpu_s": cpu, "read_s": [m["read_ms"] / 1e3 for m in ms],
            "compute_s": [m["compute_ms"] / 1e3 for m in ms], "write_s": [m["write_ms"] / 1e3 for m in ms],
            "pipeline_s": summary["pipeline_seconds"], "pipeline": summary.get("pipeline"),
            "shifts": [np.asarray(m["shifts_px"]) for m in ms]}


#: (label, RELION options, our options, what differs in the work done)
CONFIGS = (
    ("default: local 3×3", ("--patch_x", "3", "--patch_y", "3"), ("--patches", "3x3"),
     "ours also writes the non-dose-weighted sum and a 512² PSD, and interpolates the local motion with Keys "
     "cubic weights (16 taps) before the dose weighting; RELION writes the dose-weighted sum only and "
     "interpolates the dose-weighted frames bilinearly (4 taps)"),
    ("same outputs: local 3×3", ("--patch_x", "3", "--patch_y", "3", "--save_noDW"),
     ("--patches", "3x3", "--psd-size", "0"),
     "both write the sum and the dose-weighted sum, no PSD; RELION interpolates twice (the frames, then the "
     "dose-weighted frames) bilinearly, ours once with Keys weights, then one forward FFT per frame"),
    ("same outputs: local 3×3, bilinear", ("--patch_x", "3", "--patch_y", "3", "--save_noDW"),
     ("--patches", "3x3", "--psd-size", "0", "--interpolation", "linear"),
     "both write the sum and the dose-weighted sum, no PSD, and interpolate bilinearly (4 taps): RELION "
     "twice (the frames, then the dose-weighted frames), ours once, then one forward FFT per frame"),
    ("same outputs: global only", ("--patch_x", "1", "--patch_y", "1", "--save_noDW"),
     ("--no-local", "--psd-size", "0"),
     "both write the sum and the dose-weighted sum, no PSD, no interpolation (Fourier shifts)"),
)


def _rows(label: str, relion: dict, ours: dict, truths: list, n: int, j: int) -> list:
    rel_err = [rms_error(s, t) for s, t in zip(relion["shifts"], truths)]
    our_err = [rms_error(s, t) for s, t in zip(ours["shifts"], truths)]
    return [
        f"| {label} | relion_run_motioncorr --use_own --j {j} | – | {np.median(relion['per_movie_s']):.2f} (read "
        f"included) | – | {relion['wall_s'] / n:.2f} | {relion['cpu_s'] / n:.2f} | "
        f"{np.mean(rel_err):.3f}, {np.max(rel_err):.3f} |",
        f"| {label} | xmipp-accel align-movies --device cpu | {np.median(ours['read_s']):.3f} | "
        f"{np.median(ours['compute_s']):.2f} | {np.median(ours['write_s']):.3f} | {ours['wall_s'] / n:.2f} "
        f"(pipeline {ours['pipeline_s'] / n:.2f}) | {ours['cpu_s'] / n:.2f} | "
        f"{np.mean(our_err):.3f}, {np.max(our_err):.3f} |",
        f"| {label} | **RELION / ours** | | | | **{relion['wall_s'] / ours['wall_s']:.2f}×** | "
        f"**{relion['cpu_s'] / ours['cpu_s']:.2f}×** | {np.mean(rel_err) / np.mean(our_err):.2f}× |"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--movies", type=int, default=5)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--frames", type=int, default=24)
    ap.add_argument("--cores", default="0,1", help="CPU cores for both programs (taskset list)")
    ap.add_argument("--workdir", default="/tmp/relion_cpu_mc")
    ap.add_argument("--repeats", type=int, default=2, help="alternate runs of each program (the fastest counts)")
    ap.add_argument("--configs", default="0,1,2,3", help="which of CONFIGS to run (comma-separated indices)")
    ap.add_argument("--results", default=None, help="append the table to this Markdown file")
    args = ap.parse_args(argv)
    d = os.path.abspath(args.workdir)
    truths = make_project(d, args.movies, args.size, args.frames)
    n = args.movies
    j = len(args.cores.split(","))
    configs = [CONFIGS[int(i)] for i in args.configs.split(",")]
    lines = [f"CPU movie alignment, {n} movies {args.size}² × {args.frames} (1 Å/px, dose weighting), "
             f"cores {args.cores}, fastest of {args.repeats} alternate runs; "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.node()}, "
             f"load average {os.getloadavg()[0]:.1f}, commit {_commit()}", "",
             "| setting | program | read s/movie | compute s/movie | write s/movie | wall s/movie (run / n) | "
             "CPU s/movie (run / n) | RMS error px (mean, max) |", "|---|---|---|---|---|---|---|---|"]
    notes = []
    for label, relion_extra, extra, note in configs:
        runs = {"relion": [], "ours": []}
        for _ in range(max(1, args.repeats)):
            runs["relion"].append(run_relion(d, n, args.cores, relion_extra))
            runs["ours"].append(run_ours(d, n, args.cores, extra))
        lines += _rows(label, _fastest(runs["relion"]), _fastest(runs["ours"]), truths, n, j)
        notes.append(f"* {label}: RELION `{' '.join(relion_extra)}`, ours `{' '.join(extra)}`; {note}.")
    lines += [""] + notes
    text = "\n".join(lines)
    print(text)
    if args.results:
        with open(args.results, "a") as f:
            f.write("\n\n" + text + "\n")
    return 0


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or "?"
    except OSError:
        return "?"


if __name__ == "__main__":
    sys.exit(main())
