"""RELION reads the STAR files we write, run from the folder a RELION user runs from (the project folder).

Every command runs with the project folder as working directory, as a user does (issue 14). RELION
then opens the images named in our outputs: ``relion_star_handler --discard_on_stats`` reads every
image (or micrograph) a STAR file names and fails on a missing one, and ``relion_reconstruct`` reads
them all and writes a map. Layouts: RELION's (names relative to the project, STAR files in job
folders), a STAR beside its stack with the output in a sub-folder (the report of issue 14: we wrote
``../parts.mrcs``), a STAR beside its stacks named relative to itself (Scipion/Xmipp), stacks moved
(``--datadir``), and ``--absolute-paths``; and RELION's own motion correction beside ours. 32 px, 200
particles, two 256 px movies: about 25 s on 2 cores.
"""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from xmipp_accel.cli.__main__ import main as cli_main
from xmipp_accel.em.synthetic import make_particles, phantom_volume
from xmipp_accel.em.synthetic_movies import make_movie
from xmipp_accel.io.images import write_stack
from xmipp_accel.io.mrc import read_mrc, write_mrc
from xmipp_accel.io.particles import write_particles_from_arrays
from xmipp_accel.io.star import read_star, write_star
from xmipp_accel.tests.relion_peer import relion_program, run_relion

