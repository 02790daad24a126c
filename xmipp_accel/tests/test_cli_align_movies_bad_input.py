"""``xmipp-accel align-movies`` on bad input: every case refused before any work with a message that says
the limit (exit 2), or handled (unique output names); :func:`xmipp_accel.io.atomic.check_writable`."""
import json
import os
import re

import numpy as np
import pytest

from xmipp_accel.cli.__main__ import main
from xmipp_accel.em.synthetic_movies import make_movie
from xmipp_accel.errors import InputError
from xmipp_accel.io.atomic import check_writable
from xmipp_accel.io.mrc import read_mrc, write_mrc
from xmipp_accel.io.star import read_star

FAST = ["--no-local", "--psd-size", "0", "--hot-pixel-sigma", "0", "--device", "cpu", "-q"]


def _run(argv, capsys):
    code = main(["align-movies"] + [str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _noise_movie(path, side, frames=6, pixel=2.0, seed=0):
    rng = np.random.default_rng(seed)
    write_mrc(str(path), rng.poisson(5.0, (frames, side, side)).astype(np.float32), pixel)


@pytest.fixture(scope="module")
def movie256(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad_input")
    frames, _ = make_movie((256, 256), 8, dose_per_pixel=2.0, drift_scale=1.0, doming_px=0.0, seed=5)
    write_mrc(str(d / "m256.mrcs"), frames, 2.0)
    return d


def test_same_file_name_in_two_folders_gets_two_outputs(movie256, tmp_path, capsys):
    frames, _ = make_movie((256, 256), 8, dose_per_pixel=2.0, drift_scale=1.0, doming_px=0.0, seed=6)
    for sub, data in (("a", read_mrc(str(movie256 / "m256.mrcs"))[0]), ("c", frames)):
        os.makedirs(tmp_path / sub)
        write_mrc(str(tmp_path / sub / "m.mrcs"), data, 2.0)
    out = tmp_path / "out"
    code, stdout, _ = _run([tmp_path / "a" / "m.mrcs", tmp_path / "c" / "m.mrcs", "-o", out, "--json"] + FAST,
                           capsys)
    assert code == 0
    summary = json.loads(stdout.strip().splitlines()[-1])
    sums = [m["outputs"]["sum"] for m in summary["movies"]]
    assert sums == [str(out / "a" / "m.mrc"), str(out / "c" / "m.mrc")]       # the movies' folders kept
    a, c = (read_mrc(s)[0] for s in sums)
    assert not np.allclose(a, c)                                               # neither overwrote the other
    mics = read_star(str(out / "corrected_micrographs.star"))["micrographs"]
    assert list(mics["rlnMicrographName"]) == sums
    assert list(mics["rlnMicrographMetadata"]) == [str(out / "a" / "m_shifts.star"), str(out / "c" / "m_shifts.star")]
    assert not os.path.exists(out / "m.mrc")


def test_movie_given_twice_is_refused(movie256, tmp_path, capsys):
    m = movie256 / "m256.mrcs"
    code, _, err = _run([m, m, "-o", tmp_path / "o"] + FAST, capsys)
    assert code == 2 and "overwrite each other's outputs" in err and "m256.mrc" in err
    assert not os.path.exists(tmp_path / "o")                                  # refused before any work


def test_outputs_clashing_with_another_movies_outputs_are_refused(movie256, tmp_path, capsys):
    # m.mrcs writes m_DW.mrc with --dose-per-frame, which is also the sum of m_DW.mrcs
    for name in ("m.mrcs", "m_DW.mrcs"):
        os.link(movie256 / "m256.mrcs", tmp_path / name)
    code, _, err = _run([tmp_path / "m.mrcs", tmp_path / "m_DW.mrcs", "-o", tmp_path / "o", "--dose-per-frame", 1]
                        + FAST, capsys)
    assert code == 2 and "m_DW.mrc" in err


def _limit(pattern, text):
    m = re.search(pattern, text)
    assert m, text
    return [int(v) for v in m.groups()]


def test_too_fine_patch_grid_is_refused_with_the_limit(movie256, tmp_path, capsys):
    m = movie256 / "m256.mrcs"
    common = ["--psd-size", "0", "--device", "cpu", "-q"]
    code, _, err = _run([m, "-o", tmp_path / "o", "--patches", "500x500"] + common, capsys)
    assert code == 2 and "--patches 500x500" in err and "m256.mrcs" in err
    assert not os.path.exists(tmp_path / "o")
    mx, my = _limit(r"at most (\d+)x(\d+) patches", err)
    assert 3 <= mx < 500 and 3 <= my < 500
    # the limit is the limit: one more is refused, the limit itself aligns
    assert _run([m, "-o", tmp_path / "o", "--patches", f"{mx + 1}x{my}"] + common, capsys)[0] == 2
    assert _run([m, "-o", tmp_path / "o", "--patches", f"{mx}x{my}"] + common, capsys)[0] == 0


def test_tiny_frames_are_refused_with_the_smallest_size(tmp_path, capsys):
    _noise_movie(tmp_path / "tiny.mrcs", 8, pixel=1.0)
    code, _, err = _run([tmp_path / "tiny.mrcs", "-o", tmp_path / "o"] + FAST, capsys)
    assert code == 2 and "8 x 8 px are too small" in err and "broadcast" not in err
    (side, _) = _limit(r"frames of at least (\d+) x (\d+) px", err)
    _noise_movie(tmp_path / "small.mrcs", side, pixel=1.0)
    assert _run([tmp_path / "small.mrcs", "-o", tmp_path / "o"] + FAST, capsys)[0] == 0


def test_tiny_movie_in_a_batch_is_skipped_with_the_message(movie256, tmp_path, capsys):
    _noise_movie(tmp_path / "tiny.mrcs", 8)
    code, stdout, err = _run([movie256 / "m256.mrcs", tmp_path / "tiny.mrcs", "-o", tmp_path / "o", "--json"] + FAST,
                             capsys)
    assert code == 0
    status = {os.path.basename(m["movie"]): (m["status"], m.get("error", ""))
              for m in json.loads(stdout.strip().splitlines()[-1])["movies"]}
    assert status["m256.mrcs"][0] == "ok"
    assert status["tiny.mrcs"][0] == "skipped" and "too small" in status["tiny.mrcs"][1] and "tiny.mrcs" in err


@pytest.mark.parametrize("value", ["0", "-1", "nan"])
def test_pixel_size_must_be_positive(movie256, tmp_path, capsys, value):
    code, _, err = _run([movie256 / "m256.mrcs", "-o", tmp_path / "o", "--pixel-size", value] + FAST, capsys)
    assert code == 2 and "--pixel-size must be a positive" in err
    assert not os.path.exists(tmp_path / "o")


@pytest.mark.parametrize("option, value", [("--psd-size", "-1"), ("--hot-pixel-sigma", "-2"),
                                           ("--read-threads", "0"), ("--workers-per-gpu", "0")])
def test_other_negative_options(movie256, tmp_path, capsys, option, value):
    argv = [movie256 / "m256.mrcs", "-o", tmp_path / "o", "--device", "cpu", "-q", option, value]
    code, _, err = _run(argv, capsys)
    assert code == 2 and option in err


def test_unwritable_output_is_refused_before_any_work(movie256, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    code, _, err = _run([movie256 / "m256.mrcs", "-o", tmp_path / "file"] + FAST, capsys)
    assert code == 2 and str(tmp_path / "file") in err and "is a file" in err
    code, _, err = _run([movie256 / "m256.mrcs", "-o", tmp_path / "file" / "sub"] + FAST, capsys)
    assert code == 2 and "is a file" in err


def test_check_writable(tmp_path):
    assert check_writable(tmp_path / "new" / "deeper") == str(tmp_path / "new" / "deeper")
    assert not os.path.exists(tmp_path / "new")                                # creates nothing
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(InputError, match="f.txt.*is a file"):
        check_writable(tmp_path / "f.txt")
    assert check_writable(tmp_path / "f.txt", folder=False) == str(tmp_path / "f.txt")   # a file to replace
    with pytest.raises(InputError, match="is a folder"):
        check_writable(tmp_path, folder=False)
    with pytest.raises(InputError, match="is a file"):
        check_writable(tmp_path / "f.txt" / "out.mrc", folder=False)


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write in read-only folders")
def test_check_writable_read_only_folder(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(InputError, match="not writable"):
            check_writable(ro / "out")
    finally:
        ro.chmod(0o755)
