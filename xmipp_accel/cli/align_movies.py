"""Align movies (FlexAlign: global + local B-spline motion) and write aligned, dose-weighted sums.

For every movie, OUTDIR receives ``<stem>.mrc`` (aligned sum), ``<stem>_DW.mrc`` (dose weighted, with
--dose-per-frame), ``<stem>_shifts.star`` (RELION motion-correction STAR: data_general,
data_global_shift in pixels of the input movie with MotionCor2's sign, data_local_shift with the patch
measurements and our B-spline model in data_xmipp_accel_bspline*), ``<stem>_psd.mrc`` (power spectrum
of the sum), and with --odd-even ``<stem>_ODD.mrc``/``<stem>_EVN.mrc`` (frames 1, 3, 5... / 2, 4,
6...), with --save-stack ``<stem>_aligned.mrcs``; OUTDIR/corrected_micrographs.star lists the sums and
their motion STAR files as RELION's motion correction does (the input of RELION's Bayesian polishing).
Reading the next movie overlaps the GPU work on the current one; one worker per GPU in --gpus. A movie
that cannot be read or has too few frames, NaNs or no signal is skipped with a warning naming it, and the
batch goes on.

Example usage::

    xmipp-accel align-movies movies/*.tiff -o aligned --pixel-size 0.83 --gain gain.mrc \\
        --dose-per-frame 1.2 --voltage 300 --json
    xmipp-accel align-movies m.mrcs -o out --patches 5x5 --frames 2:40 --bin 2 --gpus 0,1
    xmipp-accel align-movies m.mrc -o out --no-local --max-res 20 --odd-even --device cpu
    mpirun -np 4 xmipp-accel align-movies movies/*.tiff -o aligned --gpus 0,1,2,3 --json

Under mpirun the movies are split across the ranks (contiguous blocks in the given order), each rank
aligns its movies on its own GPU (``--gpus`` cycled over the ranks of a host) and writes their outputs,
and rank 0 gathers the per-movie summaries (input order) and prints the report and ``--json``. A bad
movie is skipped with a warning on the rank that met it; any other failure on a rank aborts the job.
"""
from __future__ import annotations

import argparse
import logging
import os
import threading
import time
from typing import Dict, List, Optional, Tuple

import numpy as np

from ..errors import InputError
from .. import backend
from .common import add_common_args, emit_result, progress, rank_devices

logger = logging.getLogger("xmipp_accel")

_STEM_EXTENSIONS = (".mrcs", ".mrc", ".st", ".tiff", ".tif", ".eer")


def _grid(spec: str, n: int, option: str) -> Tuple[int, ...]:
    parts = spec.lower().replace("×", "x").split("x")
    try:
        vals = tuple(int(p) for p in parts)
    except ValueError:
        vals = ()
    if len(vals) != n or min(vals) < 1:
        example = "5x5" if n == 2 else "6x6x5"
        raise InputError(f"{option} expects {n} positive integers like {example}, got {spec!r}")
    return vals


