"""A pipeline of stages over GPUs and CPU workers: read, host-to-device, compute, device-to-host, write.

Reading (decoding TIFF/MRC) runs in a thread pool; each compute worker owns one
device (one worker per GPU in ``devices``, plus ``cpu_workers`` NumPy workers)
and a CUDA stream, copies its inputs to the GPU from pinned buffers, runs the
computation and copies the results back; a writer thread stores them. Stages
overlap: while a GPU computes item *i*, the readers decode items *i+1...*, and
the writer stores item *i-1*. At most :attr:`Pipeline.max_in_flight` items are
held at once (read, queued, computing or waiting to be written), so memory stays
bounded however many items there are. One item's failure (a corrupt movie, an
out-of-memory) is reported for that item, through ``on_error``, and the others
go on. After Umpalumpa (Střelák et al., Computing 2023).

Example
-------
>>> pipe = Pipeline(read=read_movie, compute=align, write=save_result, devices=[0, 1], queue_depth=2)
>>> run = pipe.run(movie_paths)
>>> failed = run.errors                    # ItemResult with .item, .error, .stage
>>> print(run.summary()["overlap"])        # sum of stage times / wall time

``compute(data, worker)`` receives the data on the worker's device (NumPy arrays
became CuPy arrays on a GPU worker; arrays nested in tuples, lists, dicts and
:class:`~.payload.Payload` are moved) and a :class:`WorkerContext` (device,
``xp``, stream, per-worker ``state`` from ``setup``); ``compute(data)`` works too.
CuPy arrays in its result are copied back to the host before ``write(item, result)``.
"""
from __future__ import annotations

import functools
import heapq
import inspect
import logging
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Union

import numpy as np

from ... import backend
from .payload import Payload, PhysicalDescriptor
from .pinned import PinnedPool
from .run_types import STAGES, Cancelled, ItemResult, PipelineRun, StageStats, WorkerContext  # noqa: F401

logger = logging.getLogger(__name__)

__all__ = ["Pipeline", "PipelineRun", "ItemResult", "StageStats", "WorkerContext", "STAGES"]

_SENTINEL = object()


def _wants_two_args(fn: Callable) -> bool:
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return True
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return any(p.kind == p.VAR_POSITIONAL for p in params) or len(positional) >= 2


def _root(a: np.ndarray) -> int:
    """id of the array that owns ``a``'s memory (following views back to their base)."""
    while isinstance(getattr(a, "base", None), np.ndarray):
        a = a.base
    return id(a)


def _map_arrays(obj: Any, fn: Callable[[Any], Any], kind: type, pinned: bool = False) -> Any:
    """Apply ``fn`` to every array of type ``kind`` inside tuples, lists, dicts and Payloads.

    ``pinned`` says that ``fn`` returns pinned host arrays (recorded in the payloads' physical descriptors).
    """
    if isinstance(obj, kind):
        return fn(obj)
    if isinstance(obj, Payload):
        data = _map_arrays(obj.data, fn, kind, pinned)
        if data is obj.data or not hasattr(data, "nbytes"):
            return obj if data is obj.data else Payload(data, obj.logical, obj.physical, dict(obj.meta))
        return Payload(data, obj.logical, PhysicalDescriptor.of(data, pinned=pinned), dict(obj.meta))
    if isinstance(obj, tuple):
        return tuple(_map_arrays(o, fn, kind, pinned) for o in obj)
    if isinstance(obj, list):
        return [_map_arrays(o, fn, kind, pinned) for o in obj]
    if isinstance(obj, dict):
        return {k: _map_arrays(v, fn, kind, pinned) for k, v in obj.items()}
    return obj


def _resolve_devices(devices: Optional[Sequence[Union[int, str, backend.Device]]]) -> List[backend.Device]:
    if devices is None:
        return [backend.resolve_device()]
    out = []
    for d in devices:
        if isinstance(d, backend.Device):
            out.append(d)
        elif isinstance(d, str) and d.lower() in ("cpu", "gpu", "auto"):
            out.append(backend.resolve_device(d.lower()))
        else:
            out.append(backend.resolve_device("gpu", int(d)))
    return out


