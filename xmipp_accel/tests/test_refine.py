"""``xmipp-accel refine``: gold-standard auto-refinement on a synthetic ground truth, bad input, --continue,
real TRPV1 particles (NumPy path)."""
from __future__ import annotations

import json
import os
import warnings

import numpy as np
import pytest

from xmipp_accel.cli.__main__ import main as cli
from xmipp_accel.em.geometry import angular_distance_deg, euler_to_matrix
from xmipp_accel.em.synthetic import make_particles, phantom_volume
from xmipp_accel.gpu.refine import guinier_bfactor, lowpass_volume, sharpen, soft_spherical_mask
from xmipp_accel.gpu.resolution.fsc import fsc, resolution_at
from xmipp_accel.io.images import write_stack
from xmipp_accel.io.mrc import read_mrc, write_mrc
from xmipp_accel.io.particles import read_particles, write_particles_from_arrays

BOX = 40
APIX = 4.0
N = 1000
SNR = 0.1
DIAMETER = 0.85 * BOX * APIX      # Å: the phantom's density lies within 0.8 box
OUTPUTS = ("run_data.star", "run_half1_class001.mrc", "run_half2_class001.mrc", "run_class001.mrc",
           "run_class001_sharpened.mrc", "run_fsc.star", "iterations.jsonl")


def write_synthetic(folder, *, n=N, box=BOX, ctf=True, seed=1):
    """Particles of a phantom with CTF (defocus 0.8-2 µm), shifts of up to 1.5 px and noise at SNR, as a STAR
    file + stack, and the initial model (truth cut at 30 Å); returns (star, init path, truth, truth dict)."""
    vol = phantom_volume(box, seed=3)
    imgs, tr = make_particles(vol, n, pixel_size_A=APIX, snr=SNR, ctf=ctf, max_shift_px=1.5, seed=seed,
                              defocus_range_A=(8000, 20000))
    write_stack(os.path.join(folder, "parts.mrcs"), imgs, APIX)
    star = os.path.join(folder, "parts.star")
    write_particles_from_arrays(star, [f"{i + 1}@parts.mrcs" for i in range(n)], APIX,
                                ctf=tr if ctf else None, box_size=box)
    init = os.path.join(folder, "init.mrc")
    write_mrc(init, lowpass_volume(vol, 30.0, APIX, edge_shells=1.0), APIX)
    return star, init, vol, tr


