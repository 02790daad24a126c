"""Helpers for the CPU side-by-side benchmarks against RELION: run a command pinned to the same cores
and time it, find RELION, describe the CPU.

Both programs are whole command lines (start-up, reading and writing the MRC files included), run
one after the other under ``taskset -c <cores>`` (where it exists) with ``OMP_NUM_THREADS`` set to
the number of cores, so they see the same CPUs.
"""
from __future__ import annotations

import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from typing import List, Optional, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cores_to_use(n: Optional[int]) -> List[int]:
    """The first ``n`` CPUs this process may run on (all of them when n is None)."""
    allowed = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count()))
    return allowed if not n else allowed[:n]


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def relion(program: str) -> Optional[str]:
    return shutil.which(program)


def children_cpu_s() -> float:
    """User + system CPU seconds of the waited-for child processes of this process so far."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_timed(cmd: Sequence[str], cwd: str, cores: Sequence[int], repeats: int = 1) -> dict:
    """Run ``cmd`` ``repeats`` times pinned to ``cores``: the best wall time (s), that run's CPU time
    (user + system, s: less sensitive than the wall time to other jobs on the cores) and its stdout."""
    env = dict(os.environ, OMP_NUM_THREADS=str(len(cores)), OPENBLAS_NUM_THREADS=str(len(cores)),
               MKL_NUM_THREADS=str(len(cores)), PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    prefix = ["taskset", "-c", ",".join(map(str, cores))] if shutil.which("taskset") else []
    best, out, cpu = float("inf"), None, None
    for _ in range(repeats):
        before = children_cpu_s()
        t0 = time.perf_counter()
        proc = subprocess.run(prefix + [str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        used = children_cpu_s() - before
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(map(str, cmd))} exited {proc.returncode}:\n{proc.stdout[-2000:]}\n"
                               f"{proc.stderr[-2000:]}")
        if wall < best:
            best, out, cpu = wall, proc.stdout, used
    return {"seconds": best, "cpu_seconds": cpu, "stdout": out}


def ours(command: str, *args) -> List[str]:
    """Command line of ``xmipp-accel <command> ...`` with this checkout's Python, on the CPU."""
    return [sys.executable, "-m", "xmipp_accel", command, *map(str, args), "--device", "cpu", "--json", "--quiet"]


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])
