"""Angular assignment throughput: particles/s of projection matching and DeepAlign, training time, FLOPs.

For each box (128 px at 2 Å/px and 300 px at 1 Å/px; a phantom map, particles from ``make_particles``
with CTF, shifts up to 5 % of the box and noise at SNR 1/3, generated on the device):

- projmatch: global search (3° gallery of the asymmetric unit, psi every 3°, shift disk of 5 % of the box
  at the global shift step, cut-off about one pixel per step) then 3 levels of local refinement up to
  ``--max-res``; time per stage (synchronised), particles/s, median/90th-percentile angular error and
  median shift error against the truth;
- the FLOP count of the global correlation search (``global_search_flops``: batched complex GEMM over
  rings per angular frequency + inverse real FFT along psi) against its measured time, and the bytes of
  its intermediates (GEMM output written and read, its transpose, the psi correlations written and read)
  against the memory bandwidth: the floor is ``max(FLOPs / peak, bytes / bandwidth)``;
- deepalign: noise fit + training of two models (``--train-steps`` steps of ``--train-batch`` images
  each), then region prediction, matching restricted to the 2 best regions of each model, refinement and
  consensus; particles/s excluding training, and the training time;
- peer: the same projmatch search with the NumPy path on the host CPU, on a few particles.

The 36 000-particle, 300 px target (training included) is extrapolated from the measured rates:
``training + 36000 / rate`` (the rate is measured on ``--particles-300`` particles, not 36 000).

Usage::

    python benchmarks/assign_angles.py [--boxes 128,300] [--particles-128 4000] [--particles-300 2000]
                                       [--train-steps 1500] [--train-batch 256] [--json out.json] [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback

import numpy as np

from xmipp_accel.em.geometry import angular_distance_deg
from xmipp_accel.em.synthetic import make_particles, phantom_volume
from xmipp_accel import backend
from xmipp_accel.gpu.align.projmatch import ProjectionMatcher
from xmipp_accel.gpu.align.search_plan import global_search_flops

CTF_KEYS = ("defocus_u_A", "defocus_v_A", "defocus_angle_deg", "voltage_kV", "cs_mm", "amplitude_contrast")
SETUPS = {128: dict(pixel_size_A=2.0, max_res_A=6.0), 300: dict(pixel_size_A=1.0, max_res_A=4.0)}
PEAK_FP32_TFLOPS = {"H100": 67.0, "H200": 67.0}       # SXM FP32 (non tensor-core), the GEMMs here are complex FP32
PEAK_BW_TBS = {"H100": 3.35, "H200": 4.8}


def _sync(xp):
    backend.synchronize(xp)


def _ctf(truth, n):
    return {k: np.broadcast_to(np.asarray(truth[k], float), (n,)).copy() for k in CTF_KEYS}


def _errors(res, truth, px):
    err = angular_distance_deg(res.matrices, truth["matrices"])
    o = np.stack([truth["origin_x_A"], truth["origin_y_A"]], 1) / px
    sh = np.hypot(*(res.origins_px - o).T)
    return {"median_err_deg": float(np.median(err)), "p90_err_deg": float(np.percentile(err, 90)),
            "median_shift_err_px": float(np.median(sh))}


def _device_name(xp):
    if xp is np:
        return platform.processor() or "cpu"
    return backend.gpu_info(xp.cuda.Device().id)["name"]


def _peaks(name):
    for key in PEAK_FP32_TFLOPS:
        if key in name:
            return PEAK_FP32_TFLOPS[key], PEAK_BW_TBS[key]
    return None, None


def global_bytes(n_particles, n_dirs, matcher) -> float:
    """Bytes moved by the global search intermediates (see module docstring)."""
    plan = matcher.plan
    n_m = plan.n_theta // 2 + 1
    triples = float(n_particles) * len(plan.shift_grid) * n_dirs
    return triples * (n_m * 8 * 4 + plan.n_theta * 4 * 3)


def bench_projmatch(xp, vol, imgs, truth, px, args, max_res_A, batch):
    n = imgs.shape[0]
    ms = 0.05 * vol.shape[0]
    m = ProjectionMatcher(vol, pixel_size_A=px, step_deg=args.step, max_shift_px=ms * 1.2, max_res_A=max_res_A)
    ctf = _ctf(truth, n)
    t0 = time.perf_counter()
    m.gallery()
    m.set_whitening(imgs[:256], {k: v[:256] for k, v in ctf.items()})
    _sync(xp)
    t_setup = time.perf_counter() - t0
    # warm-up (FFT plans, kernels)
    m.align_batch(imgs[:8], {k: v[:8] for k, v in ctf.items()})
    _sync(xp)
    t_glob = t_ref = 0.0
    parts = []
    from xmipp_accel.gpu.align.projmatch import AlignmentResult
    for s in range(0, n, batch):
        e = min(n, s + batch)
        sub = {k: v[s:e] for k, v in ctf.items()}
        t = time.perf_counter()
        cand = m.global_search(imgs[s:e], sub)
        _sync(xp)
        t_glob += time.perf_counter() - t
        t = time.perf_counter()
        parts.append(m.refine_from_candidates(imgs[s:e], sub, *cand))
        _sync(xp)
        t_ref += time.perf_counter() - t
    res = AlignmentResult.concatenate(parts)
    flops = global_search_flops(n, m.n_directions, m.plan)
    out = {"particles": n, "directions": m.n_directions, "shifts": len(m.plan.shift_grid), "n_theta": m.plan.n_theta,
           "rings": len(m.plan.radii), "r0": m.plan.r0, "r_res": m.plan.r_res, "setup_s": t_setup,
           "global_s": t_glob, "refine_s": t_ref, "particles_per_s": n / (t_glob + t_ref),
           "global_flops": flops, "global_bytes": global_bytes(n, m.n_directions, m)}
    out.update(_errors(res, truth, px))
    return out, m


def bench_peer_cpu(vol, imgs, truth, px, args, max_res_A, n_peer):
    """The NumPy path on the host CPU (all cores through scipy.fft / BLAS)."""
    v = backend.to_host(vol)
    x = backend.to_host(imgs[:n_peer])
    m = ProjectionMatcher(v, pixel_size_A=px, step_deg=args.step, max_shift_px=0.05 * v.shape[0] * 1.2,
                          max_res_A=max_res_A)
    ctf = _ctf(truth, imgs.shape[0])
    sub = {k: v_[:n_peer] for k, v_ in ctf.items()}
    t0 = time.perf_counter()
    m.gallery()
    m.set_whitening(x, sub)
    t_setup = time.perf_counter() - t0
    t0 = time.perf_counter()
    m.align_batch(x, sub)
    t = time.perf_counter() - t0
    return {"particles": n_peer, "setup_s": t_setup, "seconds": t, "particles_per_s": n_peer / t,
            "cpu_cores": os.cpu_count()}


def bench_deepalign(xp, matcher, imgs, truth, px, args, batch):
    from xmipp_accel.gpu.align.deepalign import DeepAlignConfig, DeepAligner
    n = imgs.shape[0]
    ctf = _ctf(truth, n)
    cfg = DeepAlignConfig(train_steps=args.train_steps, train_batch=args.train_batch)
    aligner = DeepAligner(matcher, cfg)
    sample = min(n, 2000)
    t0 = time.perf_counter()
    info = aligner.train(imgs[:sample], {k: v[:sample] for k, v in ctf.items()})
    _sync(xp)
    t_train = time.perf_counter() - t0
    aligner.align_batch(imgs[:8], {k: v[:8] for k, v in ctf.items()})   # warm-up
    _sync(xp)
    t0 = time.perf_counter()
    res = aligner.align(imgs, ctf, batch_size=batch)
    _sync(xp)
    t_align = time.perf_counter() - t0
    true_region = aligner.regions.assign_matrices(truth["matrices"])
    probs = aligner.region_probabilities(imgs[: min(n, 2000)])
    top1 = [float(np.mean(p.argmax(1) == true_region[: p.shape[0]])) for p in probs]
    top2 = [float(np.mean((np.argsort(-p, 1)[:, :2] == true_region[: p.shape[0], None]).any(1))) for p in probs]
    out = {"particles": n, "regions": aligner.regions.n_regions, "cnn_box": aligner.cnn_box,
           "train_s": t_train, "train_steps": cfg.train_steps, "train_batch": cfg.train_batch,
           "models": info["models"], "align_s": t_align, "particles_per_s": n / t_align,
           "region_top1": top1, "region_top2": top2,
           "disagree_fraction": float(np.mean(res.extra["disagree"]))}
    out.update(_errors(res, truth, px))
    return out, aligner


def bench_fine(xp, vol, imgs, truth, px, args, max_res_A, batch, trained):
    """Finer global step (``--fine-step``): projmatch against DeepAlign reusing the models trained above."""
    from xmipp_accel.gpu.align.deepalign import DeepAligner
    n = min(args.particles_fine, imgs.shape[0])
    x = imgs[:n]
    tr = {k: (v[:n] if np.ndim(v) and np.shape(v)[0] == imgs.shape[0] else v) for k, v in truth.items()}
    save = args.step
    args.step = args.fine_step
    try:
        pm, matcher = bench_projmatch(xp, vol, x, tr, px, args, max_res_A, batch)
    finally:
        args.step = save
    out = {"step_deg": args.fine_step, "projmatch": pm}
    if trained is not None:
        aligner = DeepAligner(matcher, trained.config)
        aligner.models, aligner.noise, aligner.cnn_box = trained.models, trained.noise, trained.cnn_box
        ctf = _ctf(tr, n)
        aligner.align_batch(x[:8], {k: v[:8] for k, v in ctf.items()})
        _sync(xp)
        t0 = time.perf_counter()
        res = aligner.align(x, ctf, batch_size=batch)
        _sync(xp)
        t = time.perf_counter() - t0
        out["deepalign"] = {"particles": n, "align_s": t, "particles_per_s": n / t,
                            "disagree_fraction": float(np.mean(res.extra["disagree"]))}
        out["deepalign"].update(_errors(res, tr, px))
    return out


def _dump(report, args):
    out = args.json or (os.path.join(os.environ["OUT"], "assign_angles.json") if os.environ.get("OUT") else None)
    if out:
        with open(out, "w") as f:
            json.dump(report, f, indent=1, default=float)


def run_box(box, args, xp, report):
    setup = SETUPS[box]
    px, max_res = setup["pixel_size_A"], setup["max_res_A"]
    n = getattr(args, f"particles_{box}")
    t0 = time.perf_counter()
    vol = xp.asarray(phantom_volume(box, seed=0))
    imgs, truth = make_particles(vol, n, pixel_size_A=px, snr=1 / 3, max_shift_px=0.05 * box, seed=1)
    _sync(xp)
    entry = {"box": box, "pixel_size_A": px, "max_res_A": max_res, "snr": 1 / 3, "make_particles_s":
             time.perf_counter() - t0}
    report["boxes"].append(entry)
    batch = args.batch or (512 if box <= 128 else 256)
    try:
        entry["projmatch"], matcher = bench_projmatch(xp, vol, imgs, truth, px, args, max_res, batch)
        print(f"[{box} px] projmatch {entry['projmatch']['particles_per_s']:.0f} particles/s "
              f"(global {entry['projmatch']['global_s']:.2f} s, refine {entry['projmatch']['refine_s']:.2f} s), "
              f"median error {entry['projmatch']['median_err_deg']:.2f} deg", flush=True)
    except Exception:
        entry["projmatch_error"] = traceback.format_exc()
        print(entry["projmatch_error"], flush=True)
        return
    if not args.no_peer and xp is not np:
        try:
            entry["peer_numpy_cpu"] = bench_peer_cpu(vol, imgs, truth, px, args, max_res, 8 if box <= 128 else 4)
            print(f"[{box} px] numpy CPU peer {entry['peer_numpy_cpu']['particles_per_s']:.2f} particles/s", flush=True)
        except Exception:
            entry["peer_error"] = traceback.format_exc()
    _dump(report, args)
    trained = None
    if not args.no_deep:
        try:
            entry["deepalign"], trained = bench_deepalign(xp, matcher, imgs, truth, px, args, batch)
            d = entry["deepalign"]
            print(f"[{box} px] deepalign train {d['train_s']:.1f} s, {d['particles_per_s']:.0f} particles/s, "
                  f"median error {d['median_err_deg']:.2f} deg, region top-1 {d['region_top1']}", flush=True)
        except Exception:
            entry["deepalign_error"] = traceback.format_exc()
            print(entry["deepalign_error"], flush=True)
    _dump(report, args)
    if box == max(SETUPS) and args.fine_step:
        try:
            entry["fine"] = f = bench_fine(xp, vol, imgs, truth, px, args, max_res, batch, trained)
            line = (f"[{box} px, step {args.fine_step} deg] projmatch {f['projmatch']['particles_per_s']:.0f} "
                    f"particles/s (median {f['projmatch']['median_err_deg']:.2f} deg)")
            if "deepalign" in f:
                line += (f", deepalign {f['deepalign']['particles_per_s']:.0f} particles/s "
                         f"(median {f['deepalign']['median_err_deg']:.2f} deg)")
            print(line, flush=True)
        except Exception:
            entry["fine_error"] = traceback.format_exc()
            print(entry["fine_error"], flush=True)
        _dump(report, args)


def print_table(report):
    peak, bw = _peaks(report["device"])
    print()
    print(f"device: {report['device']}  (peaks assumed: {peak} TFLOP/s FP32, {bw} TB/s)")
    hdr = f"{'box':>4} {'method':<10} {'particles/s':>12} {'train s':>8} {'med err':>8} {'p90 err':>8} {'shift':>6}"
    print(hdr)
    print("-" * len(hdr))
    for e in report["boxes"]:
        for key in ("projmatch", "deepalign", "peer_numpy_cpu"):
            r = e.get(key)
            if not r:
                continue
            print(f"{e['box']:>4} {key:<10} {r['particles_per_s']:>12.1f} {r.get('train_s', 0):>8.1f} "
                  f"{r.get('median_err_deg', float('nan')):>8.2f} {r.get('p90_err_deg', float('nan')):>8.2f} "
                  f"{r.get('median_shift_err_px', float('nan')):>6.2f}")
    print()
    print(f"{'box':>4} {'global s':>9} {'TFLOP':>8} {'TFLOP/s':>8} {'GB moved':>9} {'floor s':>8} {'ratio':>6}")
    for e in report["boxes"]:
        r = e.get("projmatch")
        if not r:
            continue
        tflop = r["global_flops"] / 1e12
        gb = r["global_bytes"] / 1e9
        floor = max(tflop / peak if peak else 0.0, gb / 1e3 / bw if bw else 0.0)
        print(f"{e['box']:>4} {r['global_s']:>9.3f} {tflop:>8.2f} {tflop / r['global_s']:>8.2f} {gb:>9.1f} "
              f"{floor:>8.3f} {r['global_s'] / floor if floor else float('nan'):>6.1f}")
    for e in report["boxes"]:
        f = e.get("fine")
        if f:
            print(f"\n{e['box']} px at a {f['step_deg']} deg global step ({f['projmatch']['particles']} particles):")
            pm = f["projmatch"]
            print(f"  projmatch {pm['particles_per_s']:.1f} particles/s (global {pm['global_s']:.2f} s, "
                  f"{pm['global_flops'] / 1e12:.1f} TFLOP, {pm['global_bytes'] / 1e9:.0f} GB), median error "
                  f"{pm['median_err_deg']:.2f} deg")
            if "deepalign" in f:
                d = f["deepalign"]
                print(f"  deepalign {d['particles_per_s']:.1f} particles/s, median error {d['median_err_deg']:.2f} deg "
                      f"({pm['particles_per_s'] and d['particles_per_s'] / pm['particles_per_s']:.1f}x projmatch)")
    for e in report["boxes"]:
        if e["box"] == 300:
            pm, dp = e.get("projmatch"), e.get("deepalign")
            if pm:
                t = 36000 / pm["particles_per_s"] + pm["setup_s"]
                print(f"\nextrapolated 36 000 x 300 px, projmatch: {t / 60:.1f} min")
            if dp:
                t = dp["train_s"] + 36000 / dp["particles_per_s"]
                print(f"extrapolated 36 000 x 300 px, deepalign (training included): {t / 60:.1f} min")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--boxes", default="128,300")
    p.add_argument("--particles-128", dest="particles_128", type=int, default=4000)
    p.add_argument("--particles-300", dest="particles_300", type=int, default=2000)
    p.add_argument("--step", type=float, default=3.0)
    p.add_argument("--train-steps", type=int, default=1000)
    p.add_argument("--fine-step", type=float, default=1.5, help="finer global step compared at 300 px (0: skip)")
    p.add_argument("--particles-fine", type=int, default=300)
    p.add_argument("--train-batch", type=int, default=256)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--no-peer", action="store_true")
    p.add_argument("--no-deep", action="store_true")
    p.add_argument("--quick", action="store_true", help="small sizes (a smoke test)")
    p.add_argument("--device", choices=("gpu", "cpu"), default="gpu")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.particles_128, args.particles_300, args.train_steps, args.particles_fine = 256, 128, 100, 32
    dev = backend.resolve_device(args.device)
    xp = dev.xp
    report = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "device": _device_name(xp), "versions": backend.versions(),
              "argv": sys.argv[1:], "boxes": []}
    with dev:
        for box in [int(b) for b in args.boxes.split(",")]:
            run_box(box, args, xp, report)
    print_table(report)
    _dump(report, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
