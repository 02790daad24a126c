"""Soak of ``align-movies --watch``: many movies through one resident worker, memory flat, corrupt files named.

A feeder copies --movies synthetic movies (xmipp_accel.em.synthetic_movies; --distinct different ones are
generated first in a staging folder, so generation is not timed) into a watched folder, one every
--interval seconds (0: as fast as the copies go), each copied in 8 chunks as a network copy writes it, and
puts --corrupt broken files among them (a truncated MRC, a TIFF of random bytes, an empty MRC, an MRC whose
header announces other frames, a zero-filled movie without signal; repeated as needed), spread evenly over
the stream. The watch (:class:`xmipp_accel.jobs.watch.WatchJob`, in this process, so that its memory can be
sampled) runs with --watch-timeout --timeout until the stream has gone through.

Measured after every movie (the pipeline's writer thread calls back): the host resident set (VmRSS, MB), the
GPU memory in use (cudaMemGetInfo: whole device, MB) and held by CuPy's pool (MB), and the movie's read,
compute and write times (ms). Reported: first/last (after --warmup movies) and the growth per 100 movies
(least-squares slope over the movies after the warm-up) of RSS and GPU memory; per-movie compute time
(median, p95, max) and movies per minute; the corrupt files and whether each is named in the log
(``<workdir>/watch.log``) and recorded as failed in the done-list; whether corrected_micrographs.star lists
every good movie; and the number of worker set-ups (1 per GPU worker = resident). The check fails (exit
status 1) when a corrupt file is not named, a good movie is missing, or RSS / GPU memory grows by more than
--max-growth-mb per 100 movies.

Usage::

    # GPU machine (the issue's soak): 200 movies 4096^2 x 40, 5 corrupt
    python benchmarks/watch_soak.py --movies 200 --corrupt 5 --size 4096 --frames 40 --gpus 0 --json $OUT/soak.json
    # CPU, tiny (a minute)
    python benchmarks/watch_soak.py --movies 30 --corrupt 3 --size 256 --frames 8 --device cpu
"""
from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Dict, List, Optional

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from xmipp_accel import backend  # noqa: E402
from xmipp_accel.em.synthetic_movies import make_movie  # noqa: E402
from xmipp_accel.io.mrc import write_mrc  # noqa: E402
from xmipp_accel.jobs import movies as movies_module  # noqa: E402
from xmipp_accel.jobs.movies import MovieJobSettings  # noqa: E402
from xmipp_accel.jobs.watch import JOURNAL_NAME, WatchJob, WatchOptions  # noqa: E402

CORRUPT_KINDS = ("truncated.mrcs", "random.tiff", "empty.mrcs", "wrong_header.mrcs", "no_signal.mrcs")


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def gpu_mb(on_gpu: bool) -> Dict[str, float]:
    if not on_gpu:
        return {"gpu_used_mb": float("nan"), "pool_mb": float("nan")}
    cp = backend.cupy_module()
    free, total = cp.cuda.runtime.memGetInfo()
    return {"gpu_used_mb": (total - free) / 2**20, "pool_mb": cp.get_default_memory_pool().total_bytes() / 2**20}


