"""FlexAlign movie alignment (global + local) in streaming (``xmipp-accel align-movies``).

The protocol follows pwem's :class:`ProtAlignMovies` (legacy streaming engine: new movies are
picked up from the input set while it grows, outputs are updated and closed at the end). Instead of
one step per movie, movies that arrive together are grouped into batches (at most ``moviesPerBatch``
and spread over the worker threads), so that one ``xmipp-accel`` process amortises its start-up
(imports, FFT plans, kernel compilation) over several movies.

With *Resident worker* (expert), one ``xmipp-accel align-movies --watch`` process per protocol run aligns
every batch instead (one worker per GPU of the protocol's list, set up once): a batch step links its movies
into the worker's watched folder, waits for the worker's done-list to list them and collects the outputs.
The worker ends when the protocol's output is closed (SIGTERM), or after ``RESIDENT_IDLE_S`` without
movies; the next batch starts it again (it skips what its done-list holds), as it does after a crash.
"""
from __future__ import annotations

import json
import math
import os
import shlex
import shutil
import subprocess
import threading
import time

import pyworkflow.protocol.params as params
import pyworkflow.utils as pwutils
from pyworkflow import SCIPION_DEBUG_NOCLEAN
from pyworkflow.protocol.constants import LEVEL_ADVANCED

import pwem.objects as emobj
from pwem.protocols import ProtAlignMovies

from .. import Plugin
from .. import constants as c
from . import convert
from .protocol_base import GPU_PLACEHOLDER, XmippAccelProtBase

READABLE_MOVIES = (".mrc", ".mrcs", ".tif", ".tiff")
COMPRESSED = (".bz2", ".tbz", ".txt")
#: Seconds without a movie after which the resident worker exits (the next batch starts it again).
RESIDENT_IDLE_S = 120
#: Times a batch starts the resident worker again when it exited before aligning the batch's movies.
RESIDENT_RESTARTS = 3
_WORKER_LOCK = threading.Lock()   # batch steps run in threads of one process


