"""Reconstruct a 3-D map from aligned particles by direct Fourier inversion (gather, Xmipp-style; GPU or CPU).

Example usage::

    xmipp-accel reconstruct particles.star -o map.mrc
    xmipp-accel reconstruct particles.star -o map.mrc --sym i --halves --max-res 3.5 --json
    xmipp-accel reconstruct particles.star -o map.mrc --ctf phase-flip --gpus 0,1
    mpirun -np 4 xmipp-accel reconstruct particles.star -o map.mrc --gpus 0,1,2,3

With ``--halves`` the particles are split by rlnRandomSubset (or even/odd when the column is
absent) and OUT_half1.mrc, OUT_half2.mrc and OUT_fsc.star are written beside OUT.mrc.
Under mpirun each rank reconstructs its share of the particles on its GPU and rank 0 sums
the partial volumes and writes the outputs.
"""
from __future__ import annotations

import argparse
import logging
import os
import time
from typing import Iterator, Optional

import numpy as np

from ..em.geometry import euler_to_matrix
from ..constants import CTF_AUTO, CTF_MODES, CTF_NONE, CTF_WIENER
from ..errors import FileFormatError, InputError
from .common import add_common_args, add_path_args, emit_result, progress, rank_devices

logger = logging.getLogger("xmipp_accel.reconstruct")

CTF_CHOICES = CTF_MODES   # auto, wiener, phase-flip, none


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("particles", help="STAR file of aligned particles (RELION 3.0 or 3.1+: rlnImageName, "
                                          "rlnAngleRot/Tilt/Psi, optional origins, CTF and rlnRandomSubset)")
    parser.add_argument("-o", "--output", required=True, help="output map (.mrc); half maps and FSC go beside it")
    g = parser.add_argument_group("reconstruction")
    g.add_argument("--sym", default="c1", help="point-group symmetry: c1, cN, dN, t, o, i (=i2), i1..i4 "
                                               "(default: %(default)s)")
    g.add_argument("--sym-mode", choices=("volume", "expand"), default="volume",
                   help="volume: symmetrise the accumulated Fourier data once (fast, RELION-style); expand: insert "
                        "each particle once per symmetry operator (Xmipp-style) (default: %(default)s)")
    g.add_argument("--pad", type=float, default=2.0, help="padding factor of images and volume (default: %(default)s)")
    g.add_argument("--max-res", type=float, default=None, metavar="Å",
                   help="highest resolution inserted, in Å (default: Nyquist, 2 pixels)")
    g.add_argument("--ctf", choices=CTF_CHOICES, default=CTF_AUTO,
                   help="CTF correction: wiener accumulates CTF·F and CTF² weights, phase-flip multiplies by the CTF "
                        "sign, none ignores it; auto is wiener when the STAR file has CTF columns, else none "
                        "(default: %(default)s)")
    g.add_argument("--wiener-constant", type=float, default=0.01,
                   help="regularisation added to the weights, relative to each shell's mean weight "
                        "(default: %(default)s)")
    g.add_argument("--halves", action="store_true",
                   help="also reconstruct two half maps (rlnRandomSubset, else even/odd particles) and their FSC")
    g.add_argument("--batch", type=int, default=None, metavar="N",
                   help="particles read and sent to a device at once (default: about 1 GB of GPU buffers)")
    g.add_argument("--no-mask", dest="mask", action="store_false",
                   help="do not multiply the map by a soft sphere (1 to N/2 - max(3, N/20) px, cosine edge to 0 at "
                        "N/2; it removes the noise of the corners)")
    b = parser.add_argument_group("interpolation")
    b.add_argument("--interp", choices=("auto", "blob", "trilinear"), default="auto",
                   help="insertion kernel: blob (Kaiser-Bessel gather, Xmipp), trilinear (RELION's, CPU only); auto: "
                        "trilinear on the CPU (about 10x faster there, as accurate), the blob on GPUs "
                        "(default: %(default)s)")
    b.add_argument("--blob-radius", type=float, default=1.9,
                   help="blob radius in padded voxels (default: %(default)s)")
    b.add_argument("--blob-alpha", type=float, default=15.0, help="taper parameter (default: %(default)s)")
    b.add_argument("--blob-order", type=int, default=0, help="Bessel order (default: %(default)s)")
    b.add_argument("--blob-mode", choices=("table", "onthefly"), default="table",
                   help="blob values from a 10 000-entry table or computed per pixel (default: %(default)s)")
    b.add_argument("--no-gridding-correction", dest="gridding_correction", action="store_false",
                   help="do not divide the map by the kernel's real-space transform (blob, or sinc² for trilinear)")
    add_path_args(parser, absolute=False)
    add_common_args(parser)


# --------------------------------------------------------------------------------------------- helpers

def output_paths(output: str, halves: bool) -> dict:
    """Paths written: ``volume`` and, with half maps, ``half1``, ``half2`` and ``fsc`` (STAR)."""
    root, ext = os.path.splitext(output)
    ext = ext or ".mrc"
    out = {"volume": root + ext}
    if halves:
        out.update(half1=f"{root}_half1{ext}", half2=f"{root}_half2{ext}", fsc=f"{root}_fsc.star")
    return out


