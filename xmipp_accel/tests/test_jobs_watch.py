"""``align-movies --watch``: movies copied in while the watch runs (one slowly), a corrupt one named and
skipped, one worker set up once for all movies, the STAR always readable while it grows, restart, stop."""
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from xmipp_accel import backend
from xmipp_accel.cli.__main__ import main
from xmipp_accel.em.synthetic_movies import make_movie
from xmipp_accel.errors import InputError
from xmipp_accel.io.mrc import write_mrc
from xmipp_accel.io.star import read_star
from xmipp_accel.jobs import movies as movies_module
from xmipp_accel.jobs.movies import MovieJobSettings
from xmipp_accel.jobs.watch import JOURNAL_NAME, WatchJob, WatchOptions

SIZE, N = 128, 8
FAST = dict(local=False, psd_size=0)          # global alignment only: a 128 px movie aligns in ~20 ms
CPU = [backend.Device("cpu")]
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def stock(tmp_path_factory):
    """Four movies with known drift (MRC stacks) and one corrupt file, outside the watched folder."""
    d = tmp_path_factory.mktemp("stock")
    truths = {}
    for i in range(4):
        frames, truth = make_movie((SIZE, SIZE), N, dose_per_pixel=2.0, drift_scale=2.0, doming_px=0, seed=10 + i)
        write_mrc(str(d / f"m{i}.mrcs"), frames, 2.0)
        truths[f"m{i}"] = truth["global_shifts_px"]
    (d / "bad.tiff").write_bytes(b"II*\0" + os.urandom(4000))        # TIFF magic, garbage after it
    return d, truths


