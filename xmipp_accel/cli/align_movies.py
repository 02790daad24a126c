"""Align movies (FlexAlign: global + local B-spline motion) and write aligned, dose-weighted sums.

For every movie, OUTDIR receives ``<stem>.mrc`` (aligned sum), ``<stem>_DW.mrc`` (dose weighted, with
--dose-per-frame), ``<stem>_shifts.star`` (RELION motion-correction STAR: data_general,
data_global_shift in pixels of the input movie with MotionCor2's sign, data_local_shift with the patch
measurements and our B-spline model in data_xmipp_accel_bspline*), ``<stem>_psd.mrc`` (power spectrum
of the sum), and with --odd-even ``<stem>_ODD.mrc``/``<stem>_EVN.mrc`` (frames 1, 3, 5... / 2, 4,
6...), with --save-stack ``<stem>_aligned.mrcs``; OUTDIR/corrected_micrographs.star lists the sums and
their motion STAR files as RELION's motion correction does (the input of RELION's Bayesian polishing).
``<stem>`` is the movie's file name without extension; where two movies would write the same outputs
(``a/m.mrcs`` and ``c/m.mrcs``) every movie keeps its folder relative to the folder common to all movies
(``OUTDIR/a/m.mrc``, ``OUTDIR/c/m.mrc``). Reading the next movie overlaps the GPU work on the current one;
one worker per GPU in --gpus.

Options are checked before any work: against the first readable movie (frame size, --patches grid, both
with the limit in the message), the gain/dark/defect references, unique outputs and a writable OUTDIR
(exit status 2 with a message). A movie that cannot be read, has another size that the options do not fit,
too few frames, NaNs or no signal is skipped with a warning naming it, and the batch goes on. The work is
done by :class:`xmipp_accel.jobs.movies.MovieJob`; this module parses the options and prints the report.

Example usage::

    xmipp-accel align-movies movies/*.tiff -o aligned --pixel-size 0.83 --gain gain.mrc \\
        --dose-per-frame 1.2 --voltage 300 --json
    xmipp-accel align-movies m.mrcs -o out --patches 5x5 --frames 2:40 --bin 2 --gpus 0,1
    xmipp-accel align-movies m.mrc -o out --no-local --max-res 20 --odd-even --device cpu
    mpirun -np 4 xmipp-accel align-movies movies/*.tiff -o aligned --gpus 0,1,2,3 --json

With ``--watch INDIR`` (instead of MOVIE arguments) the command aligns each movie that lands in INDIR
(``--watch-pattern``) once it is complete (size and mtime unchanged for ``--watch-settle`` s, the data its
MRC header or TIFF/EER page directories announce all there), in one process with one worker per GPU set up
once; after each movie it appends a line to OUTDIR/watch_done.jsonl and writes a new
OUTDIR/corrected_micrographs.star (whole, then renamed). It ends after ``--watch-timeout`` s without a new
movie, or on Ctrl-C/SIGTERM once the movies already read are written (exit status 0); run again on the same
OUTDIR it skips the movies done before. A corrupt movie is named in a warning, recorded as failed and the
watch goes on (:mod:`xmipp_accel.jobs.watch`)::

    xmipp-accel align-movies --watch /data/session1 --watch-pattern "*.tiff" -o aligned --pixel-size 0.83 \\
        --dose-per-frame 1.2 --gpus 0,1 --watch-timeout 3600

Under mpirun the movies are split across the ranks (contiguous blocks in the given order), each rank
aligns its movies on its own GPU (``--gpus`` cycled over the ranks of a host) and writes their outputs,
and rank 0 gathers the per-movie summaries (input order) and prints the report and ``--json``. A bad
movie is skipped with a warning on the rank that met it; any other failure on a rank aborts the job.
"""
from __future__ import annotations

import argparse
import logging
from typing import Optional, Tuple

from ..em.ctf import CTF_DEFAULTS
from ..errors import InputError
from .common import add_common_args, add_path_args, emit_result, progress, rank_devices

