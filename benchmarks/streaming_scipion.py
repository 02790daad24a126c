"""Facility streaming throughput of the Scipion movie-alignment protocol: movies per minute and latency.

A scripted Scipion project per worker setting: ``ProtImportMovies`` in streaming mode on an empty folder and
``XmippAccelProtMovieAlign`` (our FlexAlign protocol) scheduled on its output, as the facility template
(xmipp_accel/templates/xmipp_accel_streaming.json.template) sets them up. A feeder moves synthetic movies
(xmipp_accel.em.synthetic_movies, pre-generated in a staging folder, so generation is not timed) into the
folder with ``os.rename`` at --rate movies/s (0: all at once). Measured, per worker setting:

- movies/min: --movies / (last micrograph registered in the output set - first movie arriving);
- per-movie latency: movie renamed into the folder -> its micrograph seen in the protocol's
  ``micrographs.sqlite`` (polled every --poll s from this process, read-only);
- time to the output set being closed (after the feeder's end of session: the import's STOP_STREAMING.TXT,
  what the GUI's "Stop import" action writes, once all movies are imported);
- the protocol's batching: command calls (one ``align_<id>.json`` per ``xmipp-accel align-movies`` call in
  the protocol's extra folder), movies per call, and the seconds spent inside the command (its JSON).

A warm-up movie goes through each project first (protocol launches, first command call, kernel caches), so
the timed movies measure the steady streaming engine, not the start of the run. The floor is the command
itself: ``xmipp-accel align-movies`` on the same --movies files in one call (after a one-movie warm-up call),
measured in the same run; the streaming rows add the import's and the executor's polling, the per-call
process start and the output-set updates to it.

Workers: the protocol runs one batch per GPU slot; slots are the ids of 'GPU IDs' (gpuList) and
threads = slots + 1. W workers per GPU on --gpus "0" means gpuList "0 0 ..." (W times) and W + 1 threads.
Every --workers value is run for every --batch value (the protocol's 'Movies per batch').

Polling: the protocols run with SCIPION_STEPS_CHECK_SEC (Scipion's default, 5 s) and the import's folder
poll SCIPION_EM_NEW_FILE_CHECK_SEC (5 s here, Scipion's default 10 s, to fit three settings in 6 minutes);
pyworkflow's parallel executor also sleeps 3 s whenever it launches nothing. The import's poll delays the
start of the stream only, so "movies/min from import" counts from the first timed movie in the import's set.

The movies are hard links to --distinct files (page cache warm, as just-written detector files are), with
their original modification times, so the import's file timeout does not delay them.

Usage::

    # H100 (Python 3.12 without Tk): the tkinter stand-in makes Scipion importable
    export PYTHONPATH=$PWD/scripts/headless_tk
    python3 benchmarks/streaming_scipion.py --json $OUT/streaming.json      # 40 movies 24 x 2048^2, workers 1,2,4
    # CPU, tiny
    python benchmarks/streaming_scipion.py --quick
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Dict, List, Optional, Tuple

import numpy as np

PIXEL_A = 1.0            # Å per pixel
DOSE = 1.0               # e/Å² per frame (= e/px at 1 Å/px)
VOLTAGE_KV = 300.0
PATTERN = "stream_*.mrcs"
STREAM_CLOSED = 2        # pyworkflow.object.Set.STREAM_CLOSED
WARMUP_LIMIT_S = 150.0   # a warm-up phase taking longer than this means something is wrong


# --------------------------------------------------------------------------- movies
def make_distinct_movies(folder: str, n: int, *, size: int, frames: int, on_gpu: bool) -> List[str]:
    """Write ``n`` synthetic movies (float32 MRC stacks, counts at 1 e/px/frame) and return their paths."""
    from xmipp_accel.em.synthetic_movies import make_movie
    from xmipp_accel import backend
    from xmipp_accel.io.mrc import write_mrc
    os.makedirs(folder, exist_ok=True)
    xp = backend.cupy_module() if on_gpu else None
    paths = []
    for i in range(n):
        movie, _ = make_movie((size, size), frames, dose_per_pixel=DOSE, seed=100 + i, xp=xp or np)
        path = os.path.join(folder, f"distinct_{i:02d}.mrcs")
        write_mrc(path, movie, PIXEL_A)
        paths.append(path)
        del movie
    if xp is not None:  # leave the GPU memory to the protocols' processes
        xp.get_default_memory_pool().free_all_blocks()
    return paths


def link_movies(distinct: List[str], folder: str, names: List[str]) -> List[str]:
    """Hard links (copies where links are refused) of the distinct movies under ``names``, cycling them."""
    os.makedirs(folder, exist_ok=True)
    out = []
    for i, name in enumerate(names):
        dst = os.path.join(folder, name)
        src = distinct[i % len(distinct)]
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)
        out.append(dst)
    return out


class Feeder(threading.Thread):
    """Moves staged movies into the watched folder (``os.rename``) and records each arrival time."""

    def __init__(self, staged: List[str], folder: str, rate: float):
        super().__init__(daemon=True)
        self.staged, self.folder, self.rate = staged, folder, rate
        self.arrivals: Dict[str, float] = {}
        self.error: Optional[BaseException] = None

    def run(self):
        try:
            t0 = time.time()
            for i, src in enumerate(self.staged):
                if self.rate > 0:
                    time.sleep(max(0.0, t0 + i / self.rate - time.time()))
                name = os.path.basename(src)
                os.rename(src, os.path.join(self.folder, name))
                self.arrivals[name] = time.time()
        except BaseException as exc:  # reported by the caller
            self.error = exc


# --------------------------------------------------------------------------- Scipion sets, read-only
def read_set(path: str, label: str) -> Tuple[Optional[List[str]], Optional[int]]:
    """Values of attribute ``label`` of every item of a Scipion set file and its stream state.

    Returns (None, None) while the file does not exist or cannot be read (being written).
    """
    if not os.path.exists(path):
        return None, None
    try:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=2.0)
        try:
            col = con.execute("SELECT column_name FROM Classes WHERE label_property=?", (label,)).fetchone()
            if col is None:
                return None, None
            values = [r[0] for r in con.execute(f"SELECT {col[0]} FROM Objects")]
            state = con.execute("SELECT value FROM Properties WHERE key='_streamState'").fetchone()
        finally:
            con.close()
    except sqlite3.Error:
        return None, None
    return values, (int(state[0]) if state is not None and state[0] is not None else None)


def protocol_status(project, prot) -> str:
    """Status of a running protocol read from its own run.db (as pyworkflow's tests do)."""
    from pyworkflow.protocol import getProtocolFromDb
    try:
        current = getProtocolFromDb(project.path, prot.getDbPath(), prot.getObjId())
    except Exception:  # the run.db may be replaced while being read; try again at the next poll
        return "unknown"
    status = current.getStatus()
    current.getProject().closeMapper()
    current.closeMappers()
    return status


def any_failed(project, prots) -> bool:
    return any(protocol_status(project, p) == "failed" for p in prots)


def check_failed(project, prots) -> None:
    """Raise with the log to read when one of the protocols failed."""
    for p in prots:
        if protocol_status(project, p) == "failed":
            raise RuntimeError(f"{p.getObjLabel()} failed: see {os.path.join(project.getPath(), p.getLogPaths()[1])}")


def stop_protocol(project, prot) -> None:
    """Stop a protocol this script launched (its process tree, by the pid pyworkflow recorded)."""
    from pyworkflow.protocol import getProtocolFromDb
    try:
        current = getProtocolFromDb(project.path, prot.getDbPath(), prot.getObjId())
        if current.isActive():
            project.stopProtocol(current)
        current.getProject().closeMapper()
        current.closeMappers()
    except Exception as exc:
        print(f"  (could not stop {prot.getRunName()}: {exc})", file=sys.stderr)


# --------------------------------------------------------------------------- the floor
def align_args(args) -> List[str]:
    """The options the protocol gives ``align-movies`` with its defaults (see _alignArgs)."""
    out = ["--pixel-size", str(PIXEL_A)]
    if not args.local:
        out.append("--no-local")
    out += ["--max-res", "30.0", "--dose-per-frame", str(DOSE), "--pre-exposure", "0.0",
            "--voltage", str(VOLTAGE_KV)]
    if args.device_used == "gpu":
        out += ["--device", "gpu", "--gpus", args.gpus.split(",")[0].strip()]
    else:
        out += ["--device", "cpu"]
    return out


def run_command(movies: List[str], outdir: str, args) -> dict:
    """``xmipp-accel align-movies MOVIES`` in one process; its JSON summary plus the wall time with start-up."""
    cmd = [sys.executable, "-m", "xmipp_accel", "align-movies", *movies, "-o", outdir, *align_args(args),
           "--json", "--quiet"]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True,
                          timeout=max(10.0, args.deadline - time.time()))
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"align-movies failed ({proc.returncode}): {proc.stderr[-2000:]}")
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"wall_s": round(wall, 3), "seconds": summary.get("seconds"),
            "pipeline_seconds": summary.get("pipeline_seconds"), "n_ok": summary.get("n_ok"),
            "movies_per_min": round(60.0 * len(movies) / wall, 1)}


