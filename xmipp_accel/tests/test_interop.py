"""Interoperability: what we write is read right by the tools used beside Scipion, and what they write by us.

* Xmipp metadata (``.xmd``): xmippLib writes particles of known angles and shifts -> our reader -> the
  RELION values that put each image on our projection of the map; we write -> xmippLib reads every value
  and its own ``readApplyGeo`` centres the images; ``assign-angles``/``reconstruct`` take and give ``.xmd``.
* RELION motion STAR (Bayesian polishing): ``align-movies`` output read by our parser and by emtable
  (Scipion's reader), checked against the labels ``Micrograph::read`` requires and against the true drift,
  sign included; ``corrected_micrographs.star`` points at it.
* ChimeraX: the maps we write (MRC header as ChimeraX reads it) and the local-resolution ``.cxc`` script.
"""
from __future__ import annotations

import json
import os
import shlex

import numpy as np
import pytest

from xmipp_accel.cli.__main__ import main as cli
from xmipp_accel.em.geometry import angular_distance_deg, euler_to_matrix
from xmipp_accel.em.projection import FourierProjector, shift_images
from xmipp_accel.em.synthetic import make_particles, phantom_volume
from xmipp_accel.errors import FileFormatError
from xmipp_accel.io.images import write_stack
from xmipp_accel.io.mrc import read_mrc, write_mrc
from xmipp_accel.io.particles import read_particles, write_particles, write_particles_from_arrays
from xmipp_accel.io.star import read_star

xmippLib = pytest.importorskip("xmippLib")

PX = 2.5
BOX = 32
#: (rot, tilt, psi) degrees and the displacement d (x, y) px of each particle's content from the box centre.
ANGLES = np.array([[10.0, 40.0, -30.0], [120.0, 95.0, 60.0], [-75.0, 150.0, 170.0], [33.0, 12.0, -100.0]])
DISPLACEMENT = np.array([[3.0, -2.0], [-4.0, 1.0], [2.0, 3.0], [-1.0, -3.0]])
MIRRORED = 2      # stored mirrored in x (Xmipp flip = 1)
DISABLED = 3      # Xmipp enabled = -1


def _cc(a, b) -> float:
    a = np.asarray(a, np.float64) - np.mean(a)
    b = np.asarray(b, np.float64) - np.mean(b)
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


def _mirror_x(img):
    """x -> -x about the box centre N//2 (Xmipp's mirror)."""
    return np.roll(img[..., ::-1], 1, axis=-1)


@pytest.fixture(scope="module")
def views():
    """Projections P of a phantom at ANGLES and the stored images X = P moved by DISPLACEMENT (one mirrored)."""
    vol = phantom_volume(BOX, seed=3)
    proj = FourierProjector(vol).project(euler_to_matrix(ANGLES[:, 0], ANGLES[:, 1], ANGLES[:, 2]))
    images = shift_images(proj, DISPLACEMENT)            # content moves by +d: RELION origin = -d
    images[MIRRORED] = _mirror_x(images[MIRRORED])
    return vol, np.asarray(proj), np.asarray(images)


def _xmipp_row(md, oid, values: dict):
    for label, value in values.items():
        md.setValue(getattr(xmippLib, label), value, oid)


# ------------------------------------------------------------------------------------------------ Xmipp

