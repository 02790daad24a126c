"""Thread-pool shares of concurrent processes and of MPI ranks on one node (threads.py)."""
from __future__ import annotations

import os
import subprocess
import sys
import threading

import numpy as np

from xmipp_accel.threads import (THREAD_VARIABLES, local_ranks, share_cores_with_local_ranks, thread_limits,
                                     with_thread_limits)


def test_each_process_gets_its_share_of_the_cores():
    assert thread_limits(4, cores=16) == {name: "4" for name in THREAD_VARIABLES}
    assert thread_limits(3, cores=16)["OPENBLAS_NUM_THREADS"] == "5"
    assert thread_limits(32, cores=16)["OMP_NUM_THREADS"] == "1"        # never 0
    assert thread_limits(1, cores=2)["MKL_NUM_THREADS"] == "2"


def test_user_limits_are_kept_and_one_process_is_left_alone():
    env = {"PATH": "/bin", "OMP_NUM_THREADS": "7"}
    out = with_thread_limits(env, 2, cores=16)
    assert out["OMP_NUM_THREADS"] == "7" and out["OPENBLAS_NUM_THREADS"] == "8" and out["PATH"] == "/bin"
    assert with_thread_limits(env, 1, cores=16) == env
    assert "OPENBLAS_NUM_THREADS" not in env                              # the input is not modified

    class Environ(dict):                                                  # Scipion's runJob needs its methods
        def getPrepend(self):
            return ""
    typed = with_thread_limits(Environ(PATH="/bin"), 4, cores=8)
    assert isinstance(typed, Environ) and typed["MKL_NUM_THREADS"] == "2" and typed.getPrepend() == ""


def test_the_limit_reaches_numpy_in_a_child_process():
    """Set in the environment of a new process, the share is what its BLAS pool uses (threadpoolctl
    reports it where installed; else the variable is at least seen by the child)."""
    code = ("import os, numpy\n"
            "try:\n"
            "    from threadpoolctl import threadpool_info\n"
            "    print(max([p['num_threads'] for p in threadpool_info() if p['user_api'] == 'blas'] or [0]))\n"
            "except ImportError:\n"
            "    print(os.environ['OPENBLAS_NUM_THREADS'])\n")
    clean = {k: v for k, v in os.environ.items() if k not in THREAD_VARIABLES}
    env = with_thread_limits(clean, 2, cores=2)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert int(out.stdout.strip()) in (0, 1)    # 0: no BLAS pool reported (a numpy without OpenBLAS)


def test_local_ranks_from_the_launchers_variables():
    assert local_ranks({}) == 1
    assert local_ranks({"OMPI_COMM_WORLD_LOCAL_SIZE": "4"}) == 4
    assert local_ranks({"MPI_LOCALNRANKS": "3"}) == 3
    assert local_ranks({"SLURM_NTASKS_PER_NODE": "2"}) == 2
    assert local_ranks({"SLURM_NTASKS_PER_NODE": "2(x3)"}) == 1          # not a plain count: left alone
    env = {"OMPI_COMM_WORLD_LOCAL_SIZE": "4", "MKL_NUM_THREADS": "1"}
    assert share_cores_with_local_ranks(env, cores=16) == {"OMP_NUM_THREADS": "4", "OPENBLAS_NUM_THREADS": "4"}
    assert env["MKL_NUM_THREADS"] == "1"
    assert share_cores_with_local_ranks({}, cores=16) == {}


