"""Reading throughput per movie format: seconds to decode one movie into a (pinned) buffer, page cache warm.

Movies (synthetic, written first): MRC float32 and mode 101 (4-bit), TIFF uint8 none/LZW/deflate, all
N x 4096 x 4096; EER 4096 x 4096 raw frames at ``--electrons-per-pixel`` per raw frame (a Falcon 4i at
about 0.01-0.03), grouped in fractions of 40, at 4K and 8K. For each, the time with 1 thread and with
``--threads`` threads, and the resulting GB/s of decoded frames (what the GPU receives).

Usage::

    python benchmarks/movie_formats.py [--frames 20] [--eer-raw 200] [--threads 8] [--workdir /tmp/fmt]
                                       [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from xmipp_accel import backend
from xmipp_accel.io.movie import movie_info, read_movie_raw


def _write_movies(d: str, n: int, n_raw: int, epp: float, rng) -> dict:
    import mrcfile
    import tifffile
    from xmipp_accel.tests import eer_synth
    counts = rng.poisson(1.0, (n, 4096, 4096)).astype(np.uint8)
    paths = {}
    paths["mrc float32"] = os.path.join(d, "f32.mrc")
    with mrcfile.new(paths["mrc float32"], overwrite=True) as m:
        m.set_data(counts.astype(np.float32))
    paths["mrc 4-bit"] = os.path.join(d, "k3.mrc")
    with mrcfile.new(paths["mrc 4-bit"], overwrite=True) as m:
        m.set_data(np.zeros((n, 4096, 4096), np.uint8))
    packed = (np.minimum(counts[..., 0::2], 15) | (np.minimum(counts[..., 1::2], 15) << 4)).astype(np.uint8)
    with open(paths["mrc 4-bit"], "r+b") as f:
        f.seek(12)
        f.write(np.array([101], "<i4").tobytes())
        f.seek(1024)
        f.write(packed.tobytes())
        f.truncate(1024 + packed.size)
    for comp in ("none", "lzw", "zlib"):
        paths[f"tiff {comp}"] = os.path.join(d, f"{comp}.tif")
        tifffile.imwrite(paths[f"tiff {comp}"], counts, compression=None if comp == "none" else comp,
                         photometric="minisblack", metadata=None)
    paths["eer"] = os.path.join(d, "m.eer")
    electrons = int(epp * 4096 * 4096)
    eer_synth.write_eer(paths["eer"], 4096, 4096, eer_synth.random_frames(rng, n_raw, 4096, 4096, electrons))
    return paths


def _time(path: str, threads: int, **eer) -> tuple:
    info = movie_info(path, **eer)
    buf = backend.pinned_empty((info.n_frames, info.ny, info.nx), info.dtype)
    read_movie_raw(path, out=buf, workers=threads, info=info)       # warm: page cache, imports
    t0 = time.perf_counter()
    read_movie_raw(path, out=buf, workers=threads, info=info)
    dt = time.perf_counter() - t0
    return dt, buf.nbytes, info.n_frames


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=20)
    ap.add_argument("--eer-raw", type=int, default=200)
    ap.add_argument("--electrons-per-pixel", type=float, default=0.02)
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--workdir", default="/tmp/movie_formats_bench")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    os.makedirs(a.workdir, exist_ok=True)
    paths = _write_movies(a.workdir, a.frames, a.eer_raw, a.electrons_per_pixel, np.random.default_rng(0))
    rows = []
    for name, path in paths.items():
        variants = [("", {})] if name != "eer" else [(" 4K", {"eer_fractions": 40, "eer_upsampling": 1}),
                                                     (" 8K", {"eer_fractions": 40, "eer_upsampling": 2})]
        for suffix, eer in variants:
            for threads in sorted({1, a.threads}):
                dt, nbytes, n = _time(path, threads, **eer)
                rows.append({"format": name + suffix, "threads": threads, "seconds": round(dt, 3), "frames": n,
                             "decoded_GB_per_s": round(nbytes / dt / 1e9, 2)})
                print(f"{name + suffix:14s} {threads:2d} threads {dt:7.3f} s  {n:4d} frames  "
                      f"{nbytes / dt / 1e9:6.2f} GB/s decoded", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"cpu_count": os.cpu_count(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
