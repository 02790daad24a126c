"""Angular assignment end to end through the command line: particles on disk -> ``xmipp-accel assign-angles``.

Issue 5's target (36 000 particles of 300 px assigned, training included, in under 15 minutes on one
H100) measured the way a user meets it, instead of extrapolated from in-memory rates
(``benchmarks/assign_angles.py``):

1. **Dataset on disk** (timed separately, not part of the figure): a phantom map
   (``phantom_volume``, ``--box`` px at ``--pixel-size`` Å), ``--particles`` particles from
   ``make_particles`` (uniformly random orientations, RELION CTF with defocus 1-2.5 µm, shifts uniform
   in ±5 % of the box, white noise at ``--snr`` over the box), made on the GPU when present, in chunks
   of ``--chunk`` particles, each chunk written as one MRC stack (``io.images.write_stack``) by a
   writer thread while the next chunk is made, so host memory holds at most two chunks. One RELION 3.1
   STAR (``io.particles.write_particles_from_arrays``: optics table, CTF columns, half sets; no angles and no
   origins) and the truth in ``truth.npz`` beside it. The reference map (MRC with its voxel size) is the
   phantom, Gaussian low-passed to ``--ref-lowpass`` Å when given so that it is not the exact truth.
   The disk footprint is printed first; the run is refused when the work folder has too little space.
2. **The command**, for each of ``--methods``: ``python -m xmipp_accel assign-angles PARTICLES.star
   --reference REF.mrc -o OUT.star --method M --json --device D [--extra ...]`` as a subprocess; its
   wall clock (start-up, training, reading the stacks, assignment, writing) is the figure; its ``--json``
   last line gives the training time, the alignment time and the pipeline's stage times (the read stage:
   reading the images from the stacks and checking they are finite; files just written are usually in
   the page cache, so this is rarely a cold-disk rate).
3. **Accuracy**: OUT.star read back (``io.particles.read_particles``), matched to the truth by image name;
   median and 90th-percentile angular error modulo ``--sym`` and shift error by
   ``assign_angles_accuracy.pose_errors``.
4. **Table**: method, particles, box, wall s, training s, particles/s excluding training (wall - training)
   and the command's own alignment rate, the 900 s target and wall / target, errors, read rate; plus the
   generation time. ``--json PATH`` writes everything.

``--time-limit`` (default 540 s, for a 10-minute device command) bounds the whole run: generation is
abandoned when the first chunk projects it past the limit; a method is not launched with less than
``--min-method-s`` left, a running one is stopped at the limit; the table says so in each case.

Usage::

    python benchmarks/assign_angles_cli.py --quick                       # 64 px, 300 particles, CPU, ~2 min
    python benchmarks/assign_angles_cli.py --device gpu --json $OUT/assign_cli.json   # 36 000 x 300 px
    python benchmarks/assign_angles_cli.py --box 300 --particles 36000 --snr 0.1 --methods projmatch \\
        --extra "--max-res 4" --workdir /scratch --keep
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional

import numpy as np

from assign_angles_accuracy import pose_errors  # same folder: the benchmarks' error measure
from xmipp_accel.em.synthetic import gaussian_lowpass
from xmipp_accel.em.geometry import euler_to_matrix
from xmipp_accel.em.symmetry import symmetry_matrices
from xmipp_accel.em.synthetic import make_particles, phantom_volume
from xmipp_accel import backend
from xmipp_accel.io.images import write_stack
from xmipp_accel.io.mrc import write_mrc
from xmipp_accel.io.particles import read_particles, write_particles_from_arrays

TARGET_S = 900.0                      # issue 5: 36 000 x 300 px in under 15 minutes, training included
SHIFT_FRACTION = 0.05                 # true shifts uniform in +-5 % of the box (as benchmarks/assign_angles.py)
TRUTH_KEYS = ("rot", "tilt", "psi", "matrices", "origin_x_A", "origin_y_A", "shifts_px", "defocus_u_A",
              "defocus_v_A", "defocus_angle_deg", "subset")
#: DeepAlign's training budget under --quick (a 2-core CPU); --extra still overrides it.
QUICK_DEEP_ARGS = "--train-steps 150 --train-batch 64 --cnn-box 32 --cnn-width 16"
RESERVE_S = 15.0                      # kept for reading OUT.star back, the table and the JSON


# ------------------------------------------------------------------------------------------------------------
# Dataset on disk
# ------------------------------------------------------------------------------------------------------------

def disk_footprint_bytes(n: int, box: int, chunk: int, n_methods: int) -> Dict[str, int]:
    """Bytes the run writes: stacks, reference, STAR files, truth, models (an upper estimate).

    Parameters
    ----------
    n : particles; box : image side (px); chunk : particles per stack; n_methods : commands run.

    Returns
    -------
    dict with ``stacks``, ``reference``, ``star``, ``truth``, ``models`` and ``total`` (bytes).
    """
    n_stacks = -(-n // chunk)
    out = {"stacks": n * box * box * 4 + n_stacks * 1024,
           "reference": box ** 3 * 4 + 1024,
           "star": n * 300 * (1 + n_methods),          # ~250-300 bytes per row, input and each output
           "truth": n * len(TRUTH_KEYS) * 8 * 2,
           "models": 64 * 2 ** 20}                      # two small CNNs and their JSON
    out["total"] = sum(out.values())
    return out


def check_free_space(workdir: str, need_bytes: int) -> int:
    """Raise SystemExit with a clear message when ``workdir`` has less than ``need_bytes`` + 5 % + 256 MiB free."""
    free = shutil.disk_usage(workdir).free
    want = int(need_bytes * 1.05) + 256 * 2 ** 20
    if free < want:
        raise SystemExit(f"not enough disk space in {workdir}: the dataset and outputs need about "
                         f"{want / 1e9:.1f} GB, only {free / 1e9:.1f} GB is free; give --workdir on a larger disk, "
                         "or fewer --particles / a smaller --box")
    return free


def _release_gpu_memory(xp) -> None:
    """Return CuPy's cached blocks to the driver so the assign-angles subprocess sees the GPU memory free."""
    if xp is not np:
        backend.synchronize(xp)
        xp.get_default_memory_pool().free_all_blocks()
        xp.get_default_pinned_memory_pool().free_all_blocks()


