"""Movie alignment job: check a batch of movies and options, align them over the devices, write the outputs.

:class:`MovieJob` is what ``xmipp-accel align-movies`` runs (the command parses its arguments into
:class:`MovieJobSettings` and prints the :class:`MovieJobReport`). Everything that can be checked before
any work is checked when the job is made: the options (pixel size, dose...), the options against the
first readable movie (frame size, patch grid), the gain/dark/defect references against its frames,
unique output names and a writable output folder. Each movie is then checked again when it is read (a
movie of another size, too few frames), and a bad one is skipped with a message naming it.

Per movie, OUTDIR receives ``<name>.mrc`` (aligned sum), ``<name>_DW.mrc`` (dose weighted),
``<name>_ODD.mrc``/``<name>_EVN.mrc``, ``<name>_aligned.mrcs``, ``<name>_psd.mrc`` and the RELION motion
STAR ``<name>_shifts.star`` (:mod:`xmipp_accel.io.relion_motion`); :meth:`MovieJob.write_index` writes
``corrected_micrographs.star``. ``<name>`` is the movie's file name without extension, or, where two
movies would share outputs (``a/m.mrcs`` and ``c/m.mrcs``), the movie's path relative to the folder
common to all movies (``OUTDIR/a/m.mrc``, ``OUTDIR/c/m.mrc``), as RELION keeps the movies' folders.
"""
from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..em.ctf import CTF_DEFAULTS
from ..errors import InputError
from ..gpu.movie import AlignmentOptions, align_movie, fast_shape
from ..gpu.movie.apply import prepare_cpu_engine
from ..gpu.movie.flexalign import check_movie_options
from ..gpu.movie.preprocess import check_reference_shape, orient_reference
from ..gpu.runtime.mpi import MPIContext, mpi_context
from ..gpu.runtime.pipeline import Pipeline
from ..io.atomic import check_writable
from ..io.eer import DEFAULT_EER_FRACTIONS
from ..io.movie import (MovieInfo, movie_info, read_defects, read_movie_raw, read_reference,
                        upsample_eer_reference)
from ..io.mrc import write_mrc
from ..io.relion_motion import (BSplineMotion, MicrographEntry, MotionAcquisition, motion_star_blocks,
                                relion_defect_file, write_corrected_micrographs, write_motion_star)
from ..threads import available_memory_bytes, blas_threads, core_share, cpu_workers

__all__ = ["MovieJobSettings", "MovieJob", "MovieJobReport", "movie_stem", "output_names", "movie_report",
           "cpu_movie_workers", "CPU_MOVIE_FRAME_COPIES", "CPU_MOVIE_MEMORY_FRACTION"]

logger = logging.getLogger("xmipp_accel")

_STEM_EXTENSIONS = (".mrcs", ".mrc", ".st", ".tiff", ".tif", ".eer")
_INDEX_NAMES = ("corrected_micrographs.star", "gain_oriented.mrc")


def movie_stem(path: str) -> str:
    """File name without folder and movie extension."""
    base = os.path.basename(path)
    low = base.lower()
    for ext in _STEM_EXTENSIONS:
        if low.endswith(ext):
            return base[:-len(ext)]
    return os.path.splitext(base)[0]