def _load_particles(path: str, datadir: Optional[str] = None):
    from ..io.particles import read_particles
    if not os.path.exists(path):
        raise FileFormatError(f"particle file {path} does not exist")
    pset = read_particles(path, datadir=datadir)
    if pset.n == 0:
        raise InputError(f"{path} holds no particles")
    if pset.angles_deg is None:
        raise InputError(f"{path} has no rlnAngleRot/rlnAngleTilt/rlnAnglePsi columns: the particles must be aligned "
                         "(e.g. run xmipp-accel assign-angles or a 3D refinement first)")
    if not np.all(np.isfinite(pset.angles_deg)):
        bad = int(np.nonzero(~np.isfinite(pset.angles_deg).all(axis=1))[0][0])
        raise InputError(f"{path}: particle {bad + 1} has a NaN or infinite angle")
    return pset


def _pixel_size(pset, path: str) -> float:
    px = np.asarray(pset.pixel_size_A, dtype=np.float64)
    if not np.all(np.isfinite(px)) or np.any(px <= 0):
        raise InputError(f"{path}: pixel sizes must be positive numbers of Å")
    if np.ptp(px) > 1e-4 * px.max():
        uniq = np.unique(np.round(px, 4))
        raise InputError(f"{path}: particles have different pixel sizes ({', '.join(f'{u:g}' for u in uniq[:5])} Å); "
                         "rescale them to one pixel size (e.g. relion_image_handler --rescale_angpix) or reconstruct "
                         "each optics group separately")
    return float(px[0])


def _settings(args: argparse.Namespace, pixel_size_A: float, has_ctf: bool, premultiplied: bool):
    from ..gpu.reconstruct.blob import KaiserBesselBlob
    from ..gpu.reconstruct.fourier import ReconstructionSettings
    ctf_mode = args.ctf
    if ctf_mode == CTF_AUTO:
        ctf_mode = CTF_WIENER if has_ctf else CTF_NONE
    elif ctf_mode != CTF_NONE and not has_ctf:
        raise InputError(f"--ctf {ctf_mode} needs CTF parameters (rlnDefocusU, ...) in {args.particles}; "
                         "use --ctf none for images without CTF information")
    if args.max_res is None:
        max_res = 0.5
    else:
        if not args.max_res > 0:
            raise InputError(f"--max-res must be a positive resolution in Å, got {args.max_res}")
        max_res = pixel_size_A / args.max_res
        if max_res > 0.5:
            logger.warning("--max-res %.3g Å is beyond Nyquist (%.3g Å): using Nyquist", args.max_res,
                           2 * pixel_size_A)
            max_res = 0.5
    try:
        blob = KaiserBesselBlob(args.blob_radius, args.blob_alpha, args.blob_order)
    except ValueError as exc:
        raise InputError(f"bad blob parameters (--blob-radius/--blob-alpha/--blob-order): {exc}") from None
    if args.batch is not None and args.batch < 1:
        raise InputError(f"--batch must be >= 1, got {args.batch}")
    return ReconstructionSettings(pad=args.pad, max_res_digital=max_res, sym=args.sym, sym_mode=args.sym_mode,
                                  ctf_mode=ctf_mode, wiener_constant=args.wiener_constant, blob=blob,
                                  blob_mode=args.blob_mode, gridding_correction=args.gridding_correction,
                                  ctf_premultiplied=premultiplied, interp=args.interp, mask=args.mask).validated()


def _batches(pset, indices: np.ndarray, batch: int, pixel_size_A: float, subsets: Optional[np.ndarray],
             use_ctf: bool) -> Iterator:
    """Read the particles ``indices`` of ``pset`` in batches (images, rotations, shifts, CTF, subsets)."""
    from ..gpu.reconstruct.batches import ParticleBatch
    angles = pset.angles_deg
    origins = pset.origins_A
    ctf = pset.ctf() if use_ctf else None
    for start in range(0, indices.size, batch):
        sel = indices[start:start + batch]
        images = pset.read_images(sel)
        a = angles[sel]
        yield ParticleBatch(
            images=images,
            matrices=euler_to_matrix(a[:, 0], a[:, 1], a[:, 2]),
            shifts_px=None if origins is None else origins[sel] / pixel_size_A,
            ctf=None if ctf is None else {k: v[sel] for k, v in ctf.items()},
            subset=None if subsets is None else subsets[sel],
            first_index=int(sel[0]))


def _write_outputs(paths: dict, result, pixel_size_A: float, fsc_table) -> None:
    """Write the maps and the FSC all or nothing (:func:`xmipp_accel.io.atomic.write_outputs`)."""
    from ..io.atomic import write_outputs
    from ..io.mrc import write_mrc
    from ..io.star import write_star
    maps = {"volume": result.volume, "half1": result.half1, "half2": result.half2}

    def writer(key):
        if key == "fsc":
            return lambda tmp: write_star(tmp, {"fsc": fsc_table})
        return lambda tmp: write_mrc(tmp, maps[key], pixel_size_A)
    write_outputs({path: writer(key) for key, path in paths.items()})