class Pipeline:
    """Read → host-to-device → compute → device-to-host → write, over GPUs and CPU workers.

    Parameters
    ----------
    compute : callable ``(data, worker) -> result`` or ``(data) -> result``
        The work for one item, on the worker's device.
    read : callable ``(item) -> data`` or ``(item, alloc) -> data``, optional
        Load one item (runs in a pool of ``read_workers`` threads); default: the item is the data. With
        two parameters it gets ``alloc(shape, dtype) -> ndarray``, a host buffer (pinned when GPUs are
        used) to read into directly, e.g. ``f.readinto(alloc(shape, "float32"))``, which saves the copy
        into pinned memory.
    write : callable ``(item, result) -> value``, optional
        Store one result (runs in the writer thread); its return value is kept as ``ItemResult.value``.
    setup : callable ``(worker) -> state``, optional
        Per-worker initialisation (FFT plans, kernels, buffers), called once in the worker's thread
        with its device current; the state is ``worker.state``. A failing setup stops the run.
    devices : sequence of GPU ids, ``Device`` or ``"cpu"``/``"gpu"``/``"auto"``, optional
        One compute worker per GPU (``workers_per_gpu`` each). Default: the automatic device.
    cpu_workers : int
        NumPy workers, in addition to the GPUs (at least one when no GPU is used).
    workers_per_gpu : int
        Compute workers (each with its own stream) per GPU; 2 overlaps one's copies with the other's compute.
    read_workers, write_workers : int
        Reader threads; writer threads (1 when ``ordered``).
    queue_depth : int
        Items that may wait between stages per compute worker; with the workers' own items it bounds
        memory: ``max_in_flight = read_workers + workers * (1 + queue_depth) + write_workers``.
    ordered : bool
        Write and return results in input order (else in completion order).
    on_error : callable ``(item_result) -> None``, optional
        Called (in the writer thread) for each failed item.
    on_result : callable ``(item_result) -> None``, optional
        Called for every finished item (progress bars).
    pinned : bool
        Copy read arrays into pinned buffers for fast, asynchronous host-to-device copies (GPU workers only).
    to_host : bool
        Copy CuPy arrays in ``compute``'s result back to NumPy before ``write``.
    fail_fast : bool
        Stop at the first failed item (the rest are reported as cancelled) and raise its error from :meth:`run`.
    prefetch : bool
        GPU workers upload the next item on a copy stream while the previous item's compute still runs on
        the worker's stream (the compute waits on the upload's event; the previous item is synchronised
        only once the next upload is issued). ``compute`` must then only queue GPU work and return
        without waiting for it, and a worker holds two items' device data at once (one more in flight).
        Not yet run on a GPU (its test, ``test_prefetch_uploads_beside_the_previous_compute...``, is
        written); no caller turns it on yet.
    """

    def __init__(self, compute: Callable, *, read: Optional[Callable] = None, write: Optional[Callable] = None,
                 setup: Optional[Callable] = None, devices: Optional[Sequence[Any]] = None, cpu_workers: int = 0,
                 workers_per_gpu: int = 1, read_workers: int = 2, write_workers: int = 1, queue_depth: int = 2,
                 ordered: bool = True, on_error: Optional[Callable[[ItemResult], None]] = None,
                 on_result: Optional[Callable[[ItemResult], None]] = None, pinned: bool = True,
                 to_host: bool = True, fail_fast: bool = False, prefetch: bool = False):
        if read_workers < 1 or write_workers < 1 or queue_depth < 0 or cpu_workers < 0 or workers_per_gpu < 1:
            raise ValueError("read_workers, write_workers and workers_per_gpu must be >= 1; queue_depth and "
                             "cpu_workers >= 0")
        self.compute, self.read, self.write, self.setup = compute, read, write, setup
        self._compute_ctx = _wants_two_args(compute)
        self._read_alloc = read is not None and _wants_two_args(read)
        resolved = _resolve_devices(devices)
        gpus = [d for d in resolved if d.is_gpu]
        n_cpu = cpu_workers if (gpus or cpu_workers) else 1
        if any(not d.is_gpu for d in resolved):
            n_cpu = max(n_cpu, 1)
        self.workers: List[backend.Device] = [g for g in gpus for _ in range(workers_per_gpu)] + \
            [backend.Device("cpu")] * n_cpu
        self._names = []
        for i, d in enumerate(self.workers):
            if d.is_gpu:
                k = sum(1 for w in self.workers[:i] if w.is_gpu and w.gpu_id == d.gpu_id)
                self._names.append(f"gpu{d.gpu_id}" + (f".{k}" if workers_per_gpu > 1 else ""))
            else:
                self._names.append(f"cpu{sum(1 for w in self.workers[:i] if not w.is_gpu)}")
        self.read_workers = read_workers
        self.write_workers = 1 if ordered else write_workers
        self.queue_depth = queue_depth
        self.ordered = ordered
        self.on_error, self.on_result = on_error, on_result
        self.pinned = pinned and bool(gpus)
        self.to_host = to_host
        self.fail_fast = fail_fast
        self.prefetch = prefetch

    @property
    def max_in_flight(self) -> int:
        """Most items held in memory at once."""
        per_worker = 1 + self.queue_depth + (1 if self.prefetch else 0)
        return self.read_workers + len(self.workers) * per_worker + self.write_workers

    @property
    def worker_names(self) -> List[str]:
        return list(self._names)

    # ------------------------------------------------------------------------------------------ run
    def run(self, items: Iterable[Any]) -> PipelineRun:
        """Process every item; returns a :class:`PipelineRun` (one :class:`ItemResult` per item).

        ``items`` may be a generator: it is consumed lazily, as memory allows.
        """
        state = _RunState(self)
        t0 = time.perf_counter()
        threads = [threading.Thread(target=state.feed, args=(items,), name="pipeline-feed", daemon=True)]
        threads += [threading.Thread(target=state.work, args=(i,), name=f"pipeline-{n}", daemon=True)
                    for i, n in enumerate(self._names)]
        threads += [threading.Thread(target=state.write_loop, name=f"pipeline-write{i}", daemon=True)
                    for i in range(self.write_workers)]
        for t in threads:
            t.start()
        try:
            for t in threads:
                while t.is_alive():
                    t.join(0.1)
        except BaseException:  # KeyboardInterrupt: stop reading, let queued items drain as cancelled
            state.stop.set()
            for t in threads:
                t.join()
            raise
        wall = time.perf_counter() - t0
        if state.fatal is not None:
            raise state.fatal
        results = state.results
        results = sorted(results, key=lambda r: r.index) if self.ordered else results
        n_gpu = sum(1 for w in self.workers if w.is_gpu)
        stage_workers = {"read": self.read_workers, "h2d": n_gpu, "compute": len(self.workers), "d2h": n_gpu,
                         "write": self.write_workers}
        run = PipelineRun(results, state.stats, wall, state.peak, self.max_in_flight, self._names, stage_workers)
        if self.fail_fast and run.errors:
            first = min(run.errors, key=lambda r: (r.stage == "cancelled", r.index))
            raise first.error
        return run