def measure_floor(distinct: List[str], args) -> dict:
    folder = os.path.join(args.workdir, "floor")
    movies = link_movies(distinct, folder, [f"floor_{i:04d}.mrcs" for i in range(args.movies)])
    run_command(movies[:1], os.path.join(folder, "warmup_out"), args)        # kernel caches, FFT plans
    result = run_command(movies, os.path.join(folder, "out"), args)
    result["movies"] = args.movies
    return result


# --------------------------------------------------------------------------- one streaming run
def call_summaries(extra: str, resident: bool = False) -> List[dict]:
    """The protocol's command calls (one align_<first movie id>.json each), the first (warm-up) call left out;
    with the resident worker its runs (watch_<n>.json, written when it ends; the warm-up movie included)."""
    calls = []
    if not os.path.isdir(extra):
        return []
    prefix = "watch_" if resident else "align_"
    names = sorted(n for n in os.listdir(extra) if n.startswith(prefix) and n.endswith(".json"))
    for name in names[0 if resident else 1:]:
        try:
            with open(os.path.join(extra, name)) as f:
                summary = json.load(f)
        except (OSError, ValueError):
            continue
        calls.append({"file": name, "n_movies": summary.get("n_movies"), "seconds": summary.get("seconds")})
    return calls


_STEP_LINE = re.compile(r"(STARTED|FINISHED)\S*: processMovieBatchStep, step (\d+), time (\S+ \S+)")


