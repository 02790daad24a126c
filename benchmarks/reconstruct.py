"""Benchmark: 3-D Fourier reconstruction (gather) on the configurations of the thesis' Table 5.

For each (box, particles) of 64² x 100 000, 128² x 30 000, 256² x 10 000 and 512² x 10 000, without
symmetry (c1) and with a 60-fold one (i), it times ``xmipp_accel.gpu.reconstruct.reconstruct`` from
particle images in host memory (NumPy arrays, as read from disk) to the finished volume on the host:
staging into pinned memory, transfer, padding + FFT, CTF (Wiener), shifts, gather insertion,
symmetrisation, normalisation, inverse FFT, gridding correction. Next to it the floor counted for
that work (transfer, FLOPs, device bytes; see docs/reconstruction.md), the NumPy path on a few
particles (extrapolated per particle, marked ~), and optionally cryoDRGN's ``backproject_voxel``
(its command on files written here; C1 only, it has no symmetry).

Usage::

    python benchmarks/reconstruct.py                       # all configurations, GPU + NumPy subsets
    python benchmarks/reconstruct.py --configs 64,256 --peer cryodrgn --json-out results.json

Images are random (the work does not depend on pixel values); orientations are uniform on SO(3),
shifts within ±5 px, defoci 1-3 µm.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from xmipp_accel.em.geometry import euler_to_matrix  # noqa: E402
from xmipp_accel.em.symmetry import symmetry_order  # noqa: E402
from xmipp_accel import backend  # noqa: E402
from xmipp_accel.gpu.reconstruct import batches as rb  # noqa: E402
from xmipp_accel.gpu.reconstruct import fourier as fr  # noqa: E402
from xmipp_accel.gpu.reconstruct.insert import insertion_count  # noqa: E402

CONFIGS = {64: 100_000, 128: 30_000, 256: 10_000, 512: 10_000}
NUMPY_SUBSET = {64: 40, 128: 12, 256: 4, 512: 2}
THESIS_SYM_S = {64: 6.3, 128: 7.6, 256: 11.7, 512: 39.4}      # Umpalumpa, 2x RTX 3090 + 24-core EPYC, with sym
XMIPP_SYM_S = {64: 43.6, 128: 14.4, 256: 12.2, 512: 46.0}
APIX = 1.0


# ---------------------------------------------------------------------------------------------- data

def host_particles(box: int, n: int, seed: int = 0):
    """n images (n, box, box) float32 in host memory (a tiled random base set), poses, shifts, CTF."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((min(n, 256), box, box), dtype=np.float32)
    images = np.empty((n, box, box), np.float32)
    for start in range(0, n, base.shape[0]):
        stop = min(n, start + base.shape[0])
        images[start:stop] = base[:stop - start]
    mats = euler_to_matrix(rng.uniform(0, 360, n), np.degrees(np.arccos(rng.uniform(-1, 1, n))),
                           rng.uniform(0, 360, n))
    shifts = rng.uniform(-5, 5, (n, 2))
    du = rng.uniform(10_000, 30_000, n)
    ctf = {"defocus_u_A": du, "defocus_v_A": du - 300, "defocus_angle_deg": rng.uniform(0, 180, n)}
    return images, mats, shifts, ctf


# ---------------------------------------------------------------------------------------------- floor

