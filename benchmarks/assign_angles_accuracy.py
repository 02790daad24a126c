"""Angular assignment accuracy end to end: known map -> particles -> assigned poses -> reconstruction -> FSC.

For each SNR (default 1/3 and 1/10): a phantom map (``phantom_volume``), ``--particles`` particles from
``make_particles`` (RELION CTF, defocus 1-2.5 µm, shifts uniform in ±5 % of the box, white noise at the
SNR), then for each method:

- projmatch: ``ProjectionMatcher`` (global ``--step`` gallery of the asymmetric unit, psi at the same
  step, local refinement to step/8), whitening from the first 256 particles;
- deepalign: ``DeepAligner`` on the same matcher, two small CNNs trained on the reference
  (``--train-steps`` steps of ``--train-batch`` images, ``--cnn-box`` px, ``--cnn-width`` channels), matching
  restricted to the best regions, refinement, consensus;

the median and 90th-percentile angular error (degrees, modulo ``--sym``) and shift error (px) against the
truth, a Fourier reconstruction (``xmipp_accel.gpu.reconstruct.reconstruct``, Wiener CTF correction) from the
assigned poses and one from the true poses, and the FSC of each against the true map (resolution in Å at
0.5 and 0.143). The reconstruction from true poses is the ceiling set by the data (particle count, noise,
CTF); the gap to it is what the assignment costs.

Usage::

    python benchmarks/assign_angles_accuracy.py [--box 48] [--pixel-size 2] [--particles 1000]
        [--snrs 0.3333,0.1] [--methods projmatch,deepalign] [--step 3] [--device cpu|gpu] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings

import numpy as np

from xmipp_accel.em.geometry import angular_distance_deg
from xmipp_accel.em.symmetry import symmetry_matrices
from xmipp_accel.em.synthetic import make_particles, phantom_volume
from xmipp_accel import backend
from xmipp_accel.gpu.align.projmatch import ProjectionMatcher
from xmipp_accel.gpu.reconstruct import reconstruct
from xmipp_accel.gpu.resolution.fsc import fsc, resolution_at

CTF_KEYS = ("defocus_u_A", "defocus_v_A", "defocus_angle_deg", "voltage_kV", "cs_mm", "amplitude_contrast")


def ctf_arrays(truth: dict, n: int) -> dict:
    """Per-particle CTF parameters ``(n,)`` float64 from ``make_particles``' truth."""
    return {k: np.broadcast_to(np.asarray(truth[k], float), (n,)).copy() for k in CTF_KEYS}


def true_origins_px(truth: dict) -> np.ndarray:
    """RELION origins of the truth in pixels ``(n, 2)`` (x, y): the shift that centres each particle."""
    return np.stack([truth["origin_x_A"], truth["origin_y_A"]], 1) / truth["pixel_size_A"]


def pose_errors(matrices, origins_px, truth: dict, sym: str) -> dict:
    """Median / 90th-percentile angular error (degrees, modulo ``sym``) and shift error (px)."""
    err = angular_distance_deg(matrices, truth["matrices"], symmetry_matrices(sym))
    sh = np.hypot(*(np.asarray(origins_px) - true_origins_px(truth)).T)
    return {"median_err_deg": float(np.median(err)), "p90_err_deg": float(np.percentile(err, 90)),
            "median_shift_err_px": float(np.median(sh)), "p90_shift_err_px": float(np.percentile(sh, 90))}


def map_resolution(images, matrices, origins_px, ctf, true_map, *, pixel_size_A: float, sym: str,
                   device) -> dict:
    """Reconstruct from poses and compare with the true map: FSC=0.5 and 0.143 resolutions (Å), seconds."""
    t0 = time.perf_counter()
    rec = reconstruct(images, matrices, shifts_px=origins_px, ctf=ctf, pixel_size_A=pixel_size_A, sym=sym,
                      devices=[device])
    seconds = time.perf_counter() - t0
    curve = fsc(rec.volume, backend.to_host(true_map))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # inf / Nyquist are reported as such
        return {"fsc05_A": resolution_at(curve, 0.5, pixel_size_A),
                "fsc0143_A": resolution_at(curve, 0.143, pixel_size_A), "reconstruct_s": seconds}


def run_method(method, matcher, imgs, truth, ctf, args, xp) -> dict:
    """Assign poses with one method; returns errors, timings (training separate) and the poses."""
    out = {}
    engine = matcher
    t0 = time.perf_counter()
    if method == "deepalign":
        from xmipp_accel.gpu.align.deepalign import DeepAlignConfig, DeepAligner
        cfg = DeepAlignConfig(region_step_deg=args.region_step, cnn_box=args.cnn_box, width=args.cnn_width,
                              train_steps=args.train_steps, train_batch=args.train_batch, seed=args.seed)
        engine = DeepAligner(matcher, cfg)
        k = min(imgs.shape[0], 2000)
        info = engine.train(imgs[:k], {key: v[:k] for key, v in ctf.items()})
        backend.synchronize(xp)
        out["train_s"] = time.perf_counter() - t0
        out["validation_accuracy"] = [m["validation_accuracy"] for m in info["models"]]
    t1 = time.perf_counter()
    res = engine.align(imgs, ctf, batch_size=args.batch)
    backend.synchronize(xp)
    out["align_s"] = time.perf_counter() - t1
    out["seconds"] = time.perf_counter() - t0
    out.update(pose_errors(res.matrices, res.origins_px, truth, args.sym))
    if "disagree" in res.extra:
        out["disagree_fraction"] = float(np.mean(res.extra["disagree"]))
    return out, res