@dataclass
class MovieJobSettings:
    """What a :class:`MovieJob` needs besides the movies and the output folder (units in the names).

    ``frame_range`` is 0-based ``(start, stop)`` (stop excluded, None = to the end) or None for all
    frames; ``pixel_size_A`` None takes it from the first movie's header; ``cpu_workers`` is the number of
    movies aligned side by side on the CPU (0: automatic, :func:`cpu_movie_workers`); ``alignment`` holds the other
    :class:`~xmipp_accel.gpu.movie.AlignmentOptions` fields (max_res_A, binning, local, patches_xy...).
    """
    pixel_size_A: Optional[float] = None
    frame_range: Optional[Tuple[int, Optional[int]]] = None
    dose_per_frame: Optional[float] = None
    pre_exposure: float = 0.0
    voltage_kV: float = CTF_DEFAULTS["voltage_kV"]
    cs_mm: float = CTF_DEFAULTS["cs_mm"]
    amplitude_contrast: float = CTF_DEFAULTS["amplitude_contrast"]
    absolute_paths: bool = False
    gain: Optional[str] = None
    dark: Optional[str] = None
    defects: Optional[str] = None
    gain_rot: int = 0
    gain_flip: int = 0
    read_threads: int = 8
    workers_per_gpu: int = 1
    cpu_workers: int = 0
    eer_fractions: int = DEFAULT_EER_FRACTIONS
    eer_upsampling: int = 1
    alignment: Dict[str, Any] = field(default_factory=dict)

    def reader_options(self) -> Dict[str, int]:
        """How EER movies are read (raw frames per fraction, 4K or 8K grid); ignored for other formats."""
        return {"eer_fractions": int(self.eer_fractions), "eer_upsampling": int(self.eer_upsampling)}

    def check(self) -> None:
        """Raise InputError naming the option when a value is out of range (before reading anything)."""
        if self.pixel_size_A is not None and not (self.pixel_size_A > 0 and np.isfinite(self.pixel_size_A)):
            raise InputError(f"--pixel-size must be a positive number of Å, got {self.pixel_size_A:g}")
        if self.read_threads < 1:
            raise InputError(f"--read-threads must be at least 1, got {self.read_threads}")
        if self.workers_per_gpu < 1:
            raise InputError(f"--workers-per-gpu must be at least 1, got {self.workers_per_gpu}")
        if self.cpu_workers < 0:
            raise InputError(f"--cpu-workers must be 0 (automatic) or at least 1, got {self.cpu_workers}")
        if self.eer_fractions < 1:
            raise InputError(f"--eer-fractions must be at least 1 raw frame per fraction, got {self.eer_fractions}")
        if self.eer_upsampling not in (1, 2):
            raise InputError(f"--eer-upsampling must be 1 (4K) or 2 (8K), got {self.eer_upsampling}")


def _output_files(name: str, options: AlignmentOptions) -> Dict[str, str]:
    """Output files of one movie (relative to OUTDIR) by kind, as the options make them."""
    out = {"sum": f"{name}.mrc", "shifts": f"{name}_shifts.star"}
    if options.dose_per_frame:
        out["sum_dw"] = f"{name}_DW.mrc"
    if options.odd_even:
        out["sum_odd"], out["sum_even"] = f"{name}_ODD.mrc", f"{name}_EVN.mrc"
    if options.save_stack:
        out["stack"] = f"{name}_aligned.mrcs"
    if options.psd_size:
        out["psd"] = f"{name}_psd.mrc"
    return out


def _clashes(names: Dict[str, str], options: AlignmentOptions) -> Dict[str, List[str]]:
    """Output file -> the movies that would write it, where more than one would (or an index file)."""
    owners: Dict[str, List[str]] = {n: ["(the batch's index)"] for n in _INDEX_NAMES}
    for path, name in names.items():
        for f in _output_files(name, options).values():
            owners.setdefault(os.path.normcase(f), []).append(path)
    return {f: who for f, who in owners.items() if len(who) > 1}


def output_names(paths: Sequence[str], options: AlignmentOptions) -> Dict[str, str]:
    """Unique output name (relative to OUTDIR, without suffix) of each movie.

    The file stem where no two movies' outputs clash; else every movie keeps its folder relative to the
    folder common to all movies. Raises InputError when the outputs still clash (a movie given twice, or
    ``m.mrcs`` beside ``m_DW.mrcs`` with dose weighting), naming the movies.
    """
    seen = set()
    for p in paths:
        key = os.path.normcase(os.path.realpath(p))
        if key in seen:
            raise InputError(f"{p} is given twice: movies would overwrite each other's outputs ("
                             f"{movie_stem(p)}.mrc...); give each movie once")
        seen.add(key)
    names = {p: movie_stem(p) for p in paths}
    if not _clashes(names, options):
        return names
    common = os.path.commonpath([os.path.dirname(p) for p in paths])
    names = {p: os.path.join(os.path.relpath(os.path.dirname(p), common), movie_stem(p)) for p in paths}
    names = {p: os.path.normpath(n) for p, n in names.items()}
    clashes = _clashes(names, options)
    if clashes:
        f, who = next(iter(clashes.items()))
        raise InputError(f"movies would overwrite each other's outputs: {' and '.join(who)} both write {f}; "
                         "give each movie once, or rename the movies so that their outputs differ")
    return names


