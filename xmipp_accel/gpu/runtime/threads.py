"""CPU thread pools of concurrent processes: each gets its share of the cores.

NumPy's BLAS (OpenBLAS, MKL) and OpenMP size their thread pools to all cores of the machine in every
process. When several ``xmipp-accel`` processes run at once on one node (the streaming protocol's workers,
several commands of a pipeline), their pools oversubscribe the cores and OpenBLAS's spinning threads slow
every process down, the GPU work included (it waits for the CPU that launches it). These helpers give
each process ``cores // processes`` threads through the environment, which the libraries read when they
start (so it is set for the child processes, not in the running one).
"""
from __future__ import annotations

import copy
import os
from typing import Dict, Mapping, Optional

__all__ = ["THREAD_VARIABLES", "thread_limits", "with_thread_limits"]

#: Environment variables that size the BLAS/OpenMP thread pools.
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def thread_limits(processes: int, cores: Optional[int] = None) -> Dict[str, str]:
    """Variables giving each of ``processes`` concurrent processes ``cores // processes`` threads (>= 1).

    ``cores`` defaults to the cores this process may use.
    """
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
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
