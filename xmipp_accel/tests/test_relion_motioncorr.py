"""Our movie alignment against ``relion_run_motioncorr --use_own`` (RELION 3.1) on a synthetic movie.

The movie (512² × 16 frames, 1 Å/px, 1 e⁻/px per frame, doming 2 px) comes from
:mod:`xmipp_accel.em.synthetic_movies` with a known global drift (~25 px over the movie). RELION runs
from the project folder on ``movies.star`` (``--j 2``, 3 × 3 patches, dose weighting), we run
``align-movies`` on the same file, both with their default settings (RELION: B-factor 150 px²; ours:
all-pairs at 30 Å then the polish at B = 450 Å², see :mod:`xmipp_accel.gpu.movie.polish`). Checked:

* our motion STAR has every block RELION's ``Micrograph::read`` (polishing, ``--corr_mic``) reads, with
  the same column names, value types (int/float/str) and units (input pixels, Å, e/Å², kV): shifts and
  patch centres are compared in value with RELION's, which would show a binning or Å/px mix-up;
* the RMS error of the global shifts against the truth: ours ≤ RELION's.
"""
from __future__ import annotations

import os

import numpy as np
import pytest

from xmipp_accel.cli.__main__ import main as cli
from xmipp_accel.em.synthetic_movies import make_movie
from xmipp_accel.io.mrc import write_mrc
from xmipp_accel.io.relion_motion import read_global_shifts
from xmipp_accel.io.star import Table, read_star, write_star
from xmipp_accel.tests.relion_peer import run_relion

SIZE, FRAMES, PIXEL, DOSE, KV = 512, 16, 1.0, 1.0, 300.0
#: Blocks RELION writes that readers may go without: hot_pixels lists the pixels RELION replaced (absent
#: when none), local_motion_model is read only with rlnMotionModelVersion 1 (RELION's polynomial; ours is 0,
#: our B-spline sits in blocks of our own).
OPTIONAL_RELION_BLOCKS = {"hot_pixels", "local_motion_model"}


def _movies_star(path: str, movies) -> None:
    optics = Table({"rlnOpticsGroupName": np.array(["opticsGroup1"]), "rlnOpticsGroup": np.array([1]),
                    "rlnMicrographOriginalPixelSize": np.array([PIXEL]), "rlnVoltage": np.array([KV]),
                    "rlnSphericalAberration": np.array([2.7]), "rlnAmplitudeContrast": np.array([0.1])})
    write_star(path, {"optics": optics, "movies": Table({"rlnMicrographMovieName": np.array(movies),
                                                         "rlnOpticsGroup": np.ones(len(movies), np.int64)})})


@pytest.fixture(scope="module")
def motioncorr(tmp_path_factory):
    d = tmp_path_factory.mktemp("relion_motioncorr")
    frames, truth = make_movie((SIZE, SIZE), FRAMES, dose_per_pixel=1.0, drift_scale=2.0, doming_px=2.0, seed=3)
    os.makedirs(d / "Movies")
    write_mrc(str(d / "Movies" / "m.mrcs"), frames.astype(np.float32), PIXEL)
    _movies_star(str(d / "movies.star"), ["Movies/m.mrcs"])
    run_relion(["relion_run_motioncorr", "--i", "movies.star", "--o", "MotionCorr/", "--use_own", "--j", 2,
                "--patch_x", 3, "--patch_y", 3, "--bin_factor", 1, "--bfactor", 150, "--dose_weighting",
                "--dose_per_frame", DOSE, "--voltage", KV], cwd=d, threads=2)
    cwd = os.getcwd()
    os.chdir(d)  # as RELION: relative movie names from the project folder
    try:
        code = cli(["align-movies", "Movies/m.mrcs", "-o", "Ours", "--patches", "3x3", "--dose-per-frame", str(DOSE),
                    "--voltage", str(KV), "--device", "cpu", "-q", "--json"])
    finally:
        os.chdir(cwd)
    assert code == 0
    relion = read_star(str(d / "MotionCorr" / "Movies" / "m.star"))
    ours = read_star(str(d / "Ours" / "m_shifts.star"))
    return d, truth, relion, ours


def _kind(values) -> str:
    """int, float or str, as a STAR reader types the column."""
    return {"i": "int", "u": "int", "f": "float"}.get(np.asarray(values).dtype.kind, "str")


def test_blocks_columns_and_types_are_relions(motioncorr):
    _, _, relion, ours = motioncorr
    assert set(relion) - OPTIONAL_RELION_BLOCKS <= set(ours), (sorted(relion), sorted(ours))
    assert {"general", "global_shift", "local_shift"} <= set(relion)   # RELION ran its local alignment too
    for block in set(relion) - OPTIONAL_RELION_BLOCKS:
        r, o = relion[block], ours[block]
        assert r.loop == o.loop, block
        missing = [c for c in r.names if c not in o.names]
        assert not missing, (block, missing)
        if r.loop:
            assert o.names[:len(r.names)] == r.names, block                 # same columns, same order
        for c in r.names:
            assert _kind(o[c]) == _kind(r[c]), (block, c, o[c][:3], r[c][:3])


