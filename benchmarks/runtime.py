"""Task runtime: the overlap a pipeline achieves (wall time vs the sum of stage times vs the slowest stage).

Two synthetic workloads shaped like movie alignment, each run as a serial loop (read, copy, compute,
copy back, write one after the other) and through :class:`~xmipp_accel.gpu.runtime.Pipeline`:

- ``sleep``: reading and writing are waits (--read-ms, --write-ms: a network file system), compute is
  a batch of FFTs and correlations of --frames x --side^2 frames on the GPU (CPU without one);
- ``files``: the same compute on stacks written to --folder and read back with ``numpy.fromfile``
  (the page cache makes this a memory-bandwidth read, as on a fast local disk).

The table gives the serial wall time, the pipeline's wall time, the sum of its stage busy times, the
busiest stage (the floor of any schedule with one worker per stage), the overlap (sum / wall) and the
pipeline's wall time relative to that floor; a second run with pinned staging off shows what pinned
buffers bring to the host-to-device copies.

Usage::

    python benchmarks/runtime.py [--items 24] [--frames 16] [--side 1024] [--read-ms 40] [--write-ms 10]
                                 [--folder /tmp/x] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time

import numpy as np

from xmipp_accel import backend
from xmipp_accel.gpu.runtime import Pipeline


def make_compute(xp):
    def compute(frames, worker=None):
        spec = xp.fft.rfft2(frames)
        ref = spec.mean(axis=0, keepdims=True)
        corr = xp.fft.irfft2(spec * xp.conj(ref), s=frames.shape[-2:])
        peak = corr.reshape(corr.shape[0], -1).argmax(axis=1)
        return peak, spec[:, :8, :8].copy()
    return compute


def serial_loop(items, read, compute, write, xp):
    t = time.perf_counter()
    for it in items:
        data = read(it, lambda shape, dtype: np.empty(shape, dtype)) if read.__code__.co_argcount == 2 else read(it)
        d = xp.asarray(data)
        out = compute(d)
        out = tuple(backend.to_host(o) for o in out)
        write(it, out)
    backend.synchronize(xp)
    return time.perf_counter() - t


def run_case(label, items, read, write, compute, xp, devices, args, pinned=True):
    serial = serial_loop(items, read, compute, write, xp)
    pipe = Pipeline(compute, read=read, write=write, devices=devices, read_workers=args.read_workers,
                    queue_depth=args.queue_depth, pinned=pinned)
    run = pipe.run(items)
    s = run.summary()
    if run.errors:
        print(f"{label}: {len(run.errors)} items failed, first: {run.errors[0].error!r}")
    s.update({"case": label, "serial_s": serial, "pinned": pinned})
    return s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=24)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--side", type=int, default=1024)
    parser.add_argument("--read-ms", type=float, default=40.0)
    parser.add_argument("--write-ms", type=float, default=10.0)
    parser.add_argument("--read-workers", type=int, default=2)
    parser.add_argument("--queue-depth", type=int, default=2)
    parser.add_argument("--folder", default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    cp = backend.cupy_module()
    xp = cp if cp is not None else np
    devices = [0] if cp is not None else ["cpu"]
    compute = make_compute(xp)
    shape = (args.frames, args.side, args.side)
    rng = np.random.default_rng(0)
    base = rng.standard_normal(shape, dtype=np.float32)
    items = list(range(args.items))
    results = []

    def read_sleep(i):
        time.sleep(args.read_ms / 1e3)
        return base + np.float32(i)

    def write_sleep(i, out):
        time.sleep(args.write_ms / 1e3)
        return int(out[0][0])

    compute(xp.asarray(base))  # plans and kernels made once, outside the timings
    backend.synchronize(xp)
    results.append(run_case("sleep I/O", items, read_sleep, write_sleep, compute, xp, devices, args))

    folder = args.folder or tempfile.mkdtemp(prefix="runtime_bench_")
    try:
        paths = []
        for i in items:
            p = os.path.join(folder, f"movie_{i:04d}.raw")
            (base + np.float32(i)).tofile(p)
            paths.append(p)

        def read_file(p):
            return np.fromfile(p, dtype=np.float32).reshape(shape)

        def write_file(p, out):
            np.save(p + ".peaks.npy", out[0])
            return p

        def read_into(p, alloc):
            buf = alloc(shape, np.float32)
            with open(p, "rb") as f:
                f.readinto(memoryview(buf).cast("B"))
            return buf

        results.append(run_case("file read + pinned copy", paths, read_file, write_file, compute, xp, devices, args))
        results.append(run_case("file read into pinned", paths, read_into, write_file, compute, xp, devices, args))
        if cp is not None:
            results.append(run_case("file read, pageable", paths, read_file, write_file, compute, xp, devices, args,
                                    pinned=False))
    finally:
        if args.folder is None:
            shutil.rmtree(folder, ignore_errors=True)

    dev = backend.list_gpus()[0]["name"] if cp is not None else f"cpu ({os.cpu_count()} cores)"
    mb = np.prod(shape) * 4 / 2**20
    print(f"task runtime on {dev}: {args.items} items of {args.frames} x {args.side}^2 float32 ({mb:.0f} MiB), "
          f"read workers {args.read_workers}, queue depth {args.queue_depth}")
    print(f"{'case':<24} {'serial s':>9} {'pipeline s':>10} {'speedup':>8} {'sum stages':>10} {'slowest':>8} "
          f"{'floor':>7} {'overlap':>8} {'wall/floor':>10}  stage busy s (read h2d compute d2h write)")
    for r in results:
        b = r["stage_busy_s"]
        stages = " ".join(f"{b.get(k, 0):.2f}" for k in ("read", "h2d", "compute", "d2h", "write"))
        print(f"{r['case']:<24} {r['serial_s']:>9.2f} {r['wall_s']:>10.2f} {r['serial_s'] / r['wall_s']:>7.2f}x "
              f"{r['sum_stages_s']:>10.2f} {r['slowest_stage_s']:>8.2f} {r['stage_floor_s']:>7.2f} "
              f"{r['overlap']:>8.2f} {r['wall_over_floor']:>9.2f}x  {stages}")
    print("slowest = busiest stage summed over its workers; floor = max over stages of busy time / workers of "
          "that stage (no schedule can beat it); overlap = sum of stage times / wall")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": dev, "args": vars(args), "results": results}, f, default=str)


if __name__ == "__main__":
    main()