def parse_frame_range(spec: Optional[str]) -> Optional[Tuple[int, Optional[int]]]:
    """``"A:B"`` (1-based, inclusive; ``A:`` or ``:B`` open) -> 0-based ``(start, stop)``; None for all."""
    if spec is None or spec.strip() in ("", ":"):
        return None
    a, sep, b = spec.partition(":")
    try:
        start = int(a) if a.strip() else 1
        stop = int(b) if b.strip() else None
    except ValueError:
        start, stop, sep = 0, None, ""
    if not sep or start < 1 or (stop is not None and stop < start):
        raise InputError(f"--frames expects A:B with 1 <= A <= B (1-based, inclusive), e.g. 2:40; got {spec!r}")
    return start - 1, stop


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("movies", nargs="+", metavar="MOVIE",
                        help="movie files: MRC/MRCS (modes 0, 1, 2, 6, 12 and 101 = 4-bit packed), TIFF (none, LZW, "
                             "deflate; read upside down as RELION, IMOD and MotionCor2 do) or EER")
    parser.add_argument("-o", "--output-dir", required=True, help="output folder (created if missing)")
    g = parser.add_argument_group("acquisition")
    g.add_argument("--pixel-size", type=float, default=None,
                   help="pixel size of the movies in Å (default: from the MRC header)")
    g.add_argument("--dose-per-frame", type=float, default=None,
                   help="exposure per frame in e/Å²; gives the dose-weighted sum <stem>_DW.mrc")
    g.add_argument("--pre-exposure", type=float, default=0.0, help="exposure before the first frame, e/Å² (0)")
    g.add_argument("--voltage", type=float, default=300.0, help="acceleration voltage in kV (%(default)s)")
    g.add_argument("--eer-fractions", type=int, default=40, metavar="N",
                   help="EER movies: raw frames summed into each frame that is aligned (RELION's --eer_grouping; "
                        "%(default)s); raw frames left over at the end are not used. --frames and "
                        "--dose-per-frame count these fractions")
    g.add_argument("--eer-upsampling", type=int, default=1, choices=(1, 2),
                   help="EER movies: 1 renders the detector's 4K pixels, 2 the 8K grid of half pixels from the "
                        "sub-pixel positions (RELION's --eer_upsampling; %(default)s); --pixel-size is that of the "
                        "rendered grid (half the physical pixel with 2) and a 4K gain is repeated over 2x2")
    g = parser.add_argument_group("corrections")
    g.add_argument("--gain", default=None,
                   help="gain reference (MRC, TIFF or EPU's EER .gain), multiplied with the frames")
    g.add_argument("--gain-rot", type=int, default=0, choices=(0, 1, 2, 3),
                   help="rotate the gain by this many 90° clockwise turns (MotionCor2 -RotGain)")
    g.add_argument("--gain-flip", type=int, default=0, choices=(0, 1, 2),
                   help="then flip the gain: 1 upside down, 2 left-right (MotionCor2 -FlipGain)")
    g.add_argument("--dark", default=None, help="dark reference subtracted before the gain (same orientation)")
    g.add_argument("--defects", default=None,
                   help="defects: MotionCor2 text file of 'x y width height' rectangles, or an MRC/TIFF map")
    g.add_argument("--hot-pixel-sigma", type=float, default=10.0,
                   help="replace pixels whose frame sum lies this many robust σ from the median (0: off)")
    g = parser.add_argument_group("alignment")
    g.add_argument("--frames", default=None, help="frames to use, A:B, 1-based inclusive (default: all)")
    g.add_argument("--bin", type=float, default=1.0, help="Fourier binning factor, fractional allowed (1)")
    g.add_argument("--max-res", type=float, default=30.0, help="correlation resolution in Å (%(default)s)")
    g.add_argument("--max-shift", type=float, default=50.0,
                   help="largest shift between two frames in Å (%(default)s)")
    g.add_argument("--patches", default=None, help="patch grid XxY (default: about one per 500 Å, 3 to 7)")
    g.add_argument("--control-points", default=None,
                   help="B-spline control points XxYxT (default: 1 per 1000 Å + 2; ceil(N/7) + 2; min 4)")
    g.add_argument("--no-local", dest="local", action="store_false", help="global alignment only")
    g = parser.add_argument_group("outputs")
    g.add_argument("--odd-even", action="store_true", help="also write <stem>_ODD.mrc and <stem>_EVN.mrc")
    g.add_argument("--save-stack", action="store_true", help="also write the aligned frames <stem>_aligned.mrcs")
    g.add_argument("--psd-size", type=int, default=512, help="power spectrum size in pixels (0: none)")
    g.add_argument("--read-threads", type=int, default=8, help="threads reading one movie (%(default)s)")
    g.add_argument("--workers-per-gpu", type=int, default=1,
                   help="movies aligned at once on each GPU, each on its own stream (%(default)s); 2 overlaps one "
                        "movie's copies and host work with the other's GPU work, at twice the GPU memory")
    add_common_args(parser)


def movie_stem(path: str) -> str:
    """File name without folder and movie extension."""
    base = os.path.basename(path)
    low = base.lower()
    for ext in _STEM_EXTENSIONS:
        if low.endswith(ext):
            return base[:-len(ext)]
    return os.path.splitext(base)[0]