def make_stock(folder: str, args, xp) -> List[str]:
    """--distinct movies (counts stored as --dtype; rendered with ``xp``) and the corrupt files."""
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i in range(args.distinct):
        frames, _ = make_movie((args.size, args.size), args.frames, dose_per_pixel=1.0, drift_scale=2.0,
                               doming_px=2.0, seed=100 + i, xp=xp)
        frames = backend.to_host(frames)
        p = os.path.join(folder, f"stock{i}.mrcs")
        write_mrc(p, frames.astype(args.dtype), args.pixel_size)     # Poisson counts (mean 1) fit int8
        paths.append(p)
    good = open(paths[0], "rb").read()
    bad = os.path.join(folder, "bad")
    os.makedirs(bad, exist_ok=True)
    with open(os.path.join(bad, "truncated.mrcs"), "wb") as f:
        f.write(good[:len(good) // 2])
    with open(os.path.join(bad, "random.tiff"), "wb") as f:
        f.write(b"II*\0" + os.urandom(100000))
    open(os.path.join(bad, "empty.mrcs"), "wb").close()
    header = bytearray(good[:1024])
    header[8:12] = np.int32(args.frames + 7).tobytes()          # nz larger than the data
    with open(os.path.join(bad, "wrong_header.mrcs"), "wb") as f:
        f.write(bytes(header) + good[1024:])
    # same dtype and size as the good movies: a larger file would raise the pools' high-water mark once (a step
    # that the growth slope would read as a leak; seen in run E with a float32 one among int8 movies)
    write_mrc(os.path.join(bad, "no_signal.mrcs"), np.zeros((args.frames, args.size, args.size), args.dtype),
              args.pixel_size)
    return paths


def feed(indir: str, stock: List[str], args, arrivals: Dict[str, float], corrupt: List[str],
         finished: threading.Semaphore) -> None:
    """Copy the stream into the watched folder (8 chunks per movie); note when each was complete. At most
    --backlog files wait at once (``finished`` is released after each movie), so the disk stays bounded."""
    n_total = args.movies + args.corrupt
    bad_at = {int(round((k + 0.5) * n_total / max(args.corrupt, 1))): k for k in range(args.corrupt)}
    good = 0
    for i in range(n_total):
        if i in bad_at:
            kind = CORRUPT_KINDS[bad_at[i] % len(CORRUPT_KINDS)]
            src = os.path.join(os.path.dirname(stock[0]), "bad", kind)
            dst = os.path.join(indir, f"corrupt{bad_at[i]:02d}_{kind}")
            corrupt.append(dst)
        else:
            src = stock[good % len(stock)]
            dst = os.path.join(indir, f"movie{good:04d}.mrcs")
            good += 1
        finished.acquire()
        data = open(src, "rb").read()
        step = max(1, -(-len(data) // 8))
        with open(dst, "wb") as f:
            for j in range(0, max(len(data), 1), step):
                f.write(data[j:j + step])
                f.flush()
        arrivals[dst] = time.monotonic()
        if args.interval > 0:
            time.sleep(args.interval)


def slope_per_100(values: List[float]) -> float:
    v = np.asarray(values, dtype=float)
    if v.size < 3 or not np.isfinite(v).all():
        return float("nan")
    return float(np.polyfit(np.arange(v.size), v, 1)[0] * 100)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--movies", type=int, default=200, help="good movies (%(default)s)")
    ap.add_argument("--corrupt", type=int, default=5, help="corrupt files among them (%(default)s)")
    ap.add_argument("--size", type=int, default=4096, help="frame size in px, square (%(default)s)")
    ap.add_argument("--frames", type=int, default=40, help="frames per movie (%(default)s)")
    ap.add_argument("--distinct", type=int, default=4, help="different movies generated (%(default)s)")
    ap.add_argument("--dtype", default="int8", choices=("int8", "uint16", "float32"),
                    help="how the movies store their counts (%(default)s: 0.67 GB per 4096^2 x 40 movie)")
    ap.add_argument("--backlog", type=int, default=8, help="most files waiting in the folder at once (%(default)s)")
    ap.add_argument("--keep-files", action="store_true",
                    help="keep each input movie and its sums (default: deleted once aligned, so 200 4K movies fit "
                         "the disk; the shifts STAR files, the done-list and corrected_micrographs.star stay)")
    ap.add_argument("--pixel-size", type=float, default=1.0)
    ap.add_argument("--interval", type=float, default=0.0, help="seconds between arrivals (0: back to back)")
    ap.add_argument("--settle", type=float, default=1.0, help="--watch-settle (%(default)s s)")
    ap.add_argument("--timeout", type=float, default=20.0, help="--watch-timeout (%(default)s s)")
    ap.add_argument("--no-local", dest="local", action="store_false", help="global alignment only")
    ap.add_argument("--device", default=None, help="auto, gpu or cpu")
    ap.add_argument("--gpus", default=None, help="GPU ids, e.g. 0 or 0,1")
    ap.add_argument("--workers-per-gpu", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=5, help="movies left out of first/last and slopes (%(default)s)")
    ap.add_argument("--max-growth-mb", type=float, default=50.0,
                    help="largest RSS or GPU memory growth per 100 movies that passes (%(default)s MB)")
    ap.add_argument("--workdir", default=None, help="folder for stock, INDIR, OUTDIR (default: a temporary one)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    ap.add_argument("--json", default=None, help="write the per-movie samples and the summary here")
    args = ap.parse_args(argv)

    work = args.workdir or tempfile.mkdtemp(prefix="watch_soak_")
    indir, outdir = os.path.join(work, "in"), os.path.join(work, "out")
    for d in (indir, outdir):
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
    log_path = os.path.join(work, "watch.log")
    handler = logging.FileHandler(log_path, mode="w")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s: %(message)s"))
    logging.getLogger("xmipp_accel").addHandler(handler)
    logging.getLogger("xmipp_accel").setLevel(logging.INFO)

    ids = backend.parse_gpu_list(args.gpus)
    first = backend.resolve_device(args.device, ids[0] if ids else None)
    devices = [first] + ([backend.resolve_device("gpu", i) for i in ids[1:]] if first.is_gpu else [])
    on_gpu = first.is_gpu
    t = time.perf_counter()
    stock = make_stock(os.path.join(work, "stock"), args, backend.cupy_module() if on_gpu else np)
    if on_gpu:
        backend.cupy_module().get_default_memory_pool().free_all_blocks()    # the stock's, not the watch's
    print(f"stock: {args.distinct} movies {args.size}^2 x {args.frames} in {time.perf_counter() - t:.1f} s")

    setups: List[str] = []
    original = movies_module.MovieJob._setup_refs

    def counting(refs):
        setup = original(refs)

        def wrapped(ctx):
            setups.append(ctx.name)
            return setup(ctx)
        return wrapped
    movies_module.MovieJob._setup_refs = staticmethod(counting)

    samples: List[dict] = []
    last_result: List[float] = []
    arrivals: Dict[str, float] = {}
    corrupt: List[str] = []

    finished = threading.Semaphore(args.backlog)

    def on_result(res):
        v = res.value or {}
        last_result[:] = [time.perf_counter()]
        finished.release()
        if not args.keep_files:
            for f in [res.item] + [o for k, o in v.get("outputs", {}).items() if k != "shifts"]:
                try:
                    os.remove(f)
                except OSError:
                    pass
        samples.append({"movie": os.path.basename(res.item), "ok": res.ok, "rss_mb": rss_mb(), **gpu_mb(on_gpu),
                        "read_ms": v.get("read_ms"), "compute_ms": v.get("compute_ms"), "write_ms": v.get("write_ms"),
                        "latency_s": time.monotonic() - arrivals.get(res.item, float("nan")), "worker": res.worker})

    settings = MovieJobSettings(pixel_size_A=args.pixel_size, workers_per_gpu=args.workers_per_gpu,
                                alignment={"local": args.local})
    job = WatchJob(outdir, settings, WatchOptions(folder=indir, settle_s=args.settle, timeout_s=args.timeout))
    feeder = threading.Thread(target=feed, args=(indir, stock, args, arrivals, corrupt, finished), daemon=True)
    rss0 = rss_mb()
    t0 = time.perf_counter()
    feeder.start()
    report = job.run(devices, on_result=on_result)
    wall = (last_result[0] - t0) if last_result else float("nan")
    feeder.join()
    handler.flush()

    log = open(log_path).read()
    done = {}
    for line in open(os.path.join(outdir, JOURNAL_NAME)):
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if "movie" in r:
            done[os.path.basename(r["movie"])] = r["status"]
    named = {os.path.basename(p): (p in log and done.get(os.path.basename(p)) == "failed") for p in corrupt}
    good = [s for s in samples if s["ok"]]
    steady = samples[args.warmup:] or samples
    compute = sorted(s["compute_ms"] for s in good if s["compute_ms"] is not None)
    star_rows = 0
    if report.star:
        from xmipp_accel.io.star import read_star
        star_rows = len(read_star(report.star)["micrographs"])

    def first_last(key):
        vals = [s[key] for s in steady]
        return (vals[0], vals[-1], slope_per_100(vals)) if vals else (float("nan"),) * 3

    rss = first_last("rss_mb")
    gpu = first_last("gpu_used_mb")
    pool = first_last("pool_mb")
    summary = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                 cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip(),
        "device": [d.describe() for d in devices], "movies": args.movies, "corrupt": args.corrupt,
        "size": args.size, "frames": args.frames, "local": args.local, "n_ok": report.n_ok,
        "n_failed": report.n_failed, "star_rows": star_rows, "setups": setups,
        "rss_mb": {"start": rss0, "first": rss[0], "last": rss[1], "growth_per_100": rss[2]},
        "gpu_used_mb": {"first": gpu[0], "last": gpu[1], "growth_per_100": gpu[2]},
        "pool_mb": {"first": pool[0], "last": pool[1], "growth_per_100": pool[2]},
        "compute_ms": {"median": statistics.median(compute) if compute else None,
                       "p95": compute[int(0.95 * (len(compute) - 1))] if compute else None,
                       "max": compute[-1] if compute else None},
        "movies_per_min": 60.0 * len(samples) / wall if wall > 0 else None,
        "corrupt_named": named, "log": log_path,
    }
    problems = [f"{name} not named in the log / not recorded as failed" for name, ok in named.items() if not ok]
    if report.n_ok != args.movies or star_rows != args.movies:
        problems.append(f"{report.n_ok} movies aligned and {star_rows} in the STAR, expected {args.movies}")
    for key, fl in (("RSS", rss), ("GPU memory", gpu)):
        if np.isfinite(fl[2]) and fl[2] > args.max_growth_mb:
            problems.append(f"{key} grows by {fl[2]:.0f} MB per 100 movies (> {args.max_growth_mb:g})")
    if len(setups) != len(report.workers):
        problems.append(f"{len(setups)} worker set-ups for {len(report.workers)} workers")
    summary["problems"] = problems

    print(f"{'':18}{'first':>10}{'last':>10}{'MB/100 movies':>15}")
    for label, fl in (("host RSS (MB)", rss), ("GPU used (MB)", gpu), ("CuPy pool (MB)", pool)):
        print(f"{label:18}{fl[0]:10.0f}{fl[1]:10.0f}{fl[2]:15.1f}")
    c = summary["compute_ms"]
    if compute:
        print(f"compute per movie: median {c['median']:.0f} ms, p95 {c['p95']:.0f} ms, max {c['max']:.0f} ms; "
              f"{summary['movies_per_min']:.1f} movies/min; {len(setups)} worker set-up(s)")
    print(f"{report.n_ok} aligned, {report.n_failed} failed, STAR rows {star_rows}; corrupt named: "
          + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in named.items()))
    print("PASS" if not problems else "FAIL: " + "; ".join(problems))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"summary": summary, "samples": samples}, f, indent=1, default=str)
    if not args.keep and not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