def generate_dataset(workdir: str, args, device, started: float) -> dict:
    """Write the particle stacks, PARTICLES.star, truth.npz and REF.mrc into ``workdir``; returns paths and times.

    The particles of chunk ``k`` come from ``make_particles(..., seed=args.seed + 1 + 2 * k)`` with their noise
    added by the same call (SNR ``args.snr`` over the chunk's images), so each chunk is reproducible alone.
    Raises SystemExit when the first chunk projects the generation past ``--time-limit``.
    """
    xp = device.xp
    n, box, px, chunk = args.particles, args.box, args.pixel_size, args.chunk
    t0 = time.perf_counter()
    vol_host = phantom_volume(box, seed=args.seed)
    ref = (vol_host if not args.ref_lowpass
           else gaussian_lowpass(vol_host, resolution_A=args.ref_lowpass, pixel_size_A=px))
    ref_path = os.path.join(workdir, "reference.mrc")
    write_mrc(ref_path, ref, px)
    t_map = time.perf_counter() - t0
    refs: List[str] = []
    parts: List[dict] = []
    n_chunks = -(-n // chunk)
    pending: Optional[concurrent.futures.Future] = None
    t_write = [0.0]

    def write(path, images):
        t = time.perf_counter()
        write_stack(path, images, px)
        t_write[0] += time.perf_counter() - t

    with device, concurrent.futures.ThreadPoolExecutor(max_workers=1) as writer:
        vol = xp.asarray(vol_host)
        for k in range(n_chunks):
            m = min(chunk, n - k * chunk)
            images, truth = make_particles(vol, m, pixel_size_A=px, snr=args.snr, max_shift_px=SHIFT_FRACTION * box,
                                           seed=args.seed + 1 + 2 * k)
            host = backend.to_host(images)
            del images
            if pending is not None:
                pending.result()                         # at most two chunks on the host at once
            name = f"particles_{k:04d}.mrcs"
            pending = writer.submit(write, os.path.join(workdir, name), host)
            refs.extend(f"{i + 1}@{name}" for i in range(m))
            parts.append({**{key: truth[key] for key in TRUTH_KEYS}, "noise_sigma": np.full(m, truth["noise_sigma"])})
            if k == 0:
                scalars = {key: truth[key] for key in ("voltage_kV", "cs_mm", "amplitude_contrast",
                                                       "phase_shift_deg", "pixel_size_A")}
                spent = time.perf_counter() - t0
                projected = t_map + (spent - t_map) * n_chunks
                left = args.time_limit - (time.perf_counter() - started) - RESERVE_S
                if n_chunks > 1 and projected - spent > left:
                    raise SystemExit(f"generation alone would take about {projected:.0f} s (first chunk of {m} "
                                     f"particles: {spent - t_map:.1f} s), more than the {left:.0f} s left of "
                                     f"--time-limit {args.time_limit:g} s; raise --time-limit or lower --particles")
            print(f"  chunk {k + 1}/{n_chunks}: {m} particles, {time.perf_counter() - t0:.1f} s", flush=True)
        if pending is not None:
            pending.result()
        del vol
        _release_gpu_memory(xp)
    truth = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
    truth.update(scalars)
    star = os.path.join(workdir, "particles.star")
    write_particles_from_arrays(star, refs, px, ctf=truth, subset=truth["subset"], box_size=box)
    np.savez(os.path.join(workdir, "truth.npz"), image_name=np.array(refs), **truth)
    seconds = time.perf_counter() - t0
    stack_bytes = n * box * box * 4
    return {"particles_star": star, "reference": ref_path, "truth": truth, "image_names": refs,
            "seconds": seconds, "map_s": t_map, "write_s": t_write[0], "stacks": n_chunks,
            "stack_bytes": stack_bytes, "noise_sigma_range": [float(truth["noise_sigma"].min()),
                                                             float(truth["noise_sigma"].max())]}


# ------------------------------------------------------------------------------------------------------------
# The command and its accuracy
# ------------------------------------------------------------------------------------------------------------

def command_line(method: str, data: dict, out_star: str, args) -> List[str]:
    """argv of ``python -m xmipp_accel assign-angles`` for one method (``--extra`` last, so it wins)."""
    cmd = [sys.executable, "-m", "xmipp_accel", "assign-angles", data["particles_star"], "--reference",
           data["reference"], "-o", out_star, "--method", method, "--sym", args.sym, "--json", "--device",
           args.device]
    if args.quick and method == "deepalign":
        cmd += shlex.split(QUICK_DEEP_ARGS)
    return cmd + shlex.split(args.extra)


def run_command(cmd: List[str], log_path: str, timeout_s: float) -> dict:
    """Run ``cmd``, stderr to ``log_path``; returns wall seconds, return code, the JSON summary (or None)."""
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        try:
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=log, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired as exc:
            out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
            return {"wall_s": time.perf_counter() - t0, "returncode": None, "timed_out": True, "summary": None,
                    "stdout": out}
    wall = time.perf_counter() - t0
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    summary = None
    if proc.returncode == 0 and lines:
        try:
            summary = json.loads(lines[-1])
        except json.JSONDecodeError:
            summary = None
    return {"wall_s": wall, "returncode": proc.returncode, "timed_out": False, "summary": summary,
            "stdout": proc.stdout}


def assigned_poses(out_star: str, image_names: List[str]):
    """Rotation matrices ``(n, 3, 3)`` and origins ``(n, 2)`` px of OUT.star, in the order of ``image_names``."""
    pset = read_particles(out_star)
    angles = pset.angles_deg
    origins = pset.origins_px
    if angles is None or origins is None:
        raise ValueError(f"{out_star} has no angles or origins")
    where = {name: i for i, name in enumerate(pset.image_refs)}
    missing = [name for name in image_names if name not in where]
    if missing:
        raise ValueError(f"{out_star} lacks {len(missing)} of the particles (e.g. {missing[0]})")
    order = np.array([where[name] for name in image_names])
    a = angles[order]
    return euler_to_matrix(a[:, 0], a[:, 1], a[:, 2]), origins[order]


def read_rate_MBps(summary: dict, n: int, box: int) -> Optional[float]:
    """Images read per second by the command's pipeline, MB/s: bytes / (read busy time / read workers)."""
    pipe = (summary or {}).get("pipeline") or {}
    busy = (pipe.get("stage_busy_s") or {}).get("read")
    workers = (pipe.get("stage_workers") or {}).get("read", 1)
    if not busy:
        return None
    return n * box * box * 4 / 1e6 / (busy / max(1, workers))


def run_method(method: str, data: dict, args, workdir: str, started: float) -> dict:
    """Run the command for one method within the time left; returns the table row."""
    n, box = args.particles, args.box
    row = {"method": method, "particles": n, "box": box}
    left = args.time_limit - (time.perf_counter() - started) - RESERVE_S
    if left < args.min_method_s:
        row["status"] = f"not run: {max(left, 0):.0f} s left of --time-limit {args.time_limit:g} s"
        return row
    out_star = os.path.join(workdir, f"assigned_{method}.star")
    cmd = command_line(method, data, out_star, args)
    row["command"] = shlex.join(cmd)
    print(f"[{method}] {row['command']}", flush=True)
    res = run_command(cmd, os.path.join(workdir, f"assign_{method}.log"), left)
    row["wall_s"] = res["wall_s"]
    if res["timed_out"]:
        row["status"] = f"stopped at the time limit after {res['wall_s']:.0f} s"
        return row
    if res["summary"] is None:
        with open(os.path.join(workdir, f"assign_{method}.log")) as f:
            tail = f.read()[-3000:]
        row["status"] = f"failed (exit {res['returncode']})"
        row["log_tail"] = tail
        print(f"[{method}] FAILED, exit {res['returncode']}; stderr tail:\n{tail}", flush=True)
        return row
    s = res["summary"]
    training = s.get("training") or {}
    train_s = float(training.get("training_seconds", 0.0)) if not training.get("loaded") else 0.0
    row.update({"status": "ok", "command_s": s.get("seconds"), "alignment_s": s.get("alignment_seconds"),
                "cli_particles_per_s": s.get("particles_per_second"), "train_s": train_s,
                "particles_per_s_excl_training": n / max(res["wall_s"] - train_s, 1e-9),
                "ratio_to_target": res["wall_s"] / TARGET_S, "read_MBps": read_rate_MBps(s, n, box),
                "devices": s.get("devices"), "disagree_fraction": s.get("disagree_fraction"),
                "pipeline": s.get("pipeline"), "training": training or None})
    mats, origins = assigned_poses(out_star, data["image_names"])
    row.update(pose_errors(mats, origins, data["truth"], args.sym))
    print(f"[{method}] wall {row['wall_s']:.1f} s (training {train_s:.1f} s), median error "
          f"{row['median_err_deg']:.2f} deg, p90 {row['p90_err_deg']:.2f} deg, shift "
          f"{row['median_shift_err_px']:.2f} px", flush=True)
    return row


# ------------------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------------------

def _f(value, fmt: str) -> str:
    return "–" if value is None else format(value, fmt)


def print_table(report: dict) -> None:
    g = report.get("generation") or {}
    print()
    print(f"device: {report['device']}; {report['particles']} particles of {report['box']} px at "
          f"{report['pixel_size_A']} Å/px, SNR {report['snr']:.3g}, sym {report['sym']}, reference low-pass "
          f"{report['ref_lowpass_A'] or 'none'}; extra: {report['extra'] or 'none'}")
    if g:
        print(f"generation (not in the figure): {g['seconds']:.1f} s for {g['stack_bytes'] / 1e9:.2f} GB in "
              f"{g['stacks']} stacks (map {g['map_s']:.1f} s, stack writing {g['write_s']:.1f} s in a writer "
              f"thread, {g['stack_bytes'] / 1e6 / max(g['write_s'], 1e-9):.0f} MB/s)")
    print("| method | particles | box | wall s (command) | training s | particles/s excl. training (wall) | "
          "align particles/s (command) | target s | wall / target | median err (°) | p90 err (°) | "
          "median shift err (px) | read MB/s | status |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in report["rows"]:
        print(f"| {r['method']} | {r['particles']} | {r['box']} | {_f(r.get('wall_s'), '.1f')} | "
              f"{_f(r.get('train_s'), '.1f')} | {_f(r.get('particles_per_s_excl_training'), '.1f')} | "
              f"{_f(r.get('cli_particles_per_s'), '.1f')} | {TARGET_S:.0f} | {_f(r.get('ratio_to_target'), '.3f')} | "
              f"{_f(r.get('median_err_deg'), '.2f')} | {_f(r.get('p90_err_deg'), '.2f')} | "
              f"{_f(r.get('median_shift_err_px'), '.2f')} | {_f(r.get('read_MBps'), '.0f')} | {r['status']} |")
    print(f"total run {report['total_s']:.1f} s of --time-limit {report['time_limit_s']:g} s")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--box", type=int, default=None, help="particle box, px (default 300; --quick 64)")
    p.add_argument("--particles", type=int, default=None, help="particles (default 36000; --quick 300)")
    p.add_argument("--pixel-size", type=float, default=None, help="Å per pixel (default 1.0; --quick 2.5)")
    p.add_argument("--snr", type=float, default=1 / 3, help="signal / noise variance over the box (default 1/3)")
    p.add_argument("--ref-lowpass", type=float, default=0.0,
                   help="Gaussian low-pass of the reference (amplitude 0.5 at this resolution), Å; 0: the exact map")
    p.add_argument("--sym", default="c1", help="symmetry passed to the command and used for the errors")
    p.add_argument("--methods", default="deepalign,projmatch", help="comma-separated, run in this order")
    p.add_argument("--device", choices=("auto", "gpu", "cpu"), default="auto",
                   help="where the data are made and where the command computes (passed as --device)")
    p.add_argument("--chunk", type=int, default=None, help="particles per MRC stack (default 2000; --quick 100)")
    p.add_argument("--workdir", default=None, help="folder in which a fresh run folder is made (default: the "
                   "system temp folder); deleted at the end unless --keep")
    p.add_argument("--keep", action="store_true", help="keep the run folder (dataset, outputs, logs)")
    p.add_argument("--extra", default="", help="arguments appended to every assign-angles command, quoted: "
                   "--extra \"--train-steps 500 --batch 512\"")
    p.add_argument("--time-limit", type=float, default=540.0, help="seconds for the whole run (default 540)")
    p.add_argument("--min-method-s", type=float, default=None,
                   help="do not launch a method with less time left, s (default 60; --quick 10)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true",
                   help=f"64 px, 300 particles, DeepAlign trained with {QUICK_DEEP_ARGS} (~2 min on 2 cores)")
    p.add_argument("--json", default=None, help="write the report here")
    args = p.parse_args(argv)
    quick = args.quick
    defaults = {"box": (300, 64), "particles": (36000, 300), "pixel_size": (1.0, 2.5), "chunk": (2000, 100),
                "min_method_s": (60.0, 10.0)}
    for name, (full, small) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, small if quick else full)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in args.methods if m not in ("projmatch", "deepalign")]
    if bad:
        p.error(f"--methods: unknown {', '.join(bad)} (choose from projmatch, deepalign)")
    if args.box < 16 or args.box % 2:
        p.error(f"--box must be even and >= 16, got {args.box}")
    if args.particles < 1 or args.chunk < 1:
        p.error("--particles and --chunk must be >= 1")
    if not args.snr > 0:
        p.error(f"--snr must be positive, got {args.snr}")
    symmetry_matrices(args.sym)
    return args