def test_the_command_line_shares_the_cores_before_numpy_loads():
    """`mpirun -np 4 xmipp-accel ...` on one node: each rank's BLAS gets a quarter of the cores, set before
    NumPy is imported (NumPy reads the variables once, when it loads)."""
    code = ("import os, sys\n"
            "import xmipp_accel.cli.__main__\n"
            "from xmipp_accel import threads\n"
            "print(os.environ.get('OPENBLAS_NUM_THREADS'), threads.applied_before_numpy)\n")
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARIABLES}
    env["OMPI_COMM_WORLD_LOCAL_SIZE"] = "2"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    value, before = out.stdout.split()
    assert int(value) == max(1, len(os.sched_getaffinity(0)) // 2) and before == "True"


def test_idle_blas_threads_sleep_unless_the_user_said_otherwise():
    from xmipp_accel.threads import BLAS_THREAD_TIMEOUT, let_idle_blas_threads_sleep
    name, value = BLAS_THREAD_TIMEOUT
    env = {"PATH": "/bin"}
    assert let_idle_blas_threads_sleep(env) == {name: value} and env[name] == value
    env = {name: "20"}
    assert let_idle_blas_threads_sleep(env) == {} and env[name] == "20"


def test_omp_num_threads_set_after_import_limits_the_cpu_ffts_and_the_local_motion_twin(monkeypatch):
    """The movie FFTs (``movie/_fft.py``), the polar module's FFTs and the local-motion twin's frame threads
    follow :func:`cpu_workers` at each call: the cores (4, made so here), or 1 once ``OMP_NUM_THREADS=1``."""
    import concurrent.futures

    import scipy.fft

    from xmipp_accel import threads
    from xmipp_accel.gpu.align import polar
    from xmipp_accel.gpu.movie import _fft, apply
    monkeypatch.setattr(threads, "_cores", lambda: 4)
    workers, pools = [], []
    for name in ("fft", "ifft", "rfft", "irfft", "rfft2"):
        def spy(*args, _transform=getattr(scipy.fft, name), **kw):
            workers.append(kw["workers"])
            return _transform(*args, **kw)
        monkeypatch.setattr(scipy.fft, name, spy)

    def pool(n, _pool=concurrent.futures.ThreadPoolExecutor):
        pools.append(n)
        return _pool(n)
    monkeypatch.setattr(concurrent.futures, "ThreadPoolExecutor", pool)

    def run():
        workers.clear(), pools.clear()
        x = np.random.default_rng(0).standard_normal((3, 16, 16)).astype(np.float32)
        _fft.irfft2(_fft.rfft2(x), (16, 16))                              # rfft, fft, ifft, irfft
        polar.fft_last(x), polar.centred_rfft2(x)                         # fft, rfft2
        apply.correct_local_motion_reference(x, np.zeros((3, 2, 4, 4), np.float32), (8.0, 8.0))
        return len(workers), set(workers), list(pools)

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert run() == (6, {4}, [3])                                         # 3 frames: a pool of min(4, 3)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert run() == (6, {1}, [])                                          # one worker, no pool


def test_map_in_order_keeps_the_order_and_runs_the_libraries_single_threaded():
    """Results in the items' order whatever the workers and their speed; inside a worker FFTs get 1 thread
    (outside: cpu_workers) and BLAS is held at 1 thread while the map runs, with one worker too."""
    import time

    from xmipp_accel import threads

    def fn(i):
        time.sleep(0.002 * ((7 * i) % 5))                  # later items often finish first
        blas = [getter() for _, getter in threads._loaded_blas()]
        return i * i, threads.fft_workers(), threads.in_pool_thread(), blas

    outside = threads.fft_workers()
    assert outside == threads.cpu_workers() and not threads.in_pool_thread()
    for workers in (1, 3):
        out = list(threads.map_in_order(fn, range(12), workers, ahead=4))
        assert [o[0] for o in out] == [i * i for i in range(12)]
        assert all(o[1] == (1 if workers > 1 else outside) and o[2] == (workers > 1) for o in out)
        assert all(set(o[3]) <= {1} for o in out)
    assert threads.fft_workers() == outside
    # a map inside a worker runs in that worker's thread (no pool inside a pool)
    inner = list(threads.map_in_order(lambda _: list(threads.map_in_order(lambda i: threading.get_ident(),
                                                                           range(4), 3)) + [threading.get_ident()],
                                      range(3), 3))
    assert all(len(set(idents)) == 1 for idents in inner)


def test_blas_threads_are_restored_after_nested_holds():
    import numpy  # noqa: F401  (loads NumPy's BLAS)
    import pytest

    from xmipp_accel import threads
    libs = threads._loaded_blas()
    if not libs:
        pytest.skip("no OpenBLAS or MKL loaded")
    setter, getter = libs[0]
    before = getter()
    try:
        setter(2)
        held = getter()                                   # 2, or 1 where OpenBLAS caps it at one core
        with threads.blas_threads(1):
            with threads.blas_threads(1):
                assert getter() == 1
            assert getter() == 1                          # the inner block does not give the count back
        assert getter() == held
    finally:
        setter(before)


def test_heap_settings_are_applied_unless_the_user_set_them():
    """In a fresh process: the glibc settings are applied (Linux), each one skipped where its variable is set."""
    import pytest
    if not sys.platform.startswith("linux"):
        pytest.skip("glibc mallopt")
    code = ("import os\n"
            "from xmipp_accel.threads import keep_freed_heap_memory\n"
            "print(sorted(keep_freed_heap_memory()))\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(sorted(["MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_ARENA_MAX"]))
    env["MALLOC_ARENA_MAX"] = "4"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(sorted(["MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_"]))


def test_core_share_limits_the_calling_thread_only():
    from xmipp_accel import threads
    full = threads.cpu_workers()
    seen = {}
    active = {"n": 2}
    with threads.core_share(1):
        assert threads.cpu_workers() == 1 and threads.fft_workers() == 1
        t = threading.Thread(target=lambda: seen.setdefault("other", threads.cpu_workers()))
        t.start()
        t.join()
        with threads.core_share(5):                      # nested: the smaller share stays
            assert threads.cpu_workers() == 1
    assert seen["other"] == full and threads.cpu_workers() == full
    with threads.core_share(lambda: max(1, 64 // active["n"])):   # asked at each call
        assert threads.cpu_workers() == min(full, 32)
        active["n"] = 64
        assert threads.cpu_workers() == 1
    assert threads.cpu_workers() == full


def test_available_memory_is_positive_and_below_the_machine_total():
    from xmipp_accel import threads
    avail = threads.available_memory_bytes()
    if avail is None:
        return
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert 0 < avail <= total