def test_xmipp_shift_sign_ground_truth(tmp_path):
    """Xmipp moves the image by +shift (and mirrors first when flip): a blob 5 px right, 3 px up is centred by
    shiftX = -5, shiftY = +3 (y grows downwards in the array), as for RELION's origin."""
    yy, xx = np.mgrid[:BOX, :BOX]
    c = BOX // 2
    blob = np.exp(-((xx - (c + 5)) ** 2 + (yy - (c - 3)) ** 2) / 8.0).astype(np.float32)
    write_mrc(str(tmp_path / "blob.mrc"), blob, PX)
    md = xmippLib.MetaData()
    oid = md.addObject()
    _xmipp_row(md, oid, {"MDL_IMAGE": str(tmp_path / "blob.mrc"), "MDL_ANGLE_ROT": 0.0, "MDL_ANGLE_TILT": 0.0,
                         "MDL_ANGLE_PSI": 0.0})

    def peak(shift, flip=False):
        _xmipp_row(md, oid, {"MDL_SHIFT_X": float(shift[0]), "MDL_SHIFT_Y": float(shift[1]), "MDL_FLIP": flip})
        img = xmippLib.Image()
        img.readApplyGeo(md, oid, True)                  # only_apply_shifts, as Xmipp's 3-D programs read
        y, x = np.unravel_index(np.argmax(img.getData()), blob.shape)
        return int(x) - c, int(y) - c

    assert peak((-5, 3)) == (0, 0)                       # moved by +shift
    assert peak((5, -3)) == (10, -6)
    assert peak((5, 3), flip=True) == (0, 0)             # mirrored (x -> -x) first, then moved by +shift
    # our shift_images has the same meaning (content moves by +shift)
    moved = shift_images(blob, np.array([-5.0, 3.0]))
    assert np.unravel_index(np.argmax(moved), blob.shape) == (c, c)


def test_xmipplib_writes_our_reader_gives_relion_values(views, tmp_path):
    vol, proj, images = views
    write_stack(str(tmp_path / "stack.mrcs"), images, PX)
    md = xmippLib.MetaData()
    for i in range(len(ANGLES)):
        oid = md.addObject()
        _xmipp_row(md, oid, {
            "MDL_IMAGE": f"{i + 1:06d}@{tmp_path / 'stack.mrcs'}", "MDL_ITEM_ID": i + 11,
            "MDL_ENABLED": -1 if i == DISABLED else 1, "MDL_FLIP": i == MIRRORED,
            "MDL_ANGLE_ROT": ANGLES[i, 0], "MDL_ANGLE_TILT": ANGLES[i, 1], "MDL_ANGLE_PSI": ANGLES[i, 2],
            "MDL_SHIFT_X": -DISPLACEMENT[i, 0], "MDL_SHIFT_Y": -DISPLACEMENT[i, 1], "MDL_MAXCC": 0.5 + 0.1 * i,
            "MDL_SAMPLINGRATE": PX, "MDL_CTF_DEFOCUSU": 12000.0 + i, "MDL_CTF_DEFOCUSV": 11000.0 + i,
            "MDL_CTF_DEFOCUS_ANGLE": 30.0 + i, "MDL_CTF_VOLTAGE": 200.0, "MDL_CTF_CS": 2.0, "MDL_CTF_Q0": 0.07})
    for i, oid in enumerate(md):          # Xmipp's own reading of these rows centres every image on P
        img = xmippLib.Image()
        img.readApplyGeo(md, oid, True)
        assert _cc(img.getData(), proj[i]) > 0.9999
    md.write(str(tmp_path / "parts.xmd"))

    pset = read_particles(str(tmp_path / "parts.xmd"))
    keep = [i for i in range(len(ANGLES)) if i != DISABLED]
    assert pset.n == len(keep) and pset.optics is None
    np.testing.assert_allclose(pset.pixel_size_A, PX)
    normal = [k for k, i in enumerate(keep) if i != MIRRORED]
    np.testing.assert_allclose(pset.angles_deg[normal], ANGLES[[keep[k] for k in normal]], atol=1e-6)
    np.testing.assert_allclose(pset.origins_px[normal], -DISPLACEMENT[[keep[k] for k in normal]], atol=1e-6)
    m = keep.index(MIRRORED)   # Scipion's rowToAlignment: tilt + 180, -psi, -shiftX
    np.testing.assert_allclose(pset.angles_deg[m], ANGLES[MIRRORED] * [1, 1, -1] + [0, 180, 0], atol=1e-6)
    np.testing.assert_allclose(pset.origins_px[m], DISPLACEMENT[MIRRORED] * [1, -1], atol=1e-6)
    ctf = pset.ctf()
    np.testing.assert_allclose(ctf["defocus_u_A"], 12000.0 + np.array(keep))
    np.testing.assert_allclose(ctf["defocus_angle_deg"], 30.0 + np.array(keep))
    assert set(ctf["voltage_kV"]) == {200.0} and set(ctf["cs_mm"]) == {2.0} and set(ctf["amplitude_contrast"]) == {0.07}
    np.testing.assert_allclose(pset.table["rlnParticleFigureOfMerit"], 0.5 + 0.1 * np.array(keep))
    assert pset.table["rlnImageId"].tolist() == [i + 11 for i in keep]
    # physics: the RELION values put every image (mirrored one included) on our projection of the map
    ours = FourierProjector(vol).project(euler_to_matrix(*pset.angles_deg.T))
    centred = shift_images(pset.read_images(), pset.origins_px)
    assert min(_cc(centred[k], ours[k]) for k in range(pset.n)) > 0.9999
    wrong_sign = shift_images(pset.read_images(), -pset.origins_px)
    assert max(_cc(wrong_sign[k], ours[k]) for k in range(pset.n)) < 0.9