def gpu_peaks(cp) -> dict:
    """FP32 peak (FLOP/s) and memory bandwidth (B/s) from the device attributes; pinned H2D measured."""
    dev = cp.cuda.Device()
    attrs = dev.attributes
    sms = attrs["MultiProcessorCount"]
    clock_hz = attrs["ClockRate"] * 1e3
    fp32 = sms * 128 * 2 * clock_hz                              # Hopper/Ampere: 128 FP32 lanes per SM
    mem_bw = 2 * attrs["MemoryClockRate"] * 1e3 * attrs["GlobalMemoryBusWidth"] / 8
    # measured pinned host -> device bandwidth (1 GiB)
    host = backend.pinned_empty((1 << 28,), np.float32)
    host[:] = 1
    dst = cp.empty(host.shape, cp.float32)
    dst.set(host)
    cp.cuda.Device().synchronize()
    t0 = time.perf_counter()
    for _ in range(3):
        dst.set(host)
    cp.cuda.Device().synchronize()
    h2d = 3 * host.nbytes / (time.perf_counter() - t0)
    del dst, host
    name = cp.cuda.runtime.getDeviceProperties(dev.id)["name"]
    return {"name": name.decode() if isinstance(name, bytes) else str(name), "fp32_flops": fp32,
            "mem_bw": mem_bw, "h2d_bw": h2d}


def work_floor(box: int, n: int, sym_order: int, sym_mode: str, peaks: dict) -> dict:
    """Counted work of a reconstruction and its floor time (the largest of transfer, compute, memory).

    Per particle: a real FFT of the padded M² image (2.5 M² log2 M² FLOP), the CTF and phase pass,
    and the gather: ``pi kmax² a`` voxels in the half-volume slab, each computing q = A k (~20 FLOP),
    each gathering ``2/3 pi a²`` pixels (~16 FLOP each: distance, table interpolation, 3 complex/real
    multiply-adds). Expand mode does this ``sym_order`` times; volume mode symmetrises the half volume
    once (trilinear, 8 taps x 6 FLOP + 20 per operator and voxel in the sphere). Device bytes: each
    image read once, its transform and CTF weights written once and read once, the accumulators
    written and read once per symmetrisation, the final FFT (3 passes).
    """
    settings = fr.ReconstructionSettings()
    grid = fr.fourier_grid(box, settings)
    M, Mh = grid.padded_box, grid.half
    cnt = insertion_count(grid, settings.blob)
    inserts = n * (sym_order if sym_mode == "expand" else 1)
    flops_fft = n * 2.5 * M * M * math.log2(M * M)
    flops_insert = inserts * (cnt["voxels"] * 20 + cnt["contributions"] * 16)
    sphere_half = (2.0 / 3.0) * math.pi * grid.kmax ** 3
    flops_sym = sphere_half * sym_order * 68 if (sym_mode == "volume" and sym_order > 1) else 0.0
    flops_final = 2.5 * M ** 3 * math.log2(M ** 3)
    flops = flops_fft + flops_insert + flops_sym + flops_final
    vol_bytes = M * M * Mh * 12
    dev_bytes = (n * box * box * 4 + n * M * Mh * (8 + 4) * 2 + vol_bytes * 2
                 + (vol_bytes * 2 if flops_sym else 0) + 3 * M ** 3 * 4)
    h2d_bytes = n * box * box * 4
    t = {"transfer": h2d_bytes / peaks["h2d_bw"], "compute": flops / peaks["fp32_flops"],
         "memory": dev_bytes / peaks["mem_bw"]}
    bound = max(t, key=t.get)
    return {"flops": flops, "dev_bytes": dev_bytes, "h2d_bytes": h2d_bytes, "t": t, "floor_s": t[bound],
            "bound": bound, "contributions": inserts * cnt["contributions"]}


# ---------------------------------------------------------------------------------------------- runs

def time_gpu(images, mats, shifts, ctf, sym: str, sym_mode: str, devices, **kw) -> tuple:
    """Seconds of one reconstruction (after a warm-up on 64 particles) and its stage timings."""
    cp = backend.cupy_module()
    # warm-up: kernels compiled, FFT plans made, memory pool filled at this size
    rb.reconstruct(images[:64], mats[:64], shifts_px=shifts[:64], ctf={k: v[:64] for k, v in ctf.items()},
                   pixel_size_A=APIX, sym=sym, sym_mode=sym_mode, devices=devices, **kw)
    cp.cuda.Device().synchronize()
    t0 = time.perf_counter()
    res = rb.reconstruct(images, mats, shifts_px=shifts, ctf=ctf, pixel_size_A=APIX, sym=sym, sym_mode=sym_mode,
                         devices=devices, **kw)
    cp.cuda.Device().synchronize()
    return time.perf_counter() - t0, res.timings


