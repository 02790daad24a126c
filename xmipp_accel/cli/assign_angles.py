"""Assign projection angles and shifts to particles against a reference map (projection matching or DeepAlign).

Writes the input STAR file with rlnAngleRot/Tilt/Psi, rlnOriginXAngst/YAngst and the normalised
correlation with the CTF-modulated reference projection in rlnParticleFigureOfMerit (RELION's
per-particle figure-of-merit column); every other column is kept. DeepAlign adds
rlnXmippAccelConsensusDeg (angle between the assignments of its two models, degrees) and
rlnXmippAccelConsensusDisagree (1 where it exceeds --consensus-tolerance).

Example usage::

    xmipp-accel assign-angles particles.star --reference map.mrc -o aligned.star --sym c1 --angular-step 3
    xmipp-accel assign-angles particles.star --reference map.mrc -o aligned.star --method deepalign \\
        --model-dir models/ --max-res 8 --gpus 0,1 --json
    mpirun -np 4 xmipp-accel assign-angles particles.star --reference map.mrc -o aligned.star --gpus 0,1,2,3

Under mpirun each rank aligns a contiguous share of the particles on its own GPU (``--gpus`` cycled over the
ranks of a host) and rank 0 gathers the poses in input order and writes OUTPUT (the other ranks write nothing;
``--json`` is printed by rank 0). Every rank sets its frequency weights from the same first particles, so the
result equals the single-process run. DeepAlign models are trained (when missing) by rank 0 before the others
load them. A failure on any rank aborts the whole job.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
from typing import List, Optional, Tuple

import numpy as np

from ..constants import CTF_IMAGES_NORMAL, CTF_IMAGES_PHASE_FLIPPED, CTF_IMAGES_PREMULTIPLIED
from ..errors import InputError
from .common import add_common_args, add_path_args, emit_result, progress, rank_devices, stopwatch

logger = logging.getLogger("xmipp_accel.assign_angles")

SCORE_COLUMN = "rlnParticleFigureOfMerit"
CONSENSUS_COLUMN = "rlnXmippAccelConsensusDeg"
DISAGREE_COLUMN = "rlnXmippAccelConsensusDisagree"
#: Particles (the first ones) every worker sets its frequency weights from (ProjectionMatcher.set_whitening).
WHITENING_SAMPLE = 128


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("particles", type=os.path.abspath, help="input particles (RELION STAR file)")
    parser.add_argument("--reference", required=True, type=os.path.abspath, help="reference map (MRC)")
    parser.add_argument("-o", "--output", required=True, type=os.path.abspath, help="output STAR file")
    g = parser.add_argument_group("search")
    g.add_argument("--method", choices=("projmatch", "deepalign"), default="projmatch",
                   help="projmatch: global projection matching; deepalign: learned region recognition, then "
                        "matching restricted to the best regions (needs PyTorch) (default: %(default)s)")
    g.add_argument("--sym", default="c1", help="symmetry group of the reference: c1, cN, dN, t, o, i... "
                   "(default: %(default)s)")
    g.add_argument("--angular-step", type=float, default=3.0,
                   help="angular step of the global gallery and of psi, degrees (default: %(default)s)")
    g.add_argument("--max-shift", type=float, default=None,
                   help="largest shift searched, pixels of the particles (default: 10%% of the box)")
    g.add_argument("--max-res", type=float, default=None,
                   help="highest resolution compared, Å (default: 2/3 of Nyquist)")
    g.add_argument("--refine-levels", type=int, default=3,
                   help="local refinement levels after the global search, each halving the step "
                        "(default: %(default)s)")
    g.add_argument("--candidates", type=int, default=3,
                   help="directions kept per particle after the global search (default: %(default)s)")
    g.add_argument("--no-ctf", action="store_true", help="ignore the CTF parameters of the particles")
    g.add_argument("--batch", type=int, default=None, help="particles per batch (default: from the free memory)")
    g.add_argument("--cpu-workers", type=int, default=0,
                   help="CPU workers aligning batches besides the GPUs of --gpus (at least one when no GPU is "
                        "used) (default: %(default)s)")
    d = parser.add_argument_group("deepalign")
    d.add_argument("--model-dir", type=os.path.abspath, default=None,
                   help="folder of trained models: loaded when it holds them, else trained models are saved there "
                        "(default: OUTPUT without .star/.xmd + '_deepalign_models')")
    d.add_argument("--region-step", type=float, default=30.0,
                   help="spacing of the sphere regions the networks recognise, degrees (default: %(default)s)")
    d.add_argument("--regions-searched", type=int, default=2,
                   help="best regions of each model matched per particle; the minimum when the shortlist is "
                        "adaptive (default: %(default)s)")
    d.add_argument("--region-mass", type=float, default=0.9,
                   help="adaptive shortlist: each model's regions are taken, most probable first, until their "
                        "probabilities sum to this; 0 searches exactly --regions-searched (default: %(default)s)")
    d.add_argument("--max-regions", type=int, default=6,
                   help="most regions of one model searched per particle (default: %(default)s)")
    d.add_argument("--coarse-check-step", type=float, default=10.0,
                   help="particles whose models are unsure or disagree also get a coarse global search at this "
                        "step, degrees, whose two best regions join the shortlist; 0 disables it "
                        "(default: %(default)s)")
    d.add_argument("--train-steps", type=int, default=1000,
                   help="training steps per model (one new batch of images each) (default: %(default)s)")
    d.add_argument("--train-batch", type=int, default=256, help="images per training step (default: %(default)s)")
    d.add_argument("--cnn-box", type=int, default=64,
                   help="box the networks see, pixels (Fourier-cropped) (default: %(default)s)")
    d.add_argument("--cnn-width", type=int, default=32, help="channels of the first layer (default: %(default)s)")
    d.add_argument("--consensus-tolerance", type=float, default=5.0,
                   help="particles whose two DeepAlign assignments differ by more, degrees, are flagged "
                        "(default: %(default)s)")
    d.add_argument("--seed", type=int, default=0, help="random seed of the training (default: %(default)s)")
    add_path_args(parser)
    add_common_args(parser)


# ------------------------------------------------------------------------------------------------------------
# Inputs
# ------------------------------------------------------------------------------------------------------------

def _particles(args):
    from ..io.particles import read_particles
    pset = read_particles(args.particles, datadir=args.datadir)
    if pset.n == 0:
        raise InputError(f"{args.particles} holds no particles")
    px = np.asarray(pset.pixel_size_A, dtype=np.float64)
    if not np.allclose(px, px[0], rtol=1e-3):
        raise InputError(f"{args.particles} mixes pixel sizes ({px.min():.4g}-{px.max():.4g} Å); assign angles to "
                         "each optics group separately")
    return pset, float(px[0]), int(pset.box_size)


def _ctf_mode(pset) -> str:
    flipped = pset.table.get("rlnCtfDataArePhaseFlipped")
    if pset.ctf_premultiplied:
        return CTF_IMAGES_PREMULTIPLIED
    if flipped is not None and np.any(np.asarray(flipped).astype(np.int64) != 0):
        return CTF_IMAGES_PHASE_FLIPPED
    return CTF_IMAGES_NORMAL


def load_reference(path: str, *, box: int, pixel_size_A: float,
                   max_res_A: Optional[float]) -> Tuple[np.ndarray, List[str]]:
    """Read a map and bring it to the particles' box and pixel size (Fourier resampling, then centre crop/pad).

    Returns the map (box, box, box) float32 and notes for the log. Raises InputError for an empty,
    non-finite, constant, non-cubic map, or one too coarse for ``max_res_A``.
    """
    from ..gpu.align.polar import fourier_crop
    from ..io.mrc import check_finite, read_mrc
    vol, voxel = read_mrc(path)
    vol = np.asarray(vol, dtype=np.float32)
    notes = []
    if vol.ndim != 3 or len(set(vol.shape)) != 1 or vol.shape[0] < 8:
        raise InputError(f"reference {path} must be a cubic 3-D map (got shape {vol.shape}); give the map, not an "
                         "image or a stack")
    check_finite(vol, f"reference {path}")
    if not np.any(vol) or float(vol.std()) == 0.0:
        raise InputError(f"reference {path} is empty (constant); give a map with density")
    n_ref = vol.shape[0]
    if voxel is None or voxel <= 0:
        voxel = pixel_size_A
        notes.append(f"{path} gives no voxel size: the particles' {pixel_size_A:.4g} Å/px is assumed")
    if max_res_A is not None and max_res_A < 2.0 * voxel * 0.999:
        raise InputError(f"--max-res {max_res_A:g} Å is beyond the Nyquist limit of the reference ({2 * voxel:.3g} Å "
                         f"at {voxel:.4g} Å/px); use --max-res {2.5 * voxel:.3g} or coarser, or a finer map")
    if abs(voxel - pixel_size_A) > 1e-3 * pixel_size_A:
        m = int(round(n_ref * voxel / pixel_size_A))
        m += m % 2
        if m < 8:
            raise InputError(f"reference {path} ({n_ref} px at {voxel:.4g} Å/px) is too small to resample to the "
                             f"particles' {pixel_size_A:.4g} Å/px")
        vol = fourier_crop(vol, m, ndim=3)
        notes.append(f"reference resampled from {voxel:.4g} to {voxel * n_ref / m:.4g} Å/px ({n_ref} -> {m} px) "
                     f"to match the particles ({pixel_size_A:.4g} Å/px)")
        n_ref = m
    if n_ref != box:
        out = np.zeros((box,) * 3, dtype=np.float32)
        c_in, c_out = n_ref // 2, box // 2
        h = min(n_ref, box)
        lo = -(h // 2)
        si = slice(c_in + lo, c_in + lo + h)
        so = slice(c_out + lo, c_out + lo + h)
        out[so, so, so] = vol[si, si, si]
        notes.append(f"reference {'padded' if n_ref < box else 'cropped'} from {n_ref} to {box} px about its centre")
        vol = out
    return vol, notes


# ------------------------------------------------------------------------------------------------------------
# Work
# ------------------------------------------------------------------------------------------------------------

def _ctf_subset(ctf, idx):
    if ctf is None:
        return None
    return {k: np.asarray(v)[idx] for k, v in ctf.items()}


def _deep_config(args):
    from ..gpu.align.deepalign import DeepAlignConfig
    return DeepAlignConfig(region_step_deg=args.region_step, cnn_box=args.cnn_box, width=args.cnn_width,
                           train_steps=args.train_steps, train_batch=args.train_batch,
                           n_regions_searched=args.regions_searched, consensus_tolerance_deg=args.consensus_tolerance,
                           region_probability_mass=args.region_mass, max_regions_searched=args.max_regions,
                           coarse_check_step_deg=args.coarse_check_step, seed=args.seed)


def _make_matcher(vol, args, pixel_size_A, ctf_mode):
    from ..gpu.align.projmatch import ProjectionMatcher
    return ProjectionMatcher(vol, pixel_size_A=pixel_size_A, sym=args.sym, step_deg=args.angular_step,
                             max_res_A=args.max_res, max_shift_px=args.max_shift, n_refine_levels=args.refine_levels,
                             n_candidates=args.candidates, ctf_mode=ctf_mode)


def _default_model_dir(output: str) -> str:
    stem = os.path.splitext(output)[0] if output.lower().endswith((".star", ".xmd")) else output
    return stem + "_deepalign_models"


def _read_batch(pset, idx, args):
    from ..io.mrc import check_finite
    images = pset.read_images(idx)
    check_finite(images, f"particles of {args.particles}", item_name="particle")
    return images


def _check_deep_args(args: argparse.Namespace) -> None:
    """Refuse DeepAlign shortlist settings that cannot work, naming the option and its range."""
    if not 0 <= args.region_mass <= 1:
        raise InputError(f"--region-mass is a probability: give a value in [0, 1], got {args.region_mass}")
    if args.regions_searched < 1:
        raise InputError(f"--regions-searched must be at least 1, got {args.regions_searched}")
    if args.max_regions < args.regions_searched:
        raise InputError(f"--max-regions ({args.max_regions}) must be at least --regions-searched "
                         f"({args.regions_searched})")
    if not 0 <= args.coarse_check_step <= 90:
        raise InputError(f"--coarse-check-step must be in [0, 90] degrees (0 disables the check), "
                         f"got {args.coarse_check_step}")


def main(args: argparse.Namespace) -> int:
    from ..em.symmetry import symmetry_matrices
    from ..gpu.runtime.mpi import mpi_context
    from ..io.atomic import check_outputs
    from ..io.particles import write_particles
    symmetry_matrices(args.sym)  # unknown names fail here, before any work
    check_outputs([args.output], folders=[args.model_dir or _default_model_dir(args.output)]
                  if args.method == "deepalign" else ())
    if not 0 < args.angular_step <= 90:
        raise InputError(f"--angular-step must be in (0, 90] degrees, got {args.angular_step}")
    if args.method == "deepalign":
        _check_deep_args(args)
        from ..gpu.align.deepalign import require_torch
        require_torch()
    pset, px, box = _particles(args)
    if args.max_shift is not None and not 0 <= args.max_shift <= box / 2:
        raise InputError(f"--max-shift must be between 0 and half the box ({box / 2:g} px), got {args.max_shift}")
    if args.max_res is not None and args.max_res < 2 * px * 0.999:
        raise InputError(f"--max-res {args.max_res:g} Å is beyond Nyquist of the particles ({2 * px:.3g} Å)")
    vol, notes = load_reference(args.reference, box=box, pixel_size_A=px, max_res_A=args.max_res)
    for note in notes:
        logger.info("%s", note)
    ctf = None if args.no_ctf else pset.ctf()
    ctf_mode = _ctf_mode(pset)
    ctx = mpi_context()
    devices = rank_devices(args, ctx)
    n = pset.n
    mine = ctx.split_indices(n)
    if ctx.enabled:
        logger.info("rank %d of %d: particles %d to %d on %s", ctx.rank, ctx.size, int(mine[0]) if mine.size else 0,
                    int(mine[-1]) if mine.size else -1, ", ".join(d.describe() for d in devices))
    summary = {"command": "assign-angles", "method": args.method, "particles": n, "output": args.output,
               "sym": args.sym, "angular_step_deg": args.angular_step, "devices": [d.describe() for d in devices],
               "ctf": "none" if ctf is None else ctf_mode, "notes": notes, "mpi_ranks": ctx.size}
    with stopwatch() as total, ctx.abort_on_error():
        model_dir = None
        training = None
        if args.method == "deepalign":
            model_dir = args.model_dir or _default_model_dir(args.output)
            if ctx.is_root:  # one rank trains (or loads) the models; the others load what it saved
                training = _prepare_models(vol, args, pset, px, ctf, ctf_mode, devices[0], model_dir)
            training = ctx.bcast(training)
            summary["model_dir"] = model_dir
            summary["training"] = training
        bar_args = args if ctx.is_root else argparse.Namespace(quiet=True)
        bar = progress(total=int(mine.size), desc=f"assign-angles ({args.method})", args=bar_args, unit="particle")
        with stopwatch() as align_time:
            try:
                res, run = align_particles(pset, vol, args, px, ctf, ctf_mode, devices, model_dir,
                                           indices=mine, on_batch=lambda k: bar.update(k))
            finally:
                bar.close()
        parts = ctx.gather((res, run.summary()))
        if not ctx.is_root:
            return 0
        res = _concatenate([p[0] for p in parts], n)
        extra = {SCORE_COLUMN: res.score}
        if "consensus_deg" in res.extra:
            extra[CONSENSUS_COLUMN] = res.extra["consensus_deg"]
            extra[DISAGREE_COLUMN] = res.extra["disagree"]
        write_particles(args.output, pset, angles_deg=res.angles_deg, origins_A=res.origins_px * px, extra=extra,
                        absolute_paths=args.absolute_paths)
    summary.update({"seconds": total["seconds"], "alignment_seconds": align_time["seconds"],
                    "particles_per_second": n / max(align_time["seconds"], 1e-9),
                    "median_score": float(np.median(res.score)), "pipeline": parts[0][1]})
    if ctx.enabled:
        summary["rank_pipelines"] = [p[1] for p in parts]
    if "disagree" in res.extra:
        summary["disagree_fraction"] = float(np.mean(res.extra["disagree"]))
    lines = [f"{n} particles aligned with {args.method} in {total['seconds']:.1f} s "
             f"({summary['particles_per_second']:.1f} particles/s on {', '.join(summary['devices'])}); "
             f"median score {summary['median_score']:.3f}; written to {args.output}"]
    if training:
        how = "loaded" if training.get("loaded") else f"trained in {training.get('training_seconds', 0.0):.1f} s"
        lines.append(f"DeepAlign models: {model_dir} ({how})")
        if "disagree_fraction" in summary:
            lines.append(f"{100 * summary['disagree_fraction']:.1f} % of the particles flagged by the consensus "
                         f"(> {args.consensus_tolerance:g} deg, column {DISAGREE_COLUMN})")
    emit_result(args, summary, lines)
    return 0


def _concatenate(parts, n: int):
    """The ranks' AlignmentResults (rank order = input order) as one of ``n`` particles (empty shares dropped)."""
    from ..gpu.align.projmatch import AlignmentResult
    full = [p for p in parts if len(p.score)]
    res = AlignmentResult.concatenate(full)
    if len(res.score) != n:
        raise RuntimeError(f"the MPI ranks returned {len(res.score)} poses for {n} particles")
    return res