def main(argv=None) -> int:
    started = time.perf_counter()
    args = parse_args(argv)
    device = backend.resolve_device(args.device)
    args.device = "gpu" if device.is_gpu else "cpu"      # the command computes where the data were made
    base = args.workdir or tempfile.gettempdir()
    os.makedirs(base, exist_ok=True)
    foot = disk_footprint_bytes(args.particles, args.box, args.chunk, len(args.methods))
    print(f"disk footprint: about {foot['total'] / 1e9:.2f} GB ({foot['stacks'] / 1e9:.2f} GB of stacks, "
          f"{foot['reference'] / 1e6:.0f} MB reference, {foot['star'] / 1e6:.0f} MB STAR) in {base}", flush=True)
    free = check_free_space(base, foot["total"])
    workdir = tempfile.mkdtemp(prefix="assign_angles_cli_", dir=base)
    report = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": sys.argv[1:], "versions": backend.versions(),
              "device": device.describe() + ("" if device.is_gpu else f" ({os.cpu_count()} cores, "
                                             f"{platform.processor() or platform.machine()})"),
              "particles": args.particles, "box": args.box, "pixel_size_A": args.pixel_size, "snr": args.snr,
              "sym": args.sym, "ref_lowpass_A": args.ref_lowpass, "extra": args.extra, "workdir": workdir,
              "disk_footprint_bytes": foot, "disk_free_bytes": free, "time_limit_s": args.time_limit,
              "target_s": TARGET_S, "rows": []}
    try:
        print(f"generating {args.particles} particles of {args.box} px on {device.describe()} in {workdir}",
              flush=True)
        try:
            data = generate_dataset(workdir, args, device, started)
        except SystemExit as exc:
            report["generation_error"] = str(exc)
            print(exc, flush=True)
            data = None
        if data is not None:
            report["generation"] = {k: v for k, v in data.items() if k not in ("truth", "image_names")}
            print(f"generated in {data['seconds']:.1f} s", flush=True)
            for method in args.methods:
                report["rows"].append(run_method(method, data, args, workdir, started))
    finally:
        report["total_s"] = time.perf_counter() - started
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print_table(report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1, default=float)
    return 0 if all(r["status"] == "ok" for r in report["rows"]) and "generation_error" not in report else 1


if __name__ == "__main__":
    sys.exit(main())