BOX, N, PX = 32, 200, 3.0
EXTRACT = "Extract/job007/Movies/parts.mrcs"
OPTICS_LOST = "could not read optics groups table"     # RELION 3.1's warning when data_optics lacks a label


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A RELION-style project folder: Extract/job007 holds the stack and a STAR naming it from the project."""
    relion_program("relion_reconstruct")
    proj = tmp_path_factory.mktemp("project")
    vol = phantom_volume(BOX, seed=1)
    images, truth = make_particles(vol, N, pixel_size_A=PX, snr=5.0, ctf=True, max_shift_px=2, seed=2)
    write_mrc(str(proj / "ref.mrc"), vol, PX)
    write_stack(str(proj / EXTRACT), images, PX)
    here = os.getcwd()
    os.chdir(proj)
    try:
        write_particles_from_arrays("Extract/job007/particles.star", [f"{i + 1:06d}@{EXTRACT}" for i in range(N)],
                                    PX, ctf=truth, box_size=BOX,   # true poses: reconstruct reads them as they are
                                    angles_deg=np.stack([truth["rot"], truth["tilt"], truth["psi"]], 1),
                                    origins_A=np.stack([truth["origin_x_A"], truth["origin_y_A"]], 1))
    finally:
        os.chdir(here)
    return proj, images, truth


def _cli(argv, capsys) -> dict:
    code = cli_main(argv + ["--device", "cpu", "--json", "-q"])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out.strip().splitlines()[-1])


def _assign(star, out, capsys, *extra):
    return _cli(["assign-angles", star, "--reference", "ref.mrc", "-o", out, "--angular-step", "15",
                 "--refine-levels", "1", *extra], capsys)


def _names(star, label="rlnImageName", block="particles"):
    return read_star(star)[block][label].tolist()


def _relion_reads_images(star, cwd, label="rlnImageName"):
    """relion_star_handler reads every image ``label`` names (its image statistics), run in ``cwd``."""
    proc = run_relion(["relion_star_handler", "--i", star, "--o", os.path.join(str(cwd), "handled.star"),
                       "--discard_on_stats", "--discard_label", label], cwd)
    text = proc.stdout + proc.stderr
    assert "Discarded 0 Images" in text and OPTICS_LOST not in text, text[-2000:]


def _relion_reconstruct(star, cwd, out):
    run_relion(["relion_reconstruct", "--i", star, "--o", out, "--ctf"], cwd)
    return read_mrc(os.path.join(str(cwd), out))[0]


def _corr(a, b):
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


def test_assign_angles_in_a_relion_project(project, capsys, monkeypatch):
    proj, _, _ = project
    monkeypatch.chdir(proj)
    _assign("Extract/job007/particles.star", "Assign/job008/aligned.star", capsys)
    assert _names("Assign/job008/aligned.star")[0] == f"000001@{EXTRACT}"    # as RELION names them
    _relion_reads_images("Assign/job008/aligned.star", proj)
    ours = _cli(["reconstruct", "Assign/job008/aligned.star", "-o", "Assign/job008/ours.mrc"], capsys)
    relion_map = _relion_reconstruct("Assign/job008/aligned.star", proj, "Assign/job008/relion.mrc")
    # Same particles and poses, two independent reconstructions (gather vs RELION's gridding): at SNR 5 and
    # 32 px they agree far beyond what a wrong image (noise, a different stack) would give (< 0.5).
    assert _corr(relion_map, read_mrc(ours["output"])[0]) > 0.9


def test_star_beside_its_stack_output_in_a_sub_folder(project, capsys, monkeypatch):
    """Issue 14's report: parts.star naming parts.mrcs beside it, -o sub/aligned.star; we used to write
    ../parts.mrcs, which RELION run from the project folder could not open."""
    proj, images, truth = project
    monkeypatch.chdir(proj)
    write_stack("parts.mrcs", images, PX)
    write_particles_from_arrays("parts.star", [f"{i + 1:06d}@parts.mrcs" for i in range(N)], PX, ctf=truth,
                                box_size=BOX)
    _assign("parts.star", "sub/aligned.star", capsys)
    assert _names("sub/aligned.star")[0] == "000001@parts.mrcs"
    _relion_reads_images("sub/aligned.star", proj)
    _relion_reconstruct("sub/aligned.star", proj, "sub/relion.mrc")


def test_star_named_relative_to_its_own_folder(project, capsys, monkeypatch):
    """Scipion/Xmipp layout: bare names beside the STAR file; read from its folder, written for the project."""
    proj, images, truth = project
    data = proj / "Import" / "job001"
    write_stack(str(data / "s.mrcs"), images, PX)
    write_particles_from_arrays(str(data / "p.star"), [f"{i + 1}@s.mrcs" for i in range(N)], PX, ctf=truth,
                                box_size=BOX)
    monkeypatch.chdir(proj)
    _assign("Import/job001/p.star", "Assign/job009/aligned.star", capsys)
    assert _names("Assign/job009/aligned.star")[0] == "1@Import/job001/s.mrcs"
    _relion_reads_images("Assign/job009/aligned.star", proj)


def test_datadir_finds_moved_stacks(project, capsys, monkeypatch):
    proj, _, _ = project
    monkeypatch.chdir(proj)
    os.makedirs("transfer", exist_ok=True)
    shutil.copy(EXTRACT, "transfer/moved.mrcs")
    # the STAR file of a project whose stacks were copied, flat, into transfer/
    text = open("Extract/job007/particles.star").read().replace(EXTRACT, "Extract/job099/Movies/moved.mrcs")
    os.makedirs("Other", exist_ok=True)
    with open("Other/moved.star", "w") as f:
        f.write(text)
    code = cli_main(["assign-angles", "Other/moved.star", "--reference", "ref.mrc", "-o", "Other/x.star",
                     "--device", "cpu", "-q"])
    err = capsys.readouterr().err
    assert code != 0 and "moved.mrcs not found" in err and "--datadir" in err
    _assign("Other/moved.star", "Other/aligned.star", capsys, "--datadir", "transfer")
    assert _names("Other/aligned.star")[0] == "000001@transfer/moved.mrcs"   # the file found, for the project
    _relion_reads_images("Other/aligned.star", proj)
    _cli(["reconstruct", "Other/moved.star", "-o", "Other/map.mrc", "--datadir", "transfer"], capsys)


def test_absolute_paths_read_from_any_folder(project, capsys, monkeypatch, tmp_path):
    proj, _, _ = project
    monkeypatch.chdir(proj)
    _assign("Extract/job007/particles.star", "Assign/job010/aligned.star", capsys, "--absolute-paths")
    assert _names("Assign/job010/aligned.star")[0] == f"000001@{proj / EXTRACT}"
    _relion_reads_images(str(proj / "Assign/job010/aligned.star"), tmp_path)


def test_refine_particles_read_by_relion(project, capsys, monkeypatch):
    proj, _, _ = project
    monkeypatch.chdir(proj)
    _cli(["refine", "Extract/job007/particles.star", "--initial-volume", "ref.mrc", "--diameter", "80",
          "-o", "Refine3D/job011", "--max-iterations", "1"], capsys)
    for star in ("Refine3D/job011/run_data.star", "Refine3D/job011/it001/run_data.star"):
        assert _names(star)[0] == f"000001@{EXTRACT}"
        _relion_reads_images(star, proj)


def test_demo_reconstruction_input_read_by_relion(project, capsys, monkeypatch):
    """The particles STAR the demo writes for ``reconstruct`` (true poses): RELION reconstructs the same map."""
    proj, _, _ = project
    monkeypatch.chdir(proj)
    summary = _cli(["demo", "--small", "--particles", "300", "--outdir", "demo"], capsys)
    assert _names("demo/particles.star")[0] == "000001@demo/particles.mrcs"
    relion_map = _relion_reconstruct("demo/particles.star", proj, "demo/relion.mrc")
    truth = read_mrc("demo/truth_map.mrc")[0]
    # True poses, SNR 0.5, 300 particles of 32 px: RELION's unregularised map correlates 0.8 with the true map
    # (ours, Wiener-weighted, 0.94); images paired with the wrong poses would give noise (about 0).
    assert _corr(relion_map, truth) > 0.6
    assert _corr(read_mrc(summary["reconstruct"]["output"])[0], truth) > 0.6


@pytest.fixture(scope="module")
def movies(project):
    """Two 256 x 256 px movies of 8 frames with a known drift, in the project's Movies/ (2 Å/px)."""
    proj, _, _ = project
    for k in range(2):
        frames, _ = make_movie((256, 256), 8, dose_per_pixel=1.0, drift_scale=2.0, seed=k)
        write_mrc(str(proj / f"Movies/m{k}.mrcs"), frames, 2.0)
    return ["Movies/m0.mrcs", "Movies/m1.mrcs"]


