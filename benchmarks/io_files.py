"""File I/O speed: STAR read/write of a 10^5-particle file and 10^5 image references into a few stacks.

Prints one table: our time, a floor (bytes / memory-copy bandwidth measured here), a peer measured in the
same run (emtable for STAR; one ``mrcfile.mmap`` open per reference, the naive loop, for images), ratio.

Usage::

    python benchmarks/io_files.py [--particles 100000] [--box 16] [--stacks 4] [--folder /tmp/x]
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np

from xmipp_accel.io.images import clear_stack_cache, read_images, write_stack
from xmipp_accel.io.particles import read_particles, write_particles, write_particles_from_arrays
from xmipp_accel.io.star import read_star


def _best(fn, repeat=3):
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def _copy_bandwidth() -> float:
    a = np.ones(64 * 2**20 // 8)
    b = np.empty_like(a)
    t = _best(lambda: np.copyto(b, a), 5)
    return 2 * a.nbytes / t  # read + write, bytes per second


def _make_star(path: str, n: int, rng) -> None:
    refs = [f"{i % 1000 + 1:06d}@Extract/job012/Movies/FoilHole_{i // 1000:05d}_Data_fractions.mrcs"
            for i in range(n)]
    extra = {f"rlnExtra{k}": rng.random(n) * 100 for k in range(12)}
    extra["rlnMicrographName"] = np.array([f"MotionCorr/job002/Movies/FoilHole_{i // 1000:05d}.mrc" for i in range(n)])
    extra["rlnClassNumber"] = rng.integers(1, 5, n)
    write_particles_from_arrays(path, refs, 1.1, angles_deg=rng.random((n, 3)) * 360, origins_A=rng.random((n, 2)),
                                ctf={"defocus_u_A": rng.random(n) * 1e4 + 5e3, "defocus_v_A": rng.random(n) * 1e4,
                                     "defocus_angle_deg": rng.random(n) * 180},
                                subset=rng.integers(1, 3, n), box_size=256, extra=extra)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--particles", type=int, default=100000)
    parser.add_argument("--box", type=int, default=16, help="image side (px) for the image-read test")
    parser.add_argument("--stacks", type=int, default=4)
    parser.add_argument("--folder", default=None)
    args = parser.parse_args()
    folder = args.folder or tempfile.mkdtemp(prefix="io_bench_")
    rng = np.random.default_rng(0)
    n = args.particles
    bandwidth = _copy_bandwidth()
    rows = []

    star = os.path.join(folder, "big.star")
    _make_star(star, n, rng)
    size = os.path.getsize(star)
    floor = size / bandwidth
    ours = _best(lambda: read_star(star))
    try:
        import emtable
        peer = _best(lambda: emtable.Table(fileName=star, tableName="particles"), 1)
    except ImportError:
        peer = float("nan")
    rows.append((f"read_star {n} rows, {size / 1e6:.0f} MB", ours, floor, "emtable", peer))

    def particles_and_columns():
        p = read_particles(star)
        return p.angles_deg, p.origins_A, p.ctf(), p.subset, p.pixel_size_A, p.table.columns
    rows.append(("read_particles + every column", _best(particles_and_columns), floor, "", float("nan")))
    pset = read_particles(star)
    angles = pset.angles_deg + 1.0
    out = os.path.join(folder, "out.star")
    rows.append(("write_particles (new angles)", _best(lambda: write_particles(out, pset, angles_deg=angles)),
                 size / bandwidth, "", float("nan")))

    box, nst = args.box, args.stacks
    per = -(-n // nst)
    for s in range(nst):
        write_stack(os.path.join(folder, f"s{s}.mrcs"), rng.standard_normal((per, box, box)).astype(np.float32), 1.0)
    refs = [f"{rng.integers(per) + 1}@s{rng.integers(nst)}.mrcs" for _ in range(n)]
    nbytes = n * box * box * 4

    def ours_images():
        clear_stack_cache()
        return read_images(refs, folder)
    t_ours = _best(ours_images)

    import mrcfile
    k = min(n, 2000)

    def naive():
        out = np.empty((k, box, box), np.float32)
        for i, ref in enumerate(refs[:k]):
            idx, name = ref.split("@")
            with mrcfile.mmap(os.path.join(folder, name), mode="r") as m:
                out[i] = m.data[int(idx) - 1]
        return out
    t_naive = _best(naive, 1) * n / k
    rows.append((f"read_images {n} refs, {nst} stacks, {box}px", t_ours, nbytes / bandwidth,
                 "mrcfile.mmap per ref", t_naive))

    print(f"{'operation':45s} {'ours s':>8s} {'floor s':>8s} {'peer':>22s} {'peer s':>8s} {'peer/ours':>9s}")
    for name, t, fl, peer_name, tp in rows:
        ratio = tp / t if np.isfinite(tp) else float("nan")
        print(f"{name:45s} {t:8.3f} {fl:8.4f} {peer_name:>22s} {tp:8.3f} {ratio:9.1f}")
    print(f"floor = bytes / memory copy bandwidth measured here ({bandwidth / 1e9:.1f} GB/s); folder {folder}")


if __name__ == "__main__":
    main()