logger = logging.getLogger("xmipp_accel")


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
    parser.add_argument("movies", nargs="*", metavar="MOVIE",
                        help="movie files (or --watch INDIR): MRC/MRCS (modes 0, 1, 2, 6, 12 and 101 = 4-bit packed), "
                             "TIFF (none, LZW, "
                             "deflate; read upside down as RELION, IMOD and MotionCor2 do) or EER")
    parser.add_argument("-o", "--output-dir", required=True, help="output folder (created if missing)")
    g = parser.add_argument_group("acquisition")
    g.add_argument("--pixel-size", type=float, default=None,
                   help="pixel size of the movies in Å (default: from the MRC header)")
    g.add_argument("--dose-per-frame", type=float, default=None,
                   help="exposure per frame in e/Å²; gives the dose-weighted sum <stem>_DW.mrc")
    g.add_argument("--pre-exposure", type=float, default=0.0, help="exposure before the first frame, e/Å² (0)")
    g.add_argument("--voltage", type=float, default=CTF_DEFAULTS["voltage_kV"],
                   help="acceleration voltage in kV (%(default)s)")
    g.add_argument("--cs", type=float, default=CTF_DEFAULTS["cs_mm"],
                   help="spherical aberration in mm, for the optics of corrected_micrographs.star (%(default)s)")
    g.add_argument("--amplitude-contrast", type=float, default=CTF_DEFAULTS["amplitude_contrast"],
                   help="amplitude contrast, for the optics of corrected_micrographs.star (%(default)s)")
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
    g.add_argument("--polish-bfactor", type=float, default=450.0,
                   help="B-factor in Å² of the high-resolution polish of the global shifts (each frame against "
                        "the sum of the others, weight exp(-B k²/4)); 0: off (%(default)s)")
    g.add_argument("--no-local", dest="local", action="store_false", help="global alignment only")
    g.add_argument("--interpolation", choices=("keys", "linear"), default="keys",
                   help="resampling of the frames along the local shifts: Keys cubic (16 taps) or bilinear "
                        "(4 taps, as RELION's own motion correction: ~3x cheaper on the CPU, a little more "
                        "blur; the shifts do not change) (default: %(default)s)")
    g = parser.add_argument_group("outputs")
    g.add_argument("--odd-even", action="store_true", help="also write <stem>_ODD.mrc and <stem>_EVN.mrc")
    g.add_argument("--save-stack", action="store_true", help="also write the aligned frames <stem>_aligned.mrcs")
    g.add_argument("--psd-size", type=int, default=512, help="power spectrum size in pixels (0: none)")
    g.add_argument("--read-threads", type=int, default=8, help="threads reading one movie (%(default)s)")
    g.add_argument("--workers-per-gpu", type=int, default=1,
                   help="movies aligned at once on each GPU, each on its own stream (%(default)s). Measured on an "
                        "H100 with 4096² x 40 movies (run F): 2 is 1.8x slower than 1 (0.94 vs 0.49 s per movie; "
                        "one movie's kernels already fill the GPU), so keep 1 unless your movies are small")
    g.add_argument("--cpu-workers", type=int, default=0,
                   help="with --device cpu: movies aligned at once, each with its share of the cores (0, the "
                        "default: as many as the cores, the movies and the available memory allow; 1: one movie "
                        "at a time on all the cores); the results are the same")
    g = parser.add_argument_group("watched folder", "align each movie that lands in INDIR once it is complete, "
                                  "with one resident worker per GPU; a restart skips the movies done before")
    g.add_argument("--watch", metavar="INDIR", default=None,
                   help="watch this folder instead of taking MOVIE arguments (see the command's description)")
    g.add_argument("--watch-pattern", action="append", default=None, metavar="GLOB",
                   help="movie files to take (file name, or path below INDIR if it has a /; repeat for several; "
                        "default: *.mrc *.mrcs *.st *.tif *.tiff *.eer)")
    g.add_argument("--watch-settle", type=float, default=3.0, metavar="SECONDS",
                   help="a movie is complete once its size and mtime have not changed for this long (%(default)s)")
    g.add_argument("--watch-timeout", type=float, default=None, metavar="SECONDS",
                   help="end after this long without a new or growing movie (default: until Ctrl-C/SIGTERM)")
    g.add_argument("--watch-recursive", action="store_true",
                   help="also watch the subfolders (e.g. EPU's GridSquare_*/Data); outputs keep their folders")
    g.add_argument("--watch-rescan", type=float, default=30.0, metavar="SECONDS",
                   help="safety scan interval (%(default)s): files written into a network mount by another "
                        "machine raise no file event here and are found by this scan")
    add_path_args(parser, datadir=False)
    add_common_args(parser)


