"""FolderWatcher: a file is handed over once complete (size and mtime stable, MRC data all there), once,
woken by inotify or found by the scanning fallback; stop() and the idle timeout end the wait."""
import os
import threading
import time

import numpy as np
import pytest

from xmipp_accel.errors import InputError
from xmipp_accel.io.folder_watch import FolderWatcher, inotify_available, mrc_complete
from xmipp_accel.io.mrc import write_mrc

MODES = [pytest.param(True, id="inotify", marks=pytest.mark.skipif(not inotify_available(), reason="no inotify")),
         pytest.param(False, id="scan")]


def _write_slowly(path, data: bytes, chunks: int, pause_s: float, log: list):
    """Append ``data`` in ``chunks`` pieces, ``pause_s`` apart (each write opens and closes the file, as a
    copy over a slow link may); logs the time the last piece was written."""
    step = -(-len(data) // chunks)
    for i in range(0, len(data), step):
        with open(path, "ab") as f:
            f.write(data[i:i + step])
        log.append(time.monotonic())
        time.sleep(pause_s)


@pytest.mark.parametrize("use_inotify", MODES)
def test_slowly_written_file_is_handed_over_once_stable(tmp_path, use_inotify):
    settle = 0.6                                  # longer than the 0.15 s pauses between chunks
    w = FolderWatcher(str(tmp_path), ["*.bin"], settle_s=settle, use_inotify=use_inotify)
    log = []
    writer = threading.Thread(target=_write_slowly, args=(str(tmp_path / "m.bin"), os.urandom(50000), 6, 0.15, log))
    writer.start()
    path = w.next_ready(idle_timeout_s=10)
    got = time.monotonic()
    writer.join()
    assert path == str(tmp_path / "m.bin")
    assert os.path.getsize(path) == 50000          # all of it was there when it was handed over
    assert got - log[-1] >= settle * 0.95           # not before the file had been quiet for settle_s
    assert got - log[-1] < settle + 2.0             # nor much later (inotify: at once; scan: <= 0.5 s + one step)
    (tmp_path / "other.txt").write_text("not wanted")
    assert w.next_ready(idle_timeout_s=0.8) is None     # handed over once; the pattern filters other files
    w.close()


@pytest.mark.parametrize("use_inotify", MODES)
def test_backlog_is_taken_at_once_in_order_and_rewrites_again(tmp_path, use_inotify):
    for name in ("b.mrcs", "a.mrcs", ".tmp.mrcs", "c.tiff"):
        (tmp_path / name).write_bytes(b"x" * 10)
    old = time.time() - 60                                 # written a minute ago: already quiet
    for name in ("a.mrcs", "b.mrcs", "c.tiff"):
        os.utime(tmp_path / name, (old, old))
    t0 = time.monotonic()
    w = FolderWatcher(str(tmp_path), settle_s=5.0, use_inotify=use_inotify)
    got = [os.path.basename(w.next_ready(idle_timeout_s=1)) for _ in range(3)]
    assert time.monotonic() - t0 < 2.5                     # no 5 s settle wait for files quiet for a minute
    assert got == ["a.mrcs", "b.mrcs", "c.tiff"]           # name order within a scan; the hidden file ignored
    (tmp_path / "a.mrcs").write_bytes(b"y" * 20)           # re-copied: handed over again once stable
    w.settle_s = 0.2
    assert w.next_ready(idle_timeout_s=3) == str(tmp_path / "a.mrcs")
    w.close()


def test_mrc_still_short_of_its_header_is_held(tmp_path):
    """A pause longer than settle_s in the middle of an MRC copy does not hand it over half written."""
    write_mrc(str(tmp_path / "full.mrcs"), np.ones((4, 32, 32), np.float32), 1.0)
    data = (tmp_path / "full.mrcs").read_bytes()
    part = tmp_path / "in" / "m.mrcs"
    part.parent.mkdir()
    part.write_bytes(data[:2048])
    assert not mrc_complete(str(part)) and mrc_complete(str(tmp_path / "full.mrcs"))
    w = FolderWatcher(str(part.parent), settle_s=0.2, complete=mrc_complete)
    result = {}
    t = threading.Thread(target=lambda: result.update(path=w.next_ready(idle_timeout_s=10), at=time.monotonic()))
    t.start()
    time.sleep(1.0)                                        # 5x settle_s without a change
    done = time.monotonic()
    with open(part, "ab") as f:
        f.write(data[2048:])
    t.join()
    assert result["path"] == str(part) and result["at"] >= done
    assert os.path.getsize(part) == len(data)
    w.close()


def test_truncated_mrc_is_handed_over_after_the_grace_time(tmp_path):
    write_mrc(str(tmp_path / "m.mrcs"), np.ones((4, 32, 32), np.float32), 1.0)
    with open(tmp_path / "m.mrcs", "r+b") as f:
        f.truncate(3000)
    w = FolderWatcher(str(tmp_path), settle_s=0.1, complete=mrc_complete, incomplete_grace_s=0.8)
    t0 = time.monotonic()
    assert w.next_ready(idle_timeout_s=5) == str(tmp_path / "m.mrcs")   # its reader then names it truncated
    assert 0.6 < time.monotonic() - t0 < 3.0
    w.close()


def test_stop_and_idle_timeout_end_the_wait(tmp_path):
    w = FolderWatcher(str(tmp_path), settle_s=0.1)
    t0 = time.monotonic()
    assert w.next_ready(idle_timeout_s=0.5) is None
    assert 0.45 < time.monotonic() - t0 < 2.5
    threading.Timer(0.3, w.stop).start()
    t0 = time.monotonic()
    assert w.next_ready() is None and time.monotonic() - t0 < 1.5
    w.close()


def test_recursive_watch_finds_files_in_new_subfolders_but_not_in_excluded(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    w = FolderWatcher(str(tmp_path), ["*.mrc"], settle_s=0.2, recursive=True, exclude=[str(out)])
    (out / "sum.mrc").write_bytes(b"x")                     # our own outputs are never taken as movies
    sub = tmp_path / "GridSquare_1" / "Data"
    sub.mkdir(parents=True)
    (sub / "m.mrc").write_bytes(b"x")
    assert w.next_ready(idle_timeout_s=3) == str(sub / "m.mrc")
    assert w.next_ready(idle_timeout_s=0.5) is None
    w.close()


def test_missing_folder_is_named(tmp_path):
    with pytest.raises(InputError, match="nowhere"):
        FolderWatcher(str(tmp_path / "nowhere"))


@pytest.mark.skipif(not inotify_available(), reason="no inotify")
def test_inotify_wakes_on_the_file_without_scanning(tmp_path, monkeypatch):
    """With inotify the folder is scanned once at the start (then every rescan_s, 30 s); a new file is seen
    through its events alone, and handed over settle_s after its last write."""
    scans = []
    original = FolderWatcher.scan
    monkeypatch.setattr(FolderWatcher, "scan", lambda self: (scans.append(time.monotonic()), original(self)))
    w = FolderWatcher(str(tmp_path), ["*.mrcs"], settle_s=0.3)
    threading.Timer(0.5, lambda: (tmp_path / "m.mrcs").write_bytes(b"x" * 100)).start()
    t0 = time.monotonic()
    assert w.next_ready(idle_timeout_s=5) == str(tmp_path / "m.mrcs")
    assert 0.75 < time.monotonic() - t0 < 1.5        # 0.5 s until written + 0.3 s settle
    assert len(scans) == 1
    w.close()


@pytest.mark.parametrize("kind", ["tiff", "bigtiff", "lzw", "eer"])
def test_tiff_and_eer_cut_anywhere_are_seen_as_incomplete(tmp_path, kind):
    """Every prefix of a TIFF/EER movie (97 cuts) that lacks part of the movie is judged still being written
    (a cut that drops only trailing padding holds the whole movie); the whole file is complete."""
    import tifffile

    from xmipp_accel.io.folder_watch import movie_complete, tiff_complete
    from xmipp_accel.tests import eer_synth
    whole = tmp_path / f"m.{'eer' if kind == 'eer' else 'tiff'}"
    if kind == "eer":
        rng = np.random.default_rng(1)
        eer_synth.write_eer(str(whole), 64, 64, eer_synth.random_frames(rng, 5, 64, 64, electrons=50))
    else:
        frames = np.random.default_rng(0).integers(0, 5, (6, 64, 64)).astype(np.uint16)
        tifffile.imwrite(str(whole), frames, **{"tiff": {}, "bigtiff": {"bigtiff": True},
                                                "lzw": {"compression": "lzw"}}[kind])
    data = whole.read_bytes()
    assert tiff_complete(str(whole)) and movie_complete(str(whole))
    cut = tmp_path / whole.name.replace("m.", "cut.")
    judged_complete = []
    for n in np.linspace(0, len(data) - 1, 97).astype(int):
        cut.write_bytes(data[:n])
        if movie_complete(str(cut)):
            judged_complete.append(int(n))
    from xmipp_accel.io.movie import read_movie
    for n in judged_complete:                      # such a cut holds every frame, whole
        cut.write_bytes(data[:n])
        np.testing.assert_array_equal(np.asarray(read_movie(str(cut))), np.asarray(read_movie(str(whole))))
    assert len(judged_complete) <= 1
    (tmp_path / "x.tiff").write_bytes(b"not a TIFF at all")     # not TIFF: its reader names the problem
    assert tiff_complete(str(tmp_path / "x.tiff"))
