"""Movie alignment side by side: MotionCor3, ``relion_run_motioncorr --use_own`` and ``xmipp-accel align-movies``
on the same files, on the same machine, in the same run (issue 16).

Files: ``--movies`` distinct synthetic movies (default 20 × 4096² × 40 frames) from
:mod:`xmipp_accel.em.synthetic_movies`, each with its own Poisson noise (seed) and its own global drift
(``drift_scale`` drawn in ±[0.6, 1.6], i.e. ~12-45 px over 40 frames, either direction), doming 2 px,
1 Å/px, 1 e⁻/px per frame, written as MRC mode 1 (int16: MotionCor3, RELION 3.1 and ours all read it;
MotionCor3 reads no float16) to ``WORKDIR/Movies/m<i>.mrcs`` with ``movies.star`` beside them and the
truth per movie in ``WORKDIR/Truth/m<i>.json``, all before any timing. Generated with CuPy when a GPU is
usable, else NumPy.

Programs, each as a user runs it, one after the other on the same files, all pinned to ``--cores`` (default
all cores) with ``taskset``:

* MotionCor3 (``--motioncor3 PATH``; skipped with the reason when not given): one process per movie
  (``-Serial 0``, as RELION's and Scipion's wrappers call it; its batch mode ``-Serial 1``, ``--mc3-mode
  serial``, aligns no MRC movie in 1.2.1, see :func:`run_motioncor3`), ``-Patch 5 5``, dose weighting
  (``-FmDose 1 -PixSize 1 -kV 300``), ``-OutStack 0``, shifts from ``-LogDir``; a ``lib`` folder beside the
  binary's folder (``.mc3/lib`` for ``.mc3/bin/MotionCor3``) is put first on ``LD_LIBRARY_PATH``;
* ``relion_run_motioncorr --use_own --j <cores>`` (skipped when not on PATH), 5 × 5 patches, dose weighting;
* ``xmipp-accel align-movies --device gpu|cpu --patches 5x5 --dose-per-frame 1``.

Passes: ``cold`` drops every movie from the page cache (``os.posix_fadvise(POSIX_FADV_DONTNEED)`` after
``sync``) before each program, so each reads the disk; ``warm`` reads every movie once before each program
so each reads the page cache. Before the passes each program aligns one movie of its own (``warmup/``, not
timed in the table; ``--no-warmup`` skips it), so that one-time costs (CuPy compiling its kernels, which run C's
first, cold, pass paid) land in neither pass.

Per program and pass: read, compute and write seconds per movie (median) where the program reports them
(MotionCor3's stdout lines ``*** <file>: loaded in``, ``Computation time`` (gain, defects, alignment and
correction, not the load nor the save, which run on threads of their own) and ``Save image sums`` where
printed (1.2.1's batch mode prints no save time); ours ``--json``; RELION
reports none: its per-movie time is taken from the modification times of its per-movie STAR files), wall
and CPU (user + system) seconds of the whole run divided by the movies (start-up included), and the error
of the global shifts against the truth: per movie the RMS and max over frames of the error length (px),
after removing each set's mean (so the reference frame each program chose does not matter); the table
gives the median RMS and the max over movies. Ratios: MotionCor3 / ours and RELION / ours (wall per
movie). Prints a Markdown table; ``--json FILE`` writes everything.

Usage (GPU machine; CPU test: ``--size 512 --frames 12 --movies 3 --device cpu``)::

    python benchmarks/movies_side_by_side.py --motioncor3 .mc3/bin/MotionCor3 [--movies 20] [--size 4096]
        [--frames 40] [--device gpu] [--passes cold,warm] [--relion-movies N] [--skip relion]
        [--workdir /tmp/movies_sbs] [--keep] [--reuse] [--json out.json]

``--keep`` then ``--reuse`` splits the work over several invocations on the same movies (e.g. one pass each).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import sysconfig
import time
from typing import Dict, List, Optional, Sequence

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.relion_cpu_motioncorr import (DOSE, KV, PIXEL_A, _commit, run_ours,  # noqa: E402
                                              run_relion, shift_errors, write_movies_star)
from benchmarks.side_by_side import children_cpu_s, cpu_name  # noqa: E402
from xmipp_accel import backend  # noqa: E402
from xmipp_accel.em.synthetic_movies import make_movie  # noqa: E402
from xmipp_accel.io.mrc import write_mrc  # noqa: E402

PATCHES = 5
DOMING_PX = 2.0
#: Substrings MotionCor3 cuts output and log names at (``strcasestr`` in CSaveSerialCryoEM.cpp and
#: CAlignMain.cpp): the work folder must not contain them.
MC3_NAME_CUTS = (".mrc", ".st", ".tif", ".eer")


# ---------------------------------------------------------------- movies

def drift_scales(n_movies: int, seed: int = 16) -> np.ndarray:
    """One ``drift_scale`` per movie, |s| in [0.6, 1.6] with a random sign (distinct drifts)."""
    rng = np.random.default_rng(seed)
    return rng.uniform(0.6, 1.6, n_movies) * rng.choice([-1.0, 1.0], n_movies)


def make_movies(d: str, n_movies: int, size: int, frames: int, xp) -> List[np.ndarray]:
    """Write Movies/m<i>.mrcs (int16), Truth/m<i>.json and movies.star in ``d``; return the true global
    shifts (n_frames, 2) px per movie (MotionCor2/RELION sign: moving frame n by +g_n aligns it)."""
    os.makedirs(os.path.join(d, "Movies"), exist_ok=True)
    os.makedirs(os.path.join(d, "Truth"), exist_ok=True)
    truths = []
    for i, scale in enumerate(drift_scales(n_movies)):
        seed = 1000 + i
        frames_xp, truth = make_movie((size, size), frames, dose_per_pixel=DOSE, drift_scale=float(scale),
                                      doming_px=DOMING_PX, seed=seed, xp=xp)
        counts = backend.to_host(frames_xp.astype(np.int16))     # Poisson counts, far below 32767
        del frames_xp
        write_mrc(os.path.join(d, "Movies", f"m{i}.mrcs"), counts, PIXEL_A, is_stack=True)
        g = np.asarray(truth["global_shifts_px"])
        with open(os.path.join(d, "Truth", f"m{i}.json"), "w") as f:
            json.dump({"movie": f"Movies/m{i}.mrcs", "shape": [frames, size, size], "dtype": "int16",
                       "seed": seed, "drift_scale": float(scale), "doming_px": DOMING_PX,
                       "dose_per_pixel": DOSE, "pixel_size_A": PIXEL_A,
                       "convention": "frame_n(p) = REF(p + g_n): moving frame n by +g_n aligns it "
                                     "(MotionCor2/RELION sign), last frame 0",
                       "global_shifts_px": g.tolist()}, f)
        truths.append(g)
    write_movies_star(d, n_movies)
    os.sync()          # dirty pages cannot be dropped from the page cache
    return truths


def existing_movies(d: str, n_movies: int, size: int, frames: int) -> Optional[List[np.ndarray]]:
    """The true shifts of the movies a previous run left in ``d`` when all ``n_movies`` are there with
    this shape and this run's drifts, else None."""
    truths = []
    for i, scale in enumerate(drift_scales(n_movies)):
        t, m = os.path.join(d, "Truth", f"m{i}.json"), os.path.join(d, "Movies", f"m{i}.mrcs")
        if not (os.path.exists(t) and os.path.exists(m)):
            return None
        truth = json.load(open(t))
        if truth["shape"] != [frames, size, size] or abs(truth["drift_scale"] - scale) > 1e-12:
            return None
        truths.append(np.asarray(truth["global_shifts_px"]))
    return truths