def test_general_values_and_units(motioncorr):
    d, _, relion, ours = motioncorr
    r, o = relion["general"], ours["general"]
    for key in ("rlnImageSizeX", "rlnImageSizeY", "rlnImageSizeZ", "rlnMicrographStartFrame"):
        assert int(o[key][0]) == int(r[key][0]), key                        # pixels, frames
    for key in ("rlnMicrographBinning", "rlnMicrographOriginalPixelSize", "rlnMicrographDoseRate",
                "rlnMicrographPreExposure", "rlnVoltage"):                  # -, Å, e/Å² per frame, e/Å², kV
        assert float(o[key][0]) == pytest.approx(float(r[key][0]), abs=1e-6), key
    # both name the movie relative to the project folder, the working directory (RELION's rule)
    assert o["rlnMicrographMovieName"][0] == r["rlnMicrographMovieName"][0]
    assert os.path.isfile(str(d / o["rlnMicrographMovieName"][0]))
    assert int(o["rlnMotionModelVersion"][0]) == 0        # no polynomial model: RELION reads the shifts only


def test_shifts_and_patches_in_relions_units(motioncorr):
    _, _, relion, ours = motioncorr
    fr, rs = read_global_shifts(relion)
    fo, os_ = read_global_shifts(ours)
    assert fr.tolist() == fo.tolist() == list(range(1, FRAMES + 1))
    # same sign and pixels: after removing each one's reference, the two agree far better than the
    # ~25 px drift (a binning or Å/px mix-up would be off by the whole drift, a sign flip by twice it)
    diff = (os_ - os_.mean(0)) - (rs - rs.mean(0))
    assert np.abs(diff).max() < 0.5
    # local shifts: patch centres in input pixels inside the frame, the movie's frames. RELION tiles the frame
    # with 3 × 3 patches of 170 px; ours are at least 500 Å, so on this 512 Å frame they overlap around the
    # centre (a difference of method, not of units)
    for t in (relion["local_shift"], ours["local_shift"]):
        assert set(np.asarray(t["rlnMicrographFrameNumber"]).tolist()) == set(range(1, FRAMES + 1))
        assert len(t) == 9 * FRAMES
        for axis in ("rlnCoordinateX", "rlnCoordinateY"):
            c = np.asarray(t[axis], dtype=float)
            assert 0 < c.min() <= SIZE / 2 <= c.max() < SIZE, (axis, np.unique(c))
    # residual local shifts are small in both (doming of 2 px at the corners, decaying)
    for t in (relion["local_shift"], ours["local_shift"]):
        assert np.abs(np.asarray(t["rlnMicrographShiftX"], dtype=float)).max() < 3.0


def _rms_error(shifts, truth) -> float:
    """RMS (over frames) of the vector error (px), each set relative to its mean (the references differ)."""
    true = truth["global_shifts_px"]
    err = (shifts - shifts.mean(0)) - (true - true.mean(0))
    return float(np.sqrt((err ** 2).sum(axis=1).mean()))


def test_our_shifts_are_closer_to_the_truth(motioncorr, capsys):
    _, truth, relion, ours = motioncorr
    rel = _rms_error(read_global_shifts(relion)[1], truth)
    our = _rms_error(read_global_shifts(ours)[1], truth)
    with capsys.disabled():
        print(f"\nRMS global shift error vs truth: ours {our:.3f} px, RELION {rel:.3f} px")
    assert our <= rel
    assert our < 0.2                                       # and small in absolute terms (~0.07 px measured)


def test_relion_reads_our_corrected_micrographs(motioncorr):
    d, _, _, _ = motioncorr
    ours = read_star(str(d / "Ours" / "corrected_micrographs.star"))
    relion = read_star(str(d / "MotionCorr" / "corrected_micrographs.star"))
    for block in ("optics", "micrographs"):
        missing = [c for c in relion[block].names if c not in ours[block].names
                   and c not in ("rlnSphericalAberration", "rlnAmplitudeContrast")]   # CTF-side: from the import
        assert not missing, (block, missing)
        for c in relion[block].names:
            if c in ours[block].names:
                assert _kind(ours[block][c]) == _kind(relion[block][c]), (block, c)
    # accumulated motion in the same units (input px): the summed frame-to-frame steps (~19 px here) carry
    # each estimate's noise (~0.1 px per step, 15 steps), hence 15%
    assert float(ours["micrographs"]["rlnAccumMotionTotal"][0]) == pytest.approx(
        float(relion["micrographs"]["rlnAccumMotionTotal"][0]), rel=0.15)
