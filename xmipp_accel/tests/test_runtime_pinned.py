"""The runtime's one pinned host-memory pool (gpu/runtime/pinned.py): reuse by shape and dtype, copies, threads."""
from __future__ import annotations

import threading

import numpy as np

from xmipp_accel.gpu.runtime import PinnedPool


def test_buffers_are_reused_by_shape_and_dtype():
    pool = PinnedPool()
    a = pool.take((3, 4), np.float32)
    assert a.shape == (3, 4) and a.dtype == np.float32
    pool.release([a])
    assert pool.take((3, 4), "float32") is a            # the same buffer comes back
    assert pool.take((3, 4), np.float64) is not a       # another dtype: a new one
    assert pool.take((4, 3), np.float32) is not a       # another shape: a new one


def test_copy_in_gives_an_equal_independent_copy():
    pool = PinnedPool()
    src = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    buf = pool.copy_in(src)
    np.testing.assert_array_equal(buf, src)
    src[0, 0, 0] = -1
    assert buf[0, 0, 0] == 0 and not np.shares_memory(buf, src)


def test_threads_never_share_a_buffer():
    pool = PinnedPool()
    held, shared, lock = set(), [], threading.Lock()

    def work():
        for _ in range(200):
            b = pool.take((8,), np.float32)
            with lock:
                if id(b) in held:                     # another thread holds this buffer now
                    shared.append(id(b))
                held.add(id(b))
            with lock:
                held.discard(id(b))
            pool.release([b])
    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert shared == [] and held == set()
