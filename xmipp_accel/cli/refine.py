"""3-D auto-refinement with gold-standard half sets (projection matching + Fourier reconstruction; GPU or CPU).

Example usage::

    xmipp-accel refine particles.star --initial-volume init.mrc --symmetry C1 --diameter 180 -o Refine3D/
    xmipp-accel refine particles.xmd --initial-volume init.mrc --diameter 180 -o out/ --max-iterations 8 --json
    xmipp-accel refine particles.star --initial-volume init.mrc --diameter 180 -o out/ --continue

Writes in OUTDIR: run_data.star (RELION 3.1, with rlnRandomSubset; for an Xmipp ``.xmd`` input also
run_data.xmd, Xmipp metadata with shifts in pixels), run_half1_class001.mrc,
run_half2_class001.mrc, run_class001.mrc, run_class001_sharpened.mrc, run_fsc.star (FSC of the masked half
maps), iterations.jsonl (one JSON object per iteration) and it###/ (particles and half maps of each iteration,
read by ``--continue``). All particles are held in memory.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time

import numpy as np

from ..errors import InputError
from .common import add_common_args, add_path_args, emit_result, progress, resolve_devices

logger = logging.getLogger("xmipp_accel.refine")

STATE_PARTICLES = "run_data.star"


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("particles", type=os.path.abspath,
                        help="particles (RELION STAR or Xmipp .xmd) with CTF parameters")
    parser.add_argument("--initial-volume", required=True, type=os.path.abspath,
                        help="initial model (MRC) at the particles' box and pixel size (else resampled)")
    parser.add_argument("-o", "--output", required=True, type=os.path.abspath, help="output folder OUTDIR")
    g = parser.add_argument_group("refinement")
    g.add_argument("--symmetry", "--sym", dest="sym", default="c1",
                   help="point group: c1, cN, dN, t, o, i... (default: %(default)s)")
    g.add_argument("--diameter", type=float, required=True, metavar="Å",
                   help="particle diameter in Å (soft spherical mask and angular step)")
    g.add_argument("--mask", type=os.path.abspath, default=None,
                   help="mask (MRC, values in [0, 1]) instead of the soft sphere of --diameter")
    g.add_argument("--initial-lowpass", type=float, default=30.0, metavar="Å",
                   help="low-pass of the initial model for the first iteration, Å (default: %(default)s)")
    g.add_argument("--max-iterations", type=int, default=10, help="iterations at most (default: %(default)s)")
    g.add_argument("--global-iterations", type=int, default=1,
                   help="first iterations with the exhaustive global search (default: %(default)s)")
    g.add_argument("--global-step", type=float, default=None, metavar="DEG",
                   help="angular step of the global search, degrees (default: from --initial-lowpass and "
                        "--diameter, at most 15)")
    g.add_argument("--max-shift", type=float, default=None, metavar="PX",
                   help="largest shift of the global search, pixels (default: 10%% of the box)")
    g.add_argument("--no-ctf", action="store_true", help="ignore the CTF (images without CTF parameters)")
    g.add_argument("--continue", dest="resume", action="store_true",
                   help="resume from the last finished iteration saved in OUTDIR")
    g.add_argument("--seed", type=int, default=0, help="seed of the half-set split (default: %(default)s)")
    g.add_argument("--interp", choices=("blob", "trilinear", "auto"), default="blob",
                   help="reconstruction kernel: blob (Kaiser-Bessel gather, the GPU's: the same maps on CPU "
                        "and GPU), trilinear (RELION's scatter, CPU only, ~15x less CPU time there) or auto "
                        "(trilinear on the CPU, blob on GPUs) (default: %(default)s)")
    add_path_args(parser)
    add_common_args(parser)


# ------------------------------------------------------------------------------------------------ inputs

def _load(args):
    from ..io.particles import read_particles
    if not os.path.exists(args.particles):
        raise InputError(f"particle file {args.particles} does not exist")
    pset = read_particles(args.particles, datadir=args.datadir)
    if pset.n < 2:
        raise InputError(f"{args.particles} holds {pset.n} particles; a gold-standard refinement needs at least 2")
    px = np.asarray(pset.pixel_size_A, dtype=np.float64)
    if not np.allclose(px, px[0], rtol=1e-3):
        raise InputError(f"{args.particles} mixes pixel sizes ({px.min():.4g}-{px.max():.4g} Å); refine each "
                         "optics group separately or rescale the particles to one pixel size")
    return pset, float(px[0]), int(pset.box_size)


def _ctf(pset, args):
    if args.no_ctf:
        return None
    ctf = pset.ctf()
    if ctf is None:
        raise InputError(f"{args.particles} has no CTF parameters (rlnDefocusU/V, rlnDefocusAngle) but CTF "
                         "correction is on; add them (CTF estimation) or pass --no-ctf")
    return ctf


def _initial_volume(args, box: int, px: float):
    from ..io.mrc import mrc_voxel_size
    from .assign_angles import load_reference
    if not os.path.exists(args.initial_volume):
        raise InputError(f"initial volume {args.initial_volume} does not exist")
    voxel = mrc_voxel_size(args.initial_volume)
    vol, notes = load_reference(args.initial_volume, box=box, pixel_size_A=px, max_res_A=None)
    if voxel is not None and abs(voxel - px) > 1e-3 * px:
        logger.warning("initial volume %s has %.4g Å/px, the particles %.4g Å/px: it was resampled",
                       args.initial_volume, voxel, px)
    for note in notes:
        logger.info("%s", note)
    _check_symmetry(args, vol, box, px, notes)
    return vol, notes


SYMMETRY_WARNING_BELOW = 0.5   # symmetry_agreement of the 30 Å initial model (1: symmetric)


def _check_symmetry(args, vol, box: int, px: float, notes: list) -> None:
    """Warn (and note in the summary) when the initial model does not look like it has --symmetry.

    A warning, not a refusal: an ab-initio model of a symmetric particle is only roughly symmetric, and at
    30 Å the score of asymmetric maps overlaps that of noisy symmetric ones for low orders (c2: 0.5-0.7, see
    :func:`~xmipp_accel.em.symmetry.symmetry_agreement`); the first reference is symmetrised anyway.
    """
    from ..em.symmetry import normalize_symmetry, symmetry_agreement
    from ..gpu.refine import lowpass_volume, soft_spherical_mask
    if normalize_symmetry(args.sym) == "c1":
        return
    low = lowpass_volume(vol, max(args.initial_lowpass, 2 * px), px)
    score = symmetry_agreement(low, args.sym, mask=soft_spherical_mask(box, 0.5 * args.diameter / px))
    if score < SYMMETRY_WARNING_BELOW:
        note = (f"initial volume {args.initial_volume} does not look {args.sym}-symmetric (its non-spherical part "
                f"correlates {score:.2f} with its symmetrised copy; 1 = symmetric): check --symmetry; the model is "
                "symmetrised for the first iteration")
        logger.warning("%s", note)
        notes.append(note)


def _user_mask(args, box: int):
    if args.mask is None:
        return None
    from ..io.mrc import read_mrc
    if not os.path.exists(args.mask):
        raise InputError(f"mask {args.mask} does not exist")
    m, _ = read_mrc(args.mask)
    m = np.asarray(m, dtype=np.float32)
    if m.shape != (box,) * 3:
        raise InputError(f"mask {args.mask} has shape {m.shape}, the particles need ({box}, {box}, {box}); "
                         "make the mask at the particles' box (e.g. relion_mask_create)")
    if not np.all(np.isfinite(m)) or m.min() < -1e-3 or m.max() > 1 + 1e-3 or m.max() <= 0:
        raise InputError(f"mask {args.mask} must hold values in [0, 1] with some above 0")
    return np.clip(m, 0.0, 1.0)


def _check_args(args, box: int, px: float) -> None:
    from ..em.symmetry import symmetry_matrices
    symmetry_matrices(args.sym)
    if not args.diameter > 0:
        raise InputError(f"--diameter must be a positive size in Å, got {args.diameter}")
    if args.diameter > box * px:
        raise InputError(f"--diameter {args.diameter:g} Å is larger than the box ({box} px x {px:.4g} Å = "
                         f"{box * px:.4g} Å); give the particle's diameter, at most the box size")
    if args.max_iterations < 1:
        raise InputError(f"--max-iterations must be at least 1, got {args.max_iterations}")
    if args.global_iterations < 1:
        raise InputError(f"--global-iterations must be at least 1, got {args.global_iterations}")
    if not args.initial_lowpass >= 2 * px:
        raise InputError(f"--initial-lowpass {args.initial_lowpass:g} Å is beyond Nyquist ({2 * px:.3g} Å)")
    if args.global_step is not None and not 0 < args.global_step <= 30:
        raise InputError(f"--global-step must be in (0, 30] degrees, got {args.global_step}")
    if box < 16:
        raise InputError(f"{args.particles}: box {box} px is too small to refine (16 px at least)")
    if os.path.exists(args.output) and not os.path.isdir(args.output):
        raise InputError(f"-o {args.output} is a file; give a folder")


def _ctf_mode(pset) -> str:
    from .assign_angles import _ctf_mode as mode
    return mode(pset)


# ------------------------------------------------------------------------------------------------ outputs

def outputs(outdir: str) -> dict:
    """Final output paths in OUTDIR."""
    j = os.path.join
    return {"particles": j(outdir, STATE_PARTICLES), "half1": j(outdir, "run_half1_class001.mrc"),
            "half2": j(outdir, "run_half2_class001.mrc"), "volume": j(outdir, "run_class001.mrc"),
            "sharpened": j(outdir, "run_class001_sharpened.mrc"), "fsc": j(outdir, "run_fsc.star"),
            "iterations": j(outdir, "iterations.jsonl")}


def _it_dir(outdir: str, it: int) -> str:
    return os.path.join(outdir, f"it{it:03d}")


def _write_particles(path, pset, state, px, absolute_paths: bool = False):
    from ..io.particles import write_particles
    from ..gpu.align.projmatch import AlignmentResult
    angles = AlignmentResult(state.matrices, state.origins_px, np.zeros(pset.n)).angles_deg
    extra = {"rlnRandomSubset": state.subset.astype(np.int64)}
    if state.score is not None:
        extra["rlnParticleFigureOfMerit"] = state.score
    write_particles(path, pset, angles_deg=angles, origins_A=state.origins_px * px, extra=extra,
                    absolute_paths=absolute_paths)


def _write_mrc(path, data, px):
    from ..io.atomic import atomic_write
    from ..io.mrc import write_mrc
    with atomic_write(path) as tmp:
        write_mrc(tmp, data, px)


def _write_fsc(path, curve, px):
    from ..io.star import Table, write_star
    n = curve.size
    freq = np.arange(n) / (2.0 * (n - 1))
    with np.errstate(divide="ignore"):
        ang = np.where(freq > 0, px / np.maximum(freq, 1e-12), 999.0)
    write_star(path, {"fsc": Table({"rlnSpectralIndex": np.arange(n), "rlnResolution": freq / px,
                                    "rlnAngstromResolution": ang, "rlnFourierShellCorrelation": curve})})


def _write_history(path, history):
    from ..io.atomic import atomic_write
    with atomic_write(path) as tmp, open(tmp, "w") as fh:
        for rec in history:
            fh.write(json.dumps(rec.as_dict()) + "\n")


def write_final_outputs(paths: dict, pset, result, px: float, *, absolute_paths: bool = False) -> None:
    """The final particles, half maps, map, sharpened map and FSC, all or nothing
    (:func:`xmipp_accel.io.atomic.write_outputs`: each under a temporary name, then all renamed; a failure
    leaves no new file and outputs of an earlier run as they were). ``paths`` as :func:`outputs` gives them
    (``iterations`` is not among the final set: it is written after each iteration)."""
    from ..io.atomic import write_outputs
    from ..io.mrc import write_mrc
    st = result.state
    maps = {"half1": st.half1, "half2": st.half2, "volume": result.volume, "sharpened": result.sharpened}

    def writer(key):
        if key in maps:
            return lambda tmp: write_mrc(tmp, maps[key], px)
        if key == "fsc":
            return lambda tmp: _write_fsc(tmp, result.fsc, px)
        return lambda tmp: _write_particles(tmp, pset, st, px, absolute_paths)
    write_outputs({path: writer(key) for key, path in paths.items() if key != "iterations"})


def save_iteration(outdir: str, pset, state, px: float, *, absolute_paths: bool = False) -> None:
    """it###/run_data.star, half maps and FSC of a finished iteration, then iterations.jsonl (last: the marker)."""
    d = _it_dir(outdir, state.iteration)
    _write_particles(os.path.join(d, STATE_PARTICLES), pset, state, px, absolute_paths)
    _write_mrc(os.path.join(d, "half1.mrc"), state.half1, px)
    _write_mrc(os.path.join(d, "half2.mrc"), state.half2, px)
    _write_fsc(os.path.join(d, "fsc.star"), state.fsc, px)
    _write_history(outputs(outdir)["iterations"], state.history)


