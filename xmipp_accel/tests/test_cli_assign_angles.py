"""``xmipp-accel assign-angles``: files in, files out, errors as one line (exit status 2)."""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import pytest

from xmipp_accel.cli.__main__ import main as cli
from xmipp_accel.em.geometry import angular_distance_deg, euler_to_matrix
from xmipp_accel.em.synthetic import make_particles, phantom_volume
from xmipp_accel.gpu.align.polar import fourier_crop
from xmipp_accel.io.images import write_stack
from xmipp_accel.io.mrc import write_mrc
from xmipp_accel.io.particles import read_particles, write_particles_from_arrays

PX = 3.0
N = 32


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    d = tmp_path_factory.mktemp("assign")
    vol = phantom_volume(N, seed=0)
    imgs, truth = make_particles(vol, 30, pixel_size_A=PX, snr=2.0, max_shift_px=1.5, seed=1)
    write_stack(str(d / "particles.mrcs"), imgs, PX)
    refs = [f"{i + 1}@particles.mrcs" for i in range(len(imgs))]
    write_particles_from_arrays(str(d / "particles.star"), refs, PX, ctf=truth, subset=truth["subset"], box_size=N,
                                extra={"rlnMicrographName": np.array(["mic1.mrc"] * len(imgs))})
    write_mrc(str(d / "ref.mrc"), vol, PX)
    return d, vol, truth


def _run(capsys, argv):
    code = cli(argv)
    out, err = capsys.readouterr()
    return code, out, err


def _errors(star, truth):
    pset = read_particles(star)
    a = pset.angles_deg
    m = euler_to_matrix(a[:, 0], a[:, 1], a[:, 2])
    return angular_distance_deg(m, truth["matrices"]), pset


def test_projmatch_writes_poses_and_keeps_columns(dataset, capsys):
    d, _, truth = dataset
    out = d / "aligned.star"
    code, stdout, _ = _run(capsys, ["assign-angles", str(d / "particles.star"), "--reference", str(d / "ref.mrc"),
                                    "-o", str(out), "--angular-step", "6", "--max-shift", "2", "--device", "cpu",
                                    "--json", "-q"])
    assert code == 0
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["particles"] == 30 and summary["method"] == "projmatch" and summary["particles_per_second"] > 0
    err, pset = _errors(str(out), truth)
    assert np.median(err) < 4.0          # convention errors would give tens of degrees
    origin = pset.origins_A / PX
    true_origin = np.stack([truth["origin_x_A"], truth["origin_y_A"]], 1) / PX
    assert np.median(np.hypot(*(origin - true_origin).T)) < 0.4
    score = np.asarray(pset.table["rlnParticleFigureOfMerit"], float)
    assert np.all((score > 0) & (score <= 1))
    inp = read_particles(str(d / "particles.star"))
    for col in ("rlnDefocusU", "rlnRandomSubset", "rlnMicrographName", "rlnImageName"):
        np.testing.assert_array_equal(np.asarray(pset.table[col]), np.asarray(inp.table[col]))


def test_reference_of_other_pixel_size_is_resampled(dataset, capsys, tmp_path):
    d, vol, truth = dataset
    coarse = np.zeros((30, 30, 30), np.float32)                 # 4 Å/px in a 30 px box (120 Å)
    coarse[3:27, 3:27, 3:27] = fourier_crop(vol, 24, ndim=3)
    write_mrc(str(tmp_path / "coarse.mrc"), coarse, PX * N / 24)
    out = tmp_path / "aligned.star"
    code, stdout, _ = _run(capsys, ["assign-angles", str(d / "particles.star"), "--reference",
                                    str(tmp_path / "coarse.mrc"), "-o", str(out), "--angular-step", "6",
                                    "--max-res", "9", "--device", "cpu", "--json", "-q"])
    assert code == 0
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert any("resampled" in note for note in summary["notes"])
    assert any("cropped from 40 to 32" in note for note in summary["notes"])
    err, _ = _errors(str(out), truth)
    assert np.median(err) < 6.0


@pytest.mark.parametrize("kind, message", [("zeros", "empty"), ("nan", "not finite|NaN|non-finite"),
                                           ("image", "cubic 3-D map")])
def test_bad_reference_is_refused(dataset, capsys, tmp_path, kind, message):
    d, vol, _ = dataset
    bad = {"zeros": np.zeros_like(vol), "nan": np.where(vol > vol.max() / 2, np.nan, vol).astype(np.float32),
           "image": vol[:1]}[kind]
    write_mrc(str(tmp_path / "bad.mrc"), bad, PX)
    code, _, err = _run(capsys, ["assign-angles", str(d / "particles.star"), "--reference", str(tmp_path / "bad.mrc"),
                                 "-o", str(tmp_path / "o.star"), "--device", "cpu", "-q"])
    assert code == 2
    assert "bad.mrc" in err
    import re
    assert re.search(message, err), err
    assert not (tmp_path / "o.star").exists()