def fsc_table(half1: np.ndarray, half2: np.ndarray, pixel_size_A: float):
    """FSC of the half maps as a RELION-style STAR table and the 0.143 resolution (Å)."""
    import warnings

    from ..gpu.resolution.fsc import fsc, resolution_at
    from ..io.star import Table
    res = fsc(half1, half2)
    freq = np.asarray(res.frequency, dtype=np.float64)
    with np.errstate(divide="ignore"):
        ang = np.where(freq > 0, pixel_size_A / np.maximum(freq, 1e-12), 999.0)
    table = Table({"rlnSpectralIndex": np.arange(freq.size), "rlnResolution": freq / pixel_size_A,
                   "rlnAngstromResolution": ang, "rlnFourierShellCorrelation": np.asarray(res.fsc)})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        resolution = resolution_at(res, 0.143, pixel_size_A)
    return table, float(resolution)


# --------------------------------------------------------------------------------------------- main

def main(args: argparse.Namespace) -> int:
    from ..gpu.reconstruct.batches import default_batch_size, reconstruct_batches
    from ..gpu.reconstruct.fourier import group_matrices, resolve_interp
    from ..gpu.runtime.mpi import mpi_context
    from ..io.atomic import check_outputs
    t_start = time.perf_counter()
    ctx = mpi_context()
    group_matrices(args.sym)                 # an unknown symmetry fails before any reading
    pset = _load_particles(args.particles, args.datadir)
    pixel_size = _pixel_size(pset, args.particles)
    ctf = pset.ctf()
    settings = _settings(args, pixel_size, ctf is not None, pset.ctf_premultiplied)
    box = int(pset.box_size)
    if box < 8:
        raise InputError(f"{args.particles}: box size {box} px is too small to reconstruct (need >= 8)")
    paths = output_paths(args.output, args.halves)
    check_outputs(paths.values())             # before any work (io.atomic: the one way to write outputs)
    subsets = None
    if args.halves:
        subsets = pset.subset
        if subsets is None:
            subsets = 1 + (np.arange(pset.n) % 2)
            logger.info("no rlnRandomSubset column: half maps from even/odd particles")
        elif not np.all((subsets == 1) | (subsets == 2)):
            raise InputError(f"{args.particles}: rlnRandomSubset must be 1 or 2 for every particle")
        if not (np.any(subsets == 1) and np.any(subsets == 2)):
            raise InputError(f"{args.particles}: half maps need particles in both subsets 1 and 2")
    devices = rank_devices(args, ctx)
    interp = resolve_interp(settings.interp, gpu=devices[0].is_gpu)   # trilinear on a GPU fails here
    batch = args.batch or default_batch_size(box, settings, gpu=devices[0].is_gpu)
    mine = ctx.split_indices(pset.n)
    logger.info("reconstructing %d particles (%d px, %.4g Å/px, sym %s, ctf %s) on %s%s", pset.n, box, pixel_size,
                settings.sym, settings.ctf_mode, ", ".join(d.describe() for d in devices),
                f" (rank {ctx.rank} of {ctx.size}: {mine.size} particles)" if ctx.enabled else "")
    bar = progress(total=int(mine.size), desc="reconstruct", args=args, unit="particle")
    try:
        with ctx.abort_on_error():
            result = reconstruct_batches(
                _batches(pset, mine, batch, pixel_size, subsets, settings.ctf_mode != CTF_NONE), box,
                pixel_size_A=pixel_size, settings=settings, devices=devices, halves=args.halves, chunk=batch,
                mpi=ctx, on_batch=bar.update)
    finally:
        bar.close()
    if not ctx.is_root:
        return 0
    summary = {"output": paths["volume"], "particles": int(result.n_particles), "box": box,
               "pixel_size_A": pixel_size, "sym": settings.sym, "ctf": settings.ctf_mode,
               "interp": interp, "mask": settings.mask,
               "device": devices[0].describe(), "gpus": [d.gpu_id for d in devices if d.is_gpu],
               "mpi_ranks": ctx.size}
    lines = []
    table = None
    if args.halves:
        table, resolution = fsc_table(result.half1, result.half2, pixel_size)
        summary.update(half1=paths["half1"], half2=paths["half2"], fsc=paths["fsc"], resolution_A=resolution)
        lines.append(f"FSC 0.143 resolution: {resolution:.2f} Å")
    _write_outputs(paths, result, pixel_size, table)
    seconds = time.perf_counter() - t_start
    summary["seconds"] = round(seconds, 3)
    summary["timings"] = {k: round(v, 3) for k, v in result.timings.items()}
    lines.insert(0, f"wrote {', '.join(paths.values())} from {result.n_particles} particles in {seconds:.1f} s")
    emit_result(args, summary, lines)
    return 0


