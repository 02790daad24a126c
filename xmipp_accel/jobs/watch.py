"""Watched folder: align each movie that lands in a folder once it is complete, with resident workers.

``xmipp-accel align-movies --watch INDIR -o OUTDIR`` runs a :class:`WatchJob`. Movies are taken from a
:class:`~xmipp_accel.io.folder_watch.FolderWatcher` (woken by the kernel's file events, a movie is taken
once its size and mtime have not changed for ``settle_s``, and once it holds all the data its header
announces (MRC) or its page directories point to (TIFF, EER)) and fed to **one**
:class:`~xmipp_accel.gpu.runtime.pipeline.Pipeline` run that lasts as long as the watch: one compute worker
per GPU (``workers_per_gpu`` each) set up once (references uploaded, FFT plans and kernels cached) for every
movie, no process start per movie. The per-movie read, compute and write are those of
:class:`~xmipp_accel.jobs.movies.MovieJob` (the job is made from the first movie that can be read: options
are checked against it as in batch mode).

After each movie, OUTDIR receives its outputs (as in batch mode, ``<name>`` being the movie's path
relative to INDIR without extension), one line in ``OUTDIR/watch_done.jsonl`` (appended and synced: the
movie, its size and mtime, ok with its outputs and shifts, or failed with the reason), and a new
``OUTDIR/corrected_micrographs.star`` listing every movie aligned so far, written whole under a temporary
name and renamed (a reader sees the previous list or the new one, never a part). Once the STAR is so long
that rewriting it takes a noticeable time, it is rewritten at most every 4 rewrite durations (0.3 s for
5000 movies: then every 1.2 s) instead of after each movie; the end of the watch writes the last one.

A restart with the same OUTDIR reads the done-list and skips the movies it lists as aligned, and the
failed ones unless their size or mtime changed (a re-copied file is tried again); a done-list made with
other options is refused (the STAR would mix them). A movie that cannot be read or aligned (corrupt,
truncated, no signal, another size that the options do not fit) is logged as a warning naming it, recorded
as failed and the watch goes on. The watch ends after ``timeout_s`` without a new or growing file, or on
:meth:`WatchJob.stop` (the command calls it on SIGINT/SIGTERM): the movies already read are finished and
written (at most ``Pipeline.max_in_flight``), the STAR is complete, and a restart takes the rest.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from ..errors import InputError
from ..io.atomic import check_writable
from ..io.folder_watch import MOVIE_PATTERNS, FolderWatcher, movie_complete
from ..io.movie import movie_info
from .movies import MovieJob, MovieJobSettings, movie_report, movie_stem

__all__ = ["WatchOptions", "WatchJob", "WatchReport", "Journal", "JOURNAL_NAME", "watch_name"]

logger = logging.getLogger("xmipp_accel")

#: The done-list in OUTDIR.
JOURNAL_NAME = "watch_done.jsonl"
_JOURNAL_VERSION = 1
#: Settings that do not change the outputs (a restart may change them).
_RUNTIME_SETTINGS = ("read_threads", "workers_per_gpu", "cpu_workers")


@dataclass
class WatchOptions:
    """How the folder is watched (seconds in the names).

    ``timeout_s`` None watches until :meth:`WatchJob.stop`; ``patterns`` are :mod:`fnmatch` patterns of the
    movie files (file name, or path relative to the folder when the pattern has a ``/``).
    """
    folder: str
    patterns: Sequence[str] = MOVIE_PATTERNS
    settle_s: float = 3.0
    timeout_s: Optional[float] = None
    recursive: bool = False
    rescan_s: float = 30.0
    use_inotify: bool = True

    def check(self) -> None:
        if self.timeout_s is not None and self.timeout_s <= 0:
            raise InputError(f"--watch-timeout must be a positive number of seconds, got {self.timeout_s:g}")
        if self.settle_s < 0:
            raise InputError(f"--watch-settle must be >= 0 seconds, got {self.settle_s:g}")
        if self.rescan_s <= 0:
            raise InputError(f"--watch-rescan must be > 0 seconds, got {self.rescan_s:g}")


def watch_name(path: str, folder: str) -> str:
    """Output name of a watched movie: its path relative to the folder, without the movie extension."""
    rel = os.path.relpath(os.path.abspath(path), os.path.abspath(folder))
    return os.path.normpath(os.path.join(os.path.dirname(rel), movie_stem(rel)))


def _fingerprint(settings: MovieJobSettings) -> Dict[str, Any]:
    """The settings that shape the outputs, as JSON values (compared on restart)."""
    d = dataclasses.asdict(settings)
    for k in _RUNTIME_SETTINGS:
        d.pop(k, None)
    d.update({f"alignment.{k}": v for k, v in d.pop("alignment").items()})   # a difference names the option
    return json.loads(json.dumps(d, default=str))


class Journal:
    """``OUTDIR/watch_done.jsonl``: a header line with the settings, then one JSON line per finished movie.

    Lines are appended with one ``write`` each and synced; a line cut by a crash (the last one) is ignored
    on reading, and the next append starts on a new line.
    """

    def __init__(self, path: str, fingerprint: Dict[str, Any]):
        self.path = path
        self.fingerprint = fingerprint
        self._lock = threading.Lock()

    def load(self) -> Dict[str, dict]:
        """The last record of each movie (absolute path -> record); {} for a new journal.

        Raises InputError when the journal was written with other settings."""
        if not os.path.exists(self.path):
            return {}
        records: Dict[str, dict] = {}
        with open(self.path, encoding="utf-8") as f:
            lines = f.read().split("\n")
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                logger.warning("%s line %d is incomplete (cut by a crash?): ignored", self.path, number)
                continue
            if "settings" in rec:
                self._check_settings(rec["settings"])
            elif "movie" in rec:
                records[rec["movie"]] = rec
        return records

    def _check_settings(self, old: Dict[str, Any]) -> None:
        diff = [f"{k} {old.get(k)!r} -> {self.fingerprint.get(k)!r}" for k in sorted(set(old) | set(self.fingerprint))
                if old.get(k) != self.fingerprint.get(k)]
        if diff:
            raise InputError(f"{self.path} was written by a watch with other options ({'; '.join(diff)}): its "
                             "corrected_micrographs.star would mix them; use another output folder, or remove "
                             f"{os.path.basename(self.path)} to align every movie again")

    def append(self, record: dict) -> None:
        """Add one line (the settings header first in a new journal), synced to disk."""
        with self._lock:
            head = b""
            if not os.path.exists(self.path) or os.path.getsize(self.path) == 0:
                head = (json.dumps({"xmipp_accel_watch": _JOURNAL_VERSION, "settings": self.fingerprint})
                        + "\n").encode()
            else:
                with open(self.path, "rb") as f:
                    f.seek(-1, os.SEEK_END)
                    if f.read(1) != b"\n":
                        head = b"\n"           # the last line was cut: start a new one
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, head + (json.dumps(record) + "\n").encode())
                os.fsync(fd)
            finally:
                os.close(fd)


@dataclass
class WatchReport:
    """What :meth:`WatchJob.run` returns.

    ``movies``: this run's per-movie summaries in the order they finished (ok as in batch mode, else
    ``status`` "skipped" with ``error``); ``n_previous``: movies in the done-list of earlier runs (not redone);
    ``ended_by``: "timeout" or "stop"; ``star``: the corrected_micrographs.star, None while nothing is aligned.
    """
    movies: List[dict]
    lines: List[str]
    n_ok: int
    n_failed: int
    n_previous: int
    wall_s: float
    pipeline: Dict[str, Any]
    output_dir: str
    star: Optional[str]
    ended_by: str
    workers: List[str] = field(default_factory=list)

    def summary(self, devices: Sequence[Any]) -> dict:
        """The JSON summary of the run (``--json``)."""
        return {"device": [d.describe() for d in devices], "output_dir": self.output_dir, "watch": True,
                "n_movies": self.n_ok + self.n_failed, "n_ok": self.n_ok, "n_skipped": self.n_failed,
                "n_previous": self.n_previous, "seconds": round(self.wall_s, 3), "ended_by": self.ended_by,
                "corrected_micrographs": self.star, "pipeline": self.pipeline, "movies": self.movies}


class WatchJob:
    """Align the movies arriving in a folder (see the module docstring).

    Parameters
    ----------
    output_dir : str
    settings : MovieJobSettings
        As in batch mode.
    options : WatchOptions

    Raises
    ------
    InputError
        Bad option, missing folder, OUTDIR not writable or equal to the folder, done-list of other options.
    """

    def __init__(self, output_dir: str, settings: MovieJobSettings, options: WatchOptions):
        settings.check()
        options.check()
        self.options = options
        self.folder = os.path.abspath(options.folder)
        if not os.path.isdir(self.folder):
            raise InputError(f"--watch {options.folder}: no such folder; create it (the movies are copied into it)")
        self.output_dir = check_writable(output_dir)
        if os.path.normcase(self.output_dir) == os.path.normcase(self.folder):
            raise InputError(f"-o {output_dir} is the watched folder: the aligned sums (.mrc) would be taken as "
                             "movies; give another output folder")
        self.settings = settings
        self.journal = Journal(os.path.join(self.output_dir, JOURNAL_NAME), _fingerprint(settings))
        self.records = self.journal.load()
        self.job: Optional[MovieJob] = None
        self.watcher: Optional[FolderWatcher] = None
        self._stop = threading.Event()
        self._names: Dict[str, str] = {r["name"]: m for m, r in self.records.items() if r.get("status") == "ok"}
        self._in_flight: set = set()
        self._retry: set = set()
        self._keys: Dict[str, Tuple[int, int]] = {}
        self._movies: List[dict] = []
        self._lines: List[str] = []
        self._previous = len(self.records)
        self._on_result: Optional[Callable] = None
        self.star: Optional[str] = None
        self._lock = threading.RLock()      # _record runs in the feed and writer threads, the STAR flush in a timer
        self._star_dirty = False
        self._star_last = -float("inf")
        self._star_cost = 0.0
        self._star_timer: Optional[threading.Timer] = None

    # ------------------------------------------------------------------------------------------ control
    def stop(self) -> None:
        """End the watch: no new movie is started; those already read are finished (thread/signal safe)."""
        self._stop.set()
        if self.watcher is not None:
            self.watcher.stop()

    def run(self, devices: Sequence[Any], *, on_result: Optional[Callable] = None) -> WatchReport:
        """Watch and align until the timeout or :meth:`stop`; ``on_result(ItemResult)`` after each movie."""
        t0 = time.perf_counter()
        self._on_result = on_result
        os.makedirs(self.output_dir, exist_ok=True)
        self.watcher = FolderWatcher(self.folder, self.options.patterns, settle_s=self.options.settle_s,
                                     recursive=self.options.recursive, exclude=[self.output_dir],
                                     complete=movie_complete, rescan_s=self.options.rescan_s,
                                     use_inotify=self.options.use_inotify, handed=self._done_keys())
        if self._stop.is_set():
            self.watcher.stop()
        logger.info("watching %s (%s; %s) for %s", self.folder, "inotify" if self.watcher.uses_inotify else
                    "scanning", f"{len(self.records)} movie(s) in the done-list", ", ".join(self.options.patterns))
        summary: Dict[str, Any] = {}
        workers: List[str] = []
        try:
            self._resume()
            first = self._first_movie()
            if first is not None:
                pipe = self.job.pipeline(devices, on_result=self._finished, ordered=False)
                run = pipe.run(self._items(first))
                summary, workers = run.summary(), pipe.worker_names
        finally:
            self.watcher.close()
            self._flush_star()
        n_ok = sum(1 for m in self._movies if m.get("status") == "ok")
        return WatchReport(list(self._movies), list(self._lines), n_ok, len(self._movies) - n_ok, self._previous,
                           time.perf_counter() - t0, summary, self.output_dir, self.star,
                           "stop" if self._stop.is_set() else "timeout", workers)

    # ------------------------------------------------------------------------------------------ movies
    def _done_keys(self) -> Dict[str, Tuple[int, int]]:
        """(size, mtime) of the done-list's movies: the watcher passes over them while they stay so (no
        settle wait, no grace time for a known broken file on restart)."""
        return {m: (r["size"], r["mtime_ns"]) for m, r in self.records.items()
                if r.get("size") is not None and r.get("mtime_ns") is not None}

    def _make_job(self, path: str) -> MovieJob:
        job = MovieJob([path], self.output_dir, self.settings)
        job.add_movie(path, watch_name(path, self.folder))
        job.prepare_output()
        return job

    def _resume(self) -> None:
        """On restart: rebuild the STAR from the done-list (a crash may have come between the two writes)."""
        ok = [m for m, r in self.records.items() if r.get("status") == "ok" and os.path.exists(m)]
        if ok:
            self.job = self._make_job(ok[0])
            self._star_dirty = True
            self._flush_star()

    def _first_movie(self) -> Optional[str]:
        """The first new movie that can be read (the job's options are checked against it)."""
        while True:
            path = self.watcher.next_ready(self.options.timeout_s)
            if path is None:
                return None
            if not self._take(path):
                continue
            if self.job is not None:
                return path
            try:
                movie_info(path, **self.settings.reader_options())
            except InputError as exc:
                self._record(path, {"status": "failed", "stage": "read", "error": str(exc)})
                continue
            self.job = self._make_job(path)
            return path

    def _items(self, first: str) -> Iterator[str]:
        """Movie paths for the pipeline, as they become complete (its feed thread waits here)."""
        path: Optional[str] = first
        taken = True                                   # _first_movie took it
        while path is not None:
            if taken or self._take(path):
                self.job.add_movie(path, watch_name(path, self.folder))
                with self._lock:
                    self._in_flight.add(path)
                yield path
            taken = False
            if self._stop.is_set():
                return
            path = self.watcher.next_ready(self.options.timeout_s)

    def _take(self, path: str) -> bool:
        """Whether a complete file is to be aligned now (not done before, no output clash); notes its
        size and mtime for the done-list."""
        try:
            st = os.stat(path)
        except OSError:
            return False
        key = (st.st_size, st.st_mtime_ns)
        with self._lock:
            if path in self._in_flight:      # rewritten while being aligned: looked at again once recorded
                logger.info("%s changed while it was being aligned", path)
                self._retry.add(path)
                return False
            rec = self.records.get(path)
        if rec is not None and (rec["status"] == "ok" or (rec.get("size"), rec.get("mtime_ns")) == key):
            logger.debug("%s: %s before, not aligned again", path, rec["status"])
            return False
        self._keys[path] = key
        name = watch_name(path, self.folder)
        owner = self._names.setdefault(name, path)
        if owner != path:
            self._record(path, {"status": "failed", "stage": "read",
                                "error": f"its outputs ({name}.mrc...) would overwrite those of {owner}; rename it"})
            return False
        return True

    # ------------------------------------------------------------------------------------------ results
    def _finished(self, res) -> None:
        """After each movie (the pipeline's writer thread): done-list line, new STAR, report."""
        value, line = movie_report(res)
        if res.ok:
            rec = {"status": "ok", "outputs": {k: value["outputs"][k] for k in ("sum", "shifts", "sum_dw")
                                               if k in value["outputs"]},
                   "shifts_px": value["shifts_px"], "pixel_size_A": value["pixel_size_A"]}
        else:
            rec = {"status": "failed", "stage": res.stage, "error": str(res.error)}
        self._record(res.item, rec, summary=value, line=line, log=False)
        if self._on_result is not None:
            self._on_result(res)

    def _record(self, path: str, rec: dict, *, summary: Optional[dict] = None, line: Optional[str] = None,
                log: bool = True) -> None:
        size, mtime_ns = self._keys.get(path, (None, None))
        rec = {"movie": path, "name": watch_name(path, self.folder), "size": size, "mtime_ns": mtime_ns,
               "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), **rec}
        if rec["status"] != "ok" and log:
            logger.warning("skipped %s: %s", path, rec["error"])
        with self._lock:
            self.journal.append(rec)          # first the done-list, then the STAR made from it
            self.records[path] = rec
            self._in_flight.discard(path)
            if path in self._retry:           # it changed meanwhile: a failed one is tried again as it is now
                self._retry.discard(path)
                self.watcher.recheck(path)
            self._movies.append(summary or {"movie": path, "status": "skipped", "stage": rec.get("stage"),
                                            "error": rec.get("error")})
            self._lines.append(line or f"{path}: skipped ({rec.get('stage')}): {rec.get('error')}")
            if rec["status"] == "ok":
                self._star_changed()

    # ------------------------------------------------------------------------------------------ the STAR
    def _star_changed(self) -> None:
        """Rewrite the STAR now, or, if the last rewrite was less than 4 of its own durations ago, a little
        later (a timer): with thousands of movies a rewrite takes a good part of a second (0.3 s for 5000
        entries), and this keeps it under a fifth of the writer thread's time; small STARs are rewritten
        after every movie."""
        with self._lock:
            self._star_dirty = True
            wait = self._star_last + 4.0 * self._star_cost - time.monotonic()
            if wait <= 0:
                self._flush_star()
            elif self._star_timer is None:
                self._star_timer = threading.Timer(wait, self._flush_star)
                self._star_timer.daemon = True
                self._star_timer.start()

    def _flush_star(self) -> None:
        """Write corrected_micrographs.star of every aligned movie if it changed (whole file, then rename)."""
        with self._lock:
            if self._star_timer is not None:
                self._star_timer.cancel()
                self._star_timer = None
            if not self._star_dirty or self.job is None:
                return
            t = time.monotonic()
            self.star = self.job.write_index([r for r in self.records.values() if r.get("status") == "ok"])
            self._star_last = time.monotonic()
            self._star_cost = self._star_last - t
            self._star_dirty = False