def _copy_slowly(src, dst, chunks=5, pause_s=0.12):
    data = open(src, "rb").read()
    step = -(-len(data) // chunks)
    for i in range(0, len(data), step):
        with open(dst, "ab") as f:
            f.write(data[i:i + step])
        time.sleep(pause_s)


class StarReader(threading.Thread):
    """Reads corrected_micrographs.star again and again while the watch writes it: it must always parse,
    and its rows only grow."""

    def __init__(self, path):
        super().__init__(daemon=True)
        self.path, self.reads, self.counts, self.errors = path, 0, [], []
        self.done = threading.Event()

    def run(self):
        while not self.done.is_set():
            if os.path.exists(self.path):
                try:
                    self.counts.append(len(read_star(self.path)["micrographs"]))
                    self.reads += 1
                except Exception as exc:  # noqa: BLE001  (any failure to read is the test's finding)
                    self.errors.append(repr(exc))


def _job(indir, outdir, timeout_s=1.5, **settings):
    return WatchJob(str(outdir), MovieJobSettings(alignment=dict(FAST), **settings),
                    WatchOptions(folder=str(indir), settle_s=0.4, timeout_s=timeout_s))


def _count_setups(monkeypatch):
    calls = []
    original = movies_module.MovieJob._setup_refs

    def counting(refs, *args):
        setup = original(refs, *args)

        def wrapped(ctx):
            calls.append(ctx.name)
            return setup(ctx)
        return wrapped
    monkeypatch.setattr(movies_module.MovieJob, "_setup_refs", staticmethod(counting))
    return calls


def test_movies_arriving_while_watching(stock, tmp_path, monkeypatch, caplog):
    d, truths = stock
    indir, outdir = tmp_path / "in", tmp_path / "out"
    indir.mkdir()
    shutil.copy(d / "m0.mrcs", indir / "m0.mrcs")                    # there before the watch starts
    setups = _count_setups(monkeypatch)
    job = _job(indir, outdir)
    reader = StarReader(str(outdir / "corrected_micrographs.star"))
    reader.start()

    def arrive():
        time.sleep(0.3)
        shutil.copy(d / "m1.mrcs", indir / "m1.mrcs")
        shutil.copy(d / "bad.tiff", indir / "bad.tiff")
        _copy_slowly(d / "m2.mrcs", indir / "m2.mrcs")              # pauses (0.12 s) shorter than settle (0.4 s)
        time.sleep(0.2)
        os.makedirs(indir / "sub")
        shutil.copy(d / "m3.mrcs", indir / "sub" / "m3.mrcs")        # not recursive: ignored
        shutil.copy(d / "m3.mrcs", indir / "m3.mrcs")
    writer = threading.Thread(target=arrive)
    writer.start()
    with caplog.at_level(logging.WARNING, logger="xmipp_accel"):
        t0 = time.monotonic()
        report = job.run(CPU)
        wall = time.monotonic() - t0
    writer.join()
    reader.done.set()
    reader.join()
    status = {os.path.basename(m["movie"]): m["status"] for m in report.movies}
    assert status == {"m0.mrcs": "ok", "m1.mrcs": "ok", "bad.tiff": "skipped", "m2.mrcs": "ok", "m3.mrcs": "ok"}
    assert "bad.tiff" in caplog.text and "not a readable TIFF" in caplog.text      # named in the log
    # resident workers (as many as the cores and memory allow: --cpu-workers 0), each set up once for the 4 movies
    assert sorted(setups) == report.workers and report.workers[0] == "cpu0"
    assert len(report.workers) == job.job.cpu_workers()
    assert report.ended_by == "timeout" and wall < 12
    # the STAR, read ~continuously while it was rewritten, always parsed and never lost a row
    assert reader.errors == [] and reader.reads > 5
    assert reader.counts == sorted(reader.counts) and reader.counts[-1] == 4
    star = read_star(str(outdir / "corrected_micrographs.star"))["micrographs"]
    assert sorted(os.path.basename(n) for n in star["rlnMicrographName"]) == [f"m{i}.mrc" for i in range(4)]
    # the slowly copied movie was read whole: its shifts match the truth as well as the others'
    for m in report.movies:
        if m["status"] == "ok":
            name = os.path.basename(m["movie"])[:-len(".mrcs")]
            est, true = np.asarray(m["shifts_px"]), truths[name]
            err = (est - est.mean(0)) - (true - true.mean(0))
            assert np.sqrt((err ** 2).sum(1).mean()) < 0.5, name    # 0.3 px in the 384 px CLI test; 128 px here
    lines = [json.loads(x) for x in open(outdir / JOURNAL_NAME)]
    assert "settings" in lines[0]
    assert {os.path.basename(r["movie"]): r["status"] for r in lines[1:]} == \
        {"m0.mrcs": "ok", "m1.mrcs": "ok", "bad.tiff": "failed", "m2.mrcs": "ok", "m3.mrcs": "ok"}


def test_restart_skips_finished_movies_and_retries_a_changed_failure(stock, tmp_path):
    d, _ = stock
    indir, outdir = tmp_path / "in", tmp_path / "out"
    indir.mkdir()
    for name in ("m0.mrcs", "m1.mrcs", "bad.tiff"):
        shutil.copy(d / name, indir / name)
    first = _job(indir, outdir, timeout_s=0.8).run(CPU)
    assert (first.n_ok, first.n_failed) == (2, 1)
    sums = {n: os.path.getmtime(outdir / n) for n in ("m0.mrc", "m1.mrc")}
    t0 = time.monotonic()
    again = _job(indir, outdir, timeout_s=0.8).run(CPU)
    assert (again.n_ok, again.n_failed, again.n_previous) == (0, 0, 3)        # nothing redone, not even bad.tiff
    assert time.monotonic() - t0 < 4.0              # the known broken file is not held for its 5 s grace again
    assert {n: os.path.getmtime(outdir / n) for n in sums} == sums
    shutil.copy(d / "m2.mrcs", indir / "m2.mrcs")
    shutil.copy(d / "m3.mrcs", indir / "bad.tiff")          # the corrupt file replaced by a good (MRC) one
    with open(outdir / JOURNAL_NAME, "a") as f:
        f.write('{"movie": "/cut/by/a/cra')                 # a line cut by a crash is ignored
    third = _job(indir, outdir, timeout_s=0.8).run(CPU)
    assert sorted(os.path.basename(m["movie"]) for m in third.movies) == ["bad.tiff", "m2.mrcs"]
    assert third.n_previous == 3                              # m0, m1 and the old bad.tiff in the done-list
    star = read_star(str(outdir / "corrected_micrographs.star"))["micrographs"]
    assert len(star) == 3                                     # m0, m1 from before + m2 (bad.tiff still bad as TIFF)


def test_slow_star_rewrites_are_spaced_and_the_last_one_is_written(stock, tmp_path, monkeypatch):
    """A STAR that takes long to write (as with thousands of movies) is rewritten less often than once per
    movie, and still lists every movie when the watch ends."""
    d, _ = stock
    indir = tmp_path / "in"
    indir.mkdir()
    for i in range(4):
        shutil.copy(d / f"m{i}.mrcs", indir / f"m{i}.mrcs")
    calls = []
    original = movies_module.MovieJob.write_index

    def slow(self, movies):
        calls.append(len(movies))
        time.sleep(0.15)                    # 20 ms alignments: all 4 movies finish within one rewrite
        return original(self, movies)
    monkeypatch.setattr(movies_module.MovieJob, "write_index", slow)
    report = _job(indir, tmp_path / "out", timeout_s=1.0).run(CPU)
    assert report.n_ok == 4 and 1 <= len(calls) < 4 and calls[-1] == 4
    assert len(read_star(str(tmp_path / "out" / "corrected_micrographs.star"))["micrographs"]) == 4


def test_restart_with_other_options_is_refused(stock, tmp_path):
    d, _ = stock
    indir = tmp_path / "in"
    indir.mkdir()
    shutil.copy(d / "m0.mrcs", indir / "m0.mrcs")
    _job(indir, tmp_path / "out", timeout_s=0.5).run(CPU)
    with pytest.raises(InputError, match="dose_per_frame"):
        _job(indir, tmp_path / "out", dose_per_frame=1.0)
    _job(indir, tmp_path / "out", timeout_s=0.3, read_threads=2)       # runtime settings may change


def test_stop_finishes_and_leaves_a_complete_star(stock, tmp_path):
    d, _ = stock
    indir, outdir = tmp_path / "in", tmp_path / "out"
    indir.mkdir()
    job = _job(indir, outdir, timeout_s=None)
    result = {}
    runner = threading.Thread(target=lambda: result.update(report=job.run(CPU)))
    runner.start()
    shutil.copy(d / "m0.mrcs", indir / "m0.mrcs")
    deadline = time.monotonic() + 10
    while not (outdir / "corrected_micrographs.star").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    job.stop()
    runner.join(5)
    assert not runner.is_alive()
    assert result["report"].ended_by == "stop" and result["report"].n_ok == 1
    assert len(read_star(str(outdir / "corrected_micrographs.star"))["micrographs"]) == 1


def test_cli_watch_timeout_json_and_bad_arguments(stock, tmp_path, capsys):
    d, _ = stock
    indir = tmp_path / "in"
    indir.mkdir()
    shutil.copy(d / "m0.mrcs", indir / "m0.mrcs")
    common = ["--no-local", "--psd-size", "0", "--device", "cpu", "-q"]
    t0 = time.monotonic()
    code = main(["align-movies", "--watch", str(indir), "-o", str(tmp_path / "out"), "--watch-timeout", "1",
                 "--watch-settle", "0.3", "--json"] + common)
    assert code == 0 and time.monotonic() - t0 < 8
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["watch"] and summary["n_ok"] == 1 and summary["ended_by"] == "timeout"
    assert summary["movies"][0]["compute_ms"] > 0
    for argv, message in (([str(indir / "m0.mrcs"), "--watch", str(indir)], "not both"),
                          (["--watch", str(indir)], "watched folder"),          # -o INDIR
                          (["--watch", str(tmp_path / "none")], "no such folder"),
                          (["--watch", str(indir), "--watch-timeout", "0"], "--watch-timeout")):
        out = str(indir) if message == "watched folder" else str(tmp_path / "o2")
        assert main(["align-movies"] + argv + ["-o", out] + common) == 2
        assert message in capsys.readouterr().err
    assert main(["align-movies", "-o", str(tmp_path / "o3")] + common) == 2
    assert "--watch INDIR" in capsys.readouterr().err


@pytest.mark.skipif(not hasattr(signal, "SIGTERM") or sys.platform == "win32", reason="POSIX signals")
def test_sigterm_ends_the_command_cleanly(stock, tmp_path):
    d, _ = stock
    indir, outdir = tmp_path / "in", tmp_path / "out"
    indir.mkdir()
    shutil.copy(d / "m0.mrcs", indir / "m0.mrcs")
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.Popen([sys.executable, "-m", "xmipp_accel", "align-movies", "--watch", str(indir), "-o",
                             str(outdir), "--watch-settle", "0.2", "--no-local", "--psd-size", "0", "--device", "cpu",
                             "--json", "-q"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 20
    while not (outdir / "corrected_micrographs.star").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=15)
    assert proc.returncode == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["ended_by"] == "stop" and summary["n_ok"] == 1
    assert len(read_star(str(outdir / "corrected_micrographs.star"))["micrographs"]) == 1


@pytest.mark.gpu
def test_resident_gpu_worker_matches_the_cpu(stock, tmp_path, monkeypatch):
    """The watch on a GPU: one set-up for all movies, and the shifts of the NumPy path (same movies)."""
    d, _ = stock
    indir = tmp_path / "in"
    indir.mkdir()
    for i in range(3):
        shutil.copy(d / f"m{i}.mrcs", indir / f"m{i}.mrcs")
    setups = _count_setups(monkeypatch)
    gpu = _job(indir, tmp_path / "gpu", timeout_s=0.5).run([backend.resolve_device("gpu", 0)])
    cpu = _job(indir, tmp_path / "cpu", timeout_s=0.5).run(CPU)
    assert setups.count("gpu0") == 1 and gpu.n_ok == cpu.n_ok == 3
    by_movie = {m["movie"]: np.asarray(m["shifts_px"]) for m in cpu.movies}
    for m in gpu.movies:
        # float32 FFTs on both; cuFFT and pocketfft round differently: 0.05 px is far below the 0.5 px error
        np.testing.assert_allclose(m["shifts_px"], by_movie[m["movie"]], atol=0.05)


def test_movie_rewritten_while_its_read_fails_is_tried_again(stock, tmp_path, monkeypatch):
    """A broken file whose good version arrives while the broken one is still in the pipeline (its failure
    not yet recorded) is taken again once that failure is recorded, and aligned."""
    import tifffile

    from xmipp_accel.io.mrc import read_mrc
    d, _ = stock
    whole = tmp_path / "whole.tiff"
    tifffile.imwrite(str(whole), np.rint(read_mrc(str(d / "m1.mrcs"))[0]).astype(np.uint16))
    indir = tmp_path / "in"
    indir.mkdir()
    shutil.copy(d / "m0.mrcs", indir / "m0.mrcs")              # the job's first movie: quiet for a minute
    os.utime(indir / "m0.mrcs", (time.time() - 60, time.time() - 60))
    target = indir / "late.tiff"
    target.write_bytes(b"a broken copy, not a TIFF")
    failing = threading.Event()
    original = movies_module.MovieJob._read

    def slow_failure(self, path, alloc):
        try:
            return original(self, path, alloc)
        except Exception:
            failing.set()
            time.sleep(1.0)                # the good copy arrives now, while this movie is in flight
            raise
    monkeypatch.setattr(movies_module.MovieJob, "_read", slow_failure)

    def good_copy():
        failing.wait(10)
        shutil.copy(whole, target)
    threading.Thread(target=good_copy, daemon=True).start()
    report = _job(indir, tmp_path / "out", timeout_s=2.0).run(CPU)
    late = [m["status"] for m in report.movies if m["movie"] == str(target)]
    assert late == ["skipped", "ok"]
    assert len(read_star(str(tmp_path / "out" / "corrected_micrographs.star"))["micrographs"]) == 2