def load_state(outdir: str, pset, px: float):
    """The state of the last iteration listed in iterations.jsonl whose it### folder is complete, or None."""
    from ..gpu.refine.autorefine import IterationRecord, RefineState
    from ..io.mrc import read_mrc
    from ..io.particles import read_particles
    from ..io.star import read_star
    from ..em.geometry import euler_to_matrix
    path = outputs(outdir)["iterations"]
    if not os.path.exists(path):
        return None
    with open(path) as fh:
        recs = [json.loads(line) for line in fh if line.strip()]
    history = [IterationRecord(**{k: (float("inf") if v is None else v) for k, v in r.items()}) for r in recs]
    if not history:
        return None
    it = history[-1].iteration
    d = _it_dir(outdir, it)
    files = [os.path.join(d, f) for f in (STATE_PARTICLES, "half1.mrc", "half2.mrc", "fsc.star")]
    if not all(os.path.exists(f) for f in files):
        raise InputError(f"--continue: {d} is incomplete (iterations.jsonl lists iteration {it}); "
                         "delete OUTDIR and start again")
    saved = read_particles(files[0])
    if saved.n != pset.n:
        raise InputError(f"--continue: {files[0]} holds {saved.n} particles, the input {pset.n}; "
                         "use the same particles or a new OUTDIR")
    a = saved.angles_deg
    h1, _ = read_mrc(files[1])
    h2, _ = read_mrc(files[2])
    curve = np.asarray(read_star(files[3])["fsc"]["rlnFourierShellCorrelation"], dtype=np.float64)
    fom = saved.table.get("rlnParticleFigureOfMerit")
    return RefineState(iteration=it, matrices=euler_to_matrix(a[:, 0], a[:, 1], a[:, 2]),
                       origins_px=saved.origins_A / px, subset=np.asarray(saved.subset, dtype=np.int64),
                       half1=np.asarray(h1, np.float32), half2=np.asarray(h2, np.float32), fsc=curve,
                       resolution_A=history[-1].resolution_A,
                       score=None if fom is None else np.asarray(fom, dtype=np.float64), history=history)


