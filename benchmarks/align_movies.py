"""Movie alignment throughput: seconds per movie in a stream, the I/O floor, GPU time per stage, accuracy.

For each detector size (Falcon 4096 x 4096 x 40, K2 3838 x 3710 x 40, K3 5760 x 4092 x 30, float32 MRC,
synthetic with known drift, doming and Poisson noise at 1 e/px/frame, written to disk first):

- I/O floor: bytes per movie / measured bandwidth of (a) our reader into pinned memory, page cache warm,
  (b) the same after dropping the file from the page cache (posix_fadvise DONTNEED: the disk),
  (c) host-to-device copies from pinned memory;
- the stream: ``xmipp-accel align-movies`` (in process, after one warm-up movie) over --movies movies
  (the distinct files repeated under different names), global + 5x5 local alignment, dose weighting,
  sums and DW sums written; seconds per movie = pipeline wall time / movies;
- GPU time per stage (CUDA events, median over the stream) and the compute-only time per movie
  (``align_movie`` on a device-resident movie, no I/O);
- accuracy of movie 0 against the truth: global RMS/max error after removing the mean, local error on a
  6 x 6 grid (per-point mean over frames removed).

The peer, MotionCor3 1.2.1, was measured on this H100 by the project (algorithms.md §1): 3.5 s per
Falcon movie (1.8 s of it loading), global RMS error 0.14 px; it is not installed on the lent machine.

Usage::

    python benchmarks/align_movies.py [--sizes falcon,k3,k2] [--movies 20] [--other-movies 6]
                                      [--distinct 3] [--workdir /tmp/movie_bench] [--json out.json]
                                      [--scale 1.0] [--device gpu]
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import statistics
import sys
import time

import numpy as np

from xmipp_accel.cli.__main__ import main as cli_main
from xmipp_accel.em.synthetic_movies import make_movie
from xmipp_accel import backend
from xmipp_accel.gpu.movie import AlignmentOptions, align_movie
from xmipp_accel.gpu.movie.bspline import BSplineShiftModel
from xmipp_accel.io.movie import movie_info, read_movie_raw
from xmipp_accel.io.mrc import write_mrc
from xmipp_accel.io.star import read_star

SIZES = {"falcon": (4096, 4096, 40), "k2": (3710, 3838, 40), "k3": (4092, 5760, 30)}   # (ny, nx, frames)
PIXEL_A = 1.0
DOSE = 1.0   # e/Å² per frame = e/px per frame at 1 Å/px


def _timed(fn, repeats=3):
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def io_floor(path: str, cp) -> dict:
    """Read bandwidths (warm page cache, cold) into pinned memory and pinned host-to-device bandwidth."""
    info = movie_info(path)
    nbytes = info.nbytes()
    buf = backend.pinned_empty((info.n_frames, info.ny, info.nx), np.float32)
    warm = _timed(lambda: read_movie_raw(path, out=buf, info=info))
    cold = None
    if hasattr(os, "posix_fadvise"):
        def drop_and_read():
            fd = os.open(path, os.O_RDONLY)
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)
            t = time.perf_counter()
            read_movie_raw(path, out=buf, info=info)
            return time.perf_counter() - t
        cold = min(drop_and_read() for _ in range(2))
    h2d = None
    if cp is not None:
        dev = cp.empty(buf.shape, buf.dtype)
        s = cp.cuda.Stream(non_blocking=True)

        def copy():
            dev.set(buf, stream=s)
            s.synchronize()
        h2d = _timed(copy, repeats=5)
        del dev
    return {"bytes": nbytes, "read_warm_s": warm, "read_cold_s": cold, "h2d_s": h2d,
            "read_warm_GBps": nbytes / warm / 1e9, "read_cold_GBps": nbytes / cold / 1e9 if cold else None,
            "h2d_GBps": nbytes / h2d / 1e9 if h2d else None}


def make_movies(name, shape, n_distinct, workdir, xp):
    ny, nx, n = shape
    paths, truth0 = [], None
    for k in range(n_distinct):
        frames, truth = make_movie((ny, nx), n, dose_per_pixel=DOSE, drift_scale=1.0, doming_px=3.0, seed=k,
                                   xp=xp)
        host = backend.to_host(frames)
        del frames
        path = os.path.join(workdir, f"{name}_{k}.mrc")
        write_mrc(path, host, PIXEL_A, is_stack=True)
        paths.append(path)
        if k == 0:
            xs = np.linspace(0.1 * nx, 0.9 * nx, 6)
            ys = np.linspace(0.1 * ny, 0.9 * ny, 6)
            X, Y = np.meshgrid(xs, ys)
            total = np.stack([backend.to_host(truth["total_shift"](xp.asarray(X), xp.asarray(Y), i))
                              for i in range(n)])
            truth0 = {"global": truth["global_shifts_px"], "grid": (X, Y), "total": total, "host": host}
        else:
            del host
    return paths, truth0


def run_cli(argv):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = cli_main(argv)
    lines = [ln for ln in buf.getvalue().splitlines() if ln.strip()]
    if code != 0:
        raise RuntimeError(f"align-movies failed ({code}): {lines[-3:]}")
    return json.loads(lines[-1])


def accuracy(star_path, truth, n):
    star = read_star(star_path)
    g = star["global_shift"]
    est = np.stack([g["rlnMicrographShiftX"], g["rlnMicrographShiftY"]], axis=1)
    err = (est - est.mean(0)) - (truth["global"] - truth["global"].mean(0))
    e = np.sqrt((err ** 2).sum(1))
    out = {"global_rms_px": float(np.sqrt((e ** 2).mean())), "global_max_px": float(e.max())}
    if "xmipp_accel_bspline" in star:
        gen = star["xmipp_accel_bspline_general"]
        lx, ly, lt = (int(gen[k][0]) for k in ("xaControlPointsX", "xaControlPointsY", "xaControlPointsT"))
        b = star["xmipp_accel_bspline"]
        coef = np.zeros((lt, ly, lx, 2))
        coef[b["xaIndexT"], b["xaIndexY"], b["xaIndexX"], 0] = b["xaCoefficientX"]
        coef[b["xaIndexT"], b["xaIndexY"], b["xaIndexX"], 1] = b["xaCoefficientY"]
        model = BSplineShiftModel((lx, ly, lt), (float(gen["xaExtentX"][0]), float(gen["xaExtentY"][0]), n), coef)
        X, Y = truth["grid"]
        est_t = np.stack([est[i] + model.evaluate(X, Y, i) for i in range(n)])
        err = est_t - truth["total"]
        err -= err.mean(0, keepdims=True)
        e = np.sqrt((err ** 2).sum(-1))
        out.update(local_rms_px=float(np.sqrt((e ** 2).mean())), local_max_px=float(e.max()))
        err_g = np.stack([est[i] - truth["total"][i] for i in range(n)])
        err_g -= err_g.mean(0, keepdims=True)
        out["global_only_grid_rms_px"] = float(np.sqrt((err_g ** 2).sum(-1).mean()))
    return out


def compute_only(host, cp, patches, repeats=3):
    """align_movie on a device-resident movie: GPU compute per movie without any I/O."""
    opts = AlignmentOptions(pixel_size_A=PIXEL_A, patches_xy=patches, dose_per_frame=DOSE)
    times = []
    dev = cp.asarray(host)
    for _ in range(repeats):
        work = dev.copy()
        cp.cuda.get_current_stream().synchronize()
        t = time.perf_counter()
        r = align_movie(work, opts)
        backend.to_host(r.sum)
        times.append(time.perf_counter() - t)
        del work, r
    return min(times)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="falcon,k3,k2")
    p.add_argument("--movies", type=int, default=20, help="movies in the Falcon stream")
    p.add_argument("--other-movies", type=int, default=6, help="movies in the K2/K3 streams")
    p.add_argument("--distinct", type=int, default=3, help="distinct files per size")
    p.add_argument("--workdir", default="/tmp/movie_bench")
    p.add_argument("--json", default=None, help="write all figures to this JSON file")
    p.add_argument("--scale", type=float, default=1.0, help="scale the frame sizes (tests of the script)")
    p.add_argument("--device", default="gpu", choices=("gpu", "cpu"))
    p.add_argument("--patches", default="5x5")
    p.add_argument("--keep", action="store_true", help="keep the movie files")
    p.add_argument("--no-two-workers", dest="two_workers", action="store_false",
                   help="skip the Falcon stream with --workers-per-gpu 2")
    a = p.parse_args()
    cp = backend.cupy_module() if a.device == "gpu" else None
    if a.device == "gpu" and cp is None:
        sys.exit("no usable GPU: use --device cpu (with --scale 0.125) to test the script")
    xp = cp if cp is not None else np
    os.makedirs(a.workdir, exist_ok=True)
    patches = tuple(int(v) for v in a.patches.split("x"))
    device = backend.gpu_info(0)["name"] if cp is not None else "cpu"
    rows = []
    for name in a.sizes.split(","):
        ny, nx, n = SIZES[name]
        ny, nx = int(ny * a.scale) // 2 * 2, int(nx * a.scale) // 2 * 2
        t0 = time.perf_counter()
        paths, truth = make_movies(name, (ny, nx, n), a.distinct, a.workdir, xp)
        gen_s = time.perf_counter() - t0
        floor = io_floor(paths[0], cp)
        n_movies = a.movies if name == "falcon" else a.other_movies
        links = []
        for i in range(n_movies):
            link = os.path.join(a.workdir, f"{name}_stream_{i:03d}.mrc")
            if os.path.lexists(link):
                os.remove(link)
            os.symlink(paths[i % len(paths)], link)
            links.append(link)
        out = os.path.join(a.workdir, f"out_{name}")
        common = ["-o", out, "--pixel-size", str(PIXEL_A), "--patches", a.patches, "--dose-per-frame", str(DOSE),
                  "--device", a.device, "--json", "-q"]
        run_cli(["align-movies", links[0]] + common)                       # warm-up: plans, kernels
        summary = run_cli(["align-movies"] + links + common)
        per_movie = summary["pipeline_seconds"] / n_movies
        per_movie_2w = None
        if name == "falcon" and cp is not None and a.two_workers:
            two = run_cli(["align-movies"] + links + common + ["--workers-per-gpu", "2"])
            per_movie_2w = two["pipeline_seconds"] / n_movies
        stages = {}
        for m in summary["movies"]:
            for k, v in m.get("timings_ms", {}).items():
                stages.setdefault(k, []).append(v)
        stage_ms = {k: statistics.median(v) for k, v in stages.items()}
        acc = accuracy(os.path.join(out, f"{name}_stream_000_shifts.star"), truth, n)
        comp = compute_only(truth["host"], cp, patches) if cp is not None else None
        row = {"size": name, "shape": [n, ny, nx], "generate_s": gen_s, "io": floor, "movies": n_movies,
               "stream_wall_s": summary["pipeline_seconds"], "seconds_per_movie": per_movie,
               "seconds_per_movie_2_workers": per_movie_2w,
               "compute_only_s": comp, "gpu_stage_ms": stage_ms, "accuracy": acc,
               "pipeline": summary["pipeline"], "ok": summary["n_ok"]}
        rows.append(row)
        print(json.dumps(row), flush=True)
        if not a.keep:
            for f in paths + links:
                os.remove(f)
            shutil.rmtree(out, ignore_errors=True)
    print(f"\nMovie alignment on {device} (float32 MRC from disk, global + {a.patches} local, DW sum written)")
    hdr = (f"{'size':7} {'frames x px':>18} {'GB':>5} {'read warm':>9} {'read cold':>9} {'H2D':>6} "
           f"{'floor s':>7} {'s/movie':>7} {'compute s':>9} {'vs floor':>8} {'MC3 s':>6} {'glob RMS':>8} "
           f"{'loc RMS':>7}")
    print(hdr)
    for r in rows:
        io_ = r["io"]
        floor_s = max(io_["read_warm_s"], io_["h2d_s"] or 0.0)
        mc3 = "3.5" if r["size"] == "falcon" else "-"
        cold = f"{io_['read_cold_GBps']:.1f}" if io_["read_cold_GBps"] else "-"
        h2d = f"{io_['h2d_GBps']:.1f}" if io_["h2d_GBps"] else "-"
        comp = f"{r['compute_only_s']:.3f}" if r["compute_only_s"] else "-"
        print(f"{r['size']:7} {r['shape'][0]:>4} x {r['shape'][2]}x{r['shape'][1]:<6} {io_['bytes'] / 1e9:5.2f} "
              f"{io_['read_warm_GBps']:8.1f}G {cold:>8}G {h2d:>5}G {floor_s:7.3f} {r['seconds_per_movie']:7.3f} "
              f"{comp:>9} {r['seconds_per_movie'] / floor_s:7.2f}x {mc3:>6} "
              f"{r['accuracy']['global_rms_px']:8.3f} {r['accuracy'].get('local_rms_px', float('nan')):7.3f}")
    for r in rows:
        if r.get("seconds_per_movie_2_workers"):
            print(f"{r['size']}: {r['seconds_per_movie_2_workers']:.3f} s per movie with --workers-per-gpu 2")
    print("\nGPU ms per stage (median over the stream):")
    for r in rows:
        print(f"  {r['size']:7} " + ", ".join(f"{k} {v:.1f}" for k, v in r["gpu_stage_ms"].items()))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": device, "date": time.strftime("%Y-%m-%d"), "rows": rows}, f, indent=1,
                      default=float)


if __name__ == "__main__":
    main()
