"""Pipeline runtime on CPU threads (and a GPU worker where available): results equal a serial loop, order,
per-item errors, bounded memory, fail-fast, setup per worker, clean shutdown."""
from __future__ import annotations

import random
import threading
import time

import numpy as np
import pytest

from xmipp_accel import backend
from xmipp_accel.gpu.runtime import ItemResult, Payload, Pipeline


def read_item(i):
    time.sleep(random.Random(i).random() * 0.004)  # completion order differs from input order
    return np.random.default_rng(i).normal(size=(16, 16)).astype(np.float32)


def compute_item(a):
    return np.abs(np.fft.rfft2(a)).sum(dtype=np.float64)


def serial(items):
    return [compute_item(read_item(i)) for i in items]


def test_results_equal_a_serial_loop_in_input_order():
    items = list(range(40))
    run = Pipeline(compute_item, read=read_item, devices=["cpu"], cpu_workers=3, read_workers=3).run(items)
    assert [r.index for r in run] == items and [r.item for r in run] == items
    assert all(r.ok for r in run)
    np.testing.assert_array_equal(run.values, serial(items))
    assert set(r.worker for r in run) <= {"cpu0", "cpu1", "cpu2"}
    assert run.stats["read"].count == 40 and run.stats["compute"].count == 40
    assert run.stats["h2d"].count == 0  # CPU workers copy nothing
    s = run.summary()
    assert s["items"] == 40 and s["failed"] == 0 and s["sum_stages_s"] >= s["slowest_stage_s"] > 0


def test_ordered_writes_happen_in_input_order_even_when_computes_finish_out_of_order():
    written = []

    def slow_compute(i):
        time.sleep(0.01 if i % 3 == 0 else 0.0)
        return i * i

    run = Pipeline(slow_compute, write=lambda item, r: written.append((item, r)) or r, devices=["cpu"],
                   cpu_workers=3).run(range(20))
    assert written == [(i, i * i) for i in range(20)]
    assert run.values == [i * i for i in range(20)]


def test_unordered_results_hold_every_item_once():
    run = Pipeline(lambda i: i + 0.5, read=lambda i: (time.sleep((7 * i % 5) * 0.002), i)[1], devices=["cpu"],
                   cpu_workers=2, ordered=False, write_workers=2).run(range(30))
    assert sorted(r.index for r in run) == list(range(30))
    assert all(r.value == r.item + 0.5 for r in run)


def test_errors_are_reported_per_item_and_others_continue():
    def read(i):
        if i == 3:
            raise OSError("corrupt movie 3")
        return i

    def compute(i):
        if i == 5:
            raise MemoryError("out of memory on item 5")
        return 10 * i

    def write(i, r):
        if i == 7:
            raise PermissionError("cannot write 7")
        return r

    seen = []
    run = Pipeline(compute, read=read, write=write, devices=["cpu"], cpu_workers=2, on_error=seen.append).run(range(10))
    stages = {r.index: r.stage for r in run.errors}
    assert stages == {3: "read", 5: "compute", 7: "write"}
    assert isinstance(run[3].error, OSError) and "corrupt" in str(run[3].error)
    assert [r.value for r in run if r.ok] == [10 * i for i in range(10) if i not in (3, 5, 7)]
    assert sorted(r.index for r in seen) == [3, 5, 7] and all(isinstance(r, ItemResult) for r in seen)


def test_memory_stays_bounded_by_queue_depth():
    """A lazy generator of many items is consumed only as fast as items leave the pipeline."""
    lock = threading.Lock()
    alive = {"now": 0, "peak": 0}
    taken = []

    def items():
        for i in range(60):
            taken.append(i)
            yield i

    def read(i):
        with lock:
            alive["now"] += 1
            alive["peak"] = max(alive["peak"], alive["now"])
        return np.zeros(1000) + i

    def compute(a):
        time.sleep(0.002)  # the bottleneck: readers would race ahead without a bound
        return float(a[0])

    def write(i, r):
        with lock:
            alive["now"] -= 1
        return r

    pipe = Pipeline(compute, read=read, write=write, devices=["cpu"], cpu_workers=1, read_workers=2, queue_depth=1)
    assert pipe.max_in_flight == 2 + 1 * (1 + 1) + 1
    run = pipe.run(items())
    assert run.values == [float(i) for i in range(60)] and taken == list(range(60))
    assert alive["peak"] <= pipe.max_in_flight
    assert run.peak_in_flight <= pipe.max_in_flight
    assert run.peak_in_flight >= 2  # reading did overlap computing


