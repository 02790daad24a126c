"""Run the main job on built-in synthetic data: particles of a known map → reconstruction → FSC.

Generates a phantom map, projects it at random orientations with shifts, CTF and noise, writes the
particles as a RELION 3.1 STAR file and an MRC stack, reconstructs the map with half maps
(GPU when usable, else CPU), computes the FSC between the halves and against the true map, and
writes an FSC plot. With ``--scipion`` the same chain runs as a scripted Scipion project.

Example usage::

    xmipp-accel demo                      # about two minutes on a laptop CPU, seconds on a GPU
    xmipp-accel demo --small --json       # tiny version (tests, CI)
    xmipp-accel demo --outdir /tmp/demo --box 96 --particles 20000
"""
from __future__ import annotations

import argparse
import logging
import os
import time
from typing import Callable, Optional

import numpy as np

from ..errors import InputError
from .common import add_common_args, add_path_args, emit_result, resolve_devices

logger = logging.getLogger("xmipp_accel")

# The scripted Scipion workflow lives above the protocols (xmipp_accel.workflows); the command line
# sits below them, so the entry point (xmipp_accel/__main__.py) hands the workflow in here.
SCIPION_WORKFLOW: Optional[Callable[..., dict]] = None

SIZES = {"small": dict(box=32, particles=1500), "default": dict(box=64, particles=4000),
         "default-gpu": dict(box=64, particles=20000)}


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--outdir", default="xmipp_accel_demo", help="output folder (default: %(default)s)")
    parser.add_argument("--small", action="store_true", help="tiny data set (seconds; for tests and CI)")
    parser.add_argument("--box", type=int, default=None, help="box size in pixels (default 64, small 32)")
    parser.add_argument("--particles", type=int, default=None,
                        help="number of particles (default 4000 on the CPU, 20000 on a GPU; small 1500)")
    parser.add_argument("--pixel-size", type=float, default=2.0, help="pixel size in Å (default: %(default)s)")
    parser.add_argument("--snr", type=float, default=0.5, help="signal-to-noise ratio of the particles")
    parser.add_argument("--sym", default="c1", help="symmetry of the phantom and reconstruction (default c1)")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--scipion", action="store_true",
                        help="run the chain as a scripted Scipion project (needs scipion-em)")
    add_path_args(parser, datadir=False)
    add_common_args(parser)


def _make_dataset(args, box: int, n: int, outdir: str, xp) -> dict:
    from ..em import synthetic
    from ..em.symmetry import symmetrize_volume, symmetry_order
    from ..io.mrc import write_mrc
    from ..io.particles import write_particles_from_arrays

    truth_map = synthetic.phantom_volume(box, seed=args.seed)
    if symmetry_order(args.sym) > 1:
        truth_map = symmetrize_volume(truth_map, args.sym)
    images, truth = synthetic.make_particles(xp.asarray(truth_map), n, pixel_size_A=args.pixel_size, snr=args.snr,
                                             ctf=True, max_shift_px=3, seed=args.seed)
    from ..backend import to_host
    images = to_host(images)
    truth_path = os.path.join(outdir, "truth_map.mrc")
    stack_path = os.path.join(outdir, "particles.mrcs")
    star_path = os.path.join(outdir, "particles.star")
    write_mrc(truth_path, truth_map, args.pixel_size)
    write_mrc(stack_path, images, args.pixel_size)
    refs = [f"{i + 1:06d}@particles.mrcs" for i in range(n)]
    ctf = {k: truth[k] for k in ("defocus_u_A", "defocus_v_A", "defocus_angle_deg")}
    write_particles_from_arrays(
        star_path, refs, args.pixel_size, box_size=box,
        angles_deg=np.stack([truth["rot"], truth["tilt"], truth["psi"]], axis=1),
        origins_A=np.stack([truth["origin_x_A"], truth["origin_y_A"]], axis=1),
        ctf=ctf, voltage_kV=truth["voltage_kV"], cs_mm=truth["cs_mm"],
        amplitude_contrast=truth["amplitude_contrast"], subset=truth["subset"],
        absolute_paths=args.absolute_paths)
    return {"truth_map": truth_path, "particles": star_path, "stack": stack_path}


def _run_cli(argv: list) -> dict:
    """Run one of our subcommands in-process and return its JSON summary."""
    import contextlib
    import io
    import json

    from .__main__ import main as cli_main
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = cli_main(argv + ["--json", "--quiet"])
    if rc != 0:
        raise RuntimeError(f"xmipp-accel {' '.join(argv)} failed with status {rc}")
    return json.loads(buf.getvalue().strip().splitlines()[-1])


def main(args: argparse.Namespace) -> int:
    outdir = os.path.abspath(args.outdir)
    os.makedirs(outdir, exist_ok=True)
    if args.scipion:
        size = SIZES["small" if args.small else "default"]
        box, n = args.box or size["box"], args.particles or size["particles"]
        if SCIPION_WORKFLOW is None:
            raise InputError("the Scipion demo runs from the xmipp-accel command (python -m xmipp_accel demo "
                             "--scipion), which registers the workflow layer")
        summary = SCIPION_WORKFLOW(args, outdir, box=box, n=n)
        emit_result(args, summary, [f"Scipion project: {summary['project']}",
                                    f"final resolution: {summary.get('resolution_A')} Å"])
        return 0 if all(p["status"] == "finished" for p in summary["protocols"]) else 1
    device = resolve_devices(args)[0]
    size = SIZES["small" if args.small else ("default-gpu" if device.is_gpu else "default")]
    box, n = args.box or size["box"], args.particles or size["particles"]
    t0 = time.perf_counter()
    logger.info("demo: %d particles of %d px on %s", n, box, device.describe())
    with device:
        data = _make_dataset(args, box, n, outdir, device.xp)
    t_data = time.perf_counter() - t0
    dev_args = ["--device", device.kind] + (["--gpus", str(device.gpu_id)] if device.is_gpu else [])
    out_map = os.path.join(outdir, "reconstruction.mrc")
    rec = _run_cli(["reconstruct", data["particles"], "-o", out_map, "--sym", args.sym, "--halves"] + dev_args)
    fsc_plot = os.path.join(outdir, "fsc_truth.png")
    vs_truth = _run_cli(["fsc", out_map, data["truth_map"], "--plot", fsc_plot,
                         "-o", os.path.join(outdir, "fsc_truth.star")] + dev_args)
    summary = {"outdir": outdir, "device": device.kind, "box": box, "particles": n,
               "pixel_size_A": args.pixel_size, "snr": args.snr, "sym": args.sym,
               "data_seconds": round(t_data, 2), "reconstruct": rec, "fsc_vs_truth": vs_truth,
               "resolution_A": rec.get("resolution_A"),
               "resolution_vs_truth_A": vs_truth.get("resolution_A_0.5") or vs_truth.get("resolution_A"),
               "seconds": round(time.perf_counter() - t0, 2)}
    lines = [f"demo data: {n} particles of {box} px at {args.pixel_size} Å/px, SNR {args.snr} → {outdir}",
             f"reconstruction: {out_map} ({rec.get('seconds', 0):.1f} s on {device.kind})",
             f"half-map resolution (FSC=0.143): {summary['resolution_A']} Å; "
             f"vs the true map (FSC=0.5): {summary['resolution_vs_truth_A']} Å",
             f"FSC plot: {fsc_plot}", f"total: {summary['seconds']:.1f} s"]
    emit_result(args, summary, lines)
    return 0