class _PinnedBuffers:
    """At most ``limit`` page-locked host buffers, reused between movies (blocking when all are in use)."""

    def __init__(self, limit: int):
        self.limit = limit
        self._free: List[np.ndarray] = []
        self._count = 0
        self._in_use: Dict[int, np.ndarray] = {}
        self._cond = threading.Condition()
        self._next = 0

    def acquire(self, nbytes: int) -> Tuple[int, np.ndarray]:
        with self._cond:
            while True:
                fit = [b for b in self._free if b.nbytes >= nbytes]
                if fit:
                    buf = min(fit, key=lambda b: b.nbytes)
                    self._free.remove(buf)
                    break
                if self._count < self.limit:
                    self._count += 1
                    buf = None
                    break
                if self._free:  # none large enough: replace the largest free one
                    self._free.remove(max(self._free, key=lambda b: b.nbytes))
                    self._count -= 1
                    continue
                self._cond.wait()
            token = self._next
            self._next += 1
        if buf is None:
            buf = backend.pinned_empty((nbytes,), np.uint8)
        with self._cond:
            self._in_use[token] = buf
        return token, buf

    def release(self, token: Optional[int]) -> None:
        with self._cond:
            buf = self._in_use.pop(token, None)
            if buf is not None:
                self._free.append(buf)
                self._cond.notify_all()


def _options(args: argparse.Namespace, pixel_size: float, first_frame: int):
    from ..gpu.movie import AlignmentOptions
    pre = float(args.pre_exposure)
    if args.dose_per_frame:
        pre += first_frame * float(args.dose_per_frame)  # frames left out at the start were exposed too
    opts = AlignmentOptions(
        pixel_size_A=pixel_size, max_res_A=args.max_res, max_shift_A=args.max_shift, binning=args.bin,
        local=args.local, patches_xy=_grid(args.patches, 2, "--patches") if args.patches else None,
        control_points=_grid(args.control_points, 3, "--control-points") if args.control_points else None,
        dose_per_frame=args.dose_per_frame, pre_exposure=pre, voltage_kV=args.voltage, odd_even=args.odd_even,
        save_stack=args.save_stack, psd_size=args.psd_size, hot_pixel_sigma=args.hot_pixel_sigma)
    opts.validate()
    return opts


def _reader_options(args: argparse.Namespace) -> Dict[str, int]:
    """How movie_info reads EER movies (ignored for the other formats)."""
    return {"eer_fractions": int(args.eer_fractions), "eer_upsampling": int(args.eer_upsampling)}


def _movie_frames(path: str, args: argparse.Namespace) -> int:
    """Frames of the movie as aligned (EER: fractions)."""
    from ..io.movie import movie_info
    return movie_info(path, **_reader_options(args)).n_frames


def _first_readable_info(paths: List[str], args: argparse.Namespace):
    from ..io.movie import movie_info
    for p in paths:
        try:
            return movie_info(p, **_reader_options(args))
        except InputError:
            continue
    return None


def _references(args, frame_shape) -> Dict[str, Optional[np.ndarray]]:
    """Gain, dark (oriented) and defect mask on the host, checked against the frame shape."""
    from ..gpu.movie.preprocess import check_reference_shape, orient_reference
    from ..io.movie import read_defects, read_reference, upsample_eer_reference
    refs: Dict[str, Optional[np.ndarray]] = {"gain": None, "dark": None, "defects": None}
    for key, path in (("gain", args.gain), ("dark", args.dark)):
        if path:
            img = orient_reference(read_reference(path, what=key), rotation=args.gain_rot, flip=args.gain_flip)
            if args.eer_upsampling == 2:
                img = upsample_eer_reference(img, frame_shape)
            check_reference_shape(img.shape, frame_shape, what=f"{key} reference", path=path)
            refs[key] = img
    if args.defects:
        refs["defects"] = read_defects(args.defects, frame_shape)
    return refs


#: Dose (e/Å²) up to which RELION counts motion as "early" in rlnAccumMotionEarly (--dose_motionstats_cutoff).
RELION_EARLY_DOSE = 4.0
_RELION_DEFECT_EXTENSIONS = (".txt", ".mrc", ".tif", ".tiff")