def test_fail_fast_raises_the_first_error_and_cancels_the_rest():
    def compute(i):
        if i == 2:
            raise ValueError("bad item 2")
        time.sleep(0.002)
        return i

    with pytest.raises(ValueError, match="bad item 2"):
        Pipeline(compute, devices=["cpu"], cpu_workers=1, fail_fast=True, queue_depth=0).run(range(200))


def test_setup_runs_once_per_worker_and_compute_gets_the_context():
    calls = []

    def setup(worker):
        calls.append(worker.name)
        return {"scale": 3.0}

    def compute(x, worker):
        assert worker.xp is np and not worker.is_gpu and worker.stream is None
        return x * worker.state["scale"]

    run = Pipeline(compute, setup=setup, devices=["cpu"], cpu_workers=2).run(range(8))
    assert sorted(calls) == ["cpu0", "cpu1"]
    assert run.values == [3.0 * i for i in range(8)]


def test_a_failing_setup_stops_the_run_with_its_error():
    def setup(worker):
        raise RuntimeError("cannot create FFT plan")

    with pytest.raises(RuntimeError, match="FFT plan"):
        Pipeline(lambda x: x, setup=setup, devices=["cpu"], cpu_workers=2).run(range(10))


def test_a_failing_item_source_stops_the_run():
    def items():
        yield 1
        raise OSError("lost the folder listing")

    with pytest.raises(OSError, match="folder listing"):
        Pipeline(lambda x: x, devices=["cpu"]).run(items())


def test_payloads_and_nested_data_pass_through_and_callbacks_cannot_hang_it():
    def read(i):
        return {"frames": Payload.wrap(np.full((2, 4, 4), i, np.float32), name=f"m{i}"), "dose": i}

    def compute(d):
        assert d["frames"].meta["name"] == f"m{d['dose']}"
        return d["frames"].data.sum() + d["dose"]

    def bad_callback(res):
        raise RuntimeError("progress bar broke")

    run = Pipeline(compute, read=read, devices=["cpu"], on_result=bad_callback).run(range(5))
    assert run.values == [32.0 * i + i for i in range(5)]


def test_empty_input_and_bad_options():
    run = Pipeline(lambda x: x, devices=["cpu"]).run([])
    assert list(run) == [] and run.wall_s >= 0
    with pytest.raises(ValueError):
        Pipeline(lambda x: x, read_workers=0)


@pytest.mark.gpu
@pytest.mark.parametrize("workers_per_gpu", [1, 2])
def test_gpu_worker_results_equal_numpy(workers_per_gpu):
    cp = backend.cupy_module()

    def compute(a, worker):
        assert worker.is_gpu and isinstance(a, cp.ndarray)
        assert cp.cuda.get_current_stream().ptr == worker.stream.ptr
        return cp.abs(cp.fft.rfft2(a)).astype(cp.float64).sum(axis=(-2, -1)), a.mean()

    items = list(range(12))
    run = Pipeline(compute, read=lambda i: np.stack([read_item(i)] * 3), devices=[0],
                   workers_per_gpu=workers_per_gpu).run(items)
    assert all(r.ok for r in run), [r.error for r in run.errors]
    for r in run:
        spectrum_sums, mean = r.value
        assert isinstance(spectrum_sums, np.ndarray)  # copied back to the host
        np.testing.assert_allclose(spectrum_sums, [compute_item(read_item(r.index))] * 3, rtol=1e-5)
    assert run.stats["h2d"].count == 12 and run.stats["d2h"].count == 12