def test_our_xmd_read_by_xmipplib(views, tmp_path, monkeypatch):
    _, proj, images = views
    n = MIRRORED   # the first particles (not mirrored)
    monkeypatch.chdir(tmp_path)   # run from the folder, as a user does: image names relative to it (io/paths.py)
    write_stack(str(tmp_path / "stack.mrcs"), images[:n], PX)
    star = str(tmp_path / "in.star")
    write_particles_from_arrays(star, [f"{i + 1}@stack.mrcs" for i in range(n)], PX, box_size=BOX,
                                ctf={"defocus_u_A": [15000.0, 9000.0], "defocus_v_A": [14000.0, 8500.0],
                                     "defocus_angle_deg": [12.5, 170.0], "phase_shift_deg": [0.0, 45.0]},
                                voltage_kV=300.0, cs_mm=2.7, amplitude_contrast=0.1, subset=[1, 2],
                                extra={"rlnMicrographName": np.array(["mic_a.mrc", "mic_b.mrc"])})
    score = np.array([0.25, 0.75])
    out = str(tmp_path / "out.xmd")
    write_particles(out, read_particles(star), angles_deg=ANGLES[:n], origins_A=-DISPLACEMENT[:n] * PX,
                    extra={"rlnParticleFigureOfMerit": score})          # what assign-angles does
    assert open(out).read().startswith("# XMIPP_STAR_1")
    md = xmippLib.MetaData(out)
    got = {xmippLib.label2Str(label) for label in md.getActiveLabels()}
    assert {"image", "itemId", "enabled", "angleRot", "angleTilt", "anglePsi", "shiftX", "shiftY", "maxCC",
            "ctfDefocusU", "ctfDefocusV", "ctfDefocusAngle", "ctfVoltage", "ctfSphericalAberration", "ctfQ0",
            "ctfVPPphaseshift", "samplingRate", "micrograph", "rlnRandomSubset"} <= got
    assert not got & {"rlnOriginXAngst", "rlnOpticsGroup", "rlnImagePixelSize", "rlnAngleRot"}

    def col(label):
        return np.array(md.getColumnValues(getattr(xmippLib, label)))

    assert col("MDL_IMAGE").tolist() == ["1@stack.mrcs", "2@stack.mrcs"]
    np.testing.assert_allclose(np.stack([col("MDL_ANGLE_ROT"), col("MDL_ANGLE_TILT"), col("MDL_ANGLE_PSI")], 1),
                               ANGLES[:n], atol=1e-6)
    np.testing.assert_allclose(np.stack([col("MDL_SHIFT_X"), col("MDL_SHIFT_Y")], 1), -DISPLACEMENT[:n], atol=1e-6)
    np.testing.assert_allclose(col("MDL_MAXCC"), score, atol=1e-6)
    np.testing.assert_allclose(col("MDL_CTF_DEFOCUSU"), [15000.0, 9000.0])
    np.testing.assert_allclose(col("MDL_CTF_DEFOCUSV"), [14000.0, 8500.0])
    np.testing.assert_allclose(col("MDL_CTF_DEFOCUS_ANGLE"), [12.5, 170.0])
    np.testing.assert_allclose(col("MDL_CTF_PHASE_SHIFT"), [0.0, 45.0])
    np.testing.assert_allclose([col("MDL_CTF_VOLTAGE"), col("MDL_CTF_CS"), col("MDL_CTF_Q0")],
                               [[300.0] * n, [2.7] * n, [0.1] * n])
    np.testing.assert_allclose(col("MDL_SAMPLINGRATE"), PX)
    assert col("MDL_ITEM_ID").tolist() == [1, 2] and col("MDL_ENABLED").tolist() == [1, 1]
    assert col("MDL_MICROGRAPH").tolist() == ["mic_a.mrc", "mic_b.mrc"]
    for i, oid in enumerate(md):          # Xmipp's reading of our shifts centres the images
        img = xmippLib.Image()
        img.readApplyGeo(md, oid, True)
        assert _cc(img.getData(), proj[i]) > 0.9999
    # and back: .xmd -> STAR gives the RELION values we started from
    back = read_particles(out)
    np.testing.assert_allclose(back.angles_deg, ANGLES[:n], atol=1e-6)
    np.testing.assert_allclose(back.origins_A, -DISPLACEMENT[:n] * PX, atol=1e-5)
    assert back.subset.tolist() == [1, 2] and back.table["rlnMicrographName"].tolist() == ["mic_a.mrc", "mic_b.mrc"]
    write_particles(str(tmp_path / "again.star"), back)
    again = read_particles(str(tmp_path / "again.star"))
    np.testing.assert_allclose(again.origins_A, -DISPLACEMENT[:n] * PX, atol=1e-5)
    assert again.ctf()["phase_shift_deg"].tolist() == [0.0, 45.0] and again.optics is not None