class XmippAccelProtMovieAlign(XmippAccelProtBase, ProtAlignMovies):
    """Align the frames of movies with FlexAlign on the GPU: global shifts from all frame pairs, then
    local (patch) shifts modelled by a cubic B-spline in space and time; aligned sums with and
    without dose weighting, PSD and shift plot per movie. Works in streaming.
    """
    _label = "movie alignment FlexAlign (GPU)"
    _possibleOutputs = {"outputMicrographs": emobj.SetOfMicrographs,
                        "outputMicrographsDoseWeighted": emobj.SetOfMicrographs,
                        "outputMicrographsOdd": emobj.SetOfMicrographs,
                        "outputMicrographsEven": emobj.SetOfMicrographs,
                        "outputMovies": emobj.SetOfMovies}
    evenOddCapable = True

    # -------------------------- DEFINE param functions -----------------------
    def _defineAlignmentParams(self, form):
        self._defineGpuParams(form)
        group = form.addGroup("Alignment")
        line = group.addLine("Frames to align and sum",
                             help="Frame range used (the first frame is 1; 0 as the last frame means up to "
                                  "the last frame of the movie). The same range is aligned and summed.")
        line.addParam("alignFrame0", params.IntParam, default=1, label="from")
        line.addParam("alignFrameN", params.IntParam, default=0, label="to")
        group.addParam("binFactor", params.FloatParam, default=1.0,
                       label="Binning factor",
                       help="Fourier binning of the output micrographs (1 = none; fractional values such as "
                            "1.5 are allowed). Shifts are always reported in pixels of the input movie.")
        group.addParam("maxShift", params.FloatParam, default=0.0,
                       label="Maximum shift (Å)",
                       help="Largest drift searched between frames, in Å; 0 uses the command's default.")
        group.addParam("maxResCorr", params.FloatParam, default=30.0, expertLevel=LEVEL_ADVANCED,
                       label="Correlation resolution (Å)",
                       help="Frames are low-pass filtered to this resolution before being correlated.")
        group.addParam("doLocal", params.BooleanParam, default=True,
                       label="Local (patch) alignment?",
                       help="Estimate local motion (doming) on patches and correct it with a B-spline model. "
                            "No: global shifts only (faster).")
        line = group.addLine("Patches (X x Y)", condition="doLocal",
                             help="Number of patches along X and Y; 0 chooses patches of about 500 Å.")
        line.addParam("patchX", params.IntParam, default=0, label="X")
        line.addParam("patchY", params.IntParam, default=0, label="Y")

        group = form.addGroup("Dose and gain")
        group.addParam("doApplyDoseFilter", params.BooleanParam, default=True,
                       label="Dose weighting?",
                       help="Also write dose-weighted micrographs (exposure filter of Grant & Grigorieff "
                            "2015), using the dose per frame, pre-exposure and voltage of the imported "
                            "movies.")
        group.addParam("gainRot", params.EnumParam, default=c.GAIN_ROT_NONE,
                       choices=["none", "90 degrees", "180 degrees", "270 degrees"],
                       display=params.EnumParam.DISPLAY_COMBO,
                       label="Rotate gain reference",
                       help="Rotation of the gain (and dark) reference in steps of 90 degrees before it is "
                            "applied, with MotionCor2's -RotGain convention.")
        group.addParam("gainFlip", params.EnumParam, default=c.GAIN_FLIP_NONE,
                       choices=["none", "upside down", "left right"],
                       display=params.EnumParam.DISPLAY_COMBO,
                       label="Flip gain reference",
                       help="Flip applied to the gain (and dark) reference after the rotation, as "
                            "MotionCor2's -FlipGain.")
        form.addParam("splitEvenOdd", params.BooleanParam, default=False, expertLevel=LEVEL_ADVANCED,
                      label="Odd and even sums?",
                      help="Also write the sums of the odd frames (1, 3, 5...) and of the even frames (2, 4, 6...) "
                           "as two more sets of micrographs (for denoising, e.g. Topaz/cryoCARE).")
        form.addParam("doSaveMovie", params.BooleanParam, default=False, expertLevel=LEVEL_ADVANCED,
                      label="Save aligned movies?",
                      help="Write the aligned frames as a stack per movie (output movies then point to them "
                           "with zero shifts). Uses as much disk as the input movies.")
        form.addParam("moviesPerBatch", params.IntParam, default=16, expertLevel=LEVEL_ADVANCED,
                      label="Movies per batch",
                      help="Movies that arrived together are aligned by one command call, at most this "
                           "many at a time, so that start-up costs (about 1.5 s) and the executor's wait "
                           "between steps (3 s) are paid once per batch; a backlog is split evenly across "
                           "the worker threads (threads - 1), one per GPU slot. Movies arriving one by one "
                           "are aligned as they come, whatever this value.")
        form.addParam("residentWorker", params.BooleanParam, default=False, expertLevel=LEVEL_ADVANCED,
                      label="Resident worker?",
                      help="Align every batch in one long-lived 'xmipp-accel align-movies --watch' process (one "
                           "worker per GPU, set up once) instead of one command call per batch, so the start-up "
                           f"is paid once. The process exits after {RESIDENT_IDLE_S} s without new movies and "
                           "starts again with the next ones.")
        form.addParallelSection(threads=2, mpi=0)

    # --------------------------- INSERT steps functions ----------------------
    def _getConvertExtension(self, filename):
        """Gain/dark references our reader does not take (e.g. ``.gain``, ``.dm4``) become MRC."""
        if filename.lower().endswith((".mrc", ".mrcs", ".tif", ".tiff")):
            return None
        return "mrc"

    def _insertNewMoviesSteps(self, insertedDict, inputMovies):
        """One step per batch of new movies (instead of one per movie)."""
        newMovies = [m.clone() for m in inputMovies if m.getObjId() not in insertedDict]
        if not newMovies:
            return []
        workers = max(1, self.numberOfThreads.get() - 1)
        # as few rounds of at most moviesPerBatch movies per worker as possible, spread evenly over the workers
        rounds = math.ceil(len(newMovies) / (workers * self.moviesPerBatch.get()))
        size = max(1, math.ceil(len(newMovies) / (workers * rounds)))
        deps = []
        for batch in convert.iter_chunks(newMovies, size):
            movieDicts = [m.getObjDict(includeBasic=True) for m in batch]
            stepId = self._insertFunctionStep(self.processMovieBatchStep, movieDicts,
                                              prerequisites=self.convertCIStep, needsGPU=self._usesGpu())
            for movie in batch:
                insertedDict[movie.getObjId()] = stepId
            deps.append(stepId)
        return deps

    # --------------------------- STEPS functions -----------------------------
    def processMovieBatchStep(self, movieDicts):
        movies = [self._movieFromDict(d) for d in movieDicts]
        if self.isContinued():
            movies = [m for m in movies if not os.path.exists(self._getMovieDone(m))]
        if not movies:
            return
        if self.residentWorker:
            return self._alignResident(movies)
        batchDir = self._getTmpPath(f"batch_{movies[0].getObjId():06d}")
        outDir = os.path.join(batchDir, "out")
        pwutils.makePath(outDir)
        inputs = [self._linkMovie(m, batchDir) for m in movies]
        try:
            self._runAccel("align-movies", inputs + ["-o", os.path.abspath(outDir)] + self._alignArgs(movies[0]),
                           self._getExtraPath(f"align_{movies[0].getObjId():06d}.json"),
                           concurrent=max(1, self.numberOfThreads.get() - 1))   # batch steps run side by side
        except Exception as exc:  # the batch failed as a whole: its movies are reported as failed
            self.error(f"Alignment of movies {[m.getObjId() for m in movies]} failed: {exc}")
        for movie in movies:
            self._collectOutputs(movie, outDir)
            open(self._getMovieDone(movie), "w").close()
        if pwutils.envVarOn(SCIPION_DEBUG_NOCLEAN):
            self.info(f"Keeping {batchDir} (SCIPION_DEBUG_NOCLEAN)")
        else:
            shutil.rmtree(batchDir, ignore_errors=True)

    def createOutputStep(self):
        """Every batch is done: end the resident worker (SIGTERM: it exits at once when idle), then close."""
        self._stopWorker()
        return ProtAlignMovies.createOutputStep(self)

    # --------------------------- resident worker ------------------------------
    def _stopWorker(self, wait_s: float = 30.0) -> None:
        if not self._workerRunning():
            return
        self._worker.terminate()
        try:
            self._worker.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            self.warning(f"The resident worker did not end within {wait_s:g} s of SIGTERM: killed")
            self._worker.kill()
            self._worker.wait()

    def _alignResident(self, movies):
        """Hand the batch to the resident ``--watch`` worker, wait for it, collect the outputs."""
        watchIn, watchOut = self._getTmpPath("watch_in"), self._getTmpPath("watch_out")
        staging = self._getTmpPath(f"watch_staging_{movies[0].getObjId():06d}")
        pwutils.makePath(watchIn, watchOut, staging)
        for m in movies:   # linked (or converted) beside the folder, then moved in whole
            path = self._linkMovie(m, staging)
            os.replace(path, os.path.join(watchIn, os.path.basename(path)))
        os.rmdir(staging)
        with _WORKER_LOCK:
            self._ensureWorker(watchIn, watchOut, movies[0])
        stems = {self._movieStem(m) for m in movies}
        restarts = 0
        while True:
            records = self._workerRecords(watchOut, stems)
            if len(records) == len(stems):
                break
            with _WORKER_LOCK:
                if not self._workerRunning():
                    if restarts == RESIDENT_RESTARTS:
                        self.error(f"The resident worker exited {restarts + 1} times before aligning movies "
                                   f"{sorted(stems - set(records))}; see {self._workerLog()}")
                        break
                    restarts += 1
                    self._ensureWorker(watchIn, watchOut, movies[0])
            time.sleep(0.5)
        for m in movies:
            rec = records.get(self._movieStem(m))
            if rec is not None and rec["status"] != "ok":
                self.warning(f"Movie {m.getObjId()} ({m.getFileName()}) failed: {rec.get('error')}")
            self._collectOutputs(m, watchOut)
            open(self._getMovieDone(m), "w").close()

    def _workerLog(self) -> str:
        return self._getExtraPath("watch_worker.log")

    def _workerRunning(self) -> bool:
        proc = getattr(self, "_worker", None)
        return proc is not None and proc.poll() is None

    def _ensureWorker(self, watchIn: str, watchOut: str, movie) -> None:
        """Start ``xmipp-accel align-movies --watch`` unless it runs (call with the lock held)."""
        if self._workerRunning():
            return
        calls = len([f for f in os.listdir(self._getExtraPath()) if f.startswith("watch_") and f.endswith(".json")])
        args = self._alignArgs(movie)
        gpus = ",".join(dict.fromkeys(str(g) for g in (self.getGpuList() or [0])))
        args = [gpus if a == GPU_PLACEHOLDER else str(a) for a in args]
        cmd = shlex.split(Plugin.getCommand()) + ["align-movies", "--watch", os.path.abspath(watchIn),
                                                  "-o", os.path.abspath(watchOut), "--watch-settle", "0.5",
                                                  "--watch-timeout", str(RESIDENT_IDLE_S), "--json", "-q"] + args
        self.info("Resident worker: " + " ".join(shlex.quote(a) for a in cmd))
        with open(self._getExtraPath(f"watch_{calls + 1:03d}.json"), "w") as out, \
                open(self._workerLog(), "a") as err:
            self._worker = subprocess.Popen(cmd, stdout=out, stderr=err, env=Plugin.getEnviron())

    @staticmethod
    def _workerRecords(watchOut: str, stems) -> dict:
        """The done-list records (by output name) of ``stems`` that the worker has finished."""
        path = os.path.join(watchOut, "watch_done.jsonl")     # xmipp_accel.jobs.watch.JOURNAL_NAME
        records = {}
        if os.path.exists(path):
            with open(path) as f:
                for line in f:
                    try:
                        rec = json.loads(line)
                    except ValueError:
                        continue
                    if rec.get("name") in stems:
                        records[rec["name"]] = rec
        return records

    # --------------------------- UTILS functions ------------------------------
    def _movieFromDict(self, movieDict):
        movie = emobj.Movie()
        movie.setAcquisition(emobj.Acquisition())
        movie.setAttributesFromDict(movieDict, setBasic=True, ignoreMissing=True)
        return movie

    @staticmethod
    def _movieStem(movie) -> str:
        return f"movie_{movie.getObjId():06d}"

    @staticmethod
    def _movieExtension(filename: str) -> str:
        name = convert.clean_image_path(filename).lower()
        for ext in (".mrcs", ".mrc", ".tiff", ".tif", ".eer"):
            if name.endswith(ext):
                return ext
        return os.path.splitext(name)[1]

    def _linkMovie(self, movie, batchDir: str) -> str:
        """Link (or convert) the movie into the batch folder under a unique name; returns its path."""
        src = os.path.abspath(convert.clean_image_path(movie.getFileName()))
        ext = self._movieExtension(src)
        if ext in READABLE_MOVIES:
            dst = os.path.join(batchDir, self._movieStem(movie) + ext)
            pwutils.createAbsLink(src, dst)
        else:  # e.g. .dm4, .em: convert to an MRC stack with pwem's image library
            from pwem.emlib.image import ImageHandler
            dst = os.path.join(batchDir, self._movieStem(movie) + ".mrcs")
            ImageHandler().convertStack(src, dst)
        return os.path.abspath(dst)

    def _alignArgs(self, movie) -> list:
        movies = self.inputMovies.get()
        args = ["--pixel-size", movies.getSamplingRate()]
        gain, dark = movies.getGain(), movies.getDark()
        if gain:
            args += ["--gain", os.path.abspath(self.getFinalCorrectionImagePath(gain) or gain)]
        if dark:
            args += ["--dark", os.path.abspath(self.getFinalCorrectionImagePath(dark) or dark)]
        if gain or dark:
            args += ["--gain-rot", self.gainRot.get(), "--gain-flip", self.gainFlip.get()]
        if self.binFactor.get() != 1:
            args += ["--bin", self.binFactor.get()]
        first, last = self._frameRange(movie)
        if first != 1 or self.alignFrameN.get() > 0:
            args += ["--frames", f"{first}:{last}"]
        if self.doLocal:
            if self.patchX.get() > 0 and self.patchY.get() > 0:
                args += ["--patches", f"{self.patchX.get()}x{self.patchY.get()}"]
        else:
            args += ["--no-local"]
        if self.maxShift.get() > 0:
            args += ["--max-shift", self.maxShift.get()]
        if self.maxResCorr.get() > 0:
            args += ["--max-res", self.maxResCorr.get()]
        if self._doDoseWeighting():
            preExposure, dosePerFrame = self._getCorrectedDose(movies)
            args += ["--dose-per-frame", dosePerFrame, "--pre-exposure", preExposure,
                     "--voltage", movies.getAcquisition().getVoltage()]
        if self._doSplitEvenOdd():
            args += ["--odd-even"]
        if self.doSaveMovie:
            args += ["--save-stack"]
        return args + self._deviceArgs()

    def _frameRange(self, movie):
        n = self._numberOfFrames(movie)
        return self._getFrameRange(n, "align")

    def _numberOfFrames(self, movie) -> int:
        first, last, _ = self.inputMovies.get().getFramesRange()
        if last and last > 0:
            return last - first + 1
        dim = self.inputMovies.get().getDim()
        if dim and dim[2]:
            return int(dim[2])
        return int(movie.getNumberOfFrames())

    def _outputFn(self, movie, suffix: str) -> str:
        return self._getExtraPath(self._getMovieRoot(movie) + suffix)

    def _collectOutputs(self, movie, outDir: str) -> None:
        """Move the command's per-movie files to the names the base class expects."""
        stem = self._movieStem(movie)
        moves = [(f"{stem}.mrc", self._getExtraPath(self._getOutputMicName(movie))),
                 (f"{stem}_shifts.star", self._outputFn(movie, "_shifts.star")),
                 (f"{stem}_psd.mrc", self._outputFn(movie, "_psd.mrc"))]
        if self._doDoseWeighting():
            moves.append((f"{stem}_DW.mrc", self._getExtraPath(self._getOutputMicWtName(movie))))
        if self._doSplitEvenOdd():
            moves += [(f"{stem}_ODD.mrc", self._getExtraPath(self._getOutputMicOddName(movie))),
                      (f"{stem}_EVN.mrc", self._getExtraPath(self._getOutputMicEvenName(movie)))]
        if self.doSaveMovie:
            moves.append((f"{stem}_aligned.mrcs", self._getExtraPath(self._getOutputMovieName(movie))))
        for name, dst in moves:
            src = os.path.join(outDir, name)
            if os.path.exists(src):
                shutil.move(src, dst)
            elif not name.endswith("_psd.mrc"):
                self.warning(f"Movie {movie.getObjId()} ({movie.getFileName()}): {name} was not produced; "
                             "the movie is reported as failed.")
        shiftsFn = self._outputFn(movie, "_shifts.star")
        if os.path.exists(shiftsFn):
            try:
                from ..plots import plot_movie_shifts
                xs, ys = convert.movie_shifts_from_star(shiftsFn)
                plot_movie_shifts(xs, ys, self._getPlotGlobal(movie), title=self._getMovieRoot(movie),
                                  pixel_size_A=self.inputMovies.get().getSamplingRate())
            except Exception as exc:  # a plot must not fail the movie
                self.warning(f"Could not plot the shifts of movie {movie.getObjId()}: {exc}")

    def _getPlotGlobal(self, movie) -> str:
        return self._outputFn(movie, "_global_shifts.png")

    def _getMovieShifts(self, movie):
        """Global shifts (pixels of the input movie, MotionCor2 sign) of the aligned frame range."""
        shiftsFn = self._outputFn(movie, "_shifts.star")
        if not os.path.exists(shiftsFn):
            return [], []
        xs, ys = convert.movie_shifts_from_star(shiftsFn)
        first, last = self._frameRange(movie)
        count = last - first + 1
        if len(xs) > count:  # the table lists every frame of the movie: keep the aligned range
            xs, ys = xs[first - 1:last], ys[first - 1:last]
        return xs, ys

    def _preprocessOutputMicrograph(self, mic, movie):
        if os.path.exists(self._getPlotGlobal(movie)):
            mic.plotGlobal = emobj.Image(location=self._getPlotGlobal(movie))
        psd = self._outputFn(movie, "_psd.mrc")
        if os.path.exists(psd):
            mic.psdCorr = emobj.Image(location=psd)

    def _doDoseWeighting(self) -> bool:
        return bool(self.doApplyDoseFilter) and (self.inputMovies.get().getAcquisition().getDosePerFrame() or 0) > 0

    def _createOutputWeightedMicrographs(self):
        return self._doDoseWeighting()

    # --------------------------- INFO functions -------------------------------
    def _validate(self):
        errors = ProtAlignMovies._validate(self)
        errors += self._validateGpu()
        movies = self.inputMovies.get()
        if movies is None:
            return errors
        if self.doApplyDoseFilter and not (movies.getAcquisition().getDosePerFrame() or 0) > 0:
            errors.append("Dose weighting needs the dose per frame of the movies: set it in the import "
                          "protocol, or set 'Dose weighting?' to No.")
        first = movies.getFirstItem()
        if first is not None and first.getFileName().lower().endswith(COMPRESSED):
            errors.append(f"Compressed or listed movies ({', '.join(COMPRESSED)}) are not supported: "
                          "decompress them first.")
        if self.binFactor.get() < 1:
            errors.append(f"Binning factor must be >= 1 (got {self.binFactor.get()}).")
        if self.doLocal and (self.patchX.get() < 0 or self.patchY.get() < 0
                             or (self.patchX.get() > 0) != (self.patchY.get() > 0)):
            errors.append("Give both patch numbers (X and Y, e.g. 5 x 5), or 0 and 0 for automatic patches.")
        if self.moviesPerBatch.get() < 1:
            errors.append(f"Movies per batch must be at least 1 (got {self.moviesPerBatch.get()}).")
        return errors

    def _summary(self):
        summary = []
        if self.hasAttribute("outputMicrographs"):
            summary.append(f"{self.outputMicrographs.getSize()} movies aligned "
                           f"({'global + local' if self.doLocal else 'global'} FlexAlign).")
        if self.hasAttribute("outputMicrographsDoseWeighted"):
            summary.append("Dose-weighted micrographs written.")
        failed = self._readFailedList() if hasattr(self, "_readFailedList") else []
        if failed:
            summary.append(f"{len(failed)} movies failed (see the log).")
        return summary or ["Output not ready yet."]

    def _methods(self):
        if not self.hasAttribute("outputMicrographs"):
            return []
        return [f"{self.outputMicrographs.getSize()} movies were aligned with FlexAlign [Strelak2020FlexAlign] "
                f"on the GPU ({'global and local' if self.doLocal else 'global'} alignment"
                + (", dose weighting" if self._doDoseWeighting() else "") + ")."]

    def _citations(self):
        return ["Strelak2020FlexAlign"]