def run_snr(snr, args, device, vol) -> list:
    """All methods at one SNR; returns table rows."""
    xp = device.xp
    px, box, n = args.pixel_size, args.box, args.particles
    imgs, truth = make_particles(vol, n, pixel_size_A=px, snr=snr, max_shift_px=0.05 * box, seed=args.seed + 1)
    ctf = ctf_arrays(truth, n)
    rows = []
    ceiling = map_resolution(imgs, truth["matrices"], true_origins_px(truth), ctf, vol, pixel_size_A=px,
                             sym=args.sym, device=device)
    rows.append({"snr": snr, "method": "true poses", "particles": n, "median_err_deg": 0.0, "p90_err_deg": 0.0,
                 "median_shift_err_px": 0.0, "seconds": 0.0, **ceiling})
    print(f"[SNR {snr:.3g}] true poses: FSC vs map 0.5 {ceiling['fsc05_A']:.2f} Å, 0.143 {ceiling['fsc0143_A']:.2f} Å",
          flush=True)
    matcher = ProjectionMatcher(vol, pixel_size_A=px, sym=args.sym, step_deg=args.step,
                                max_shift_px=0.06 * box, max_res_A=args.max_res)
    matcher.set_whitening(imgs[:256], {k: v[:256] for k, v in ctf.items()})
    for method in args.methods:
        if method == "deepalign" and not _has_torch():
            print(f"[SNR {snr:.3g}] deepalign skipped: PyTorch is not installed", flush=True)
            continue
        r, res = run_method(method, matcher, imgs, truth, ctf, args, xp)
        r.update(map_resolution(imgs, res.matrices, res.origins_px, ctf, vol, pixel_size_A=px, sym=args.sym,
                                device=device))
        r.update({"snr": snr, "method": method, "particles": n})
        rows.append(r)
        print(f"[SNR {snr:.3g}] {method}: median {r['median_err_deg']:.2f} deg, p90 {r['p90_err_deg']:.2f} deg, "
              f"shift {r['median_shift_err_px']:.2f} px, FSC 0.5 {r['fsc05_A']:.2f} Å, 0.143 {r['fsc0143_A']:.2f} Å, "
              f"{r['seconds']:.1f} s", flush=True)
    return rows


def _has_torch() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def print_table(report: dict) -> None:
    print()
    print(f"device: {report['device']}; box {report['box']} px at {report['pixel_size_A']} Å/px, "
          f"global step {report['step_deg']} deg, sym {report['sym']}")
    print("| SNR | method | particles | median err (deg) | p90 err (deg) | median shift err (px) | "
          "FSC=0.5 vs map (Å) | FSC=0.143 vs map (Å) | seconds (align + train) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in report["rows"]:
        secs = "–" if r["method"] == "true poses" else f"{r['seconds']:.1f}"
        if "train_s" in r:
            secs += f" ({r['train_s']:.1f} training)"
        print(f"| 1/{1 / r['snr']:.0f} | {r['method']} | {r['particles']} | {r['median_err_deg']:.2f} | "
              f"{r['p90_err_deg']:.2f} | {r['median_shift_err_px']:.2f} | {r['fsc05_A']:.2f} | {r['fsc0143_A']:.2f} | "
              f"{secs} |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--box", type=int, default=48)
    p.add_argument("--pixel-size", type=float, default=2.0, help="Å per pixel")
    p.add_argument("--particles", type=int, default=1000)
    p.add_argument("--snrs", default="0.3333333,0.1", help="comma-separated signal/noise variance ratios")
    p.add_argument("--methods", default="projmatch,deepalign")
    p.add_argument("--sym", default="c1")
    p.add_argument("--step", type=float, default=3.0, help="global angular step (degrees)")
    p.add_argument("--max-res", type=float, default=None, help="highest resolution matched (Å; default 2/3 Nyquist)")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--region-step", type=float, default=30.0)
    p.add_argument("--train-steps", type=int, default=300)
    p.add_argument("--train-batch", type=int, default=64)
    p.add_argument("--cnn-box", type=int, default=32)
    p.add_argument("--cnn-width", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    symmetry_matrices(args.sym)
    device = backend.resolve_device(args.device)
    report = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": sys.argv[1:], "versions": backend.versions(),
              "device": device.describe() + ("" if device.is_gpu else f" ({os.cpu_count()} cores, "
                                             f"{platform.processor() or platform.machine()})"),
              "box": args.box, "pixel_size_A": args.pixel_size, "step_deg": args.step, "sym": args.sym, "rows": []}
    with device:
        vol = device.xp.asarray(phantom_volume(args.box, seed=args.seed))
        for snr in [float(s) for s in args.snrs.split(",")]:
            report["rows"].extend(run_snr(snr, args, device, vol))
    print_table(report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1, default=float)
    return 0


if __name__ == "__main__":
    sys.exit(main())