def time_staging(images) -> float:
    """Host copy throughput (B/s) of the pinned staging alone: the images copied into pinned buffers."""
    import concurrent.futures
    n_stage = max(2, min(12, (os.cpu_count() or 4) - 2))
    chunk = max(1, (1 << 26) // (images[0].nbytes))
    buf = backend.pinned_empty((chunk,) + images.shape[1:], np.float32)
    pool = concurrent.futures.ThreadPoolExecutor(n_stage)
    t0 = time.perf_counter()
    for start in range(0, images.shape[0], chunk):
        part = images[start:start + chunk]
        b = [part.shape[0] * i // n_stage for i in range(n_stage + 1)]
        futures = [pool.submit(np.copyto, buf[lo:hi], part[lo:hi]) for lo, hi in zip(b[:-1], b[1:])]
        for f in futures:
            f.result()
    pool.shutdown()
    return images.nbytes / (time.perf_counter() - t0)


def time_numpy(box: int, n_total: int, n_sub: int, sym: str) -> dict:
    """NumPy path: insertion of ``n_sub`` particles timed and scaled to ``n_total``; finish measured for
    boxes up to 128 and scaled by M³ log M above; volume symmetrisation scaled by voxels from box 32."""
    settings = fr.ReconstructionSettings(sym=sym)
    rec = fr.FourierReconstructor(box, settings=settings, pixel_size_A=APIX, xp=np)
    if box not in _INSERT_CACHE:   # volume mode: the insertion does not depend on the group
        images, mats, shifts, ctf = host_particles(box, n_sub, seed=1)
        t0 = time.perf_counter()
        rec.insert(images, mats, shifts_px=shifts, ctf=ctf)
        _INSERT_CACHE[box] = (time.perf_counter() - t0) / n_sub
    per_particle = _INSERT_CACHE[box]
    out = {"insert_s": per_particle * n_total, "per_particle_s": per_particle, "measured_particles": n_sub}
    fin_box = min(box, 128)
    rec_f = fr.FourierReconstructor(fin_box, settings=fr.ReconstructionSettings(), xp=np)
    t0 = time.perf_counter()
    rec_f.volume()
    fin = time.perf_counter() - t0
    m_ratio = (rec.grid.padded_box / rec_f.grid.padded_box) ** 3 * math.log2(rec.grid.padded_box) / math.log2(
        rec_f.grid.padded_box)
    out["finish_s"] = fin * m_ratio
    if symmetry_order(sym) > 1:
        out["finish_s"] += _numpy_symmetrize_s(sym) * (rec.grid.kmax / 32.0) ** 3
    out["total_s"] = out["insert_s"] + out["finish_s"]
    return out


_SYM_CACHE: dict = {}
_INSERT_CACHE: dict = {}


def _numpy_symmetrize_s(sym: str) -> float:
    """Seconds of the NumPy symmetrisation on the 32-px box (M = 64, kmax 32), measured once per group."""
    if sym not in _SYM_CACHE:
        from xmipp_accel.gpu.reconstruct.symmetrize import symmetrize_fourier_volume_numpy
        g = fr.fourier_grid(32, fr.ReconstructionSettings())
        acc = fr.FourierAccumulator.zeros(g, np)
        t0 = time.perf_counter()
        symmetrize_fourier_volume_numpy(acc.data, acc.weight, fr.group_matrices(sym), g)
        _SYM_CACHE[sym] = time.perf_counter() - t0
    return _SYM_CACHE[sym]


def write_cryodrgn_inputs(workdir: str, mats: np.ndarray, shifts: np.ndarray, ctf: dict, box: int) -> tuple:
    """cryoDRGN's pose pickle (rotations, shifts as fractions of the box) and CTF pickle; their paths."""
    n = mats.shape[0]
    poses = os.path.join(workdir, "poses.pkl")
    with open(poses, "wb") as fh:
        pickle.dump((mats.astype(np.float32), (shifts / box).astype(np.float32)), fh)
    ctf_pkl = os.path.join(workdir, "ctf.pkl")
    params = np.stack([np.full(n, box), np.full(n, APIX), ctf["defocus_u_A"], ctf["defocus_v_A"],
                       ctf["defocus_angle_deg"], np.full(n, 300.0), np.full(n, 2.7), np.full(n, 0.1),
                       np.zeros(n)], 1).astype(np.float32)
    with open(ctf_pkl, "wb") as fh:
        pickle.dump(params, fh)
    return poses, ctf_pkl


def time_cryodrgn(box: int, n: int, workdir: str) -> dict:
    """cryoDRGN's backproject_voxel command (C1, no half maps) on an .mrcs written here; wall time of main()."""
    import types
    try:
        import igraph  # noqa: F401
    except ImportError:  # cryodrgn.utils imports it at module level; backproject_voxel never uses it
        sys.modules["igraph"] = types.ModuleType("igraph")
    import torch
    from cryodrgn.commands import backproject_voxel as bv

    from xmipp_accel.io.images import write_stack
    images, mats, shifts, ctf = host_particles(box, n, seed=2)
    stack = os.path.join(workdir, "parts.mrcs")
    write_stack(stack, images, APIX)
    poses, ctf_pkl = write_cryodrgn_inputs(workdir, mats, shifts, ctf, box)
    parser = argparse.ArgumentParser()
    bv.add_args(parser)
    args = parser.parse_args([stack, "--poses", poses, "--ctf", ctf_pkl, "-o", os.path.join(workdir, "out"),
                              "--no-half-maps"])
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    bv.main(args)
    torch.cuda.synchronize()
    return {"total_s": time.perf_counter() - t0, "particles": n}


# ---------------------------------------------------------------------------------------------- main

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--configs", default="64,128,256,512", help="boxes to run (default: %(default)s)")
    p.add_argument("--syms", default="c1,i", help="symmetries (default: %(default)s)")
    p.add_argument("--expand", default="128", help="boxes also run with --sym-mode expand (default: %(default)s)")
    p.add_argument("--blob-variants", default="256", help="boxes where blob table/on-the-fly variants are timed")
    p.add_argument("--scale", type=float, default=1.0, help="fraction of the particle counts (quick runs)")
    p.add_argument("--no-numpy", action="store_true", help="skip the NumPy path")
    p.add_argument("--peer", choices=("none", "cryodrgn"), default="none")
    p.add_argument("--peer-particles", type=int, default=10_000)
    p.add_argument("--json-out", default=None, help="write all figures to this JSON file")
    p.add_argument("--prefetch", action="store_true",
                   help="upload the next batch while the previous one inserts (Pipeline prefetch; off by default)")
    args = p.parse_args(argv)
    if args.prefetch:
        from xmipp_accel.gpu.reconstruct import batches
        batches.UPLOAD_PREFETCH = True
    cp = backend.cupy_module()
    if cp is None:
        print("no usable GPU: this benchmark needs CuPy and a CUDA device", file=sys.stderr)
        return 1
    devices = [backend.resolve_device("gpu", 0)]
    peaks = gpu_peaks(cp)
    print(f"# device: {peaks['name']}; FP32 peak {peaks['fp32_flops'] / 1e12:.1f} TFLOP/s, memory "
          f"{peaks['mem_bw'] / 1e12:.2f} TB/s (attributes), pinned H2D {peaks['h2d_bw'] / 1e9:.1f} GB/s (measured)")
    print(f"# {time.strftime('%Y-%m-%d %H:%M')}, numpy {np.__version__}, cupy {cp.__version__}")
    rows = []
    boxes = [int(b) for b in args.configs.split(",") if b]
    expand = {int(b) for b in args.expand.split(",") if b}
    blob_boxes = {int(b) for b in args.blob_variants.split(",") if b}
    hdr = ("| box x particles | sym | mode | ours GPU (s) | floor (s) | bound | ours/floor | insert+finish (s) | "
           "resident (s) | NumPy (s) | NumPy/ours | thesis 2x3090 (s) |")
    print(hdr)
    print("|" + "---|" * (hdr.count("|") - 1))
    for box in boxes:
        n = max(64, int(CONFIGS[box] * args.scale))
        images, mats, shifts, ctf = host_particles(box, n)
        print(f"# {box}²: staging copy into pinned memory {time_staging(images) / 1e9:.1f} GB/s", flush=True)
        resident = cp.asarray(images)
        for sym in args.syms.split(","):
            modes = ["volume"] + (["expand"] if (box in expand and symmetry_order(sym) > 1) else [])
            for mode in modes:
                seconds, timings = time_gpu(images, mats, shifts, ctf, sym, mode, devices)
                res_s, _ = time_gpu(resident, mats, shifts, ctf, sym, mode, devices)
                floor = work_floor(box, n, symmetry_order(sym), mode, peaks)
                npy = None
                if not args.no_numpy and mode == "volume":
                    npy = time_numpy(box, n, NUMPY_SUBSET[box], sym)
                row = {"box": box, "particles": n, "sym": sym, "mode": mode, "gpu_s": seconds, "timings": timings,
                       "resident_s": res_s, "floor": floor, "numpy": npy}
                rows.append(row)
                thesis = THESIS_SYM_S.get(box) if sym != "c1" else None
                stages = f"{timings.get('insert', 0):.3f}+{timings.get('finish', 0):.3f}"
                print(f"| {box}² x {n} | {sym} | {mode} | {seconds:.3f} | {floor['floor_s']:.3f} | {floor['bound']} | "
                      f"{seconds / floor['floor_s']:.1f} | {stages} | {res_s:.3f} | "
                      + (f"~{npy['total_s']:.0f} | ~{npy['total_s'] / seconds:.0f}x" if npy else "- | -")
                      + f" | {thesis if thesis else '-'} |", flush=True)
        if box in blob_boxes:   # insertion variants on GPU-resident images (the autotuner's knobs)
            for label, kw in (("table in shared memory", {"tuning": {"table_memory": "shared"}}),
                              ("table through L1", {"tuning": {"table_memory": "global"}}),
                              ("blob on the fly", {"blob_mode": "onthefly"})):
                t, _ = time_gpu(resident, mats, shifts, ctf, "c1", "volume", devices, **kw)
                print(f"# {box}² c1 resident, {label}: {t:.3f} s", flush=True)
                rows.append({"box": box, "variant": label, "resident_s": t})
        del images, resident
        cp.get_default_memory_pool().free_all_blocks()
    if args.peer == "cryodrgn":
        box = 256
        with tempfile.TemporaryDirectory() as tmp:
            try:
                peer = time_cryodrgn(box, args.peer_particles, tmp)
                ours = [r for r in rows if r.get("box") == box and r.get("sym") == "c1" and "gpu_s" in r]
                ratio = (peer["total_s"] * CONFIGS[box] / peer["particles"]) / ours[0]["gpu_s"] if ours else None
                print(f"\n# peer cryoDRGN backproject_voxel (C1, no half maps), {box}² x {peer['particles']}: "
                      f"{peer['total_s']:.2f} s" + (f"; ours is {ratio:.1f}x faster on {box}² x {CONFIGS[box]}"
                                                     if ratio else ""))
                rows.append({"peer": "cryodrgn", **peer, "box": box})
            except Exception as exc:  # report, do not fail the benchmark
                print(f"\n# peer cryoDRGN not run: {type(exc).__name__}: {exc}")
    if args.json_out:
        with open(args.json_out, "w") as fh:
            json.dump({"device": peaks, "rows": rows}, fh, indent=1, default=float)
    return 0


if __name__ == "__main__":
    sys.exit(main())
