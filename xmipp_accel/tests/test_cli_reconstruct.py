"""``xmipp-accel reconstruct`` end to end: STAR + stacks in, maps, half maps and FSC out; bad input."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from xmipp_accel.cli.__main__ import main as cli
from xmipp_accel.em.geometry import matrix_to_euler
from xmipp_accel.io.images import write_stack
from xmipp_accel.io.mrc import read_mrc
from xmipp_accel.io.particles import write_particles_from_arrays
from xmipp_accel.io.star import read_star
from xmipp_accel.tests.test_mpi import mpirun_path
from xmipp_accel.tests.test_reconstruct import (APIX, apply_ctf, blob_projections, blob_volume, gaussian_blobs,
                                                random_rotations)

BOX = 24
N = 160


def write_dataset(folder, *, n=N, ctf=True, subset=True, angles=True, images=None, pixel_size=None, name="parts"):
    """Particles of a Gaussian phantom written as a RELION 3.1 STAR file and one MRC stack."""
    rng = np.random.default_rng(2)
    blobs = gaussian_blobs(BOX, 12, seed=5)
    mats = random_rotations(n, 11)
    origins_px = rng.uniform(-2, 2, (n, 2))
    imgs = blob_projections(BOX, blobs, mats, -origins_px)
    du = rng.uniform(3000, 5000, n)
    params = {"defocus_u_A": du, "defocus_v_A": du - 150, "defocus_angle_deg": rng.uniform(0, 180, n)}
    if ctf:
        imgs = apply_ctf(imgs, params, APIX)
    if images is not None:
        imgs = images(imgs)
    stack = os.path.join(folder, f"{name}.mrcs")
    write_stack(stack, imgs, APIX)
    rot, tilt, psi = matrix_to_euler(mats)
    star = os.path.join(folder, f"{name}.star")
    write_particles_from_arrays(
        star, [f"{i + 1}@{name}.mrcs" for i in range(n)], APIX if pixel_size is None else pixel_size,
        angles_deg=np.stack([rot, tilt, psi], 1) if angles else None, origins_A=origins_px * APIX,
        ctf=params if ctf else None, subset=(1 + np.arange(n) % 2) if subset else None, box_size=BOX)
    return star, blob_volume(BOX, blobs)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("recon_cli")
    star, truth = write_dataset(str(folder))
    return folder, star, truth


def run_cli(args, capsys):
    code = cli(["reconstruct"] + [str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_reconstruct_with_halves_and_json(dataset, capsys, tmp_path):
    folder, star, truth = dataset
    out = tmp_path / "map.mrc"
    code, stdout, err = run_cli([star, "-o", out, "--halves", "--json", "--device", "cpu", "--quiet"], capsys)
    assert code == 0, err
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["particles"] == N and summary["ctf"] == "wiener"
    for key in ("output", "half1", "half2", "fsc"):
        assert os.path.exists(summary[key]), key
    assert summary["half1"].endswith("map_half1.mrc") and summary["fsc"].endswith("map_fsc.star")
    vol, voxel = read_mrc(str(out))
    assert vol.shape == (BOX,) * 3 and voxel == pytest.approx(APIX)
    assert np.corrcoef(vol.ravel(), truth.ravel())[0, 1] > 0.98
    table = read_star(summary["fsc"])["fsc"]
    assert table["rlnFourierShellCorrelation"][1] > 0.9
    assert 2 * APIX <= summary["resolution_A"] < 4 * APIX
    leftovers = [f for f in os.listdir(tmp_path) if f.startswith(".")]
    assert leftovers == []


def test_options_change_the_result(dataset, capsys, tmp_path):
    folder, star, truth = dataset
    maps = {}
    for tag, extra in {"none": ["--ctf", "none"], "lowres": ["--max-res", str(4 * APIX)],
                       "d2": ["--sym", "d2", "--sym-mode", "expand"]}.items():
        out = tmp_path / f"{tag}.mrc"
        code, _, err = run_cli([star, "-o", out, "--device", "cpu", "--quiet", "--batch", "50"] + extra, capsys)
        assert code == 0, err
        maps[tag] = read_mrc(str(out))[0]
    cc = {k: np.corrcoef(v.ravel(), truth.ravel())[0, 1] for k, v in maps.items()}
    assert cc["none"] < 0.95            # the CTF was ignored
    assert 0.8 < cc["lowres"] < 0.99    # information only to 4 pixels
    spec = np.abs(np.fft.fftshift(np.fft.fftn(maps["lowres"])))
    c = np.arange(BOX) - BOX // 2
    r = np.sqrt(c[:, None, None] ** 2 + c[None, :, None] ** 2 + c[None, None, :] ** 2) / BOX
    assert spec[r > 0.32].max() < 0.05 * spec.max()


def test_even_odd_halves_without_subset_column(tmp_path, capsys):
    star, truth = write_dataset(str(tmp_path), n=60, subset=False, ctf=False)
    code, stdout, err = run_cli([star, "-o", tmp_path / "m.mrc", "--halves", "--device", "cpu", "--json", "-q"],
                                capsys)
    assert code == 0, err
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["ctf"] == "none" and os.path.exists(summary["half2"])


@pytest.mark.parametrize("case", ["missing_stack", "no_angles", "bad_sym", "nan", "pixel_sizes", "ctf_missing",
                                  "no_file", "max_res"])
def test_bad_input_gives_a_clear_message_and_no_output(tmp_path, capsys, case):
    kwargs, extra = {}, []
    if case == "no_angles":
        kwargs["angles"] = False
    elif case == "nan":
        def poison(imgs):
            imgs = imgs.copy()
            imgs[7, 2, 2] = np.nan
            return imgs
        kwargs["images"] = poison
    elif case == "pixel_sizes":
        kwargs["pixel_size"] = np.where(np.arange(40) < 20, APIX, 1.1 * APIX)
    elif case == "ctf_missing":
        kwargs["ctf"] = False
        extra = ["--ctf", "wiener"]
    elif case == "bad_sym":
        extra = ["--sym", "q9"]
    elif case == "max_res":
        extra = ["--max-res", "-3"]
    star, _ = write_dataset(str(tmp_path), n=40, **kwargs)
    if case == "missing_stack":
        os.remove(os.path.join(tmp_path, "parts.mrcs"))
    if case == "no_file":
        star = os.path.join(tmp_path, "nothing.star")
    out = tmp_path / "out" / "map.mrc"
    code, _, err = run_cli([star, "-o", out, "--halves", "--device", "cpu", "-q"] + extra, capsys)
    assert code == 2, err
    expected = {"missing_stack": "parts.mrcs", "no_angles": "rlnAngleRot", "bad_sym": "q9", "nan": "particle 8",
                "pixel_sizes": "pixel size", "ctf_missing": "rlnDefocusU", "no_file": "nothing.star",
                "max_res": "--max-res"}[case]
    assert expected in err, err
    assert err.startswith("error:") and "Traceback" not in err
    assert not os.path.exists(out) and not os.path.exists(tmp_path / "out" / "map_half1.mrc")
    assert not (os.path.isdir(tmp_path / "out") and os.listdir(tmp_path / "out"))


def test_mpi_ranks_sum_partial_volumes(dataset, tmp_path):
    """Two ranks each insert half of the particles; rank 0 reduces and writes the same map as one process."""
    pytest.importorskip("mpi4py")
    exe = mpirun_path()
    if exe is None:
        pytest.skip("mpirun not found")
    folder, star, _ = dataset
    one, two = tmp_path / "one.mrc", tmp_path / "two.mrc"
    env = dict(os.environ, XMIPP_ACCEL_DEVICE="cpu", OMPI_MCA_rmaps_base_oversubscribe="1",
               PRTE_MCA_rmaps_default_mapping_policy=":oversubscribe")
    base = [sys.executable, "-m", "xmipp_accel", "reconstruct", star, "--quiet", "--json"]
    subprocess.run(base + ["-o", str(one)], check=True, env=env, capture_output=True, timeout=300)
    proc = subprocess.run([exe, "-np", "2", "--oversubscribe"] + base + ["-o", str(two)], env=env,
                          capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 and "oversubscribe" in proc.stderr:
        proc = subprocess.run([exe, "-np", "2"] + base + ["-o", str(two)], env=env, capture_output=True, text=True,
                              timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["mpi_ranks"] == 2 and summary["particles"] == N
    a, b = read_mrc(str(one))[0], read_mrc(str(two))[0]
    np.testing.assert_allclose(b, a, atol=1e-4 * np.abs(a).max())