def _star_blocks(path: str, info_shape, n_frames: int, first: int, res: dict, args, pixel_size: float, *,
                 movie_frames: Optional[int] = None, gain_name: Optional[str] = None) -> dict:
    """Blocks of the per-movie motion STAR, as RELION's ``Micrograph::write`` lays them out.

    ``general`` holds what ``Micrograph::read`` requires (rlnImageSizeX/Y/Z with Z the frame count of
    the movie file, rlnMicrographMovieName) and what polishing reads (gain, defects, binning, original
    pixel size, dose rate, pre-exposure, voltage, start frame, rlnMotionModelVersion 0 = no polynomial
    model). ``global_shift`` has one row per aligned frame (1-based numbers of the movie file; frames left
    out by --frames are absent, which RELION reads as not observed), shifts in pixels of the input movie
    with MotionCor2/RELION's sign (frame n's content moved by +shift lies on the reference).
    ``local_shift`` has RELION's columns: frame, patch centre (rlnCoordinateX/Y, input pixels) and the
    patch shift left after the global one.
    """
    from ..io.star import Table
    ny, nx = info_shape
    shifts = np.asarray(res["shifts_px"])
    frames_1 = np.arange(first + 1, first + n_frames + 1)
    general = {"rlnImageSizeX": nx, "rlnImageSizeY": ny,
               "rlnImageSizeZ": int(movie_frames if movie_frames is not None else first + n_frames),
               "rlnMicrographMovieName": os.path.abspath(path)}
    if gain_name:
        general["rlnMicrographGainName"] = gain_name
    if args.defects and args.defects.lower().endswith(_RELION_DEFECT_EXTENSIONS):
        general["rlnMicrographDefectFile"] = os.path.abspath(args.defects)
    general["rlnMicrographBinning"] = float(res["binning"])
    general["rlnMicrographOriginalPixelSize"] = float(pixel_size)
    if args.dose_per_frame:  # absent = unknown to RELION (-1); 0 would be a wrong dose
        general["rlnMicrographDoseRate"] = float(args.dose_per_frame)
    general["rlnMicrographPreExposure"] = float(args.pre_exposure)
    general["rlnVoltage"] = float(args.voltage)
    general["rlnMicrographStartFrame"] = first + 1
    general["rlnMotionModelVersion"] = 0
    blocks = {
        "general": Table(general, loop=False),
        "global_shift": Table({"rlnMicrographFrameNumber": frames_1,
                               "rlnMicrographShiftX": shifts[:, 0], "rlnMicrographShiftY": shifts[:, 1]}),
    }
    if res.get("patch_centres_px") is not None:
        centres = np.asarray(res["patch_centres_px"])
        local = np.asarray(res["patch_shifts_px"])          # (P, N, 2) input pixels
        p, n = local.shape[:2]
        blocks["local_shift"] = Table({
            "rlnMicrographFrameNumber": np.tile(frames_1, p),
            "rlnCoordinateX": np.repeat(centres[:, 0], n), "rlnCoordinateY": np.repeat(centres[:, 1], n),
            "rlnMicrographShiftX": local[:, :, 0].ravel(), "rlnMicrographShiftY": local[:, :, 1].ravel()})
    if res.get("bspline_coefficients") is not None:
        coef = np.asarray(res["bspline_coefficients"])      # (Lt, Ly, Lx, 2) input pixels
        lt, ly, lx = coef.shape[:3]
        it, iy, ix = np.meshgrid(np.arange(lt), np.arange(ly), np.arange(lx), indexing="ij")
        ext = res["bspline_extent_px"]
        blocks["xmipp_accel_bspline_general"] = Table({
            "xaControlPointsX": lx, "xaControlPointsY": ly, "xaControlPointsT": lt,
            "xaExtentX": float(ext[0]), "xaExtentY": float(ext[1]), "xaNumberOfFrames": n_frames,
            "xaReferenceFrame": first + 1 + int(res["reference_frame"])}, loop=False)
        blocks["xmipp_accel_bspline"] = Table({
            "xaIndexT": it.ravel(), "xaIndexY": iy.ravel(), "xaIndexX": ix.ravel(),
            "xaCoefficientX": coef[..., 0].ravel(), "xaCoefficientY": coef[..., 1].ravel()})
    return blocks


def _relion_gain_name(args, gain: Optional[np.ndarray], outdir: str, *, write: bool) -> Optional[str]:
    """The gain file named in the motion STAR: --gain itself, or (with --gain-rot/--gain-flip) the gain as
    applied, written once to OUTDIR/gain_oriented.mrc (RELION applies rlnMicrographGainName as it is)."""
    if not args.gain:
        return None
    if not args.gain_rot and not args.gain_flip:
        return os.path.abspath(args.gain)
    from ..io.mrc import write_mrc
    path = os.path.join(outdir, "gain_oriented.mrc")
    if write:
        write_mrc(path, np.asarray(gain, dtype=np.float32), None)
    return path