def test_max_res_beyond_reference_nyquist_is_refused(dataset, capsys, tmp_path):
    d, vol, _ = dataset
    write_mrc(str(tmp_path / "coarse.mrc"), fourier_crop(vol, 16, ndim=3), PX * 2)
    code, _, err = _run(capsys, ["assign-angles", str(d / "particles.star"), "--reference",
                                 str(tmp_path / "coarse.mrc"), "-o", str(tmp_path / "o.star"), "--max-res", "7",
                                 "--device", "cpu", "-q"])
    assert code == 2 and "--max-res" in err


def test_deepalign_without_torch(dataset, capsys, monkeypatch, tmp_path):
    d, _, _ = dataset
    monkeypatch.setitem(sys.modules, "torch", None)
    code, _, err = _run(capsys, ["assign-angles", str(d / "particles.star"), "--reference", str(d / "ref.mrc"),
                                 "-o", str(tmp_path / "o.star"), "--method", "deepalign", "--device", "cpu", "-q"])
    assert code == 2 and "PyTorch" in err and "projmatch" in err


def test_deepalign_trains_saves_and_reuses_models(dataset, capsys, tmp_path):
    pytest.importorskip("torch")
    d, _, truth = dataset
    models = tmp_path / "models"
    argv = ["assign-angles", str(d / "particles.star"), "--reference", str(d / "ref.mrc"), "--method", "deepalign",
            "--model-dir", str(models), "--angular-step", "6", "--region-step", "60", "--cnn-box", "16",
            "--cnn-width", "4", "--train-steps", "15", "--train-batch", "16", "--regions-searched", "3",
            "--device", "cpu", "--json", "-q"]
    code, stdout, _ = _run(capsys, argv + ["-o", str(tmp_path / "a.star")])
    assert code == 0
    s1 = json.loads(stdout.strip().splitlines()[-1])
    assert s1["training"]["loaded"] is False and os.path.isfile(models / "deepalign.json")
    pset = read_particles(str(tmp_path / "a.star"))
    assert "rlnXmippAccelConsensusDeg" in pset.table and "rlnXmippAccelConsensusDisagree" in pset.table
    code, stdout, _ = _run(capsys, argv + ["-o", str(tmp_path / "b.star")])
    assert code == 0
    assert json.loads(stdout.strip().splitlines()[-1])["training"]["loaded"] is True
    a = read_particles(str(tmp_path / "a.star")).angles_deg
    b = read_particles(str(tmp_path / "b.star")).angles_deg
    np.testing.assert_allclose(a, b, atol=1e-6)                 # same models, same assignment
    (models / "deepalign.json").write_text("garbage")
    code, _, err = _run(capsys, argv + ["-o", str(tmp_path / "c.star")])
    assert code == 2 and "corrupt" in err and str(models) in err


def test_unknown_symmetry_and_bad_step(dataset, capsys, tmp_path):
    d, _, _ = dataset
    base = ["assign-angles", str(d / "particles.star"), "--reference", str(d / "ref.mrc"), "-o",
            str(tmp_path / "o.star"), "--device", "cpu", "-q"]
    code, _, err = _run(capsys, base + ["--sym", "x7"])
    assert code == 2 and "x7" in err
    code, _, err = _run(capsys, base + ["--angular-step", "0"])
    assert code == 2 and "--angular-step" in err


def test_deepalign_shortlist_options_reach_the_config():
    from xmipp_accel.cli import assign_angles
    parser = argparse.ArgumentParser()
    assign_angles.add_args(parser)
    args = parser.parse_args(["p.star", "--reference", "r.mrc", "-o", "o.star", "--method", "deepalign",
                              "--region-mass", "0.75", "--max-regions", "4", "--coarse-check-step", "15",
                              "--regions-searched", "3"])
    cfg = assign_angles._deep_config(args)
    assert (cfg.region_probability_mass, cfg.max_regions_searched, cfg.coarse_check_step_deg,
            cfg.n_regions_searched) == (0.75, 4, 15.0, 3)


@pytest.mark.parametrize("option,value,message", [("--region-mass", "1.5", "--region-mass"),
                                                  ("--max-regions", "1", "--max-regions"),
                                                  ("--coarse-check-step", "-2", "--coarse-check-step")])
def test_deepalign_bad_shortlist_options_are_refused(dataset, capsys, tmp_path, option, value, message):
    d, _, _ = dataset
    code, _, err = _run(capsys, ["assign-angles", str(d / "particles.star"), "--reference", str(d / "ref.mrc"),
                                 "-o", str(tmp_path / "o.star"), "--method", "deepalign", option, value,
                                 "--device", "cpu", "-q"])
    assert code == 2 and message in err
    assert not (tmp_path / "o.star").exists()


def test_default_model_folder_drops_the_metadata_extension():
    from xmipp_accel.cli.assign_angles import _default_model_dir
    assert _default_model_dir("/d/out.star") == "/d/out_deepalign_models"
    assert _default_model_dir("/d/out.xmd") == "/d/out_deepalign_models"
    assert _default_model_dir("/d/out") == "/d/out_deepalign_models"