def batch_step_seconds(stdout_log: str) -> List[float]:
    """Durations (s) of the protocol's batch steps, in step order, from the STARTED/FINISHED lines of its log."""
    times: Dict[int, Dict[str, datetime.datetime]] = {}
    try:
        with open(stdout_log, errors="replace") as f:
            for line in f:
                m = _STEP_LINE.search(line)
                if m:
                    times.setdefault(int(m.group(2)), {})[m.group(1)] = datetime.datetime.fromisoformat(m.group(3))
    except OSError:
        return []
    return [(t["FINISHED"] - t["STARTED"]).total_seconds() for _, t in sorted(times.items())
            if "STARTED" in t and "FINISHED" in t]


def run_streaming(workers: int, batch: int, distinct: List[str], args) -> dict:
    """One project: import (streaming) + our alignment with ``workers`` slots per GPU and at most ``batch``
    movies per command call; returns the figures."""
    from pwem.protocols import ProtImportMovies
    from pyworkflow.project import Manager

    from xmipp_accel.protocols import XmippAccelProtMovieAlign

    t_start = time.time()
    gpus = [g.strip() for g in args.gpus.split(",") if g.strip()]
    slots = [g for g in gpus for _ in range(workers)]
    result = {"workers_per_gpu": workers, "batch": batch, "gpu_list": " ".join(slots), "threads": len(slots) + 1,
              "movies": args.movies, "complete": False}
    tag = f"w{workers}_b{batch}" + ("_resident" if args.resident else "")
    folder = os.path.join(args.workdir, f"incoming_{tag}")
    staging = os.path.join(args.workdir, f"staging_{tag}")
    os.makedirs(folder)
    names = [f"stream_{i:04d}.mrcs" for i in range(args.movies + 1)]            # 0 is the warm-up movie
    staged = link_movies(distinct, staging, names)

    project = Manager().createProject(f"streaming_{tag}_{time.strftime('%H%M%S')}")
    os.chdir(project.getPath())
    result["project"] = project.getPath()
    imp = project.newProtocol(
        ProtImportMovies, objLabel="import movies (streaming)", filesPath=folder, filesPattern=PATTERN,
        samplingRate=PIXEL_A, dosePerFrame=DOSE, voltage=VOLTAGE_KV, sphericalAberration=2.7,
        dataStreaming=True, timeout=str(args.import_timeout), fileTimeout="1")
    align = project.newProtocol(
        XmippAccelProtMovieAlign, objLabel=f"FlexAlign, {workers} worker(s)/GPU",
        useGpu=args.device_used == "gpu", gpuList=result["gpu_list"], numberOfThreads=len(slots) + 1,
        moviesPerBatch=batch, doLocal=args.local, residentWorker=args.resident)
    align.inputMovies.set(imp)
    align.inputMovies.setExtended("outputMovies")
    launched = []
    try:
        warm = Feeder(staged[:1], folder, 0.0)
        warm.run()
        project.launchProtocol(imp, wait=False)
        launched.append(imp)
        imp_movies = os.path.join(project.getPath(), imp._getPath("movies.sqlite"))
        if not wait_for(lambda: read_set(imp_movies, "_micName")[0] or any_failed(project, launched), args,
                        "the import's first movie", limit=WARMUP_LIMIT_S):
            result["error"] = "the warm-up movie was not imported (time limit)"
            return result
        check_failed(project, launched)
        project.scheduleProtocol(align)                   # launched by the scheduler: input ready
        launched.append(align)
        mics_path = os.path.join(project.getPath(), align._getPath("micrographs.sqlite"))
        if not wait_for(lambda: read_set(mics_path, "_micName")[0] or any_failed(project, launched), args,
                        "the warm-up micrograph", limit=WARMUP_LIMIT_S):
            result["error"] = (f"the warm-up micrograph did not appear (time limit); see "
                               f"{os.path.join(project.getPath(), align.getLogPaths()[0])}")
            return result
        check_failed(project, launched)
        result["warmup_latency_s"] = round(time.time() - warm.arrivals[names[0]], 2)

        # ---- the timed stream
        feeder = Feeder(staged[1:], folder, args.rate)
        feeder.start()
        seen: Dict[str, float] = {}            # micrograph in the alignment's output set
        imported: Dict[str, float] = {}        # movie in the import's output set
        closed_at = None
        stop_file = os.path.join(project.getPath(), imp._getExtraPath("STOP_STREAMING.TXT"))
        last_status = 0.0
        while time.time() < args.deadline:
            time.sleep(args.poll)
            now = time.time()
            mics, state = read_set(mics_path, "_micName")
            for name in mics or []:
                seen.setdefault(name, now)
            for name in read_set(imp_movies, "_micName")[0] or []:
                imported.setdefault(name, now)
            if not os.path.exists(stop_file) and not feeder.is_alive():
                if len(imported) >= len(names):          # the session ends: the facility stops the import
                    open(stop_file, "w").close()
                    result["stop_written_s"] = round(now - min(feeder.arrivals.values()), 2)
            if state == STREAM_CLOSED and closed_at is None:
                closed_at = now
            if closed_at is not None and len(seen) >= len(names):
                break
            if now - last_status > 2.0:
                last_status = now
                check_failed(project, launched)
        if feeder.error is not None:
            raise feeder.error
        arrivals = feeder.arrivals
        t0 = min(arrivals.values()) if arrivals else None
        timed = [n for n in names[1:] if n in seen and n in arrivals]
        latencies = [seen[n] - arrivals[n] for n in timed]
        result["movies_done"] = len(timed)
        if timed:
            t_last = max(seen[n] for n in timed)
            result["last_micrograph_s"] = round(t_last - t0, 2)
            result["movies_per_min"] = round(60.0 * len(timed) / max(t_last - t0, 1e-9), 1)
            result["latency_median_s"] = round(statistics.median(latencies), 2)
            result["latency_max_s"] = round(max(latencies), 2)
            result["latency_s"] = {n: round(seen[n] - arrivals[n], 2) for n in timed}
            # the import's folder poll only delays the start: the alignment's own rate counts from the first
            # timed movie in the import's set
            t_imp = min(imported.get(n, t_last) for n in timed)
            result["first_imported_s"] = round(t_imp - t0, 2)
            result["movies_per_min_from_import"] = round(60.0 * len(timed) / max(t_last - t_imp, 1e-9), 1)
            result["import_latency_median_s"] = round(statistics.median(
                [imported[n] - arrivals[n] for n in timed if n in imported]), 2)
        if closed_at is not None and t0 is not None:
            result["closed_s"] = round(closed_at - t0, 2)
        result["complete"] = closed_at is not None and len(timed) == args.movies
        # every batch has ended once the set is closed: count the calls (the warm-up one left out), and let
        # createOutputStep run (one more check) rather than stopping a protocol about to finish
        if result["complete"]:
            wait_for(lambda: protocol_status(project, align) in ("finished", "failed"), args, None,
                     limit=args.steps_check_sec + 8.0)
        result["align_status"] = protocol_status(project, align)
        calls = call_summaries(os.path.join(project.getPath(), align._getExtraPath()), args.resident)
        result["command_calls"] = len(calls)
        result["movies_per_call"] = [c["n_movies"] for c in calls]
        result["command_seconds"] = round(sum(c["seconds"] or 0.0 for c in calls), 2)
        steps = batch_step_seconds(os.path.join(project.getPath(), align.getLogPaths()[0]))
        result["step_seconds"] = round(sum(steps[1:]), 2)
        return result
    finally:
        for prot in launched:
            stop_protocol(project, prot)
        os.chdir(args.workdir)
        shutil.rmtree(staging, ignore_errors=True)
        result["wall_s"] = round(time.time() - t_start, 1)