def accumulated_motion(shifts_px, first_frame: int, *, dose_per_frame: Optional[float],
                       pre_exposure: float) -> Dict[str, float]:
    """RELION's rlnAccumMotionTotal/Early/Late: summed frame-to-frame global motion (movie pixels, as RELION's
    motion correction computes them); "early" = frames up to 4 e/Å² (needs the dose per frame)."""
    s = np.asarray(shifts_px, dtype=np.float64).reshape(-1, 2)
    step = np.hypot(*np.diff(s, axis=0).T) if len(s) > 1 else np.zeros(0)
    out = {"rlnAccumMotionTotal": float(step.sum())}
    if dose_per_frame:
        frame = first_frame + 2 + np.arange(step.size)        # 1-based frame at the end of each step
        early = frame <= (RELION_EARLY_DOSE - pre_exposure) / dose_per_frame
        out["rlnAccumMotionEarly"] = float(step[early].sum())
        out["rlnAccumMotionLate"] = float(step[~early].sum())
    return out


def write_corrected_micrographs(path: str, movies: List[dict], args, pixel_size: float,
                                first_frame: int) -> Optional[str]:
    """RELION's ``corrected_micrographs.star`` of the aligned movies (data_optics + data_micrographs).

    rlnMicrographName is the dose-weighted sum when there is one (rlnMicrographNameNoDW the plain sum),
    rlnMicrographMetadata the movie's motion STAR: what Bayesian polishing (``--corr_mic``) reads.
    Returns ``path``, or None when no movie was aligned.
    """
    from ..io.star import Table, write_star
    ok = [m for m in movies if m.get("status") == "ok"]
    if not ok:
        return None
    names, no_dw, meta, motion = [], [], [], []
    for m in ok:
        out = m["outputs"]
        names.append(out.get("sum_dw") or out["sum"])
        no_dw.append(out["sum"])
        meta.append(out["shifts"])
        motion.append(accumulated_motion(m["shifts_px"], first_frame, dose_per_frame=args.dose_per_frame,
                                         pre_exposure=float(args.pre_exposure)))
    optics = Table({"rlnOpticsGroupName": np.array(["opticsGroup1"]), "rlnOpticsGroup": np.array([1]),
                    "rlnMicrographOriginalPixelSize": np.array([float(pixel_size)]),
                    "rlnVoltage": np.array([float(args.voltage)]),
                    "rlnMicrographPixelSize": np.array([float(ok[0]["pixel_size_A"])])})
    cols = {"rlnMicrographName": np.array(names)}
    if any(m["outputs"].get("sum_dw") for m in ok):
        cols["rlnMicrographNameNoDW"] = np.array(no_dw)
    cols["rlnMicrographMetadata"] = np.array(meta)
    cols["rlnOpticsGroup"] = np.ones(len(ok), dtype=np.int64)
    for key in motion[0]:
        cols[key] = np.array([mo[key] for mo in motion])
    write_star(path, {"optics": optics, "micrographs": Table(cols)})
    return path