#: Memory a CPU worker holds while it aligns one movie besides the movie's raw frames, in float32 frames of
#: the padded size: the spectra, the spectrum-sized buffer of the local correction and the temporaries
#: (measured, 1024² × 24 float32, 3 × 3 patches: 437 MB peak for one movie, ~100 MB of it the program,
#: 100 MB the raw frames: ~2.4 copies; 3 keeps a margin).
CPU_MOVIE_FRAME_COPIES = 3.0
#: Part of the available memory (:func:`~xmipp_accel.threads.available_memory_bytes`) the CPU workers may plan on.
CPU_MOVIE_MEMORY_FRACTION = 0.8


def cpu_movie_workers(requested: int, *, cores: int, n_movies: Optional[int], raw_bytes: int, frames_bytes: int,
                      available_bytes: Optional[int], waiting: int = 2) -> int:
    """Movies the CPU aligns side by side, each with ``cores // workers`` threads.

    One movie's serial parts (Python between the NumPy calls, the solvers, the reads) leave cores idle that
    a second movie fills; the results do not change (each movie's arithmetic does not depend on its thread
    count). ``requested`` > 0 is taken as it is; 0 (automatic) gives the most workers that (1) are at most
    ``cores``, (2) at most ``n_movies`` (None: unknown, ``--watch``), and (3) fit in
    :data:`CPU_MOVIE_MEMORY_FRACTION` of ``available_bytes`` (None: not bounded), a computing movie taking
    ``raw_bytes + CPU_MOVIE_FRAME_COPIES * frames_bytes`` (raw frames as stored; float32 padded frames) and
    each of the ``waiting`` other movies in flight (read ahead, being written) ``raw_bytes``. At least 1.
    """
    if requested > 0:
        return int(requested)
    n = max(1, int(cores))
    if n_movies is not None:
        n = min(n, max(1, int(n_movies)))
    if available_bytes is not None:
        per_movie = raw_bytes + CPU_MOVIE_FRAME_COPIES * frames_bytes
        budget = CPU_MOVIE_MEMORY_FRACTION * available_bytes - waiting * raw_bytes
        n = min(n, int(budget // max(per_movie, 1.0)))
    return max(1, n)


def _first_readable_info(paths: Sequence[str], reader: Dict[str, int]) -> Optional[MovieInfo]:
    for p in paths:
        try:
            return movie_info(p, **reader)
        except InputError:
            continue
    return None


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


@dataclass
class MovieJobReport:
    """What :meth:`MovieJob.align` returns: per-movie summaries (input order) and report lines.

    On MPI ranks other than 0 only ``n_ok`` is set (``movies`` and ``lines`` are empty).
    """
    movies: List[dict]
    lines: List[str]
    n_ok: int
    n_movies: int
    wall_s: float
    pipeline_wall_s: float
    pipelines: List[dict]
    output_dir: str
    ranks: int = 1

    def summary(self, devices: Sequence[Any]) -> dict:
        """The JSON summary of the run (``--json``)."""
        out = {"device": [d.describe() for d in devices], "output_dir": self.output_dir,
               "n_movies": self.n_movies, "n_ok": self.n_ok, "n_skipped": self.n_movies - self.n_ok,
               "seconds": round(self.wall_s, 3), "pipeline_seconds": round(self.pipeline_wall_s, 3),
               "seconds_per_movie": round(self.pipeline_wall_s / max(self.n_ok, 1), 3),
               "pipeline": self.pipelines[0] if self.pipelines else {}, "mpi_ranks": self.ranks,
               "movies": self.movies}
        if self.ranks > 1:
            out["rank_pipelines"] = self.pipelines
        return out


class MovieJob:
    """A batch of movies to align, checked before any work (see the module docstring).

    Parameters
    ----------
    movies : sequence of str
        Movie files (MRC/MRCS/ST/TIFF).
    output_dir : str
        Output folder (created when the job runs, not before).
    settings : MovieJobSettings

    Raises
    ------
    InputError
        Bad option, no readable movie, options the first movie cannot take, references of another size,
        clashing output names, output folder not writable.
    """

    def __init__(self, movies: Sequence[str], output_dir: str, settings: MovieJobSettings):
        self.paths = [os.path.abspath(p) for p in movies]
        if not self.paths:
            raise InputError("no movies given")
        self.output_dir = os.path.abspath(output_dir)
        self.settings = settings
        settings.check()
        check_writable(self.output_dir)
        self.first_info = _first_readable_info(self.paths, settings.reader_options())
        if self.first_info is None:
            raise InputError(f"none of the {len(self.paths)} movie(s) can be read (first: {self.paths[0]}); "
                             "check the paths and formats")
        pixel_size = settings.pixel_size_A or self.first_info.pixel_size_A
        if not pixel_size:
            raise InputError(f"{self.first_info.path} has no pixel size in its header: give --pixel-size (Å)")
        self.pixel_size_A = float(pixel_size)
        self.first_frame = settings.frame_range[0] if settings.frame_range else 0
        self._cpu_share: Optional[Callable[[], int]] = None   # threads of a CPU worker when several (pipeline)
        self._cpu_active = 0                                   # CPU workers aligning a movie now
        self._cpu_lock = threading.Lock()
        self.options = self._alignment_options()
        check_movie_options(self.options, self.first_info.frame_shape, name=self.first_info.path)
        self.names = output_names(self.paths, self.options)
        self.references = self._references(self.first_info.frame_shape)
        self.acquisition = MotionAcquisition(
            pixel_size_A=self.pixel_size_A, voltage_kV=float(settings.voltage_kV),
            dose_per_frame=settings.dose_per_frame, pre_exposure=float(settings.pre_exposure),
            gain_name=self._gain_name(), defect_file=relion_defect_file(settings.defects),
            cs_mm=float(settings.cs_mm), amplitude_contrast=float(settings.amplitude_contrast),
            absolute_paths=bool(settings.absolute_paths))

    # ------------------------------------------------------------------------------------------ setup
    def _alignment_options(self) -> AlignmentOptions:
        s = self.settings
        pre = float(s.pre_exposure)
        if s.dose_per_frame:
            pre += self.first_frame * float(s.dose_per_frame)  # frames left out at the start were exposed too
        opts = AlignmentOptions(pixel_size_A=self.pixel_size_A, dose_per_frame=s.dose_per_frame, pre_exposure=pre,
                                voltage_kV=float(s.voltage_kV), **s.alignment)
        opts.validate()
        return opts

    def _references(self, frame_shape) -> Dict[str, Optional[np.ndarray]]:
        """Gain, dark (oriented) and defect mask on the host, checked against the frame shape."""
        s = self.settings
        refs: Dict[str, Optional[np.ndarray]] = {"gain": None, "dark": None, "defects": None}
        for key, path in (("gain", s.gain), ("dark", s.dark)):
            if path:
                img = orient_reference(read_reference(path, what=key), rotation=s.gain_rot, flip=s.gain_flip)
                if s.eer_upsampling == 2:
                    img = upsample_eer_reference(img, frame_shape)
                check_reference_shape(img.shape, frame_shape, what=f"{key} reference", path=path)
                refs[key] = img
        if s.defects:
            refs["defects"] = read_defects(s.defects, frame_shape)
        return refs

    def _gain_name(self) -> Optional[str]:
        """The gain named in the motion STAR: --gain itself, or (rotated/flipped) OUTDIR/gain_oriented.mrc,
        written by :meth:`align` (RELION applies rlnMicrographGainName as it is)."""
        s = self.settings
        if not s.gain:
            return None
        if not s.gain_rot and not s.gain_flip:
            return os.path.abspath(s.gain)
        return os.path.join(self.output_dir, "gain_oriented.mrc")

    def outputs(self, path: str) -> Dict[str, str]:
        """Absolute output files of one movie, by kind (sum, sum_dw, sum_odd, sum_even, stack, psd, shifts)."""
        return {k: os.path.join(self.output_dir, f) for k, f in _output_files(self.names[path], self.options).items()}

    # ------------------------------------------------------------------------------------------ stages
    def _check_movie(self, info: MovieInfo) -> Tuple[int, int]:
        """0-based (start, stop) frames of a movie, after checking it against the options and references."""
        first = self.first_info
        if info.frame_shape != first.frame_shape:
            if any(v is not None for v in self.references.values()):
                raise InputError(f"{info.path} has frames of {info.nx} x {info.ny} pixels but the gain/dark/defect "
                                 f"references are {first.nx} x {first.ny}")
            check_movie_options(self.options, info.frame_shape, name=info.path)
        start, stop = self._frame_span(info.n_frames)
        if stop > info.n_frames:
            raise InputError(f"{info.path} has {info.n_frames} frames; --frames asks for frames up to {stop}")
        return start, stop

    def _frame_span(self, n_frames: int) -> Tuple[int, int]:
        """``--frames`` as 0-based ``(start, stop)`` (stop excluded) for a movie of ``n_frames`` frames: the
        end defaults to the movie's; a stop beyond it is returned as it is (the caller refuses or clips)."""
        start, stop = self.settings.frame_range or (0, None)
        return int(start), int(n_frames if stop is None else stop)

    def _read(self, path: str, alloc: Callable[..., np.ndarray]) -> dict:
        """Read a movie's frames in their stored dtype into a buffer of the pipeline (pinned on GPUs)."""
        t0 = time.perf_counter()
        info = movie_info(path, **self.settings.reader_options())
        start, stop = self._check_movie(info)
        dtype = info.dtype.newbyteorder("=") if info.format == "mrc" else info.dtype
        out = alloc((stop - start, info.ny, info.nx), dtype)
        raw = read_movie_raw(path, (start, stop), out=out, workers=self.settings.read_threads, info=info)
        return {"raw": raw, "path": path, "frame_shape": info.frame_shape, "movie_frames": info.n_frames,
                "eer": info.format == "eer",
                "read_ms": 1e3 * (time.perf_counter() - t0)}

    @staticmethod
    def _setup_refs(refs, interpolation: Optional[str] = None):
        """Each compute worker's set-up: the references on its device; on the CPU, with local alignment
        (``interpolation`` given), the compiled interpolation loaded while the first movie is read."""
        def setup(ctx):
            if interpolation is not None and not ctx.is_gpu:
                prepare_cpu_engine(interpolation)
            return {k: (None if v is None else ctx.xp.asarray(v)) for k, v in refs.items()}
        return setup

    def _compute(self, data: dict, ctx) -> dict:
        t0 = time.perf_counter()
        raw = data.pop("raw")  # the pipeline keeps `data`: drop its reference so device memory can be freed
        with self._cpu_worker_share(ctx):
            result = align_movie(raw, self.options, gain=ctx.state["gain"], dark=ctx.state["dark"],
                                 defect_mask=ctx.state["defects"], name=data["path"])
        del raw
        if ctx.is_gpu:
            ctx.stream.synchronize()  # the pipeline waits here too: the time is the movie's
        out = _result_dict(result)
        out["compute_ms"] = 1e3 * (time.perf_counter() - t0)
        out["frame_shape"] = data["frame_shape"]
        out["movie_frames"] = data["movie_frames"]
        out["eer"] = data.get("eer", False)
        out["read_ms"] = data["read_ms"]
        return out

    @contextlib.contextmanager
    def _cpu_worker_share(self, ctx):
        """Around one movie of one of several CPU workers: counted as being aligned, its stages limited to
        their share of the cores, BLAS at one thread (held while any of them runs); else nothing."""
        share = None if ctx.is_gpu else self._cpu_share
        if share is None:
            yield
            return
        with self._cpu_lock:
            self._cpu_active += 1
        try:
            with core_share(share), blas_threads(1):
                yield
        finally:
            with self._cpu_lock:
                self._cpu_active -= 1

    def _write(self, path: str, res: dict) -> dict:
        t0 = time.perf_counter()
        ps = float(res["pixel_size_A"])
        files = self.outputs(path)
        written = {}
        for kind in ("sum", "sum_dw", "sum_odd", "sum_even", "stack", "psd"):
            if kind in files and res.get(kind) is not None:
                write_mrc(files[kind], res[kind], ps, **({"is_stack": True} if kind == "stack" else {}))
                written[kind] = files[kind]
        bspline = None
        if res.get("bspline_coefficients") is not None:
            bspline = BSplineMotion(res["bspline_coefficients"], res["bspline_extent_px"],
                                    self.first_frame + 1 + int(res["reference_frame"]))
        blocks = motion_star_blocks(path, res["frame_shape"], res["movie_frames"], self.first_frame,
                                    res["shifts_px"], self.acquisition, binning=float(res["binning"]),
                                    patch_centres_px=res.get("patch_centres_px"),
                                    patch_shifts_px=res.get("patch_shifts_px"), bspline=bspline,
                                    eer=(self.settings.eer_fractions, self.settings.eer_upsampling)
                                    if res.get("eer") else None)
        written["shifts"] = write_motion_star(files["shifts"], blocks)
        return {"movie": path, "status": "ok", "outputs": written,
                "shifts_px": np.round(np.asarray(res["shifts_px"]), 4).tolist(),
                "reference_frame": self.first_frame + 1 + int(res["reference_frame"]),
                "local": bspline is not None, "pixel_size_A": ps, "warnings": res["warnings"],
                "timings_ms": {k: round(v, 2) for k, v in res["timings_ms"].items()},
                "read_ms": round(res["read_ms"], 2), "compute_ms": round(res["compute_ms"], 2),
                "write_ms": round(1e3 * (time.perf_counter() - t0), 2)}

    # ------------------------------------------------------------------------------------------ run
    def add_movie(self, path: str, name: str) -> None:
        """Add a movie after the job was made (``--watch``: movies arrive while the job runs), with the
        output name ``name`` (relative to OUTDIR, without suffix); checked when it is read."""
        path = os.path.abspath(path)
        if path not in self.names:
            self.paths.append(path)
        self.names[path] = name

    def prepare_output(self) -> None:
        """Create OUTDIR and write OUTDIR/gain_oriented.mrc where the motion STAR files name it."""
        os.makedirs(self.output_dir, exist_ok=True)
        gain_name = self.acquisition.gain_name
        if gain_name and gain_name.startswith(self.output_dir + os.sep):
            write_mrc(gain_name, np.asarray(self.references["gain"], dtype=np.float32), None)

    def cpu_workers(self, n_movies: Optional[int] = None) -> int:
        """Movies aligned side by side on the CPU (:func:`cpu_movie_workers`; ``--cpu-workers``, 0: as the
        cores, ``n_movies`` (None: unknown) and the memory allow, judged on the first movie's size)."""
        info = self.first_info
        start, stop = self._frame_span(info.n_frames)
        frames = max(1, min(stop, info.n_frames) - start)
        py, px = fast_shape(info.frame_shape)
        raw_bytes = frames * info.ny * info.nx * np.dtype(info.dtype).itemsize
        return cpu_movie_workers(self.settings.cpu_workers, cores=cpu_workers(), n_movies=n_movies,
                                 raw_bytes=raw_bytes, frames_bytes=frames * py * px * 4,
                                 available_bytes=available_memory_bytes())

    def pipeline(self, devices: Sequence[Any], *, on_result: Optional[Callable] = None,
                 ordered: bool = True, n_movies: Optional[int] = None) -> Pipeline:
        """The :class:`~xmipp_accel.gpu.runtime.pipeline.Pipeline` aligning this job's movies: one reader,
        one compute worker per GPU (``workers_per_gpu`` each; their ``setup`` uploads the references once),
        one writer; ``Pipeline.run(paths)`` takes the movie paths (a generator is consumed as room allows).

        Without GPUs, :meth:`cpu_workers` ``(n_movies)`` NumPy workers; with more than one, each movie's
        stages take ``cores // movies being aligned`` threads (:func:`~xmipp_accel.threads.core_share`,
        asked stage by stage: the last movie of a batch gets all the cores once the others are done), BLAS
        is held at one thread (the results do not depend on the count of workers or threads), and no movie
        waits in their queue beyond the one read ahead (memory: ``workers + 2`` movies in flight)."""
        on_gpu = any(d.is_gpu for d in devices)
        n_cpu = 1 if on_gpu else self.cpu_workers(n_movies)
        self._cpu_share = None
        if n_cpu > 1:
            cores = cpu_workers()
            self._cpu_share = lambda: max(1, cores // max(1, self._cpu_active))
            logger.info("aligning up to %d movies side by side on the CPU (%d cores)", n_cpu, cores)
        interpolation = self.options.local_interpolation if self.options.local else None
        return Pipeline(self._compute, read=self._read, write=self._write,
                        setup=self._setup_refs(self.references, interpolation),
                        devices=devices, cpu_workers=0 if on_gpu else n_cpu, read_workers=1,
                        queue_depth=1 if n_cpu == 1 else 0, ordered=ordered, pinned=True,
                        workers_per_gpu=self.settings.workers_per_gpu if on_gpu else 1, on_result=on_result,
                        on_error=_reported_by_movie_report)

    def align(self, devices: Sequence[Any], *, ctx: Optional[MPIContext] = None,
              on_result: Optional[Callable] = None) -> MovieJobReport:
        """Align this rank's share of the movies on ``devices`` and write their outputs.

        Parameters
        ----------
        devices : sequence of :class:`~xmipp_accel.backend.Device`
            One compute worker per GPU (``workers_per_gpu`` each), or CPU workers (:meth:`cpu_workers`).
        ctx : MPIContext, optional
            Under MPI the movies are split in contiguous blocks over the ranks and the summaries gathered on
            rank 0 (input order); default: this process's context.
        on_result : callable ``(ItemResult) -> None``, optional
            Called after each movie (progress bars).
        """
        t0 = time.perf_counter()
        ctx = ctx or mpi_context()
        if ctx.is_root:
            self.prepare_output()
        else:
            os.makedirs(self.output_dir, exist_ok=True)
        paths = self.paths[ctx.split(len(self.paths))]        # this rank's movies (all of them without MPI)
        logger.info("aligning %d movie(s) on %s", len(paths), ", ".join(d.describe() for d in devices))
        if ctx.enabled:
            logger.info("rank %d of %d: %d movie(s)", ctx.rank, ctx.size, len(paths))
        pipe = self.pipeline(devices, on_result=on_result, n_movies=len(paths))
        with ctx.abort_on_error():
            run = pipe.run(paths)
            movies, lines = _movie_reports(run)
            parts = ctx.gather((movies, lines, run.summary(), run.wall_s))
        n_ok = ctx.bcast(sum(1 for p in parts for m in p[0] if m["status"] == "ok") if ctx.is_root else None)
        wall = time.perf_counter() - t0
        if not ctx.is_root:
            return MovieJobReport([], [], n_ok, len(self.paths), wall, run.wall_s, [run.summary()], self.output_dir,
                                  ctx.size)
        return MovieJobReport([m for p in parts for m in p[0]], [line for p in parts for line in p[1]], n_ok,
                              len(self.paths), wall, max(p[3] for p in parts), [p[2] for p in parts],
                              self.output_dir, ctx.size)

    def write_index(self, movies: Sequence[dict]) -> Optional[str]:
        """Write OUTDIR/corrected_micrographs.star of the aligned movies (RELION's motion correction index).

        ``movies`` are the summaries of :meth:`align` (``MovieJobReport.movies``). Returns the path, or None
        when no movie was aligned.
        """
        ok = [m for m in movies if m.get("status") == "ok"]
        entries = [MicrographEntry(sum=m["outputs"]["sum"], motion_star=m["outputs"]["shifts"],
                                   shifts_px=np.asarray(m["shifts_px"]), sum_dw=m["outputs"].get("sum_dw"))
                   for m in ok]
        if not entries:
            return None
        return write_corrected_micrographs(os.path.join(self.output_dir, "corrected_micrographs.star"), entries,
                                           self.acquisition, micrograph_pixel_size_A=float(ok[0]["pixel_size_A"]),
                                           first_frame=self.first_frame)


def _reported_by_movie_report(_result) -> None:
    """The pipeline's ``on_error``: a failed movie is logged once, by :func:`movie_report`."""


def movie_report(r) -> Tuple[dict, str]:
    """Summary and report line of one movie's :class:`~xmipp_accel.gpu.runtime.pipeline.ItemResult`
    (a skipped movie is logged as a warning naming it)."""
    if r.ok:
        shifts = np.asarray(r.value["shifts_px"])
        total = float(np.abs(np.diff(shifts, axis=0)).sum()) if len(shifts) > 1 else 0.0
        return r.value, (f"{r.item}: ok, {len(shifts)} frames, path {total:.1f} px, reference frame "
                         f"{r.value['reference_frame']}{', local' if r.value['local'] else ''}")
    msg = f"{r.item}: skipped ({r.stage}): {r.error}"
    logger.warning("skipped %s", msg)
    return {"movie": r.item, "status": "skipped", "stage": r.stage, "error": str(r.error)}, msg


def _movie_reports(run) -> Tuple[List[dict], List[str]]:
    """Per-movie summaries and report lines of a pipeline run (skipped movies logged as warnings)."""
    pairs = [movie_report(r) for r in run]
    return [p[0] for p in pairs], [p[1] for p in pairs]
