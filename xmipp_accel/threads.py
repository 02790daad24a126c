"""CPU thread pools of concurrent processes: each gets its share of the cores.

NumPy's BLAS (OpenBLAS, MKL) and OpenMP size their thread pools to all cores of the machine in every
process. When several ``xmipp-accel`` processes run at once on one node (the streaming protocol's workers,
several commands of a pipeline), their pools oversubscribe the cores and OpenBLAS's spinning threads slow
every process down, the GPU work included (it waits for the CPU that launches it). These helpers give
each process ``cores // processes`` threads through the environment, which the libraries read when they
start: for child processes (:func:`with_thread_limits`, used by the Scipion protocols), and for the MPI
ranks sharing a node (:func:`share_cores_with_local_ranks`, called by the command line before NumPy is
imported). Standard library only, so that it can run first.
"""
from __future__ import annotations

import copy
import os
import sys
from typing import Dict, MutableMapping, Mapping, Optional

__all__ = ["THREAD_VARIABLES", "cpu_workers", "thread_limits", "with_thread_limits", "local_ranks",
           "share_cores_with_local_ranks", "BLAS_THREAD_TIMEOUT", "let_idle_blas_threads_sleep"]

#: Environment variables that size the BLAS/OpenMP thread pools.
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")

#: Variables MPI launchers set to the number of ranks on this node (Open MPI, MPICH/Intel MPI, Slurm).
LOCAL_RANK_VARIABLES = ("OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "SLURM_NTASKS_PER_NODE")

#: OpenBLAS's idle pool threads spin, calling ``sched_yield``, for 2^28 cycles (~0.1 s) after every BLAS call
#: before they sleep; with ``OPENBLAS_THREAD_TIMEOUT=4`` (the smallest value it accepts: 2^4 cycles) they
#: sleep at once. Measured on the CPU movie alignment (1024² × 24 frames, 2 cores): the spinning threads made
#: ~50 000 ``sched_yield`` calls per movie and ~0.8 s of system CPU time, taken from the NumPy threads.
BLAS_THREAD_TIMEOUT = ("OPENBLAS_THREAD_TIMEOUT", "4")

#: Whether :func:`share_cores_with_local_ranks` ran before NumPy was imported (None: it did not run).
applied_before_numpy: Optional[bool] = None


def _cores() -> int:
    """Cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def cpu_workers() -> int:
    """Threads this process may keep busy: the cores it may use, at most ``OMP_NUM_THREADS`` when set (a
    pipeline's or an MPI rank's share)."""
    cores = _cores()
    limit = str(os.environ.get("OMP_NUM_THREADS", "")).strip()
    if limit.isdigit() and int(limit) > 0:
        cores = min(cores, int(limit))
    return max(1, cores)


def thread_limits(processes: int, cores: Optional[int] = None) -> Dict[str, str]:
    """Variables giving each of ``processes`` concurrent processes ``cores // processes`` threads (>= 1).

    ``cores`` defaults to the cores this process may use.
    """
    if cores is None:
        cores = _cores()
    share = max(1, int(cores) // max(1, int(processes)))
    return {name: str(share) for name in THREAD_VARIABLES}


def with_thread_limits(env: Mapping[str, str], processes: int, cores: Optional[int] = None) -> Mapping[str, str]:
    """A copy of ``env`` (same type: Scipion passes its own ``Environ`` dict) with :func:`thread_limits`
    added, keeping any limit the user already set there."""
    out = copy.copy(env) if isinstance(env, dict) else dict(env)
    if processes > 1:
        for name, value in thread_limits(processes, cores).items():
            out.setdefault(name, value)
    return out


def local_ranks(environ: Optional[Mapping[str, str]] = None) -> int:
    """Ranks an MPI launcher started on this node (1 when not launched by MPI or not said)."""
    env = os.environ if environ is None else environ
    for name in LOCAL_RANK_VARIABLES:
        value = str(env.get(name, "")).strip()
        if value.isdigit() and int(value) > 0:
            return int(value)
    return 1


def share_cores_with_local_ranks(environ: Optional[MutableMapping[str, str]] = None,
                                 cores: Optional[int] = None) -> Dict[str, str]:
    """Under MPI with several ranks on this node, set this process's thread-pool variables to its share
    of the cores (keeping those the user set). Returns what it set. Call it before NumPy is imported."""
    global applied_before_numpy
    env = os.environ if environ is None else environ
    n = local_ranks(env)
    added = {}
    if n > 1:
        for name, value in thread_limits(n, cores).items():
            if name not in env:
                env[name] = added[name] = value
    if environ is None:
        applied_before_numpy = "numpy" not in sys.modules
    return added


def let_idle_blas_threads_sleep(environ: Optional[MutableMapping[str, str]] = None) -> Dict[str, str]:
    """Set :data:`BLAS_THREAD_TIMEOUT` unless the user set it (idle OpenBLAS threads then sleep instead of
    spinning between the BLAS calls). Returns what it set. Call it before NumPy is imported."""
    env = os.environ if environ is None else environ
    name, value = BLAS_THREAD_TIMEOUT
    if name in env:
        return {}
    env[name] = value
    return {name: value}