def main(args: argparse.Namespace) -> int:
    from ..gpu.movie import align_movie
    from ..gpu.runtime.mpi import mpi_context
    from ..gpu.runtime.pipeline import Pipeline
    from ..io.movie import movie_info, read_movie_raw
    from ..io.mrc import write_mrc
    from ..io.star import write_star

    t_start = time.perf_counter()
    paths = [os.path.abspath(p) for p in args.movies]
    outdir = os.path.abspath(args.output_dir)
    frame_range = parse_frame_range(args.frames)
    if args.read_threads < 1:
        raise InputError(f"--read-threads must be at least 1, got {args.read_threads}")
    if args.workers_per_gpu < 1:
        raise InputError(f"--workers-per-gpu must be at least 1, got {args.workers_per_gpu}")
    first_info = _first_readable_info(paths, args)
    if first_info is None:
        raise InputError(f"none of the {len(paths)} movie(s) can be read (first: {paths[0]}); "
                         "check the paths and formats")
    pixel_size = args.pixel_size or first_info.pixel_size_A
    if not pixel_size:
        raise InputError(f"{first_info.path} has no pixel size in its header: give --pixel-size (Å)")
    first = frame_range[0] if frame_range else 0
    options = _options(args, float(pixel_size), first)
    refs = _references(args, first_info.frame_shape)
    os.makedirs(outdir, exist_ok=True)
    ctx = mpi_context()
    gain_name = _relion_gain_name(args, refs["gain"], outdir, write=ctx.is_root)
    all_paths = paths
    paths = all_paths[ctx.split(len(all_paths))]        # this rank's movies (all of them without MPI)
    devices = rank_devices(args, ctx)
    on_gpu = any(d.is_gpu for d in devices)
    logger.info("aligning %d movie(s) on %s", len(paths), ", ".join(d.describe() for d in devices))
    n_workers = len(devices) * (args.workers_per_gpu if on_gpu else 1)
    buffers = _PinnedBuffers(limit=2 + n_workers) if on_gpu else None

    def read(path):
        info = movie_info(path, **_reader_options(args))
        if info.frame_shape != first_info.frame_shape and any(v is not None for v in refs.values()):
            raise InputError(f"{path} has frames of {info.nx} x {info.ny} pixels but the gain/dark/defect "
                             f"references are {first_info.nx} x {first_info.ny}")
        start, stop = (frame_range[0], frame_range[1]) if frame_range else (0, None)
        stop = info.n_frames if stop is None else stop
        if stop > info.n_frames:
            raise InputError(f"{path} has {info.n_frames} frames; --frames asks for frames up to {stop}")
        n = stop - start
        dtype = info.dtype.newbyteorder("=") if info.format == "mrc" else info.dtype
        token, out = None, None
        if buffers is not None:
            token, buf = buffers.acquire(info.nbytes(n))
            out = buf[:info.nbytes(n)].view(dtype).reshape(n, info.ny, info.nx)
        try:
            raw = read_movie_raw(path, (start, stop), out=out, workers=args.read_threads, info=info)
        except BaseException:
            if buffers is not None:
                buffers.release(token)
            raise
        return {"raw": raw, "token": token, "frame_shape": info.frame_shape}

    def setup(ctx):
        xp = ctx.xp
        return {k: (None if v is None else xp.asarray(v)) for k, v in refs.items()}

    def compute(data, ctx):
        try:
            raw = data.pop("raw")  # the pipeline keeps `data`: drop its reference so memory can be freed
            result = align_movie(raw, options, gain=ctx.state["gain"], dark=ctx.state["dark"],
                                 defect_mask=ctx.state["defects"], name=data["path"])
            del raw
        finally:
            if ctx.is_gpu:
                ctx.stream.synchronize()  # the upload from the pinned buffer is complete
            if buffers is not None:
                buffers.release(data.get("token"))
        out = _result_dict(result)
        out["frame_shape"] = data["frame_shape"]
        return out

    def read_named(path):
        d = read(path)
        d["path"] = path
        return d

    def write(path, res):
        stem = movie_stem(path)
        ps = float(res["pixel_size_A"])
        outputs = {"sum": os.path.join(outdir, f"{stem}.mrc")}
        write_mrc(outputs["sum"], res["sum"], ps)
        if res.get("sum_dw") is not None:
            outputs["sum_dw"] = os.path.join(outdir, f"{stem}_DW.mrc")
            write_mrc(outputs["sum_dw"], res["sum_dw"], ps)
        if res.get("sum_odd") is not None:
            outputs["sum_odd"] = os.path.join(outdir, f"{stem}_ODD.mrc")
            outputs["sum_even"] = os.path.join(outdir, f"{stem}_EVN.mrc")
            write_mrc(outputs["sum_odd"], res["sum_odd"], ps)
            write_mrc(outputs["sum_even"], res["sum_even"], ps)
        if res.get("stack") is not None:
            outputs["stack"] = os.path.join(outdir, f"{stem}_aligned.mrcs")
            write_mrc(outputs["stack"], res["stack"], ps, is_stack=True)
        if res.get("psd") is not None:
            outputs["psd"] = os.path.join(outdir, f"{stem}_psd.mrc")
            write_mrc(outputs["psd"], res["psd"], ps)
        n_frames = int(np.asarray(res["shifts_px"]).shape[0])
        outputs["shifts"] = os.path.join(outdir, f"{stem}_shifts.star")
        write_star(outputs["shifts"], _star_blocks(path, res["frame_shape"], n_frames, first, res, args,
                                                  float(pixel_size), movie_frames=_movie_frames(path, args),
                                                  gain_name=gain_name))
        return {"movie": path, "status": "ok", "outputs": outputs,
                "shifts_px": np.round(np.asarray(res["shifts_px"]), 4).tolist(),
                "reference_frame": first + 1 + int(res["reference_frame"]),
                "local": res.get("bspline_coefficients") is not None,
                "pixel_size_A": ps, "warnings": res["warnings"],
                "timings_ms": {k: round(v, 2) for k, v in res["timings_ms"].items()}}

    if ctx.enabled:
        logger.info("rank %d of %d: %d movie(s)", ctx.rank, ctx.size, len(paths))
    bar = progress(total=len(paths), desc="movies", args=args if ctx.is_root else argparse.Namespace(quiet=True),
                   unit="movie")

    def on_result(item_result):
        bar.update(1)

    pipe = Pipeline(compute, read=read_named, write=write, setup=setup, devices=devices, read_workers=1,
                    workers_per_gpu=args.workers_per_gpu if on_gpu else 1, queue_depth=1, ordered=True,
                    pinned=False, on_result=on_result)
    with ctx.abort_on_error():
        try:
            run = pipe.run(paths)
        finally:
            bar.close()
        movies, lines = _movie_reports(run)
        parts = ctx.gather((movies, lines, run.summary(), run.wall_s))
    n_ok = ctx.bcast(sum(1 for p in parts for m in p[0] if m["status"] == "ok") if ctx.is_root else None)
    if not ctx.is_root:
        return 0 if n_ok > 0 else 1
    movies = [m for p in parts for m in p[0]]
    lines = [line for p in parts for line in p[1]]
    pipeline_wall = max(p[3] for p in parts)
    wall = time.perf_counter() - t_start
    summary = {"command": "align-movies", "device": [d.describe() for d in devices], "output_dir": outdir,
               "n_movies": len(all_paths), "n_ok": n_ok, "n_skipped": len(all_paths) - n_ok,
               "seconds": round(wall, 3), "pipeline_seconds": round(pipeline_wall, 3),
               "seconds_per_movie": round(pipeline_wall / max(n_ok, 1), 3), "pipeline": parts[0][2],
               "mpi_ranks": ctx.size, "movies": movies}
    if ctx.enabled:
        summary["rank_pipelines"] = [p[2] for p in parts]
    corrected = write_corrected_micrographs(os.path.join(outdir, "corrected_micrographs.star"), movies, args,
                                            float(pixel_size), first)
    if corrected:
        summary["corrected_micrographs"] = corrected
    lines.append(f"{n_ok} of {len(all_paths)} movie(s) aligned in {wall:.1f} s; outputs in {outdir}"
                 + (f" ({ctx.size} MPI ranks)" if ctx.enabled else ""))
    emit_result(args, summary, lines)
    return 0 if n_ok > 0 else 1