def job_settings(args: argparse.Namespace):
    """The :class:`~xmipp_accel.jobs.movies.MovieJobSettings` of the command line (parsing only)."""
    from ..jobs.movies import MovieJobSettings
    alignment = dict(max_res_A=args.max_res, max_shift_A=args.max_shift, binning=args.bin, local=args.local,
                     local_interpolation=args.interpolation,
                     patches_xy=_grid(args.patches, 2, "--patches") if args.patches else None,
                     control_points=_grid(args.control_points, 3, "--control-points") if args.control_points
                     else None, odd_even=args.odd_even, save_stack=args.save_stack, psd_size=args.psd_size,
                     hot_pixel_sigma=args.hot_pixel_sigma, polish_bfactor_A2=args.polish_bfactor)
    return MovieJobSettings(pixel_size_A=args.pixel_size, frame_range=parse_frame_range(args.frames),
                            dose_per_frame=args.dose_per_frame, pre_exposure=args.pre_exposure,
                            voltage_kV=args.voltage, cs_mm=args.cs, amplitude_contrast=args.amplitude_contrast,
                            absolute_paths=args.absolute_paths, gain=args.gain, dark=args.dark, defects=args.defects,
                            gain_rot=args.gain_rot, gain_flip=args.gain_flip, read_threads=args.read_threads,
                            workers_per_gpu=args.workers_per_gpu, cpu_workers=args.cpu_workers,
                            eer_fractions=args.eer_fractions,
                            eer_upsampling=args.eer_upsampling, alignment=alignment)


def main(args: argparse.Namespace) -> int:
    from ..gpu.runtime.mpi import mpi_context
    from ..jobs.movies import MovieJob

    if args.watch is not None:
        return watch_main(args)
    if not args.movies:
        raise InputError("give the movie files, or --watch INDIR to align the movies arriving in a folder")

    job = MovieJob(args.movies, args.output_dir, job_settings(args))     # every check before any work
    ctx = mpi_context()
    devices = rank_devices(args, ctx)
    bar = progress(total=len(job.paths) if not ctx.enabled else None, desc="movies", unit="movie",
                   args=args if ctx.is_root else argparse.Namespace(quiet=True))
    try:
        report = job.align(devices, ctx=ctx, on_result=lambda _: bar.update(1))
    finally:
        bar.close()
    if not ctx.is_root:
        return 0 if report.n_ok > 0 else 1
    summary = {"command": "align-movies", **report.summary(devices)}
    corrected = job.write_index(report.movies)
    if corrected:
        summary["corrected_micrographs"] = corrected
    lines = report.lines + [f"{report.n_ok} of {report.n_movies} movie(s) aligned in {report.wall_s:.1f} s; "
                            f"outputs in {job.output_dir}" + (f" ({ctx.size} MPI ranks)" if ctx.enabled else "")]
    emit_result(args, summary, lines)
    return 0 if report.n_ok > 0 else 1


def watch_options(args: argparse.Namespace):
    """The :class:`~xmipp_accel.jobs.watch.WatchOptions` of the command line."""
    from ..io.folder_watch import MOVIE_PATTERNS
    from ..jobs.watch import WatchOptions
    return WatchOptions(folder=args.watch, patterns=tuple(args.watch_pattern or MOVIE_PATTERNS),
                        settle_s=args.watch_settle, timeout_s=args.watch_timeout, recursive=args.watch_recursive,
                        rescan_s=args.watch_rescan)


def watch_main(args: argparse.Namespace) -> int:
    """``--watch INDIR``: align the movies arriving in INDIR until --watch-timeout or SIGINT/SIGTERM."""
    import signal
    import threading

    from ..gpu.runtime.mpi import mpi_context
    from ..jobs.watch import WatchJob

    if args.movies:
        raise InputError(f"give either MOVIE files or --watch {args.watch}, not both")
    if mpi_context().enabled:
        raise InputError("--watch runs one process with one worker per GPU: use --gpus 0,1,... without mpirun")
    job = WatchJob(args.output_dir, job_settings(args), watch_options(args))   # every check before any work
    devices = rank_devices(args, mpi_context())
    bar = progress(desc="movies", unit="movie", args=args)

    def on_signal(signum, _frame):
        logger.warning("%s: finishing the movies already read, then stopping (again to abort)",
                       signal.Signals(signum).name)
        signal.signal(signum, signal.SIG_DFL)
        job.stop()

    main_thread = threading.current_thread() is threading.main_thread()   # signals can be caught only there
    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)} if main_thread else {}
    try:
        report = job.run(devices, on_result=lambda _: bar.update(1))
    finally:
        bar.close()
        for s, handler in old.items():
            signal.signal(s, handler)
    summary = {"command": "align-movies", **report.summary(devices)}
    lines = report.lines + [f"{report.n_ok} movie(s) aligned, {report.n_failed} skipped, {report.n_previous} done "
                            f"before, in {report.wall_s:.1f} s (ended by {report.ended_by}); outputs in "
                            f"{report.output_dir}"]
    emit_result(args, summary, lines)
    return 0 if report.n_failed == 0 or report.n_ok > 0 else 1