def test_xmd_errors_name_the_fix(tmp_path):
    (tmp_path / "spider.xmd").write_text("# XMIPP_STAR_1 *\ndata_noname\nloop_\n_image\n_angleRot\n"
                                         "1@parts.stk 10\n2@parts.stk 20\n")
    with pytest.raises(FileFormatError, match="xmipp_image_convert .* --save_metadata_stack"):
        read_particles(str(tmp_path / "spider.xmd"))
    (tmp_path / "noctf.xmd").write_text("data_noname\nloop_\n_image\n_ctfDefocusU\n1@p.mrcs 10000\n")
    with pytest.raises(FileFormatError, match="ctfVoltage, ctfSphericalAberration, ctfQ0"):
        read_particles(str(tmp_path / "noctf.xmd"))
    (tmp_path / "noimage.xmd").write_text("data_noname\nloop_\n_angleRot\n10\n")
    with pytest.raises(FileFormatError, match="_image"):
        read_particles(str(tmp_path / "noimage.xmd"))


@pytest.fixture(scope="module")
def noisy_set(tmp_path_factory):
    """30 CTF-modulated particles of a phantom, their truth, as Xmipp metadata written by xmippLib and as STAR."""
    d = tmp_path_factory.mktemp("xmd_cli")
    vol = phantom_volume(BOX, seed=0)
    imgs, truth = make_particles(vol, 30, pixel_size_A=3.0, snr=2.0, max_shift_px=1.5, seed=1)
    write_stack(str(d / "particles.mrcs"), imgs, 3.0)
    write_mrc(str(d / "ref.mrc"), vol, 3.0)
    refs = [f"{i + 1}@particles.mrcs" for i in range(len(imgs))]
    angles = np.stack([truth["rot"], truth["tilt"], truth["psi"]], 1)
    origins = np.stack([truth["origin_x_A"], truth["origin_y_A"]], 1)
    write_particles_from_arrays(str(d / "particles.star"), refs, 3.0, angles_deg=angles, origins_A=origins,
                                ctf=truth, box_size=BOX)
    md = xmippLib.MetaData()
    for i, ref in enumerate(refs):
        oid = md.addObject()
        _xmipp_row(md, oid, {"MDL_IMAGE": ref, "MDL_ITEM_ID": i + 1, "MDL_ENABLED": 1, "MDL_ANGLE_ROT": angles[i, 0],
                             "MDL_ANGLE_TILT": angles[i, 1], "MDL_ANGLE_PSI": angles[i, 2],
                             "MDL_SHIFT_X": origins[i, 0] / 3.0, "MDL_SHIFT_Y": origins[i, 1] / 3.0,
                             "MDL_CTF_DEFOCUSU": float(truth["defocus_u_A"][i]),
                             "MDL_CTF_DEFOCUSV": float(truth["defocus_v_A"][i]),
                             "MDL_CTF_DEFOCUS_ANGLE": float(truth["defocus_angle_deg"][i]),
                             "MDL_CTF_VOLTAGE": float(truth["voltage_kV"]), "MDL_CTF_CS": float(truth["cs_mm"]),
                             "MDL_CTF_Q0": float(truth["amplitude_contrast"])})
    md.write(str(d / "particles.xmd"))
    return d, truth