@pytest.mark.gpu
@pytest.mark.parametrize("workers_per_gpu", [1, 2])
def test_prefetch_uploads_beside_the_previous_compute_and_keeps_every_result(workers_per_gpu):
    """With prefetch the next item is uploaded on a copy stream while the previous item's kernels are
    still queued: each result must be its own item's (no buffer reused or overwritten too early), an
    error stays with its item, and the copy-stream allocations do not leak across items."""
    cp = backend.cupy_module()

    def compute(a, worker):
        if int(a[0, 0, 0].get()) == 5 * 1000:      # a marker item: fails at launch, the others go on
            raise ValueError("item 5 refused")
        acc = cp.zeros((), dtype=cp.float64)
        for _ in range(20):                          # enough queued work that the next upload overlaps it
            acc += cp.abs(cp.fft.rfft2(a)).sum()
        return acc                                   # queued, not yet computed: completed by the runtime

    def read(i):
        a = np.stack([read_item(i)] * 3)
        a[0, 0, 0] = i * 1000.0
        return a

    def expected(i):
        return 20 * float(np.abs(np.fft.rfft2(read(i))).sum())

    run = Pipeline(compute, read=read, devices=[0], workers_per_gpu=workers_per_gpu, prefetch=True,
                   queue_depth=1).run(range(12))
    assert [r.index for r in run.errors] == [5] and "item 5" in str(run.errors[0].error)
    for r in run:
        if r.ok:
            np.testing.assert_allclose(float(r.value), expected(r.index), rtol=1e-5)
    assert run.stats["h2d"].count == 12


@pytest.mark.gpu
def test_gpu_and_cpu_workers_together_give_the_serial_results():
    cp = backend.cupy_module()

    def compute(a, worker):
        out = worker.xp.abs(worker.xp.fft.rfft2(a)).sum()
        return float(out.get()) if worker.xp is cp else float(out)

    run = Pipeline(compute, read=read_item, devices=[0], cpu_workers=1).run(range(16))
    np.testing.assert_allclose(run.values, serial(range(16)), rtol=1e-4)
    assert {"gpu0", "cpu0"} >= set(r.worker for r in run)


def test_read_into_buffers_given_by_the_pipeline(tmp_path):
    paths = []
    for i in range(6):
        p = tmp_path / f"m{i}.raw"
        (np.arange(12, dtype=np.float32) + i).tofile(p)
        paths.append(str(p))

    def read(path, alloc):
        buf = alloc((3, 4), np.float32)
        with open(path, "rb") as f:
            f.readinto(memoryview(buf).cast("B"))
        return buf

    run = Pipeline(lambda a: float(a.sum()), read=read, devices=["cpu"], cpu_workers=2).run(paths)
    assert run.values == [float(np.arange(12).sum() + 12 * i) for i in range(6)]
    assert run.summary()["stage_floor_s"] > 0 and run.stage_workers["read"] == 2


@pytest.mark.gpu
def test_gpu_pipeline_reads_straight_into_pinned_buffers(monkeypatch):
    from xmipp_accel.gpu.runtime.pinned import PinnedPool
    cp = backend.cupy_module()
    copies = []
    original = PinnedPool.copy_in
    monkeypatch.setattr(PinnedPool, "copy_in", lambda self, a: copies.append(a.shape) or original(self, a))

    def read(i, alloc):
        buf = alloc((2, 16, 16), np.float32)
        buf[...] = read_item(i)
        return {"frames": buf, "index": i}

    def compute(d, worker):
        return float(cp.abs(cp.fft.rfft2(d["frames"][0])).astype(cp.float64).sum())

    run = Pipeline(compute, read=read, devices=[0]).run(range(10))
    np.testing.assert_allclose(run.values, [compute_item(read_item(i)) for i in range(10)], rtol=1e-5)
    assert copies == []  # no staging copy: the reader filled pinned memory itself
    plain = Pipeline(compute, read=lambda i: {"frames": np.stack([read_item(i)] * 2), "index": i},
                     devices=[0]).run(range(3))
    assert plain.values and len(copies) == 3