def wait_for(condition, args, what: Optional[str], *, limit: Optional[float] = None) -> bool:
    """Poll ``condition`` every --poll s until true, the time limit or ``limit`` seconds; False on timeout."""
    start = time.time()
    end = args.deadline if limit is None else min(args.deadline, start + limit)
    while time.time() < end:
        if condition():
            return True
        time.sleep(args.poll)
    if what:
        print(f"  gave up waiting for {what} after {time.time() - start:.0f} s", file=sys.stderr)
    return False


# --------------------------------------------------------------------------- report
def table(floor: Optional[dict], runs: List[dict], args) -> List[str]:
    """The Markdown table of the runs, the floor and the warm-up latencies."""
    feed = "all at once" if args.rate <= 0 else f"{args.rate:g} movies/s"
    lines = [f"Streaming movie alignment ({args.device_name}, {time.strftime('%Y-%m-%d')}; {args.movies} movies of "
             f"{args.frames} x {args.size}^2 float32 MRC, {'global + local' if args.local else 'global'} FlexAlign, "
             f"dose weighting; feed {feed}; SCIPION_STEPS_CHECK_SEC={args.steps_check_sec}, "
             f"SCIPION_EM_NEW_FILE_CHECK_SEC={args.file_check_sec})",
             "",
             "| workers/GPU | gpuList | threads | batch <= | movies | movies/min from arrival | movies/min from import "
             "| floor / stream | latency median / max (s) | of which import (median, s) | last mic (s) "
             "| set closed (s) | command calls | movies per call | s in command | s in batch steps | wall (s) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def f(run, key):
        return str(run[key]) if run.get(key) is not None else "–"

    floor_rate = floor.get("movies_per_min") if floor else None
    for r in runs:
        done = f"{r.get('movies_done', 0)}/{r['movies']}" + ("" if r.get("complete") else " (incomplete)")
        lat = f"{f(r, 'latency_median_s')} / {f(r, 'latency_max_s')}"
        per_call = ",".join(str(n) for n in r.get("movies_per_call", [])) or "–"
        rate = r.get("movies_per_min_from_import")
        ratio = f"{floor_rate / rate:.1f}" if floor_rate and rate else "–"
        lines.append(f"| {r['workers_per_gpu']} | \"{r['gpu_list']}\" | {r['threads']} | {r['batch']} | {done} | "
                     f"{f(r, 'movies_per_min')} | {f(r, 'movies_per_min_from_import')} | {ratio} | {lat} | "
                     f"{f(r, 'import_latency_median_s')} | {f(r, 'last_micrograph_s')} | {f(r, 'closed_s')} | "
                     f"{f(r, 'command_calls')} | {per_call} | {f(r, 'command_seconds')} | {f(r, 'step_seconds')} | "
                     f"{f(r, 'wall_s')} |")
    if floor and floor.get("wall_s") is not None:
        pipe = floor.get("pipeline_seconds") or 0.0
        lines += ["", f"Floor, `xmipp-accel align-movies` on the same {floor['movies']} movies in one call: "
                      f"{floor['wall_s']} s wall with process start ({floor['movies_per_min']} movies/min), "
                      f"{floor['seconds']} s in the command, {pipe} s in its pipeline"
                      + (f" ({60.0 * floor['movies'] / pipe:.1f} movies/min)." if pipe > 0 else ".")]
    elif floor:
        lines += ["", f"Floor: ERROR {floor.get('error')}"]
    for r in runs:
        if r.get("warmup_latency_s") is not None:
            lines.append(f"Warm-up movie (protocol launches + first call), {r['workers_per_gpu']} worker(s)/GPU, "
                         f"batch {r['batch']}: "
                         f"{r['warmup_latency_s']} s from arrival to micrograph.")
        if r.get("error"):
            lines.append(f"{r['workers_per_gpu']} worker(s)/GPU, batch {r['batch']}: ERROR {r['error']}")
    return lines


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--movies", type=int, default=None, help="timed movies per worker setting (40; --quick 6)")
    p.add_argument("--frames", type=int, default=None, help="frames per movie (24; --quick 10)")
    p.add_argument("--size", type=int, default=None, help="frame side in pixels (2048; --quick 256)")
    p.add_argument("--distinct", type=int, default=None, help="distinct movie files, linked under many names (4)")
    p.add_argument("--rate", type=float, default=0.0, help="movies per second into the folder (0: all at once)")
    p.add_argument("--workers", default=None,
                   help="workers per GPU to compare, comma separated (1,2,4; --quick 1,2)")
    p.add_argument("--gpus", default="0", help="GPU ids, comma separated (0)")
    p.add_argument("--batch", default="8",
                   help="the protocol's 'Movies per batch', comma separated to compare (%(default)s)")
    p.add_argument("--local", dest="local", action="store_const", const=True, default=None,
                   help="local (patch) alignment, the protocol's default (on; --quick: off)")
    p.add_argument("--no-local", dest="local", action="store_const", const=False, help="global alignment only")
    p.add_argument("--device", default="auto", choices=("auto", "gpu", "cpu"))
    p.add_argument("--steps-check-sec", type=int, default=None,
                   help="SCIPION_STEPS_CHECK_SEC for the protocols (Scipion's default 5; --quick 2)")
    p.add_argument("--file-check-sec", type=int, default=None,
                   help="SCIPION_EM_NEW_FILE_CHECK_SEC, the import's folder poll (5, Scipion's default is 10; "
                        "--quick 2)")
    p.add_argument("--import-timeout", type=int, default=120,
                   help="the import stops after this many seconds without new files (a safety net; %(default)s)")
    p.add_argument("--poll", type=float, default=0.2, help="seconds between reads of the output set (%(default)s)")
    p.add_argument("--time-limit", type=float, default=330.0,
                   help="seconds for the whole script; what was measured by then is printed (%(default)s)")
    p.add_argument("--no-floor", dest="floor", action="store_false", help="skip the one-call command floor")
    p.add_argument("--resident", action="store_true",
                   help="the protocol's 'Resident worker?': one align-movies --watch process for all batches")
    p.add_argument("--workdir", default=None, help="folder for projects and movies (default: a new temporary one)")
    p.add_argument("--keep", action="store_true", help="keep the work folder (projects, movies)")
    p.add_argument("--json", default=None, help="also write all figures to this JSON file")
    p.add_argument("--quick", action="store_true", help="tiny CPU-sized defaults (6 movies of 10 x 256^2, global)")
    args = p.parse_args(argv)
    quick = {"movies": 6, "frames": 10, "size": 256, "distinct": 2, "workers": "1,2", "local": False,
             "steps_check_sec": 2, "file_check_sec": 2}
    full = {"movies": 40, "frames": 24, "size": 2048, "distinct": 4, "workers": "1,2,4", "local": True,
            "steps_check_sec": 5, "file_check_sec": 5}
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for option, text in (("--workers", args.workers), ("--batch", args.batch)):
        values = text.split(",")
        if not all(v.strip().isdigit() and int(v) >= 1 for v in values):
            p.error(f"{option} expects positive integers separated by commas, e.g. 1,2,4 (got {text!r})")
    if args.movies < 1 or args.distinct < 1 or args.frames < 3 or args.size < 64:
        p.error("--movies and --distinct must be >= 1, --frames >= 3 and --size >= 64")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    args.deadline = time.time() + args.time_limit
    args.workdir = os.path.abspath(args.workdir or tempfile.mkdtemp(prefix="xmipp_accel_streaming_"))
    os.makedirs(args.workdir, exist_ok=True)
    # pyworkflow and pwem read these at import time, here and in the protocol processes
    os.environ["SCIPION_STEPS_CHECK_SEC"] = str(args.steps_check_sec)
    os.environ["SCIPION_EM_NEW_FILE_CHECK_SEC"] = str(args.file_check_sec)
    os.environ["SCIPION_USER_DATA"] = os.path.join(args.workdir, "scipion_userdata")   # projects go there
    from xmipp_accel.workflows.demo_scipion import _scipion_environment
    _scipion_environment(args.workdir)

    from xmipp_accel import backend
    if args.device == "gpu" and not backend.gpu_available():
        print("--device gpu: no usable GPU (CuPy missing or no CUDA device)", file=sys.stderr)
        return 2
    args.device_used = "gpu" if args.device != "cpu" and backend.gpu_available() else "cpu"
    configs = [(int(w), int(b)) for b in args.batch.split(",") if b.strip()
               for w in args.workers.split(",") if w.strip()]

    report = {"config": {k: v for k, v in vars(args).items() if k != "deadline"},
              "date": time.strftime("%Y-%m-%d %H:%M:%S"), "floor": None, "runs": []}
    args.device_name = args.device_used
    if args.device_used == "gpu":
        name = backend.cupy_module().cuda.runtime.getDeviceProperties(0)["name"]
        report["device"] = name.decode() if isinstance(name, bytes) else str(name)
    else:
        report["device"] = f"CPU, {os.cpu_count()} cores"
    args.device_name = report["device"]
    try:
        t = time.perf_counter()
        distinct = make_distinct_movies(os.path.join(args.workdir, "distinct"), args.distinct, size=args.size,
                                        frames=args.frames, on_gpu=args.device_used == "gpu")
        report["generation_s"] = round(time.perf_counter() - t, 1)
        print(f"{args.distinct} distinct movies of {args.frames} x {args.size}^2 in {report['generation_s']} s "
              f"({args.workdir})", file=sys.stderr)
        if args.floor:
            try:
                report["floor"] = measure_floor(distinct, args)
            except Exception as exc:  # reported in the table; the streaming runs still go on
                report["floor"] = {"error": f"{type(exc).__name__}: {exc}"}
            print(f"floor: {report['floor']}", file=sys.stderr)
        for w, b in configs:
            if time.time() > args.deadline - 30:
                report["runs"].append({"workers_per_gpu": w, "batch": b, "gpu_list": "–", "threads": "–",
                                       "movies": args.movies, "error": "not run: time limit"})
                continue
            try:
                run = run_streaming(w, b, distinct, args)
            except Exception as exc:  # report it with the others
                run = {"workers_per_gpu": w, "batch": b, "gpu_list": "–", "threads": "–", "movies": args.movies,
                       "error": f"{type(exc).__name__}: {exc}"}
            report["runs"].append(run)
            print(f"{w} worker(s)/GPU, batch {b}: " + json.dumps({k: v for k, v in run.items() if k != "latency_s"}),
                  file=sys.stderr)
    finally:
        lines = table(report["floor"], report["runs"], args)
        print("\n".join(lines))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(report, f, indent=1)
        if not args.keep:
            shutil.rmtree(args.workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