def test_cli_assign_angles_xmd_in_xmd_out(noisy_set, capsys, monkeypatch):
    d, truth = noisy_set
    out = d / "aligned.xmd"
    monkeypatch.chdir(d)   # run from the project folder: image names written relative to it
    code = cli(["assign-angles", str(d / "particles.xmd"), "--reference", str(d / "ref.mrc"), "-o", str(out),
                "--angular-step", "6", "--max-shift", "2", "--device", "cpu", "--json", "-q"])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0 and summary["particles"] == 30 and summary["ctf"] == "normal"
    md = xmippLib.MetaData(str(out))
    rot, tilt, psi = (np.array(md.getColumnValues(getattr(xmippLib, f"MDL_ANGLE_{a}"))) for a in ("ROT", "TILT", "PSI"))
    err = angular_distance_deg(euler_to_matrix(rot, tilt, psi), truth["matrices"])
    assert np.median(err) < 4.0                      # wrong conventions give tens of degrees
    shifts = np.stack([md.getColumnValues(xmippLib.MDL_SHIFT_X), md.getColumnValues(xmippLib.MDL_SHIFT_Y)], 1)
    true_px = np.stack([truth["origin_x_A"], truth["origin_y_A"]], 1) / 3.0
    assert np.median(np.hypot(*(shifts - true_px).T)) < 0.7
    cc = np.array(md.getColumnValues(xmippLib.MDL_MAXCC))
    assert cc.shape == (30,) and np.all((cc > 0) & (cc <= 1))
    np.testing.assert_allclose(md.getColumnValues(xmippLib.MDL_CTF_DEFOCUSU), truth["defocus_u_A"], atol=1e-5)
    assert md.getColumnValues(xmippLib.MDL_IMAGE)[0] == "1@particles.mrcs"


def test_cli_reconstruct_xmd_equals_star(noisy_set, capsys):
    d, _ = noisy_set
    maps = {}
    for ext in ("xmd", "star"):
        out = str(d / f"map_{ext}.mrc")
        assert cli(["reconstruct", str(d / f"particles.{ext}"), "-o", out, "--device", "cpu", "-q"]) == 0
        maps[ext], voxel = read_mrc(out)
        assert voxel == pytest.approx(3.0)
    capsys.readouterr()
    assert np.abs(maps["xmd"] - maps["star"]).max() < 1e-3 * np.abs(maps["star"]).max()


# ------------------------------------------------------------------------------------------------ RELION motion

MOVIE_SIZE, MOVIE_FRAMES = 384, 12
#: RELION's Micrograph::read (src/micrograph_model.cpp): labels it requires in data_general, and their types.
RELION_GENERAL_REQUIRED = {"rlnImageSizeX": int, "rlnImageSizeY": int, "rlnImageSizeZ": int,
                           "rlnMicrographMovieName": str}
RELION_GENERAL_OPTIONAL = {"rlnMicrographGainName": str, "rlnMicrographDefectFile": str,
                           "rlnMicrographBinning": float, "rlnMicrographOriginalPixelSize": float,
                           "rlnMicrographPreExposure": float, "rlnMicrographDoseRate": float, "rlnVoltage": float,
                           "rlnMicrographStartFrame": int, "rlnMotionModelVersion": int}
RELION_NOT_OBSERVED = -9999.0


