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

import contextlib
import copy
import ctypes
import os
import sys
import threading
from collections import deque
from typing import Callable, Dict, Iterable, Iterator, List, MutableMapping, Mapping, Optional, TypeVar, Union

__all__ = ["THREAD_VARIABLES", "cpu_workers", "thread_limits", "with_thread_limits", "local_ranks",
           "share_cores_with_local_ranks", "BLAS_THREAD_TIMEOUT", "let_idle_blas_threads_sleep", "fft_workers",
           "in_pool_thread", "blas_threads", "map_in_order", "MALLOC_KEEP", "keep_freed_heap_memory",
           "core_share", "available_memory_bytes"]

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
    """Threads the calling thread may keep busy: the cores this process may use, at most ``OMP_NUM_THREADS``
    when set (a pipeline's or an MPI rank's share), at most the thread's :func:`core_share` inside one (one
    of several items aligned side by side)."""
    cores = _cores()
    limit = str(os.environ.get("OMP_NUM_THREADS", "")).strip()
    if limit.isdigit() and int(limit) > 0:
        cores = min(cores, int(limit))
    for share in getattr(_pool_state, "shares", ()):
        cores = min(cores, int(share() if callable(share) else share))
    return max(1, cores)


@contextlib.contextmanager
def core_share(n: Union[int, Callable[[], int]]):
    """Inside the block, :func:`cpu_workers` (hence :func:`fft_workers` and the NumPy paths' thread counts)
    of the calling thread is at most ``n``: the thread's share of the cores when several threads each run
    one item (the CPU movie workers of :class:`~xmipp_accel.jobs.movies.MovieJob`). ``n`` may be a function,
    asked at each :func:`cpu_workers` call (a share that grows when the other workers are idle). Other
    threads are not affected; nested blocks keep the smallest share."""
    shares = getattr(_pool_state, "shares", ())
    _pool_state.shares = shares + (n,)
    try:
        yield
    finally:
        _pool_state.shares = shares


def _cgroup_memory_left() -> Optional[int]:
    """Bytes this process's cgroup (v2) may still allocate (``memory.max - memory.current``); None when
    unlimited or unknown."""
    try:
        with open("/proc/self/cgroup") as fh:
            rel = next((line.strip().split(":", 2)[2] for line in fh if line.startswith("0::")), None)
        if rel is None:
            return None
        base = os.path.join("/sys/fs/cgroup", rel.lstrip("/"))
        with open(os.path.join(base, "memory.max")) as fh:
            limit = fh.read().strip()
        if not limit.isdigit():
            return None
        with open(os.path.join(base, "memory.current")) as fh:
            used = int(fh.read().strip())
        return max(0, int(limit) - used)
    except (OSError, ValueError, IndexError):
        return None


def available_memory_bytes() -> Optional[int]:
    """Memory (bytes) a new allocation may take without swapping: Linux's ``MemAvailable`` (free memory plus
    the page cache it can drop), at most what the cgroup's limit leaves; None where neither is known."""
    avail = None
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        avail = None
    left = _cgroup_memory_left()
    if left is not None:
        avail = left if avail is None else min(avail, left)
    return avail


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


#: glibc malloc settings (``mallopt`` parameter, value, the environment variable that overrides it): keep up to
#: 256 MB of freed memory at the top of each heap instead of giving it back to the system (trim threshold) and
#: serve blocks up to 32 MB (the most glibc allows) from the heaps rather than fresh ``mmap`` pages. The NumPy
#: paths allocate and free the same large temporaries chunk after chunk; with glibc's defaults every chunk
#: faulted its pages in again: the blob insertion of 96 particles of 64 px made 360 000 page faults and took
#: 2.3 s instead of 1.7 s (one thread; 2 threads 210 000 faults), and the whole 3-iteration refine of 1000
#: particles spent 13.5 of its 82 CPU-s in the kernel, 2.6 million faults.
#: One arena (``M_ARENA_MAX``) for all threads: the worker threads' own arenas are heaps of at most 64 MB, which
#: glibc unmaps when they empty, so their temporaries faulted in again (the refine above, 2 threads: 1.1 million
#: faults with an arena per thread, 0.33 million with one; 7.2 s of system time instead of 4.3 s).
MALLOC_KEEP = ((-1, 256 << 20, "MALLOC_TRIM_THRESHOLD_"), (-3, 32 << 20, "MALLOC_MMAP_THRESHOLD_"),
               (-8, 1, "MALLOC_ARENA_MAX"))


def keep_freed_heap_memory(environ: Optional[Mapping[str, str]] = None) -> Dict[str, int]:
    """Apply :data:`MALLOC_KEEP` with glibc's ``mallopt`` (Linux; each one unless its variable is set).
    Returns what it set (nothing where the C library has no ``mallopt``). Call it early (the command line)."""
    env = os.environ if environ is None else environ
    if not sys.platform.startswith("linux"):
        return {}
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return {}
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    done = {}
    for param, value, name in MALLOC_KEEP:
        if name not in env and mallopt(param, value) == 1:
            done[name] = value
    return done


