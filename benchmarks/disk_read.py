"""The disk's read floor for movie alignment: how fast this machine reads movie-sized files it has not cached.

Writes ``--files`` files of ``--mb`` MB each (random bytes, so that nothing can compress them; fsync'ed), drops
them from the page cache (``posix_fadvise(POSIX_FADV_DONTNEED)``, as the cold pass of ``movies_side_by_side.py``),
then reads them one after the other with ``--readers`` threads per file (each a contiguous part, ``readinto`` a
preallocated buffer), and again warm (from the page cache). Prints MB/s and the seconds one 4096²×40 int16 movie
(1342 MB) takes at that rate: no aligner that reads the whole file can go faster on that disk.

Usage (GPU machine, about 30 s)::

    python benchmarks/disk_read.py --files 4 --mb 1342 --readers 1,4 --json $OUT/disk.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from typing import List

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.movies_side_by_side import drop_from_page_cache  # noqa: E402

MOVIE_MB = 4096 * 4096 * 40 * 2 / 1e6      # one 4096^2 x 40 int16 movie, MB (10^6 bytes)


def write_files(folder: str, n: int, mb: float) -> List[str]:
    """``n`` files of ``mb`` MB of random bytes, fsync'ed."""
    rng = np.random.default_rng(0)
    block = rng.integers(0, 256, size=64 << 20, dtype=np.uint8)     # 64 MiB, rolled per block
    paths = []
    for i in range(n):
        p = os.path.join(folder, f"f{i}.bin")
        left = int(mb * 1e6)
        with open(p, "wb") as fh:
            k = 0
            while left > 0:
                chunk = np.roll(block, k * 4099 + i)[:min(left, block.size)]
                fh.write(chunk.tobytes())
                left -= chunk.size
                k += 1
            fh.flush()
            os.fsync(fh.fileno())
        paths.append(p)
    return paths


def read_file(path: str, readers: int) -> float:
    """Seconds to read ``path`` whole with ``readers`` threads (contiguous parts, ``os.preadv`` into one buffer)."""
    size = os.path.getsize(path)
    buf = bytearray(size)
    view = memoryview(buf)
    parts = np.linspace(0, size, readers + 1).astype(np.int64)
    fd = os.open(path, os.O_RDONLY)
    try:
        def part(j: int) -> None:
            lo, hi = int(parts[j]), int(parts[j + 1])
            while lo < hi:
                n = os.preadv(fd, [view[lo:min(hi, lo + (16 << 20))]], lo)
                if n <= 0:
                    raise OSError(f"short read of {path} at byte {lo}")
                lo += n
        t0 = time.perf_counter()
        with ThreadPoolExecutor(readers) as pool:
            list(pool.map(part, range(readers)))
        return time.perf_counter() - t0
    finally:
        os.close(fd)


def measure(paths: List[str], readers: int, cold: bool) -> dict:
    """MB/s over all files, cold (dropped first) or warm (read once first)."""
    if cold:
        drop_from_page_cache(paths)
    else:
        for p in paths:
            read_file(p, 4)
    seconds = [read_file(p, readers) for p in paths]
    mb = sum(os.path.getsize(p) for p in paths) / 1e6
    rate = mb / sum(seconds)
    return {"pass": "cold" if cold else "warm", "readers": readers, "MB_per_s": round(rate, 1),
            "s_per_file": [round(s, 3) for s in seconds], "s_per_4096x40_int16_movie": round(MOVIE_MB / rate, 3)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--files", type=int, default=4)
    ap.add_argument("--mb", type=float, default=MOVIE_MB, help="MB per file (default: one 4096²×40 int16 movie)")
    ap.add_argument("--readers", default="1,4", help="threads per file, comma-separated (default: %(default)s)")
    ap.add_argument("--dir", default=None, help="folder on the disk to measure (default: a temporary one)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    folder = tempfile.mkdtemp(prefix="disk_read_", dir=args.dir)
    try:
        paths = write_files(folder, args.files, args.mb)
        rows = [measure(paths, int(r), cold) for cold in (True, False) for r in args.readers.split(",")]
    finally:
        for p in os.listdir(folder):
            os.remove(os.path.join(folder, p))
        os.rmdir(folder)
    for r in rows:
        print(f"{r['pass']:>4}, {r['readers']} reader(s): {r['MB_per_s']:8.1f} MB/s, "
              f"{r['s_per_4096x40_int16_movie']:.3f} s per 4096²×40 int16 movie", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"folder_parent": os.path.dirname(folder), "rows": rows}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