def _relion_micrograph_read(path):
    """What RELION's Micrograph::read keeps of a motion STAR, done with emtable (Scipion's reader)."""
    from emtable import Table
    general = Table(fileName=path, tableName="general")
    assert general.size() == 1
    g = general[0]._asdict()
    for label, kind in RELION_GENERAL_REQUIRED.items():
        assert isinstance(g[label], kind), (label, g.get(label))
    for label, kind in RELION_GENERAL_OPTIONAL.items():
        if label in g:
            assert isinstance(g[label], (int, float) if kind is float else kind), (label, g[label])
    assert g.get("rlnMotionModelVersion", 0) == 0       # 0: no local_motion_model block to read
    n = g["rlnImageSizeZ"]
    shift = np.full((n, 2), RELION_NOT_OBSERVED)
    for row in Table(fileName=path, tableName="global_shift"):
        assert 1 <= row.rlnMicrographFrameNumber <= n    # RELION indexes globalShiftX[frame - 1]
        shift[row.rlnMicrographFrameNumber - 1] = (row.rlnMicrographShiftX, row.rlnMicrographShiftY)
    return g, shift


@pytest.fixture(scope="module")
def aligned_movie(tmp_path_factory):
    d = tmp_path_factory.mktemp("motion")
    frames, truth = make_movie_cached()
    gain = np.random.default_rng(4).uniform(0.8, 1.2, frames.shape[1:]).astype(np.float32)
    write_mrc(str(d / "movie.mrcs"), frames / gain, 2.0)
    write_mrc(str(d / "gain.mrc"), gain, 2.0)
    (d / "defects.txt").write_text("10 0 1 384\n")
    argv = ["align-movies", str(d / "movie.mrcs"), "-o", str(d / "out"), "--frames", "2:11", "--gain",
            str(d / "gain.mrc"), "--defects", str(d / "defects.txt"), "--dose-per-frame", "1.5", "--pre-exposure",
            "0.5", "--voltage", "200", "--device", "cpu", "-q", "--json"]
    return d, truth, argv


def make_movie_cached():
    from xmipp_accel.em.synthetic_movies import make_movie
    return make_movie((MOVIE_SIZE, MOVIE_SIZE), MOVIE_FRAMES, dose_per_pixel=1.0, drift_scale=3.0, doming_px=3.0,
                      seed=7)


