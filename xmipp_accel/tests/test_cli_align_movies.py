"""``xmipp-accel align-movies`` end to end: outputs, STAR shifts against the truth, bad movies, gain checks."""
import json
import os

import numpy as np
import pytest

from xmipp_accel.cli.__main__ import main
from xmipp_accel.em.synthetic_movies import make_movie
from xmipp_accel.io.mrc import read_mrc, write_mrc
from xmipp_accel.io.star import read_star

SIZE, N = 384, 12


@pytest.fixture(scope="module")
def movies(tmp_path_factory):
    d = tmp_path_factory.mktemp("movies")
    frames, truth = make_movie((SIZE, SIZE), N, dose_per_pixel=1.0, drift_scale=3.0, doming_px=3.0, seed=7)
    write_mrc(str(d / "good.mrcs"), frames, 2.0)
    write_mrc(str(d / "two.mrcs"), frames[:2], 2.0)
    write_mrc(str(d / "zero.mrcs"), np.zeros_like(frames), 2.0)
    write_mrc(str(d / "cut.mrcs"), frames, 2.0)
    with open(d / "cut.mrcs", "r+b") as f:
        f.truncate(os.path.getsize(d / "cut.mrcs") // 2)
    return d, frames, truth


def _run(argv, capsys):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def _centred(s):
    s = np.asarray(s, dtype=float)
    return s - s.mean(axis=0)


def test_batch_writes_outputs_and_skips_bad_movies(movies, tmp_path, capsys):
    d, _, truth = movies
    out = tmp_path / "out"
    argv = ["align-movies", str(d / "two.mrcs"), str(d / "good.mrcs"), str(d / "zero.mrcs"), str(d / "cut.mrcs"),
            "-o", str(out), "--dose-per-frame", "1.2", "--odd-even", "--device", "cpu", "--json", "-q"]
    code, stdout, stderr = _run(argv, capsys)
    assert code == 0
    summary = json.loads(stdout.strip().splitlines()[-1])
    status = {os.path.basename(m["movie"]): m["status"] for m in summary["movies"]}
    assert status == {"two.mrcs": "skipped", "good.mrcs": "ok", "zero.mrcs": "skipped", "cut.mrcs": "skipped"}
    errors = {os.path.basename(m["movie"]): m.get("error", "") for m in summary["movies"]}
    assert "2 frame(s)" in errors["two.mrcs"] and "no signal" in errors["zero.mrcs"]
    assert "truncated" in errors["cut.mrcs"]
    for name in ("two.mrcs", "zero.mrcs", "cut.mrcs"):
        assert name in stderr                      # the warning names the movie
    for suffix in ("", "_DW", "_ODD", "_EVN", "_psd"):
        data, ps = read_mrc(str(out / f"good{suffix}.mrc"))
        assert np.isfinite(data).all() and ps == pytest.approx(2.0)
    assert read_mrc(str(out / "good.mrc"))[0].shape == (SIZE, SIZE)
    star = read_star(str(out / "good_shifts.star"))
    assert star["general"]["rlnMicrographStartFrame"][0] == 1
    assert star["general"]["rlnMotionModelVersion"][0] == 0
    g = star["global_shift"]
    assert list(g["rlnMicrographFrameNumber"]) == list(range(1, N + 1))
    est = np.stack([g["rlnMicrographShiftX"], g["rlnMicrographShiftY"]], axis=1)
    err = _centred(est) - _centred(truth["global_shifts_px"])     # MotionCor2 sign, input pixels
    assert np.sqrt((err ** 2).sum(axis=1).mean()) < 0.3
    assert "local_shift" in star and "xmipp_accel_bspline" in star
    assert len(star["local_shift"]) == N * 9
    np.testing.assert_allclose(summary["movies"][1]["shifts_px"], est, atol=1e-3)


def test_gain_orientation_and_shape_errors(movies, tmp_path, capsys):
    d, frames, _ = movies
    gain = np.random.default_rng(3).uniform(0.5, 1.5, (SIZE, SIZE)).astype(np.float32)
    write_mrc(str(tmp_path / "raw.mrcs"), frames / gain, 2.0)              # frames = raw * gain
    write_mrc(str(tmp_path / "gain_ccw.mrc"), np.rot90(gain, 1).copy(), 2.0)   # stored turned counter-clockwise
    common = ["--no-local", "--device", "cpu", "-q", "--hot-pixel-sigma", "0", "--psd-size", "0"]
    assert _run(["align-movies", str(d / "good.mrcs"), "-o", str(tmp_path / "a")] + common, capsys)[0] == 0
    code, _, _ = _run(["align-movies", str(tmp_path / "raw.mrcs"), "-o", str(tmp_path / "b"), "--gain",
                       str(tmp_path / "gain_ccw.mrc"), "--gain-rot", "1"] + common, capsys)
    assert code == 0
    a = read_mrc(str(tmp_path / "a" / "good.mrc"))[0]
    b = read_mrc(str(tmp_path / "b" / "raw.mrc"))[0]
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-2)
    write_mrc(str(tmp_path / "small_gain.mrc"), gain[:200], 2.0)
    code, _, err = _run(["align-movies", str(d / "good.mrcs"), "-o", str(tmp_path / "c"), "--gain",
                         str(tmp_path / "small_gain.mrc")] + common, capsys)
    assert code == 2 and "384 x 200" in err and "384 x 384" in err and "small_gain.mrc" in err