def _prepare_models(vol, args, pset, px, ctf, ctf_mode, device, model_dir) -> dict:
    """Load DeepAlign models from ``model_dir`` or train them there (on ``device``); returns training info."""
    from ..gpu.align.deepalign import DeepAligner
    with device:
        xp = device.xp
        matcher = _make_matcher(xp.asarray(vol), args, px, ctf_mode)
        aligner = DeepAligner(matcher, _deep_config(args))
        if DeepAligner.has_models(model_dir):
            aligner.load(model_dir)
            logger.info("DeepAlign models loaded from %s", model_dir)
            return {"loaded": True, **aligner.info}
        if os.path.exists(model_dir) and not os.path.isdir(model_dir):
            raise InputError(f"--model-dir {model_dir} is a file; give a folder")
        if os.path.isdir(model_dir) and os.listdir(model_dir):
            raise InputError(f"--model-dir {model_dir} is not empty but holds no deepalign.json (a corrupt or foreign "
                             "folder); delete it, or give an empty or new folder")
        rng = np.random.default_rng(args.seed)
        sample = np.sort(rng.choice(pset.n, size=min(pset.n, 2000), replace=False))
        images = _read_batch(pset, sample, args)
        logger.info("training %d DeepAlign models (%d steps of %d images, %d regions) on %s",
                    aligner.config.n_models, aligner.config.train_steps, aligner.config.train_batch,
                    aligner.regions.n_regions, device.describe())
        info = aligner.train(xp.asarray(images), _ctf_subset(ctf, sample), log=logger.debug)
        aligner.save(model_dir)
        return {"loaded": False, **info}