def movie_paths(d: str, n_movies: int) -> List[str]:
    return [os.path.join(d, "Movies", f"m{i}.mrcs") for i in range(n_movies)]


def drop_from_page_cache(paths: Sequence[str]) -> None:
    """Ask the kernel to drop the files' pages (POSIX_FADV_DONTNEED): the next read goes to the disk."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_into_page_cache(paths: Sequence[str], chunk: int = 1 << 26) -> None:
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while f.read(chunk):
                pass


# ---------------------------------------------------------------- MotionCor3 output

_MC3_TIMINGS = {
    "load_s": re.compile(r"^\*\*\* (?P<file>\S+): loaded in (?P<s>[0-9.]+) seconds\.", re.M),
    "compute_s": re.compile(r"^Computation time: (?P<s>[0-9.]+) sec", re.M),
    "save_s": re.compile(r"^Save image sums: (?P<s>[0-9.]+) sec", re.M),
    "patch_align_s": re.compile(r"^Patch alignment time: (?P<s>[0-9.]+)\(sec\)", re.M),
}
_MC3_TOTAL = re.compile(r"^Total time: (?P<s>[0-9.]+) sec", re.M)


def parse_mc3_shift_log(text: str) -> np.ndarray:
    """Full-frame shifts from a MotionCor3 ``<stem>-Full.log`` or ``<stem>-Patch-Full.log``: rows
    ``frame(1-based) sx sy`` (``"%4d  %8.2f  %8.2f"``) after ``#`` comment lines; returns (n_frames, 2)
    float64 (x, y) px in input pixels, ordered by frame."""
    rows = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split()
        rows.append((int(fields[0]), float(fields[1]), float(fields[2])))
    if not rows:
        raise ValueError("no shift rows in the MotionCor3 log")
    rows.sort()
    frames = [r[0] for r in rows]
    if frames != list(range(1, len(rows) + 1)):
        raise ValueError(f"MotionCor3 log frames are not 1..{len(rows)}: {frames}")
    return np.array([[r[1], r[2]] for r in rows], dtype=np.float64)


def parse_mc3_stdout(text: str) -> Dict[str, object]:
    """Timings MotionCor3 prints (seconds): lists ``load_s``, ``compute_s``, ``save_s``, ``patch_align_s``
    (one entry per movie, in the order printed), ``loaded_files`` and ``total_s`` (None when absent)."""
    out: Dict[str, object] = {k: [float(m.group("s")) for m in rx.finditer(text)] for k, rx in _MC3_TIMINGS.items()}
    out["loaded_files"] = [m.group("file") for m in _MC3_TIMINGS["load_s"].finditer(text)]
    total = _MC3_TOTAL.search(text)
    out["total_s"] = float(total.group("s")) if total else None
    return out


def mc3_log_file(log_dir: str, movie: str) -> Optional[str]:
    """The full-frame shift log MotionCor3 writes for ``movie``: ``<LogDir><stem>-Patch-Full.log`` with
    patches, ``<stem>-Full.log`` without; ``stem`` is the file name cut at ``.mrc`` (CAlignMain.cpp)."""
    name = os.path.basename(movie)
    stem = name[:name.lower().find(".mrc")] if ".mrc" in name.lower() else name
    for suffix in ("-Patch-Full.log", "-Full.log"):
        p = os.path.join(log_dir, stem + suffix)
        if os.path.exists(p):
            return p
    return None


def mc3_command(exe: str, d: str, out: str, gpu: int, extra: Sequence[str] = (),
                movie: Optional[str] = None) -> List[str]:
    """MotionCor3 over every ``Movies/*.mrcs`` of ``d`` in one process (``-Serial 1``), or over one
    ``movie`` (``-Serial 0``, the way RELION's and Scipion's wrappers call it)."""
    if movie is None:
        io_args = ["-InMrc", os.path.join(d, "Movies", "m"), "-InSuffix", ".mrcs", "-Serial", "1",
                   "-OutMrc", os.path.join(out, "m")]
    else:
        stem = os.path.basename(movie).split(".")[0]
        io_args = ["-InMrc", movie, "-Serial", "0", "-OutMrc", os.path.join(out, stem + ".mrc")]
    return [exe, *io_args, "-LogDir", os.path.join(out, "logs") + "/",
            "-Patch", str(PATCHES), str(PATCHES), "-Gpu", str(gpu), "-PixSize", str(PIXEL_A), "-kV", str(int(KV)),
            "-FmDose", str(DOSE), "-OutStack", "0", *extra]


def mc3_library_path(exe: str) -> str:
    """LD_LIBRARY_PATH for MotionCor3: ``<bin>/../lib`` (its libtiff and co.) first, then the current one,
    then folders holding cuFFT 12 / cudart 13 where the loader might not look (CUDA_HOME or /usr/local/cuda
    lib64, the ``nvidia`` wheels of this Python)."""
    dirs = [os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(exe))), "lib")]
    dirs += [p for p in os.environ.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p]
    cuda = [os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "lib64"), "/usr/local/cuda/lib64"]
    wheels = glob.glob(os.path.join(sysconfig.get_paths()["purelib"], "nvidia", "*", "lib"))
    for lib in cuda + sorted(wheels):
        if any(glob.glob(os.path.join(lib, pat)) for pat in ("libcufft.so.12*", "libcudart.so.13*")):
            dirs.append(lib)
    return os.pathsep.join(d for i, d in enumerate(dirs) if os.path.isdir(d) and d not in dirs[:i])


def run_motioncor3(exe: str, d: str, n_movies: int, cores: str, gpu: int, extra: Sequence[str] = (),
                   mode: str = "per-movie") -> dict:
    """MotionCor3 on the first ``n_movies``: ``per-movie`` runs one process per movie (``-Serial 0``);
    ``serial`` one process over the folder (``-Serial 1``; in 1.2.1 it aligns no MRC movie: CMain::mAsyncLoad
    calls ``CLoadCryoEMStack::OpenFile`` twice instead of ``OpenFile`` then ``AsyncLoad``, so each pass pops
    two files and loads none). ``total_s`` is the sum of the ``Total time`` lines (the process start and
    CUDA context creation before it are not in it; the wall time has them)."""
    out = os.path.join(d, "MotionCor3")
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(os.path.join(out, "logs"))
    env = dict(os.environ, LD_LIBRARY_PATH=mc3_library_path(exe))
    calls = [None] if mode == "serial" else movie_paths(d, n_movies)
    t0, c0 = time.time(), children_cpu_s()
    texts = []
    for movie in calls:
        cmd = ["taskset", "-c", cores, *mc3_command(exe, d, out, gpu, extra, movie=movie)]
        proc = subprocess.run(cmd, cwd=d, env=env, capture_output=True, text=True)
        texts.append(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
        if proc.returncode != 0:
            break
    wall, cpu = time.time() - t0, children_cpu_s() - c0
    with open(os.path.join(out, "stdout.txt"), "w") as f:
        f.write("\n".join(texts))
    if proc.returncode != 0:
        raise RuntimeError(f"MotionCor3 exited {proc.returncode}: {texts[-1][-1500:]}")
    logs = [mc3_log_file(os.path.join(out, "logs"), p) for p in movie_paths(d, n_movies)]
    missing = [p for p, lg in zip(movie_paths(d, n_movies), logs) if lg is None]
    if missing:
        listed = sorted(os.listdir(os.path.join(out, "logs")))[:12]
        raise RuntimeError(f"MotionCor3 wrote no shift log for {missing[:3]} (see {out}/stdout.txt); "
                           f"logs/ holds {listed}; its output ends: {texts[-1][-1500:]}")
    timings = [parse_mc3_stdout(t) for t in texts]
    merged = {k: [v for t in timings for v in t[k]] for k in ("load_s", "compute_s", "save_s")}
    totals = [t["total_s"] for t in timings if t["total_s"] is not None]
    return {"wall_s": wall, "cpu_s": cpu, "read_s": merged["load_s"], "compute_s": merged["compute_s"],
            "write_s": merged["save_s"], "total_s": sum(totals) if totals else None,
            "shifts": [parse_mc3_shift_log(open(lg).read()) for lg in logs]}


# ---------------------------------------------------------------- the run

def _summary(program: str, command: str, r: dict, truths: List[np.ndarray], n: int) -> dict:
    errs = [shift_errors(s, t) for s, t in zip(r["shifts"], truths)]
    flipped = [shift_errors(-np.asarray(s), t)[0] for s, t in zip(r["shifts"], truths)]

    def med(key):
        v = r.get(key)
        return float(np.median(v)) if v else None
    return {"program": program, "command": command, "ok": True,
            "wall_s": r["wall_s"], "cpu_s": r["cpu_s"], "wall_per_movie_s": r["wall_s"] / n,
            "cpu_per_movie_s": r["cpu_s"] / n, "read_s": med("read_s"), "compute_s": med("compute_s"),
            "write_s": med("write_s"), "per_movie_s": med("per_movie_s"), "pipeline_s": r.get("pipeline_s"),
            "pipeline_per_movie_s": r["pipeline_s"] / n if r.get("pipeline_s") else None,
            "pipeline": r.get("pipeline"),
            "program_total_s": r.get("total_s"),
            "rms_px": float(np.median([e[0] for e in errs])), "max_px": float(max(e[1] for e in errs)),
            "read_s_per_movie": list(r.get("read_s") or []), "compute_s_per_movie": list(r.get("compute_s") or []),
            "write_s_per_movie": list(r.get("write_s") or []),
            "rms_px_per_movie": [e[0] for e in errs], "max_px_per_movie": [e[1] for e in errs],
            "rms_px_if_sign_flipped": float(np.median(flipped)),
            "shifts_px": [np.asarray(s).tolist() for s in r["shifts"]]}


def _relion(d: str, n: int, cores: str) -> dict:
    """RELION on the first ``n`` movies (movies.star rewritten to list those)."""
    write_movies_star(d, n)
    return run_relion(d, n, cores, ("--patch_x", str(PATCHES), "--patch_y", str(PATCHES)))


def programs(a, cores: str, n_movies: int) -> List[tuple]:
    """(name, command label, callable(d, n) or None, reason skipped, movies it aligns) for the three programs."""
    j = len(cores.split(","))
    out = []
    if a.motioncor3 and os.access(a.motioncor3, os.X_OK):
        serial = "-Serial 1" if a.mc3_mode == "serial" else "-Serial 0 (one call per movie)"
        out.append(("MotionCor3", f"MotionCor3 {serial} -Patch {PATCHES} {PATCHES} -FmDose {DOSE} -Gpu {a.mc3_gpu} "
                    f"{a.mc3_args}".strip(),
                    lambda d, n: run_motioncor3(a.motioncor3, d, n, cores, a.mc3_gpu, a.mc3_args.split(),
                                                 a.mc3_mode), None,
                    n_movies))
    else:
        out.append(("MotionCor3", "", None, "no --motioncor3 PATH given" if not a.motioncor3
                    else f"{a.motioncor3} is not an executable file", 0))
    n_relion = min(n_movies, a.relion_movies or n_movies)
    if shutil.which("relion_run_motioncorr"):
        out.append(("RELION", f"relion_run_motioncorr --use_own --j {j} --patch_x {PATCHES} --patch_y {PATCHES} "
                    "--dose_weighting", lambda d, n: _relion(d, n, cores), None, n_relion))
    else:
        out.append(("RELION", "", None, "relion_run_motioncorr is not on PATH", 0))
    patches = f"{PATCHES}x{PATCHES}"
    for k in ours_workers(a):
        extra = ("--patches", patches) + (("--workers-per-gpu", str(k)) if k != 1 else ())
        out.append((ours_name(k), f"xmipp-accel align-movies --device {a.device} {' '.join(extra)} "
                    f"--dose-per-frame {DOSE}",
                    lambda d, n, extra=extra: run_ours(d, n, cores, extra, device=a.device), None, n_movies))
    return out


def ours_workers(a) -> List[int]:
    """Our GPU compute workers per GPU to run (``--ours-workers-per-gpu``; 1 only on the CPU)."""
    if a.device != "gpu":
        return [1]
    return [int(k) for k in str(a.ours_workers_per_gpu).split(",")]


def ours_name(workers_per_gpu: int) -> str:
    """The table's name of our run: ``ours`` for the default (1 worker per GPU, the ratios' reference)."""
    return "ours" if workers_per_gpu == 1 else f"ours, {workers_per_gpu} workers/GPU"


#: How a program's run fails here (its exit status, a missing file, unreadable output): reported, the rest go on.
PROGRAM_ERRORS = (RuntimeError, subprocess.CalledProcessError, OSError, ValueError)


def skipped(a, name: str) -> bool:
    """Whether ``--skip`` names this program (``ours`` covers every run of ours)."""
    return name.split(",")[0].lower() in a.skip.lower().split(",")


def failure_text(e: BaseException) -> str:
    """A failed run's message: the program's stderr where it has one, else the error."""
    return str(getattr(e, "stderr", None) or e)


def warm_up(a, d: str, cores: str) -> Dict[str, float]:
    """Run every program once, untimed in the table, on one movie of its own (``d/warmup``, not among the
    timed ones, so no timed file enters the page cache): one-time costs (CuPy compiling its kernels into its
    disk cache, first CUDA use of the machine) then land in neither pass. Returns the seconds of each."""
    w = os.path.join(d, "warmup")
    make_movies(w, 1, a.size, a.frames, backend.cupy_module() or np)
    took = {}
    for name, _command, fn, _reason, n_used in programs(a, cores, 1):
        if fn is None or n_used == 0 or skipped(a, name):
            continue
        t0 = time.perf_counter()
        try:
            fn(w, 1)
        except PROGRAM_ERRORS as e:
            print(f"[warm-up] {name}: FAILED: {failure_text(e)[-500:]}", flush=True)
            continue
        took[name] = round(time.perf_counter() - t0, 2)
        print(f"[warm-up] {name}: {took[name]:.1f} s for one movie (not in the table)", flush=True)
    return took


def run_all(a, d: str, truths: List[np.ndarray], cores: str) -> List[dict]:
    n = len(truths)
    paths = movie_paths(d, n)
    rows = []
    for pass_ in a.passes.split(","):
        for name, command, fn, reason, n_used in programs(a, cores, n):
            if skipped(a, name):
                fn, reason = None, "--skip"
            if fn is None:
                print(f"[{pass_}] {name}: skipped ({reason})", flush=True)
                rows.append({"program": name, "pass": pass_, "ok": False, "reason": reason})
                continue
            if pass_ == "cold":
                drop_from_page_cache(paths)
                print(f"[cold] {name}: movies dropped from the page cache (posix_fadvise DONTNEED)", flush=True)
            else:
                read_into_page_cache(paths)
                print(f"[warm] {name}: movies read into the page cache", flush=True)
            try:
                row = _summary(name, command, fn(d, n_used), truths[:n_used], n_used)
            except PROGRAM_ERRORS as e:
                msg = failure_text(e)
                print(f"[{pass_}] {name}: FAILED: {msg[-1500:]}", flush=True)
                rows.append({"program": name, "pass": pass_, "ok": False, "reason": f"failed: {msg[-500:]}"})
                continue
            row["pass"], row["movies"] = pass_, n_used
            rows.append(row)
            print(f"[{pass_}] {name}: {row['wall_per_movie_s']:.3f} s/movie, RMS {row['rms_px']:.3f} px", flush=True)
    for r in rows:
        ours = next((o for o in rows if o["program"] == "ours" and o["pass"] == r["pass"] and o["ok"]), None)
        if r["ok"] and ours:
            r["wall_ratio_to_ours"] = r["wall_per_movie_s"] / ours["wall_per_movie_s"]
            r["cpu_ratio_to_ours"] = r["cpu_per_movie_s"] / ours["cpu_per_movie_s"]
    return rows


def _f(v, fmt: str = ".3f") -> str:
    return "–" if v is None else format(v, fmt)


def table(rows: List[dict], header: str) -> str:
    lines = [header, "",
             "| pass | program | movies | read s | compute s | write s | per-movie s (median) | "
             "wall s/movie (run / n) | pipeline s/movie | CPU s/movie | RMS err px (median) | max err px | "
             "wall × ours |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if not r["ok"]:
            why = r["reason"] if r["reason"].startswith("failed") else "skipped: " + r["reason"]
            lines.append(f"| {r['pass']} | {r['program']} | {why[:160]} | | | | | | | | | | |")
            continue
        lines.append(f"| {r['pass']} | {r['program']} | {r['movies']} | {_f(r['read_s'])} | {_f(r['compute_s'])} | "
                     f"{_f(r['write_s'])} | {_f(r['per_movie_s'])} | {r['wall_per_movie_s']:.3f} | "
                     f"{_f(r.get('pipeline_per_movie_s'))} | "
                     f"{r['cpu_per_movie_s']:.2f} | {r['rms_px']:.3f} | {r['max_px']:.3f} | "
                     f"{_f(r.get('wall_ratio_to_ours'), '.2f')}× |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--movies", type=int, default=20, help="distinct movies (default 20)")
    ap.add_argument("--size", type=int, default=4096, help="frame side, px (default 4096)")
    ap.add_argument("--frames", type=int, default=40, help="frames per movie (default 40)")
    ap.add_argument("--device", default="gpu", choices=("gpu", "cpu"), help="our device")
    ap.add_argument("--motioncor3", default=None, help="MotionCor3 binary (skipped when not given)")
    ap.add_argument("--mc3-gpu", type=int, default=0, help="MotionCor3 -Gpu")
    ap.add_argument("--mc3-mode", default="per-movie", choices=("per-movie", "serial"),
                    help="one MotionCor3 call per movie (default), or one -Serial 1 call over the folder "
                         "(aligns no MRC movie in 1.2.1)")
    ap.add_argument("--mc3-args", default="", help="more MotionCor3 flags, e.g. '-Iter 10 -Tol 0.5'")
    ap.add_argument("--cores", default=None, help="taskset CPU list for all programs (default: all allowed)")
    ap.add_argument("--passes", default="cold,warm", help="cold (page cache dropped), warm, or both")
    ap.add_argument("--relion-movies", type=int, default=None,
                    help="RELION aligns only the first N movies (it is slow: ~10 min per pass for 20 4096² movies)")
    ap.add_argument("--reuse", action="store_true",
                    help="use the movies a previous --keep run left in --workdir when their truth files match")
    ap.add_argument("--skip", default="", help="programs not to run, e.g. 'relion' or 'motioncor3,ours'")
    ap.add_argument("--workdir", default="/tmp/movies_sbs")
    ap.add_argument("--json", default=None, help="write all figures to this file")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (movies, outputs)")
    ap.add_argument("--ours-workers-per-gpu", default="1",
                    help="ours once per value, e.g. '1,2' (align-movies --workers-per-gpu; the ratios use 1)")
    ap.add_argument("--no-warmup", dest="warmup", action="store_false",
                    help="no untimed run of each program on a movie of its own before the passes")
    a = ap.parse_args(argv)
    d = os.path.abspath(a.workdir)
    if a.motioncor3:
        a.motioncor3 = os.path.abspath(a.motioncor3)  # it runs from the work folder
    cut = [s for s in MC3_NAME_CUTS if s in d.lower()]
    if a.motioncor3 and cut:
        ap.error(f"--workdir must not contain {cut}: MotionCor3 cuts its output names there")
    if a.device == "gpu" and backend.cupy_module() is None:
        ap.error("no usable GPU: use --device cpu")
    cores = a.cores or ",".join(map(str, sorted(os.sched_getaffinity(0))))
    cp = backend.cupy_module()
    t0 = time.perf_counter()
    truths = existing_movies(d, a.movies, a.size, a.frames) if a.reuse else None
    if truths is None:
        shutil.rmtree(d, ignore_errors=True)
        truths = make_movies(d, a.movies, a.size, a.frames, cp if cp is not None else np)
        gen_s = time.perf_counter() - t0
        gb = a.movies * a.frames * a.size * a.size * 2 / 1e9
        print(f"wrote {a.movies} movies ({gb:.2f} GB, int16 MRC) in {gen_s:.1f} s with "
              f"{'CuPy' if cp is not None else 'NumPy'} to {d}", flush=True)
    else:
        gen_s = None
        print(f"reusing the {a.movies} movies in {d}", flush=True)
    warmup_s = warm_up(a, d, cores) if a.warmup else {}
    rows = run_all(a, d, truths, cores)
    device = backend.gpu_info(0)["name"] if cp is not None else "no GPU"
    header = (f"Movie alignment side by side: {a.movies} distinct movies {a.size}² × {a.frames} (int16 MRC, 1 Å/px, "
              f"1 e⁻/px/frame, {PATCHES}×{PATCHES} patches, dose weighting); {device}, "
              f"{len(cores.split(','))} cores ({cpu_name()}), {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
              f"{platform.node()}, commit {_commit()}. Passes: cold = movies dropped from the page cache "
              f"(posix_fadvise DONTNEED) before each program, warm = read into it before each program.")
    text = table(rows, header)
    print("\n" + text)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"header": header, "movies": a.movies, "shape": [a.frames, a.size, a.size],
                       "generate_s": gen_s, "warmup_s": warmup_s, "device": device, "cores": cores, "rows": rows,
                       "drift_scales": drift_scales(a.movies).tolist()}, f, indent=1)
    if not a.keep:
        shutil.rmtree(d, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