def test_motion_star_is_what_relion_reads(aligned_movie, capsys):
    d, truth, argv = aligned_movie
    assert cli(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    motion = str(d / "out" / "movie_shifts.star")
    g, shift = _relion_micrograph_read(motion)
    assert (g["rlnImageSizeX"], g["rlnImageSizeY"], g["rlnImageSizeZ"]) == (MOVIE_SIZE, MOVIE_SIZE, MOVIE_FRAMES)
    assert g["rlnMicrographMovieName"] == str(d / "movie.mrcs") and os.path.exists(g["rlnMicrographMovieName"])
    assert g["rlnMicrographGainName"] == str(d / "gain.mrc")      # applied as is (no --gain-rot/--gain-flip)
    assert g["rlnMicrographDefectFile"] == str(d / "defects.txt")
    assert g["rlnMicrographStartFrame"] == 2 and g["rlnMicrographBinning"] == 1.0
    assert (g["rlnMicrographOriginalPixelSize"], g["rlnMicrographDoseRate"], g["rlnMicrographPreExposure"],
            g["rlnVoltage"]) == (2.0, 1.5, 0.5, 200.0)
    # frames 1 and 12 were not aligned (--frames 2:11): RELION sees them as not observed
    assert shift[0, 0] == RELION_NOT_OBSERVED and shift[-1, 0] == RELION_NOT_OBSERVED
    est = shift[1:11]
    assert np.all(est != RELION_NOT_OBSERVED)
    # our parser reads the same numbers
    ours = read_star(motion)
    np.testing.assert_allclose(np.stack([ours["global_shift"]["rlnMicrographShiftX"],
                                         ours["global_shift"]["rlnMicrographShiftY"]], 1), est)
    # against the truth (unbinned movie pixels, MotionCor2/RELION sign)
    true = truth["global_shifts_px"][1:11]
    err = (est - est.mean(0)) - (true - true.mean(0))
    assert np.sqrt((err ** 2).sum(1).mean()) < 0.4
    # the sign on the data itself: moving frame f's content by +shift lays it on the reference frame (shift 0),
    # which is RELION's alignPatch/getShiftAt meaning (polishing's initial track of a particle is -shift)
    ref = int(np.argmin(np.hypot(*est.T)))
    expected = truth["expected_frame"]
    first, last = 0, len(est) - 1
    for f in (first, last):
        target = np.asarray(expected(1 + ref))
        frame = np.asarray(expected(1 + f))
        right = _cc(shift_images(frame, est[f]), target)
        wrong = _cc(shift_images(frame, -est[f]), target)
        assert right > 0.9 and right > wrong + 0.1, (f, right, wrong)
    # local shifts: RELION's columns, frames of the movie, patch centres inside the frame
    local = ours["local_shift"]
    assert local.names == ["rlnMicrographFrameNumber", "rlnCoordinateX", "rlnCoordinateY", "rlnMicrographShiftX",
                           "rlnMicrographShiftY"]
    assert set(local["rlnMicrographFrameNumber"].tolist()) == set(range(2, 12))
    assert local["rlnCoordinateX"].min() > 0 and local["rlnCoordinateX"].max() < MOVIE_SIZE
    assert summary["corrected_micrographs"] == str(d / "out" / "corrected_micrographs.star")


def test_corrected_micrographs_star(aligned_movie, capsys):
    from emtable import Table
    d, _, argv = aligned_movie
    path = str(d / "out" / "corrected_micrographs.star")
    if not os.path.exists(path):
        assert cli(argv) == 0
        capsys.readouterr()
    optics = list(Table(fileName=path, tableName="optics"))
    assert len(optics) == 1 and optics[0].rlnOpticsGroup == 1
    assert optics[0].rlnMicrographOriginalPixelSize == 2.0 and optics[0].rlnMicrographPixelSize == 2.0
    assert optics[0].rlnVoltage == 200.0
    mics = list(Table(fileName=path, tableName="micrographs"))
    assert len(mics) == 1
    m = mics[0]
    assert m.rlnMicrographName == str(d / "out" / "movie_DW.mrc") and os.path.exists(m.rlnMicrographName)
    assert m.rlnMicrographNameNoDW == str(d / "out" / "movie.mrc")
    assert m.rlnMicrographMetadata == str(d / "out" / "movie_shifts.star") and m.rlnOpticsGroup == 1
    _, shift = _relion_micrograph_read(m.rlnMicrographMetadata)
    # RELION's accumulated motion: summed frame-to-frame distance; early = frames up to 4 e/Å²
    step = np.hypot(*np.diff(shift[1:11], axis=0).T)
    frame_at_end = np.arange(3, 12)
    early = frame_at_end <= (4.0 - 0.5) / 1.5
    assert m.rlnAccumMotionTotal == pytest.approx(step.sum(), abs=1e-4)
    assert m.rlnAccumMotionEarly == pytest.approx(step[early].sum(), abs=1e-4)
    assert m.rlnAccumMotionLate == pytest.approx(step[~early].sum(), abs=1e-4)


def test_oriented_gain_is_written_for_relion(aligned_movie, tmp_path, capsys):
    d, _, _ = aligned_movie
    gain = read_mrc(str(d / "gain.mrc"))[0]
    write_mrc(str(tmp_path / "gain_ccw.mrc"), np.rot90(gain, 1).copy(), 2.0)   # stored turned counter-clockwise
    argv = ["align-movies", str(d / "movie.mrcs"), "-o", str(tmp_path / "o"), "--gain", str(tmp_path / "gain_ccw.mrc"),
            "--gain-rot", "1", "--no-local", "--psd-size", "0", "--device", "cpu", "-q"]
    assert cli(argv) == 0
    capsys.readouterr()
    g, _ = _relion_micrograph_read(str(tmp_path / "o" / "movie_shifts.star"))
    assert g["rlnMicrographGainName"] == str(tmp_path / "o" / "gain_oriented.mrc")
    np.testing.assert_allclose(read_mrc(g["rlnMicrographGainName"])[0], gain)   # as applied to the frames
    assert "rlnMicrographDoseRate" not in g                                    # unknown dose: not written as 0


# ------------------------------------------------------------------------------------------------ ChimeraX

def test_mrc_maps_as_chimerax_reads_them(tmp_path):
    mrcfile = pytest.importorskip("mrcfile")
    vol = np.zeros((20, 24, 28), np.float32)                # z, y, x of different sizes: axis order visible
    vol[3, 5, 7] = 1.0
    write_mrc(str(tmp_path / "v.mrc"), vol, 1.25)
    with mrcfile.open(str(tmp_path / "v.mrc"), permissive=False) as m:
        h = m.header
        assert (int(h.nx), int(h.ny), int(h.nz)) == (28, 24, 20)
        assert (int(h.mapc), int(h.mapr), int(h.maps)) == (1, 2, 3) and int(h.ispg) == 1
        assert (float(m.voxel_size.x), float(m.voxel_size.y), float(m.voxel_size.z)) == pytest.approx((1.25,) * 3)
        assert (int(h.nxstart), int(h.nystart), int(h.nzstart)) == (0, 0, 0)
        assert (float(h.origin.x), float(h.origin.y), float(h.origin.z)) == (0.0, 0.0, 0.0)
        assert m.data[3, 5, 7] == 1.0 and int(h.mode) == 2


#: ChimeraX commands the script may use, and the options each takes (ChimeraX User Guide, commands/*.html).
CHIMERAX_COMMANDS = {"open": set(), "volume": {"voxelSize", "style", "level", "hide"},
                     "color": {"sample", "map", "palette"}, "key": {"pos", "size"}, "view": set()}


def test_chimerax_local_resolution_script(tmp_path):
    from xmipp_accel.plots import chimerax_local_resolution_script
    rng = np.random.default_rng(0)
    locres = np.zeros((24, 24, 24), np.float32)
    locres[4:20, 4:20, 4:20] = rng.uniform(3.0, 9.0, (16, 16, 16))
    mpath, lpath = str(tmp_path / "map.mrc"), str(tmp_path / "local res.mrc")   # a space: quoted
    write_mrc(mpath, rng.normal(size=locres.shape).astype(np.float32), 1.1)
    write_mrc(lpath, locres, 1.1)
    cxc = str(tmp_path / "locres.cxc")
    chimerax_local_resolution_script(mpath, lpath, cxc)
    lines = [ln for ln in open(cxc).read().splitlines() if ln.strip() and not ln.startswith("#")]
    opened, palette, key = [], None, None
    for line in lines:
        words = shlex.split(line)
        verb = words[0]
        assert verb in CHIMERAX_COMMANDS, line
        if verb == "open":
            assert len(words) == 2
            opened.append(words[1])
        elif verb == "color":
            assert words[1:5] == ["sample", "#1", "map", "#2"] and words[5] == "palette"
            palette = [(float(v), c) for v, c in (stop.split(",") for stop in words[6].split(":"))]
        elif verb == "key":
            key = [(c, float(v)) for c, v in (w.split(":") for w in words[1:] if ":" in w)]
        elif verb == "volume":
            assert words[1] in ("#1", "#2", "#1,2")
    assert opened == [mpath, lpath] and all(os.path.isfile(p) for p in opened)
    for p in opened:                         # both maps on the same grid, so 'color sample' overlays them
        data, voxel = read_mrc(p)
        assert data.shape == locres.shape and voxel == pytest.approx(1.1)
    values = locres[locres > 0]
    lo, hi = np.percentile(values, [2, 98])
    assert palette[0][0] == pytest.approx(lo, abs=0.01) and palette[-1][0] == pytest.approx(hi, abs=0.01)
    assert np.all(np.diff([v for v, _ in palette]) > 0) and all(c.startswith("#") and len(c) == 7 for _, c in palette)
    assert [c for c, _ in key] == [c for _, c in palette]
    np.testing.assert_allclose([v for _, v in key], [v for v, _ in palette], atol=0.05)