def test_align_movies_micrographs_read_by_relion(project, movies, capsys, monkeypatch):
    proj, _, _ = project
    monkeypatch.chdir(proj)
    _cli(["align-movies", "Movies/m0.mrcs", "Movies/m1.mrcs", "-o", "MotionCorr/job002", "--dose-per-frame", "1",
          "--no-local", "--psd-size", "0", "--cs", "2.7", "--amplitude-contrast", "0.07"], capsys)
    star = "MotionCorr/job002/corrected_micrographs.star"
    blocks = read_star(star)
    assert blocks["optics"]["rlnSphericalAberration"].tolist() == [2.7]
    assert blocks["optics"]["rlnAmplitudeContrast"].tolist() == [0.07]
    assert _names(star, "rlnMicrographName", "micrographs") == ["MotionCorr/job002/m0_DW.mrc",
                                                              "MotionCorr/job002/m1_DW.mrc"]
    for label in ("rlnMicrographName", "rlnMicrographNameNoDW"):
        _relion_reads_images(star, proj, label)
    # the motion STAR files, and the movies they name, as RELION's motion correction names them
    for meta in _names(star, "rlnMicrographMetadata", "micrographs"):
        assert os.path.isfile(meta) and not os.path.isabs(meta)
        movie = read_star(meta)["general"]["rlnMicrographMovieName"][0]
        assert movie in ("Movies/m0.mrcs", "Movies/m1.mrcs")


def test_relion_motion_correction_writes_the_same_layout(project, movies, capsys, monkeypatch):
    """RELION's own motion correction (relion_run_motioncorr --use_own), run on the same movies from the same
    folder: its corrected_micrographs.star has our optics labels, names of the same form and the same movie
    names in the motion STAR, and measures the same accumulated motion."""
    proj, _, _ = project
    monkeypatch.chdir(proj)
    write_star("movies.star", {"optics": {"rlnOpticsGroupName": np.array(["opticsGroup1"]), "rlnOpticsGroup": [1],
                                          "rlnMicrographOriginalPixelSize": [2.0], "rlnVoltage": [300.0],
                                          "rlnSphericalAberration": [2.7], "rlnAmplitudeContrast": [0.1]},
                               "movies": {"rlnMicrographMovieName": np.array(movies), "rlnOpticsGroup": [1, 1]}})
    run_relion(["relion_run_motioncorr", "--i", "movies.star", "--o", "MotionCorr/job005/", "--use_own",
                "--first_frame_sum", "1", "--last_frame_sum", "-1", "--bin_factor", "1", "--bfactor", "150",
                "--dose_per_frame", "1", "--patch_x", "1", "--patch_y", "1", "--j", "1"], proj)
    _cli(["align-movies", *movies, "-o", "MotionCorr/job006", "--dose-per-frame", "1", "--no-local",
          "--psd-size", "0"], capsys)
    theirs = read_star("MotionCorr/job005/corrected_micrographs.star")
    ours = read_star("MotionCorr/job006/corrected_micrographs.star")
    assert set(theirs["optics"].names) <= set(ours["optics"].names)
    for blocks in (theirs, ours):
        for label in ("rlnMicrographName", "rlnMicrographMetadata"):
            for name in blocks["micrographs"][label].tolist():
                assert not os.path.isabs(name) and os.path.isfile(name), name   # relative to the project folder
        metas = blocks["micrographs"]["rlnMicrographMetadata"].tolist()
        assert [read_star(m)["general"]["rlnMicrographMovieName"][0] for m in metas] == movies
    # Both measure the drift of the same synthetic movies (RELION: its MotionCor2-like patch alignment with
    # one patch; ours: global FlexAlign): measured 9.55 and 9.69 px against RELION's 9.54 and 9.58 px. 10 %
    # allows for the different interpolation and B-factor (on 192 px movies of 6 frames they differ by 12 %);
    # a sign or frame-numbering error changes the path length by far more.
    np.testing.assert_allclose(ours["micrographs"]["rlnAccumMotionTotal"],
                               theirs["micrographs"]["rlnAccumMotionTotal"], rtol=0.1)