class _RunState:
    """The queues, counters and threads' bodies of one :meth:`Pipeline.run`."""

    def __init__(self, pipe: Pipeline):
        self.p = pipe
        self.sem = threading.Semaphore(pipe.max_in_flight)
        self.compute_q: queue.Queue = queue.Queue()
        self.write_q: queue.Queue = queue.Queue()
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.stats = {s: StageStats(s) for s in STAGES}
        self.results: List[ItemResult] = []
        self.in_flight = 0
        self.peak = 0
        self.fatal: Optional[BaseException] = None
        self.workers_left = len(pipe.workers)
        self.pool = PinnedPool() if pipe.pinned else None
        self.pinned_of: Dict[int, List[np.ndarray]] = {}

    # -------------------------------------------------------------------------------- helpers
    def _time(self, stage: str, dt: float) -> None:
        with self.lock:
            s = self.stats[stage]
            s.count += 1
            s.busy_s += dt
            s.max_s = max(s.max_s, dt)

    def _fatal(self, exc: BaseException) -> None:
        with self.lock:
            if self.fatal is None:
                self.fatal = exc
        self.stop.set()

    # -------------------------------------------------------------------------------- feed + read
    def _acquire_slot(self) -> bool:
        """Wait for room for one more item; False when the run is being stopped."""
        while not self.sem.acquire(timeout=0.1):
            if self.stop.is_set():
                return False
        if self.stop.is_set():
            self.sem.release()
            return False
        return True

    def feed(self, items: Iterable[Any]) -> None:
        """Take items one by one, as memory allows, and hand them to the readers."""
        try:
            with ThreadPoolExecutor(self.p.read_workers, thread_name_prefix="pipeline-read") as pool:
                iterator = iter(items)
                index = 0
                while self._acquire_slot():
                    try:
                        item = next(iterator)
                    except StopIteration:
                        self.sem.release()
                        break
                    with self.lock:
                        self.in_flight += 1
                        self.peak = max(self.peak, self.in_flight)
                    pool.submit(self._read_one, index, item)
                    index += 1
        except BaseException as exc:  # the items iterable itself failed
            self._fatal(exc)
        finally:  # every read has been queued (the pool waited for them): tell each worker to finish
            for _ in self.p.workers:
                self.compute_q.put(_SENTINEL)

    def _read_one(self, index: int, item: Any) -> None:
        if self.stop.is_set():
            self.compute_q.put((index, item, None, (Cancelled("run stopped"), "cancelled")))
            return
        t = time.perf_counter()
        pinned: List[np.ndarray] = []
        try:
            if self.p._read_alloc:
                def alloc(shape, dtype=np.float32) -> np.ndarray:
                    if self.pool is None:
                        return np.empty(shape, dtype)
                    buf = self.pool.take(tuple(int(s) for s in np.atleast_1d(shape)), np.dtype(dtype))
                    pinned.append(buf)
                    return buf
                data = self.p.read(item, alloc)
            else:
                data = self.p.read(item) if self.p.read is not None else item
            if self.pool is not None:
                given = {_root(b) for b in pinned}

                def to_pinned(a: np.ndarray) -> np.ndarray:
                    if _root(a) in given:  # already in a pinned buffer of ours: no copy
                        return a
                    buf = self.pool.copy_in(a)
                    pinned.append(buf)
                    return buf
                data = _map_arrays(data, to_pinned, np.ndarray, pinned=True)
        except Exception as exc:
            self._time("read", time.perf_counter() - t)
            if pinned and self.pool is not None:
                self.pool.release(pinned)
            self.compute_q.put((index, item, None, (exc, "read")))
            return
        with self.lock:
            self.pinned_of[index] = pinned
        self._time("read", time.perf_counter() - t)
        self.compute_q.put((index, item, data, None))

    # -------------------------------------------------------------------------------- compute workers
    def work(self, w: int) -> None:
        device, name = self.p.workers[w], self.p._names[w]
        try:
            if device.is_gpu:
                cp = backend.cupy_module()
                with cp.cuda.Device(device.gpu_id):
                    stream = cp.cuda.Stream(non_blocking=True)
                    with stream:
                        self._work_loop(WorkerContext(name, device, cp, stream))
            else:
                self._work_loop(WorkerContext(name, device, np))
        except BaseException as exc:  # setup failed, or a bug in the loop itself
            self._fatal(exc)
            self._drain()
        finally:
            with self.lock:
                self.workers_left -= 1
                last = self.workers_left == 0
            if last:
                for _ in range(self.p.write_workers):
                    self.write_q.put(_SENTINEL)

    def _drain(self) -> None:
        """After a fatal error: pass every queued item on as cancelled until this worker's sentinel."""
        while True:
            msg = self.compute_q.get()
            if msg is _SENTINEL:
                return
            index, item, _, _ = msg
            self.write_q.put((index, item, None, (Cancelled("run stopped"), "cancelled"), None))

    def _work_loop(self, ctx: WorkerContext) -> None:
        if self.p.setup is not None:
            ctx.state = self.p.setup(ctx)
        copy_stream = ctx.xp.cuda.Stream(non_blocking=True) if (ctx.is_gpu and self.p.prefetch) else None
        pending = None   # with prefetch: the item whose compute is queued on ctx.stream, not yet synchronised
        while True:
            msg = self.compute_q.get()
            if msg is _SENTINEL:
                if pending is not None:
                    self._complete(ctx, *pending)
                return
            index, item, data, err = msg
            if err is None and self.stop.is_set():
                err = (Cancelled("run stopped"), "cancelled")
            if err is not None:
                self.write_q.put((index, item, None, err, ctx.name))
                continue
            stage = "h2d"
            try:
                t = time.perf_counter()
                if ctx.is_gpu:
                    data = _map_arrays(data, functools.partial(self._upload, ctx=ctx, stream=copy_stream),
                                       np.ndarray)
                    uploaded = copy_stream.record() if copy_stream is not None else None
                    self._time("h2d", time.perf_counter() - t)
                if pending is not None:          # the previous item's GPU work ran while this one uploaded
                    self._complete(ctx, *pending)
                    pending = None
                if copy_stream is not None:
                    ctx.stream.wait_event(uploaded)
                stage = "compute"
                t = time.perf_counter()
                result = self.p.compute(data, ctx) if self.p._compute_ctx else self.p.compute(data)
            except Exception as exc:
                self._failed(ctx, index, item, exc, stage)
                continue
            if copy_stream is not None:
                pending = (index, item, result, data, t)   # ``data`` stays referenced until its compute is done
                continue
            self._complete(ctx, index, item, result, data, t)

    def _complete(self, ctx: WorkerContext, index: int, item, result, data, t0: float) -> None:
        """Wait for an item's GPU work, copy its result to the host if asked, and pass it to the writer."""
        stage = "compute"
        try:
            if ctx.is_gpu:
                ctx.stream.synchronize()
            self._time("compute", time.perf_counter() - t0)
            del data
            if ctx.is_gpu and self.p.to_host:
                stage = "d2h"
                t = time.perf_counter()
                result = _map_arrays(result, lambda a: a.get(stream=ctx.stream), ctx.xp.ndarray)
                ctx.stream.synchronize()
                self._time("d2h", time.perf_counter() - t)
        except Exception as exc:
            self._failed(ctx, index, item, exc, stage)
            return
        self.write_q.put((index, item, result, None, ctx.name))

    def _failed(self, ctx: WorkerContext, index: int, item, exc: Exception, stage: str) -> None:
        if backend.is_out_of_memory(exc) and ctx.is_gpu:
            ctx.xp.get_default_memory_pool().free_all_blocks()
        self.write_q.put((index, item, None, (exc, stage), ctx.name))

    @staticmethod
    def _upload(a: np.ndarray, ctx: WorkerContext, stream=None):
        """Device copy of ``a`` on ``stream`` (default the worker's). The buffer is allocated with that
        stream current, so CuPy's stream-ordered pool never hands it a block the other stream still uses."""
        stream = stream or ctx.stream
        with stream:
            d = ctx.xp.empty(a.shape, a.dtype)
            d.set(np.ascontiguousarray(a), stream=stream)  # asynchronous from pinned memory
        return d

    # -------------------------------------------------------------------------------- write
    def write_loop(self) -> None:
        pending: list = []  # heap of (index, message) waiting for their turn (ordered)
        next_index = 0
        while True:
            msg = self.write_q.get()
            if msg is _SENTINEL:
                break
            if not self.p.ordered:
                self._finish(*msg)
                continue
            heapq.heappush(pending, (msg[0], id(msg), msg))
            while pending and pending[0][0] == next_index:
                self._finish(*heapq.heappop(pending)[2])
                next_index += 1
        for _, _, msg in sorted(pending):  # only after a fatal error can holes remain
            self._finish(*msg)

    def _finish(self, index: int, item: Any, result: Any, err: Any, worker: Optional[str]) -> None:
        res = ItemResult(index, item, worker=worker)
        if err is not None:
            res.error, res.stage = err
        else:
            t = time.perf_counter()
            try:
                res.value = self.p.write(item, result) if self.p.write is not None else result
            except Exception as exc:
                res.error, res.stage = exc, "write"
            self._time("write", time.perf_counter() - t)
        del result
        with self.lock:
            bufs = self.pinned_of.pop(index, None)
        if bufs and self.pool is not None:
            self.pool.release(bufs)
        if res.error is not None:
            if res.stage != "cancelled":
                if self.p.on_error is None and not self.p.fail_fast:  # else the caller reports it
                    logger.warning("item %d (%.80s) failed in %s: %s", index, item, res.stage, res.error)
                if self.p.fail_fast:
                    self.stop.set()
            if self.p.on_error is not None:
                self._callback(self.p.on_error, res)
        if self.p.on_result is not None:
            self._callback(self.p.on_result, res)
        with self.lock:
            self.results.append(res)
            self.in_flight -= 1
        self.sem.release()

    def _callback(self, fn: Callable[[ItemResult], None], res: ItemResult) -> None:
        try:
            fn(res)
        except Exception as exc:  # a broken callback must not hang the pipeline
            logger.error("pipeline callback %s failed: %s", getattr(fn, "__name__", fn), exc)