def _movie_reports(run) -> Tuple[List[dict], List[str]]:
    """Per-movie summaries and report lines of a pipeline run (skipped movies logged as warnings)."""
    movies = []
    lines = []
    for r in run:
        if r.ok:
            movies.append(r.value)
            shifts = np.asarray(r.value["shifts_px"])
            total = float(np.abs(np.diff(shifts, axis=0)).sum()) if len(shifts) > 1 else 0.0
            lines.append(f"{r.item}: ok, {len(shifts)} frames, path {total:.1f} px, reference frame "
                         f"{r.value['reference_frame']}{', local' if r.value['local'] else ''}")
        else:
            msg = f"{r.item}: skipped ({r.stage}): {r.error}"
            logger.warning("skipped %s", msg)
            movies.append({"movie": r.item, "status": "skipped", "stage": r.stage, "error": str(r.error)})
            lines.append(msg)
    return movies, lines


def _result_dict(res) -> dict:
    """Plain dict of a MovieAlignment (device arrays are copied back by the pipeline)."""
    out = {"sum": res.sum, "sum_dw": res.sum_dw, "sum_odd": res.sum_odd, "sum_even": res.sum_even,
           "stack": res.stack, "psd": res.psd, "shifts_px": res.shifts_px, "pixel_size_A": res.pixel_size_A,
           "binning": res.binning, "reference_frame": res.reference_frame, "timings_ms": res.timings_ms,
           "warnings": list(res.warnings), "patch_centres_px": None, "patch_shifts_px": None,
           "bspline_coefficients": None}
    if res.model is not None and res.local is not None:
        b = res.binning
        out["patch_centres_px"] = res.local.patch_centres_px * b
        out["patch_shifts_px"] = res.local.shifts_px * b
        out["bspline_coefficients"] = res.model.coefficients * b
        out["bspline_extent_px"] = (res.model.extent[0] * b, res.model.extent[1] * b)
    return out