# ------------------------------------------------------------------------------------------------ main

def main(args: argparse.Namespace) -> int:
    from ..gpu.refine.autorefine import RefineSettings, assign_subsets, auto_refine
    t0 = time.perf_counter()
    pset, px, box = _load(args)
    _check_args(args, box, px)
    from ..io.atomic import check_outputs
    final = [p for k, p in outputs(args.output).items() if k != "iterations"]
    check_outputs(files=final, folders=[args.output])       # before any work (a folder in the way of a file too)
    ctf = _ctf(pset, args)
    initial, notes = _initial_volume(args, box, px)
    mask = _user_mask(args, box)
    state = None
    if args.resume:
        state = load_state(args.output, pset, px)
        if state is None:
            logger.info("--continue: no finished iteration in %s; starting from the beginning", args.output)
    elif os.path.exists(outputs(args.output)["iterations"]):
        raise InputError(f"{args.output} already holds a refinement (iterations.jsonl); pass --continue to resume "
                         "it or give a new -o folder")
    from ..io.mrc import check_finite
    images = np.asarray(pset.read_images(np.arange(pset.n)), dtype=np.float32)
    check_finite(images, f"particles of {args.particles}", item_name="particle")
    subset = assign_subsets(pset.n, pset.subset, seed=args.seed) if state is None else state.subset
    devices = resolve_devices(args)
    from ..gpu.reconstruct.fourier import resolve_interp
    resolve_interp(args.interp, gpu=devices[0].is_gpu)      # trilinear on a GPU: refused before any work
    settings = RefineSettings(pixel_size_A=px, diameter_A=args.diameter, sym=args.sym,
                              initial_lowpass_A=args.initial_lowpass, max_iterations=args.max_iterations,
                              global_iterations=args.global_iterations, global_step_deg=args.global_step,
                              max_shift_px=args.max_shift, ctf=ctf is not None, interp=args.interp)
    os.makedirs(args.output, exist_ok=True)
    logger.info("refining %d particles (%d px, %.4g Å/px, sym %s, CTF %s) on %s", pset.n, box, px, args.sym,
                "on" if ctf is not None else "off", devices[0].describe())

    def on_iteration(st):
        save_iteration(args.output, pset, st, px, absolute_paths=args.absolute_paths)
        r = st.history[-1]
        if not args.quiet:
            print(f"iteration {r.iteration} ({r.search}, step {r.angular_step_deg:.2f}°): resolution "
                  f"{r.resolution_A:.2f} Å, mean angular change {r.mean_angular_change_deg:.2f}°, "
                  f"{100 * r.changed_fraction:.1f}% changed, {r.seconds:.1f} s", flush=True)

    bar = progress(total=None, desc="refine", args=args, unit="particle")
    try:
        result = auto_refine(images, ctf, initial, settings, subset=subset, devices=devices, mask=mask, state=state,
                             ctf_mode=_ctf_mode(pset), premultiplied=bool(pset.ctf_premultiplied),
                             on_iteration=on_iteration, on_batch=bar.update)
    finally:
        bar.close()
    st = result.state
    paths = outputs(args.output)
    if args.particles.lower().endswith(".xmd"):      # Xmipp in, Xmipp out as well
        paths["particles_xmd"] = os.path.splitext(paths["particles"])[0] + ".xmd"
    write_final_outputs(paths, pset, result, px, absolute_paths=args.absolute_paths)
    seconds = time.perf_counter() - t0
    res = result.resolution_A
    summary = {"command": "refine", "particles": pset.n, "box": box, "pixel_size_A": px, "sym": args.sym,
               "iterations": st.iteration, "converged": result.converged,
               "resolution_A": res if math.isfinite(res) else None, "bfactor_A2": result.bfactor,
               "device": devices[0].describe(), "seconds": round(seconds, 3), "notes": notes, "outputs": paths}
    lines = [f"refined {pset.n} particles in {st.iteration} iterations ({seconds:.1f} s): resolution "
             f"{res:.2f} Å (FSC 0.143), B-factor {result.bfactor:.0f} Å²"
             f"{'' if result.converged else ' (stopped at --max-iterations)'}; outputs in {args.output}"]
    emit_result(args, summary, lines)
    return 0