def run(args, capsys):
    code = cli(["refine"] + [str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def _res(curve_result, thr):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return resolution_at(curve_result, thr, APIX)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("refine_data"))
    return write_synthetic(folder)


def test_refine_recovers_ground_truth(synthetic, tmp_path, capsys):
    star, init, truth, tr = synthetic
    out = tmp_path / "out"
    code, stdout, err = run([star, "--initial-volume", init, "--diameter", DIAMETER, "-o", out,
                             "--max-iterations", 4, "--device", "cpu", "--json"], capsys)
    assert code == 0, err
    summary = json.loads(stdout.strip().splitlines()[-1])
    for name in OUTPUTS:
        assert os.path.exists(out / name), name
    assert "iteration 1 (global" in stdout                      # progress printed as it goes
    records = [json.loads(line) for line in open(out / "iterations.jsonl")]
    assert [r["iteration"] for r in records] == list(range(1, summary["iterations"] + 1))
    assert records[0]["search"] == "global" and all(r["search"] == "local" for r in records[1:])
    assert records[-1]["angular_step_deg"] < records[0]["angular_step_deg"]   # the step follows the resolution
    refined = read_particles(str(out / "run_data.star"))
    assert set(np.unique(refined.subset)) == {1, 2} and abs(int(np.sum(refined.subset == 1)) - N // 2) <= 1
    mask = soft_spherical_mask(BOX, DIAMETER / 2 / APIX, 3.0)
    vol, voxel = read_mrc(str(out / "run_class001.mrc"))
    assert voxel == pytest.approx(APIX)
    gold = summary["resolution_A"]
    truth_res = _res(fsc(vol, truth, mask=mask), 0.5)
    init_res = _res(fsc(read_mrc(init)[0], truth, mask=mask), 0.5)
    # gold-standard 0.143 and FSC-to-truth 0.5 estimate the same resolution (Rosenthal & Henderson 2003); with
    # 500 particles a half, 40 px and the 1-shell quantisation (a shell is 8 % of the frequency near 12 Å)
    # they agree to ~10 %: 15 % allows one shell of each curve's noise.
    assert abs(gold - truth_res) / truth_res < 0.15, (gold, truth_res)
    assert truth_res < 0.6 * init_res, (truth_res, init_res)     # 30 Å initial model -> ~12 Å
    a = refined.angles_deg
    err = angular_distance_deg(euler_to_matrix(a[:, 0], a[:, 1], a[:, 2]), tr["matrices"])
    step = records[-1]["angular_step_deg"]
    # the step rule d/(pi r) is the angular blur the resolution allows; at SNR 0.1 a single 40 px particle is
    # located to ~4.5 deg (its noise floor: the same search from the true poses against the true map gives
    # the same), 1.4x the final 3.2 deg step, so 1.6 steps is the bound; 10 deg would mean a failed search.
    assert np.median(err) < 1.6 * step, (np.median(err), step)
    shift_err = np.hypot(refined.origins_A[:, 0] / APIX - tr["origin_x_A"] / APIX,
                         refined.origins_A[:, 1] / APIX - tr["origin_y_A"] / APIX)
    assert np.median(shift_err) < 1.0                           # shifts of up to 1.5 px recovered to < 1 px
    sharp, _ = read_mrc(str(out / "run_class001_sharpened.mrc"))
    assert np.isfinite(sharp).all() and summary["bfactor_A2"] == pytest.approx(summary["bfactor_A2"])
    assert [f for f in os.listdir(out) if f.startswith(".")] == []


def test_guinier_bfactor_of_a_blurred_map():
    """A map blurred by exp(-B s²/4) on a flat spectrum gives back B; sharpening by B undoes the blur."""
    rng = np.random.default_rng(0)
    white = rng.standard_normal((48, 48, 48)).astype(np.float32)
    b_true = 200.0
    blurred = sharpen(white, 2.0, bfactor=-b_true, resolution_A=float("inf"))
    b = guinier_bfactor(blurred, 2.0, low_A=10.0, high_A=4.5)
    assert b == pytest.approx(b_true, rel=0.1)    # 10 %: per-shell amplitude noise of a white-noise map
    restored = sharpen(blurred, 2.0, bfactor=b, resolution_A=float("inf"))
    assert np.corrcoef(restored.ravel(), white.ravel())[0, 1] > 0.98


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("refine_small"))
    return folder, write_synthetic(folder, n=120, box=32, seed=4)


def test_continue_resumes_from_the_last_iteration(small, tmp_path, capsys):
    _, (star, init, _, _) = small
    out = tmp_path / "out"
    base = [star, "--initial-volume", init, "--diameter", 100, "-o", out, "--device", "cpu", "--quiet"]
    code, _, err = run(base + ["--max-iterations", 1], capsys)
    assert code == 0, err
    first = [json.loads(line) for line in open(out / "iterations.jsonl")]
    assert len(first) == 1 and os.path.isdir(out / "it001")
    code, _, err = run(base + ["--max-iterations", 2], capsys)     # without --continue: refused
    assert code == 2 and "--continue" in err
    code, stdout, err = run(base + ["--max-iterations", 2, "--continue", "--json"], capsys)
    assert code == 0, err
    recs = [json.loads(line) for line in open(out / "iterations.jsonl")]
    assert [r["iteration"] for r in recs] == [1, 2]
    assert recs[0] == first[0]                                    # iteration 1 was not redone
    assert recs[1]["search"] == "local"
    it1 = read_particles(str(out / "it001" / "run_data.star"))
    final = read_particles(str(out / "run_data.star"))
    assert np.array_equal(it1.subset, final.subset)              # the half sets are kept
    assert json.loads(stdout.strip().splitlines()[-1])["iterations"] == 2


def test_trilinear_kernel_gives_the_blob_refinement(small, tmp_path, capsys):
    """``--interp trilinear`` (RELION's kernel, the cheap one on the CPU) refines like the default blob: the
    same poses to within the step and maps as close to the truth."""
    _, (star, init, truth, tr) = small
    runs = {}
    for kernel in ("blob", "trilinear"):
        out = tmp_path / kernel
        code, _, err = run([star, "--initial-volume", init, "--diameter", 100, "-o", out, "--device", "cpu",
                            "--max-iterations", 2, "--quiet", "--interp", kernel], capsys)
        assert code == 0, err
        parts = read_particles(str(out / "run_data.star"))
        a = parts.angles_deg
        runs[kernel] = (euler_to_matrix(a[:, 0], a[:, 1], a[:, 2]), read_mrc(str(out / "run_class001.mrc"))[0],
                        [json.loads(line) for line in open(out / "iterations.jsonl")][-1])
    (m_b, v_b, r_b), (m_t, v_t, r_t) = runs["blob"], runs["trilinear"]
    assert np.median(angular_distance_deg(m_b, m_t)) < 0.1 * r_b["angular_step_deg"]    # 0.15° of 9.5°
    mask = soft_spherical_mask(32, 50 / APIX, 3.0)
    res_b, res_t = (_res(fsc(v, truth, mask=mask), 0.5) for v in (v_b, v_t))
    assert abs(res_t - res_b) / res_b < 0.1, (res_b, res_t)
    assert abs(r_t["resolution_A"] - r_b["resolution_A"]) / r_b["resolution_A"] < 0.1


def test_bad_input_is_refused_before_any_output(small, tmp_path, capsys):
    folder, (star, init, _, _) = small
    nostar = os.path.join(folder, "noctf.star")
    write_particles_from_arrays(nostar, [f"{i + 1}@parts.mrcs" for i in range(120)], APIX, box_size=32)
    big = os.path.join(folder, "big.mrc")
    write_mrc(big, np.ones((40, 40, 40), np.float32), APIX)
    cases = [
        ([nostar, "--initial-volume", init, "--diameter", 100], "no CTF parameters"),
        ([star, "--initial-volume", init, "--diameter", 500], "larger than the box"),
        ([star, "--initial-volume", os.path.join(folder, "missing.mrc"), "--diameter", 100], "does not exist"),
        ([star, "--initial-volume", init, "--diameter", 100, "--symmetry", "q7"], "q7"),
        ([star, "--initial-volume", big, "--diameter", 100], "empty"),
    ]
    for k, (args, message) in enumerate(cases):
        out = tmp_path / f"out{k}"
        code, _, err = run(args + ["-o", out, "--device", "cpu", "--quiet"], capsys)
        assert code == 2, (args, err)
        assert message in err and len(err.strip().splitlines()) == 1, err
        assert not os.path.exists(out)


def test_failed_final_write_leaves_no_half_written_set(small, tmp_path, capsys, monkeypatch):
    """The final particles, maps and FSC are written all or nothing: when one cannot be written (the disk is full
    as the sharpened map is saved) none of them appears, no temporary file is left, and the error says so."""
    _, (star, init, _, _) = small
    import xmipp_accel.io.mrc as mrc
    real = mrc.write_mrc

    def full_disk(path, *a, **kw):
        if os.path.basename(str(path)).startswith(".run_class001_sharpened"):
            raise OSError(28, "No space left on device")
        return real(path, *a, **kw)
    monkeypatch.setattr(mrc, "write_mrc", full_disk)
    out = tmp_path / "out"
    code, _, err = run([star, "--initial-volume", init, "--diameter", 100, "-o", out, "--max-iterations", 1,
                        "--device", "cpu", "--quiet"], capsys)
    assert code == 2 and "nothing was written" in err, err
    assert os.path.isdir(out / "it001")                     # the iteration was saved before the final write
    assert sorted(os.listdir(out)) == ["it001", "iterations.jsonl"]    # no final output, no temporary file
    monkeypatch.setattr(mrc, "write_mrc", real)
    os.makedirs(tmp_path / "blocked" / "run_class001.mrc")           # a folder where a final map goes
    code, _, err = run([star, "--initial-volume", init, "--diameter", 100, "-o", tmp_path / "blocked",
                        "--max-iterations", 1, "--device", "cpu", "--quiet"], capsys)
    assert code == 2 and "run_class001.mrc" in err and "folder" in err, err
    assert sorted(os.listdir(tmp_path / "blocked")) == ["run_class001.mrc"]   # refused before any work


def test_resampled_initial_volume_is_reported(small, tmp_path, capsys):
    """An initial model at another pixel size is resampled to the particles' with a warning."""
    folder, (star, _, truth, _) = small
    other = os.path.join(folder, "init_2A.mrc")
    coarse = lowpass_volume(truth, 30.0, APIX)
    from xmipp_accel.gpu.align.polar import fourier_crop
    write_mrc(other, fourier_crop(coarse, 16, ndim=3), 2 * APIX)     # 16 px at 8 Å/px, same extent
    code, _, err = run([star, "--initial-volume", other, "--diameter", 100, "-o", tmp_path / "o",
                        "--max-iterations", 1, "--device", "cpu"], capsys)
    assert code == 0, err
    assert "resampled" in err


def test_real_trpv1_particles(shared_data, tmp_path, capsys):
    star = os.path.join(shared_data, "trpv1-real", "trpv1_small_stack.star")
    vol = os.path.join(shared_data, "trpv1-real", "trpv1_volume.mrc")
    out = tmp_path / "out"
    code, stdout, err = run([star, "--initial-volume", vol, "--diameter", 150, "-o", out, "--max-iterations", 2,
                             "--device", "cpu", "--json", "--quiet"], capsys)
    assert code == 0, err
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["particles"] == 10 and summary["iterations"] == 2
    for name in OUTPUTS:
        assert os.path.exists(out / name), name
    assert np.isfinite(read_mrc(str(out / "run_class001_sharpened.mrc"))[0]).all()
    refined = read_particles(str(out / "run_data.star"))
    assert refined.n == 10 and np.array_equal(refined.subset, read_particles(star).subset)


def test_xmipp_metadata_input_gives_the_star_result(small, tmp_path, capsys):
    """The same particles as Xmipp .xmd (shifts in px, Xmipp labels) refine exactly as from the STAR file, and
    the refined particles come back as .xmd too."""
    from xmipp_accel.io.particles import write_particles
    folder, (star, init, _, _) = small
    xmd = os.path.join(folder, "parts.xmd")
    write_particles(xmd, read_particles(star))
    results = {}
    for name, path in (("star", star), ("xmd", xmd)):
        out = tmp_path / name
        code, stdout, err = run([path, "--initial-volume", init, "--diameter", 100, "-o", out, "--max-iterations", 1,
                                 "--device", "cpu", "--json", "--quiet"], capsys)
        assert code == 0, err
        results[name] = (json.loads(stdout.strip().splitlines()[-1]), read_particles(str(out / "run_data.star")))
    (s_sum, s_parts), (x_sum, x_parts) = results["star"], results["xmd"]
    assert "particles_xmd" in x_sum["outputs"] and "particles_xmd" not in s_sum["outputs"]
    # same input, same seed, same code path: identical poses up to the text precision of the STAR/XMD columns
    np.testing.assert_allclose(x_parts.angles_deg, s_parts.angles_deg, atol=1e-3)
    np.testing.assert_allclose(x_parts.origins_A, s_parts.origins_A, atol=1e-3)
    assert x_sum["resolution_A"] == pytest.approx(s_sum["resolution_A"], rel=1e-6)
    back = read_particles(x_sum["outputs"]["particles_xmd"])
    np.testing.assert_allclose(back.angles_deg, x_parts.angles_deg, atol=1e-3)
    np.testing.assert_allclose(back.origins_A, x_parts.origins_A, atol=1e-3)
    assert np.array_equal(back.subset, x_parts.subset)


def test_symmetry_the_initial_model_lacks_is_reported(small, tmp_path, capsys):
    """--symmetry i on an asymmetric phantom: a warning naming the model and the score, in the summary too;
    the run goes on with the symmetrised model. A model that has the symmetry passes silently."""
    from xmipp_accel.em.symmetry import symmetrize_volume, symmetry_agreement
    folder, (star, init, truth, _) = small
    mask = soft_spherical_mask(32, 50 / APIX)
    low = lowpass_volume(truth, 30.0, APIX)
    assert symmetry_agreement(symmetrize_volume(low, "c4"), "c4", mask=mask) > 0.99   # 1 up to interpolation
    assert symmetry_agreement(low, "i", mask=mask) < 0.5
    code, stdout, err = run([star, "--initial-volume", init, "--diameter", 100, "-o", tmp_path / "i",
                             "--symmetry", "i", "--max-iterations", 1, "--device", "cpu", "--json"], capsys)
    assert code == 0, err
    assert "does not look i-symmetric" in err and init in err
    assert any("does not look i-symmetric" in n for n in json.loads(stdout.strip().splitlines()[-1])["notes"])
    c4 = os.path.join(folder, "init_c4.mrc")
    write_mrc(c4, symmetrize_volume(read_mrc(init)[0], "c4"), APIX)
    code, _, err = run([star, "--initial-volume", c4, "--diameter", 100, "-o", tmp_path / "c4", "--symmetry", "c4",
                        "--max-iterations", 1, "--device", "cpu"], capsys)
    assert code == 0, err
    assert "symmetric" not in err


def test_cpu_batches_on_threads_give_the_same_refinement(monkeypatch):
    """The NumPy path runs its batches on threads (cpu_workers): poses and maps equal the one-thread run."""
    from xmipp_accel import backend
    from xmipp_accel.gpu.refine import autorefine as ar
    vol = phantom_volume(32, seed=3)
    imgs, tr = make_particles(vol, 96, pixel_size_A=APIX, snr=SNR, ctf=True, max_shift_px=1.5, seed=5,
                              defocus_range_A=(8000, 20000))
    ctf = {k: tr[k] for k in ("defocus_u_A", "defocus_v_A", "defocus_angle_deg", "voltage_kV", "cs_mm",
                              "amplitude_contrast")}
    init = lowpass_volume(vol, 30.0, APIX, edge_shells=1.0)
    settings = ar.RefineSettings(pixel_size_A=APIX, diameter_A=100.0, max_iterations=2)
    runs = []
    for workers in (1, 3):
        monkeypatch.setattr(ar, "cpu_workers", lambda w=workers: w)
        res = ar.auto_refine(imgs, ctf, init, settings, subset=ar.assign_subsets(96, seed=1),
                             devices=[backend.resolve_device("cpu")], batch=16)
        runs.append(res)
    one, three = runs
    assert [r.search for r in three.state.history] == ["global", "local"]
    assert np.array_equal(one.state.matrices, three.state.matrices)
    assert np.array_equal(one.state.origins_px, three.state.origins_px)
    assert np.array_equal(one.state.half1, three.state.half1)
