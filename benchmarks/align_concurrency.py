"""Several ``xmipp-accel align-movies`` processes on one GPU: does CPU thread oversubscription slow them down?

Writes ``--movies`` synthetic movies (``--frames`` x ``--size``², MRC) once, then times, as subprocesses:

- one process aligning all of them (the floor);
- ``--processes`` processes at once, each aligning its share, with the BLAS/OpenMP thread pools left at
  their defaults (every process sizes them to all cores);
- the same with ``OMP_NUM_THREADS`` / ``OPENBLAS_NUM_THREADS`` / ``MKL_NUM_THREADS`` set to
  ``cores // processes`` (what the Scipion protocol does for its workers).

Usage::

    python benchmarks/align_concurrency.py [--movies 16] [--frames 24] [--size 2048] [--processes 2]
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from xmipp_accel.em.synthetic_movies import make_movie  # noqa: E402
from xmipp_accel.io.mrc import write_mrc  # noqa: E402
from xmipp_accel.threads import THREAD_VARIABLES, thread_limits  # noqa: E402


def run_group(groups, outdir: str, env_extra: dict) -> float:
    """Wall seconds of one ``align-movies`` process per group of movies, all started at once."""
    env = dict(os.environ, **env_extra)
    t0 = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, "-m", "xmipp_accel", "align-movies", *g, "-o",
                               os.path.join(outdir, f"p{i}"), "--pixel-size", "1.0", "--dose-per-frame", "1.0",
                               "--quiet"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for i, g in enumerate(groups)]
    for p in procs:
        _, err = p.communicate()
        if p.returncode != 0:
            raise RuntimeError(err[-500:])
    return time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--movies", type=int, default=16)
    p.add_argument("--frames", type=int, default=24)
    p.add_argument("--size", type=int, default=2048)
    p.add_argument("--processes", type=int, default=2)
    args = p.parse_args(argv)
    work = tempfile.mkdtemp(prefix="align_concurrency_")
    try:
        base, _ = make_movie((args.size, args.size), args.frames, seed=0)
        paths = []
        for i in range(args.movies):
            path = os.path.join(work, f"m{i:03d}.mrcs")
            write_mrc(path, base, 1.0)
            paths.append(path)
        run_group([paths[:1]], os.path.join(work, "warm"), {})          # kernels compiled, tuning cached
        k = args.processes
        shares = [paths[i::k] for i in range(k)]
        rows = [("1 process, all movies", run_group([paths], os.path.join(work, "a"), {})),
                (f"{k} processes, default thread pools", run_group(shares, os.path.join(work, "b"), {})),
                (f"{k} processes, thread pools of cores/{k}",
                 run_group(shares, os.path.join(work, "c"), thread_limits(k)))]
        print(f"# {time.strftime('%Y-%m-%d %H:%M')} {args.movies} movies of {args.frames} x {args.size}², "
              f"{os.cpu_count()} cores; limits set: {', '.join(THREAD_VARIABLES)}")
        print("| setting | wall (s) | movies/min |\n|---|---|---|")
        for name, seconds in rows:
            print(f"| {name} | {seconds:.2f} | {60 * args.movies / seconds:.1f} |")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