# ------------------------------------------------------------------------------------------------------------
# Worker threads of one process: the outer loop parallel, the libraries inside it single-threaded
# ------------------------------------------------------------------------------------------------------------
#
# The NumPy paths run independent batches on threads (:func:`map_in_order`). Inside such a thread an FFT or
# a BLAS call must not start a pool of its own: with ``k`` worker threads and libraries sized to all ``k``
# cores, ``k²`` threads would share ``k`` cores (and OpenBLAS serialises concurrent multi-threaded calls on
# its one thread pool). So the worker threads are marked (:func:`in_pool_thread`), :func:`fft_workers` gives
# them 1 FFT thread, and :func:`map_in_order` holds BLAS at one thread while its workers run.

_pool_state = threading.local()
T = TypeVar("T")
R = TypeVar("R")


def in_pool_thread() -> bool:
    """Whether the calling thread is a worker thread of :func:`map_in_order` (its siblings use the other cores)."""
    return bool(getattr(_pool_state, "worker", False))


def fft_workers() -> int:
    """Threads an FFT call (``scipy.fft`` ``workers=``) may use here: 1 in a worker thread of
    :func:`map_in_order`, else :func:`cpu_workers`. The transform is the same whatever the count."""
    return 1 if in_pool_thread() else cpu_workers()


def _mark_pool_thread() -> None:
    _pool_state.worker = True


#: (setter, getter) symbol names of the BLAS libraries' thread counts: OpenBLAS (NumPy's and SciPy's wheels
#: suffix or prefix the names) and MKL.
_BLAS_SYMBOLS = tuple((f"{p}openblas_set_num_threads{s}", f"{p}openblas_get_num_threads{s}")
                      for p in ("", "scipy_") for s in ("", "64_")) + (("MKL_Set_Num_Threads", "MKL_Get_Max_Threads"),)


def _loaded_blas() -> List[tuple]:
    """(set, get) ctypes functions of the BLAS libraries loaded in this process (Linux ``/proc/self/maps``;
    none elsewhere or when none is found)."""
    found, seen = [], set()
    try:
        with open("/proc/self/maps") as fh:
            paths = {line.split()[-1] for line in fh if "/" in line}
    except OSError:
        return found
    for path in sorted(paths):
        name = os.path.basename(path).lower()
        if not ("openblas" in name or name.startswith("libmkl_rt")) or path in seen:
            continue
        seen.add(path)
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for set_name, get_name in _BLAS_SYMBOLS:
            setter, getter = getattr(lib, set_name, None), getattr(lib, get_name, None)
            if setter is not None and getter is not None:
                setter.restype, getter.restype = None, ctypes.c_int
                found.append((setter, getter))
                break
    return found


_blas_lock = threading.Lock()
_blas_hold = {"depth": 0, "saved": []}


@contextlib.contextmanager
def blas_threads(n: int = 1):
    """Hold the loaded BLAS libraries (OpenBLAS, MKL) at ``n`` threads inside the block, then give back the
    counts they had. Nested or concurrent blocks share one hold (the first sets, the last restores); a
    process without such a library is left as it is. Matrix products may differ in their last bits from one
    count to another (OpenBLAS's threaded matrix-vector product splits the sums)."""
    with _blas_lock:
        if _blas_hold["depth"] == 0:
            libs = _loaded_blas()
            _blas_hold["saved"] = [(setter, int(getter())) for setter, getter in libs]
            for setter, _ in _blas_hold["saved"]:
                setter(ctypes.c_int(max(1, int(n))))
        _blas_hold["depth"] += 1
    try:
        yield
    finally:
        with _blas_lock:
            _blas_hold["depth"] -= 1
            if _blas_hold["depth"] == 0:
                for setter, count in _blas_hold["saved"]:
                    setter(ctypes.c_int(count))
                _blas_hold["saved"] = []


def map_in_order(fn: Callable[[T], R], items: Iterable[T], workers: int, *, ahead: Optional[int] = None) -> Iterator[R]:
    """``fn(item)`` for each item, yielded in the items' order, ``workers`` at once on threads when more than
    one (NumPy's array arithmetic releases the interpreter lock). Inside the workers FFTs are single-threaded
    (:func:`fft_workers`); BLAS is held at one thread (:func:`blas_threads`) until the last result is taken,
    with one worker too: OpenBLAS's threaded matrix-vector products split their sums, so a count of threads
    that followed ``workers`` would change the last bits of the results.

    ``ahead`` bounds the items started but not yet consumed (memory; default ``2 * workers``). The results are
    those of the plain loop, whatever ``workers`` (and whatever ``OMP_NUM_THREADS``). ``fn`` must not build
    shared caches lazily. Called from a worker thread of another ``map_in_order``, it runs in that thread
    (its siblings have the other cores: no pool inside a pool).
    """
    workers = 1 if in_pool_thread() else max(1, int(workers))
    if workers == 1:
        with blas_threads(1):
            for item in items:
                yield fn(item)
        return
    from concurrent.futures import ThreadPoolExecutor
    limit = max(workers, int(ahead) if ahead else 2 * workers)
    pending: deque = deque()
    with blas_threads(1), ThreadPoolExecutor(workers, initializer=_mark_pool_thread) as pool:
        try:
            for item in items:
                pending.append(pool.submit(fn, item))
                if len(pending) >= limit:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()