def test_binning_frame_range_and_defects(movies, tmp_path, capsys):
    d, _, truth = movies
    (tmp_path / "defects.txt").write_text("100 0 2 384\n")
    code, stdout, _ = _run(["align-movies", str(d / "good.mrcs"), "-o", str(tmp_path / "o"), "--bin", "2",
                            "--frames", "2:11", "--no-local", "--defects", str(tmp_path / "defects.txt"),
                            "--device", "cpu", "--json", "-q"], capsys)
    assert code == 0
    img, ps = read_mrc(str(tmp_path / "o" / "good.mrc"))
    assert img.shape == (SIZE // 2, SIZE // 2) and ps == pytest.approx(4.0)
    star = read_star(str(tmp_path / "o" / "good_shifts.star"))
    assert star["general"]["rlnMicrographStartFrame"][0] == 2
    assert star["general"]["rlnMicrographBinning"][0] == pytest.approx(2.0)
    g = star["global_shift"]
    assert list(g["rlnMicrographFrameNumber"]) == list(range(2, 12))
    est = np.stack([g["rlnMicrographShiftX"], g["rlnMicrographShiftY"]], axis=1)   # input pixels
    err = _centred(est) - _centred(truth["global_shifts_px"][1:11])
    assert np.sqrt((err ** 2).sum(axis=1).mean()) < 0.4
    assert "local_shift" not in star


def test_bad_options_are_user_errors(movies, tmp_path, capsys):
    d, _, _ = movies
    for extra, text in [(["--frames", "5:2"], "--frames"), (["--patches", "5"], "--patches"),
                        (["--bin", "0.5"], "--bin")]:
        code, _, err = _run(["align-movies", str(d / "good.mrcs"), "-o", str(tmp_path / "x"), "--device", "cpu"]
                            + extra, capsys)
        assert code == 2 and text in err


@pytest.mark.gpu
def test_two_workers_per_gpu_give_the_shifts_of_one(tmp_path, capsys):
    """``--workers-per-gpu 2`` (two streams on one GPU, movies in flight side by side) aligns each movie as one
    worker does: same shifts, every movie once, in input order."""
    paths = []
    for i in range(4):
        frames, _ = make_movie((256, 256), 10, dose_per_pixel=1.0, drift_scale=2.0 + i, doming_px=1.0, seed=20 + i)
        paths.append(str(tmp_path / f"m{i}.mrcs"))
        write_mrc(paths[-1], frames, 1.0)
    shifts = {}
    for k in (1, 2):
        argv = ["align-movies", *paths, "-o", str(tmp_path / f"w{k}"), "--patches", "3x3", "--device", "gpu",
                "--workers-per-gpu", str(k), "--json", "-q"]
        code, stdout, _ = _run(argv, capsys)
        assert code == 0
        summary = json.loads(stdout.strip().splitlines()[-1])
        assert [m["status"] for m in summary["movies"]] == ["ok"] * 4
        assert [m["movie"] for m in summary["movies"]] == paths
        shifts[k] = np.array([m["shifts_px"] for m in summary["movies"]])
    np.testing.assert_allclose(shifts[2], shifts[1], atol=1e-4)


def test_cpu_workers_side_by_side_give_the_outputs_of_one(tmp_path, capsys):
    """``--cpu-workers 2`` (two movies aligned at once on the CPU, each with its share of the cores, the last
    one with all of them) writes what one worker writes, bit for bit: sums, dose-weighted sums, shifts,
    every movie once, in input order; a bad movie among them is still skipped alone."""
    paths = []
    for i in range(3):
        frames, _ = make_movie((256, 256), 10, dose_per_pixel=1.0, drift_scale=2.0 + i, doming_px=1.0, seed=30 + i)
        paths.append(str(tmp_path / f"m{i}.mrcs"))
        write_mrc(paths[-1], frames, 1.0)
    bad = str(tmp_path / "zbad.mrcs")
    write_mrc(bad, np.zeros((10, 256, 256), np.float32), 1.0)
    summaries = {}
    for k in (1, 2):
        argv = ["align-movies", *paths, bad, "-o", str(tmp_path / f"w{k}"), "--patches", "3x3", "--device", "cpu",
                "--dose-per-frame", "1", "--cpu-workers", str(k), "--json", "-q"]
        code, stdout, _ = _run(argv, capsys)
        summaries[k] = json.loads(stdout.strip().splitlines()[-1])
        assert code == 0 and summaries[k]["pipeline"]["workers"] == [f"cpu{i}" for i in range(k)]
        assert [m["movie"] for m in summaries[k]["movies"]] == paths + [bad]
        assert [m["status"] for m in summaries[k]["movies"]] == ["ok"] * 3 + ["skipped"]
    for m1, m2 in zip(summaries[1]["movies"][:3], summaries[2]["movies"][:3]):
        assert m1["shifts_px"] == m2["shifts_px"]
        for kind in ("sum", "sum_dw"):
            a, b = read_mrc(m1["outputs"][kind])[0], read_mrc(m2["outputs"][kind])[0]
            assert a.shape == (256, 256) and np.array_equal(a, b)


def test_cpu_movie_workers_follow_the_cores_the_movies_and_the_memory():
    from xmipp_accel.jobs.movies import CPU_MOVIE_FRAME_COPIES, CPU_MOVIE_MEMORY_FRACTION, cpu_movie_workers
    gb = 1 << 30
    raw, frames = int(1.34 * gb), int(2.7 * gb)          # a 4096² × 40 int16 movie; its float32 frames
    per = raw + CPU_MOVIE_FRAME_COPIES * frames
    common = dict(raw_bytes=raw, frames_bytes=frames)
    assert cpu_movie_workers(0, cores=2, n_movies=5, available_bytes=None, **common) == 2
    assert cpu_movie_workers(0, cores=8, n_movies=3, available_bytes=None, **common) == 3
    assert cpu_movie_workers(0, cores=8, n_movies=None, available_bytes=None, **common) == 8   # --watch
    for n in (1, 2, 3):                                   # memory for exactly n computing + 2 waiting movies
        avail = (n * per + 2 * raw) / CPU_MOVIE_MEMORY_FRACTION + 1
        assert cpu_movie_workers(0, cores=16, n_movies=20, available_bytes=avail, **common) == n
    assert cpu_movie_workers(0, cores=16, n_movies=20, available_bytes=gb, **common) == 1   # never 0
    assert cpu_movie_workers(3, cores=2, n_movies=1, available_bytes=gb, **common) == 3     # as asked