class _BatchInfo:
    """Host-side facts of a batch that travel with its images through the pipeline (never uploaded)."""

    def __init__(self, indices: np.ndarray, ctf):
        self.indices = indices
        self.ctf = ctf


def particle_batches(n: int, batch_size: int) -> List[np.ndarray]:
    """Consecutive index batches ``[0, bs), [bs, 2 bs) ...`` covering ``n`` particles."""
    bs = max(1, int(batch_size))
    return [np.arange(s, min(n, s + bs)) for s in range(0, n, bs)]


def _batch_size(args, box: int, devices) -> int:
    """``--batch``, else the search's default for the first device (free GPU memory; 128 on the CPU)."""
    if args.batch is not None:
        if args.batch < 1:
            raise InputError(f"--batch must be at least 1, got {args.batch}")
        return int(args.batch)
    from ..em.sampling import sphere_sampling
    from ..gpu.align.search_plan import default_batch_size
    n_dir = len(sphere_sampling(args.angular_step, args.sym)[0])
    with devices[0]:
        return default_batch_size(box, n_dir, devices[0].xp)


def align_particles(pset, vol, args, px, ctf, ctf_mode, devices, model_dir, *, indices=None, on_batch=None):
    """Align every particle through the task runtime; returns the AlignmentResult (input order) and the run.

    The particles are split into consecutive batches (``--batch``) that a
    :class:`~xmipp_accel.gpu.runtime.pipeline.Pipeline` processes: its reader threads read each batch
    from the image stacks (into pinned buffers when GPUs are used), one compute worker per device in
    ``devices`` (plus ``--cpu-workers`` NumPy workers) aligns it on its device, and the writer collects
    the results in input order. Every worker sets its frequency weights from the same particles (the
    first :data:`WHITENING_SAMPLE`), so the result of a particle depends neither on the batch size nor
    on the worker that aligned it.

    Parameters
    ----------
    pset : ParticleSet; vol : float32 (N, N, N) reference at the particles' box and pixel size ``px`` (Å).
    ctf : dict of per-particle CTF arrays or None; ctf_mode : see :data:`~xmipp_accel.gpu.align.projmatch.CTF_MODES`.
    devices : list of :class:`~xmipp_accel.backend.Device` (``resolve_devices(args)``).
    model_dir : DeepAlign models (``--method deepalign``), else None.
    indices : int64 (m,) ascending particle indices to align (this MPI rank's share), default all.
        The frequency weights still come from the first particles of the whole set.
    on_batch : callable ``(n_particles) -> None`` called after each batch (progress bars).

    Returns
    -------
    (AlignmentResult, PipelineRun)
    """
    from ..gpu.align.projmatch import AlignmentResult
    from ..gpu.runtime.pipeline import Pipeline
    if args.cpu_workers < 0:
        raise InputError(f"--cpu-workers must be 0 or more, got {args.cpu_workers}")
    n = pset.n
    indices = np.arange(n, dtype=np.int64) if indices is None else np.asarray(indices, dtype=np.int64)
    batches = [indices[b] for b in particle_batches(indices.size, _batch_size(args, int(vol.shape[-1]), devices))]
    sample_idx = np.arange(min(n, WHITENING_SAMPLE))
    sample = _read_batch(pset, sample_idx, args)
    sample_ctf = _ctf_subset(ctf, sample_idx)
    deep = args.method == "deepalign"

    def setup(worker):
        xp = worker.xp
        with _torch_safe_stream(worker, deep):
            matcher = _make_matcher(xp.asarray(vol), args, px, ctf_mode)
            if matcher.whiten:
                matcher.set_whitening(xp.asarray(sample), sample_ctf)
            if not deep:
                return matcher
            from ..gpu.align.deepalign import DeepAligner
            engine = DeepAligner(matcher, _deep_config(args))
            engine.load(model_dir)
            return engine

    def read(idx):
        return _read_batch(pset, idx, args), _BatchInfo(idx, _ctf_subset(ctf, idx))

    def compute(data, worker):
        images, info = data
        with _torch_safe_stream(worker, deep):
            return worker.state.align_batch(images, info.ctf)

    def on_result(item_result):
        if on_batch is not None and item_result.ok:
            on_batch(int(item_result.item.size))

    gpus = [d for d in devices if d.is_gpu]
    pipe = Pipeline(compute, read=read, setup=setup, devices=gpus or devices, cpu_workers=args.cpu_workers,
                    read_workers=2, queue_depth=1, ordered=True, on_result=on_result, fail_fast=True)
    run = pipe.run(batches)
    if not run.values:  # an MPI rank with no particles (more ranks than particles)
        empty = AlignmentResult(np.zeros((0, 3, 3)), np.zeros((0, 2)), np.zeros(0))
        return empty, run
    return AlignmentResult.concatenate(run.values), run


@contextlib.contextmanager
def _torch_safe_stream(worker, deep: bool):
    """DeepAlign (PyTorch) work on a GPU runs on the null stream, which PyTorch's default stream synchronises
    with; the worker's own stream (its uploads) is drained first. A no-op for projection matching or a CPU."""
    if not (deep and worker.is_gpu):
        yield
        return
    worker.stream.synchronize()
    null = worker.xp.cuda.Stream.null
    with null:
        yield
    null.synchronize()
