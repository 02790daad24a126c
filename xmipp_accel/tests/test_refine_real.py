"""``xmipp-accel refine`` on the real particles of ../shared/data (NumPy path, 2 iterations): RELION 3.1 with two
optics groups (300 and 200 kV), the same particles in RELION 3.0 form, and EMPIAR-10076 (RELION 3.0 with
rlnMagnification/rlnDetectorPixelSize). Too few particles to refine well: this checks reading, the CTF and the
outputs. TRPV1 at its own size is in test_refine.py.

The 200 px and 320 px stacks are Fourier-cropped 4x first (the STAR files are copied with only the image names
and pixel-size columns changed, their format kept): at full size the CPU reconstruction of each iteration
takes about a minute and several GB (17 particles at 200 px, 1 iteration: 67 s, 3.7 GB), too much for CI.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from xmipp_accel.cli.__main__ import main as cli
from xmipp_accel.gpu.align.polar import fourier_crop
from xmipp_accel.gpu.refine import lowpass_volume, soft_spherical_mask
from xmipp_accel.io.images import write_stack
from xmipp_accel.io.mrc import read_mrc, write_mrc
from xmipp_accel.io.particles import read_particles
from xmipp_accel.io.star import read_star, write_star

CROP = 4
SETS = {  # name: (STAR under star-variants/, particle diameter in Å)
    "relion31_two_optics_groups": ("sample_particles_relion31.star", 200.0),
    "relion30": ("sample_relion_data.star", 200.0),
    "empiar_10076": ("empiar_10076_7.star", 300.0),
}
OUTPUTS = ("run_data.star", "run_half1_class001.mrc", "run_half2_class001.mrc", "run_class001.mrc",
           "run_class001_sharpened.mrc", "run_fsc.star", "iterations.jsonl")


def cropped_copy(star: str, folder: str) -> str:
    """The particles of ``star`` cropped ``CROP`` times into ``folder``: new stack, STAR copy of the same format."""
    pset = read_particles(star)
    images = np.asarray(pset.read_images(np.arange(pset.n)), dtype=np.float32)
    box = images.shape[-1] // CROP
    px = float(np.asarray(pset.pixel_size_A).ravel()[0]) * CROP
    write_stack(os.path.join(folder, "crop.mrcs"), fourier_crop(images, box), px)
    blocks = read_star(star)
    out = {}
    for name, table in blocks.items():
        cols = table.columns
        if "rlnImageName" in cols:
            cols["rlnImageName"] = np.array([f"{i + 1}@crop.mrcs" for i in range(pset.n)])
            for label in ("rlnOriginX", "rlnOriginY"):              # RELION 3.0: pixels
                if label in cols:
                    cols[label] = np.asarray(cols[label], dtype=np.float64) / CROP
        for label in ("rlnImagePixelSize", "rlnDetectorPixelSize"):   # 3.1 optics / 3.0 per particle
            if label in cols:
                cols[label] = np.asarray(cols[label], dtype=np.float64) * CROP
        if "rlnImageSize" in cols:
            cols["rlnImageSize"] = np.full(len(cols["rlnImageSize"]), box)
        out[name] = type(table)(cols)
    path = os.path.join(folder, os.path.basename(star))
    write_star(path, out)
    return path


def blob(box: int, px: float, diameter_A: float, path: str) -> str:
    """Initial model with no structure: the particle's soft sphere at 30 Å (these sets come without a map)."""
    write_mrc(path, lowpass_volume(soft_spherical_mask(box, 0.5 * diameter_A / px, 3.0), 30.0, px), px)
    return path


@pytest.mark.parametrize("name", list(SETS))
def test_real_particles_go_through_refine(name, shared_data, tmp_path, capsys):
    source, diameter = SETS[name]
    star = cropped_copy(os.path.join(shared_data, "star-variants", source), str(tmp_path))
    parts = read_particles(star)
    px, box = float(np.asarray(parts.pixel_size_A).ravel()[0]), int(parts.box_size)
    ctf_in = parts.ctf()
    assert ctf_in is not None                              # every set has defocus columns
    init = blob(box, px, diameter, str(tmp_path / "init.mrc"))
    out = tmp_path / "out"
    code = cli(["refine", star, "--initial-volume", init, "--diameter", str(diameter), "-o", str(out),
                "--max-iterations", "2", "--device", "cpu", "--json", "--quiet"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    summary = json.loads(captured.out.strip().splitlines()[-1])
    assert summary["particles"] == parts.n and summary["iterations"] == 2
    assert summary["pixel_size_A"] == pytest.approx(px) and summary["box"] == box
    for f in OUTPUTS:
        assert os.path.exists(out / f), f
    for f in OUTPUTS[1:5]:
        vol, voxel = read_mrc(str(out / f))
        assert vol.shape == (box,) * 3 and np.isfinite(vol).all() and voxel == pytest.approx(px), f
    res = summary["resolution_A"]
    assert res is None or res >= 2 * px * 0.999                # never beyond Nyquist
    refined = read_particles(str(out / "run_data.star"))
    assert refined.n == parts.n and refined.angles_deg is not None and np.isfinite(refined.angles_deg).all()
    assert set(np.unique(refined.subset)) == {1, 2}
    if parts.subset is not None and set(np.unique(parts.subset)) == {1, 2}:
        assert np.array_equal(refined.subset, parts.subset)   # the file's half sets are kept
    ctf_out = refined.ctf()                                   # the CTF of each particle is carried over
    for key in ("defocus_u_A", "defocus_v_A", "defocus_angle_deg", "voltage_kV"):
        np.testing.assert_allclose(np.broadcast_to(ctf_out[key], (parts.n,)),
                                   np.broadcast_to(ctf_in[key], (parts.n,)), rtol=1e-5, err_msg=key)
    records = [json.loads(line) for line in open(out / "iterations.jsonl")]
    assert [r["search"] for r in records] == ["global", "local"]
