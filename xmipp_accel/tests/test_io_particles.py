"""Particle sets (io/particles.py): real RELION 3.0/3.1/5 particle files, optics groups, writing, bad files."""
from __future__ import annotations

import os

import numpy as np
import pytest

from xmipp_accel.errors import FileFormatError, InputError
from xmipp_accel.io.images import read_images
from xmipp_accel.io.mrc import write_mrc
from xmipp_accel.io.particles import read_particles, write_particles, write_particles_from_arrays
from xmipp_accel.io.star import read_star


def _variant(shared_data, name):
    return os.path.join(shared_data, "star-variants", name)


def test_relion31_single_optics_group(shared_data):
    p = read_particles(_variant(shared_data, "relion31.star"))
    assert p.n == 5 and p.optics.nrows == 1
    np.testing.assert_allclose(p.angles_deg[0], [-102.30296, 82.318041, 124.706463])
    np.testing.assert_allclose(p.origins_A[1], [-0.25248, 0.403454])
    np.testing.assert_allclose(p.pixel_size_A, 2.806)
    ctf = p.ctf()
    np.testing.assert_allclose([ctf["defocus_u_A"][0], ctf["defocus_v_A"][0], ctf["defocus_angle_deg"][0]],
                               [13108.082418, 12845.582418, -160.39])
    np.testing.assert_allclose([ctf["voltage_kV"][0], ctf["cs_mm"][0], ctf["amplitude_contrast"][0]],
                               [300.0, 0.01, 0.1])
    assert p.box_size == 256 and p.subset.tolist() == [1, 1, 1, 1, 1]
    assert p.image_refs[0] == "000001@relion31.mrcs"
    assert p.read_images([4]).shape == (1, 256, 256)


def test_relion31_six_optics_groups(shared_data):
    p = read_particles(_variant(shared_data, "relion31.6opticsgroups.star"))
    assert p.n == 139 and p.optics.nrows == 6
    pixel_of_group = {1: 1.25, 2: 1.24, 3: 1.25, 4: 1.25, 5: 1.24, 6: 1.25}
    cs_of_group = {1: 2.7, 2: 2.7, 3: 2.7, 4: 2.6, 5: 2.7, 6: 2.7}
    groups = p.table["rlnOpticsGroup"]
    assert set(groups.tolist()) <= set(pixel_of_group)
    np.testing.assert_allclose(p.pixel_size_A, [pixel_of_group[g] for g in groups.tolist()])
    np.testing.assert_allclose(p.ctf()["cs_mm"], [cs_of_group[g] for g in groups.tolist()])
    assert len(set(groups.tolist())) > 1
    np.testing.assert_allclose(p.angles_deg[0], [-128.10516, 37.068920, -82.17809])
    np.testing.assert_allclose(p.origins_A[0], [13.284554, -3.21701])
    np.testing.assert_allclose(p.ctf()["defocus_u_A"][:3], [10352.805929, 10761.768721, 14197.948733])
    assert p.ctf()["voltage_kV"].tolist() == [200.0] * 139 and p.box_size == 196
    assert p.table["rlnOpticsGroupName"][0] == "opticsGroup6"


def test_relion5(shared_data):
    p = read_particles(_variant(shared_data, "relion5.star"))
    assert p.n == 17
    np.testing.assert_allclose(p.angles_deg[0], [111.508618, 36.742536, 141.158035])
    np.testing.assert_allclose(p.origins_A[0], [-3.12578, -1.41031])
    ctf = p.ctf()
    np.testing.assert_allclose([ctf["defocus_u_A"][0], ctf["defocus_v_A"][0], ctf["voltage_kV"][0]],
                               [11949.06133, 11800.493288, 100.0])
    np.testing.assert_allclose(p.pixel_size_A, 0.89)
    assert p.box_size == 448 and p.image_refs[:2] == ["1@toy_images_a.mrcs", "2@toy_images_b.mrcs"]


def test_relion30_pixel_size_from_detector_and_magnification(shared_data):
    p = read_particles(_variant(shared_data, "sample_relion_data.star"))
    assert p.optics is None and p.n == 17
    pixel = 5.0 * 1e4 / 37369.207031
    np.testing.assert_allclose(p.pixel_size_A, pixel)
    # rlnOriginX/Y are in pixels in RELION 3.0
    np.testing.assert_allclose(p.origins_A[0], [0.1996 * pixel, 0.1996 * pixel])
    np.testing.assert_allclose(p.origins_px[3], [-0.0504, -0.3004])
    assert p.box_size == 200  # from the stack header: no rlnImageSize in 3.0


def test_empiar_bare_data_block(shared_data):
    p = read_particles(_variant(shared_data, "empiar_10076_7.star"))
    assert p.n == 7 and p.angles_deg is None and p.origins_A is None and p.subset is None
    np.testing.assert_allclose(p.pixel_size_A, 5.0 * 1e4 / 38168)
    ctf = p.ctf()
    np.testing.assert_allclose([ctf["defocus_u_A"][2], ctf["defocus_v_A"][2], ctf["defocus_angle_deg"][2]],
                               [15150.7, 14766.0, 5.28])
    assert ctf["amplitude_contrast"][0] == 0.07 and ctf["phase_shift_deg"][0] == 0.0
    assert p.box_size == 320
    assert p.table["rlnMicrographName"].tolist()[:2] == ["1", "2"]


def test_trpv1(shared_data):
    p = read_particles(os.path.join(shared_data, "trpv1-real", "trpv1_small_stack.star"))
    assert p.n == 10 and p.optics["rlnOpticsGroup"].tolist() == [7]
    np.testing.assert_allclose(p.angles_deg[0], [-30.073301, 137.509323, 167.963364])
    np.testing.assert_allclose(p.origins_A[0], [-8.149219, -6.120969])
    np.testing.assert_allclose(p.pixel_size_A, 4.88)
    assert p.subset.tolist()[:4] == [2, 1, 2, 1] and p.box_size == 48
    np.testing.assert_allclose(p.ctf()["cs_mm"], 2.0)


def test_relion30_and_31_forms_of_the_same_particles_agree(shared_data):
    p30 = read_particles(_variant(shared_data, "sample_relion_data.star"))
    p31 = read_particles(_variant(shared_data, "sample_particles_relion31.star"))
    # The 3.1 file repeats particle 14 as particle 15 (coordinates, angles, subset): compare the others.
    same = np.arange(17) != 14
    np.testing.assert_allclose(p31.angles_deg[same], p30.angles_deg[same])
    assert not np.allclose(p31.angles_deg[14], p30.angles_deg[14])
    for key in ("defocus_u_A", "defocus_v_A", "defocus_angle_deg", "cs_mm", "amplitude_contrast"):
        np.testing.assert_allclose(p31.ctf()[key], p30.ctf()[key], err_msg=key)
    assert p31.image_refs == p30.image_refs
    np.testing.assert_array_equal(p31.subset[same], p30.subset[same])
    # The 3.1 file carries the 3.0 pixel origins' numbers in its Angstrom columns (a naive conversion);
    # each reader applies its own version's unit.
    np.testing.assert_allclose(p31.origins_A[same], p30.origins_px[same])
    np.testing.assert_array_equal(read_images(p31.image_refs, p31.star_dir, indices=[0, 16]),
                                  p30.read_images([0, 16]))


def test_write_particles_round_trip_six_groups(shared_data, tmp_path):
    src = read_particles(_variant(shared_data, "relion31.6opticsgroups.star"))
    out = tmp_path / "same.star"
    write_particles(out, src)
    back = read_particles(out)
    assert back.optics == src.optics
    assert back.table.names == src.table.names
    for name in src.table.names:
        a, b = src.table[name], back.table[name]
        if a.dtype.kind == "f":
            np.testing.assert_allclose(b, a, rtol=1e-9, atol=1e-9, err_msg=name)
        elif name != "rlnImageName":
            np.testing.assert_array_equal(b, a, err_msg=name)
    np.testing.assert_allclose(back.pixel_size_A, src.pixel_size_A)


def test_write_particles_new_angles_origins_and_extra(shared_data, tmp_path):
    src = read_particles(os.path.join(shared_data, "trpv1-real", "trpv1_small_stack.star"))
    rng = np.random.default_rng(5)
    angles = rng.uniform(-180, 180, (10, 3))
    origins = rng.uniform(-20, 20, (10, 2))
    out = tmp_path / "sub" / "aligned.star"
    write_particles(out, src, angles_deg=angles, origins_A=origins, extra={"rlnMaxValueProbDistribution": 0.5})
    back = read_particles(out)
    np.testing.assert_allclose(back.angles_deg, angles, atol=1e-6)
    np.testing.assert_allclose(back.origins_A, origins, atol=1e-6)
    assert back.table["rlnMaxValueProbDistribution"].tolist() == [0.5] * 10
    np.testing.assert_array_equal(back.subset, src.subset)
    np.testing.assert_allclose(back.ctf()["defocus_u_A"], src.ctf()["defocus_u_A"])
    # the stack lies outside the working directory (the checkout), so its name is written absolute
    # (io/paths.py) and still finds the same stack from the other folder
    assert back.image_refs[0] == "000001@" + os.path.join(shared_data, "trpv1-real", "batch_0_restacked.mrc")
    np.testing.assert_array_equal(back.read_images([0, 9]), src.read_images([0, 9]))
    with pytest.raises(InputError, match="angles_deg must have shape"):
        write_particles(out, src, angles_deg=angles[:5])


def test_relion30_is_written_as_31_with_optics(shared_data, tmp_path):
    src = read_particles(_variant(shared_data, "sample_relion_data.star"))
    write_particles(tmp_path / "p31.star", src)
    blocks = read_star(tmp_path / "p31.star")
    assert list(blocks) == ["optics", "particles"]
    particles = blocks["particles"]
    for gone in ("rlnOriginX", "rlnOriginY", "rlnMagnification", "rlnDetectorPixelSize", "rlnVoltage"):
        assert gone not in particles, gone
    back = read_particles(tmp_path / "p31.star")
    assert back.optics.nrows == 1 and back.table["rlnOpticsGroup"].tolist() == [1] * 17
    np.testing.assert_allclose(back.pixel_size_A, src.pixel_size_A, rtol=1e-6)
    np.testing.assert_allclose(back.origins_A, src.origins_A, atol=1e-6)
    np.testing.assert_allclose(back.angles_deg, src.angles_deg, atol=1e-6)
    for key, values in src.ctf().items():
        np.testing.assert_allclose(back.ctf()[key], values, rtol=1e-6, err_msg=key)
    assert back.box_size == 200 and back.optics["rlnImageDimensionality"].tolist() == [2]


def test_write_particles_from_arrays(tmp_path):
    n = 6
    stack = np.random.default_rng(0).standard_normal((n, 16, 16)).astype(np.float32)
    write_mrc(tmp_path / "parts.mrcs", stack, 1.5)
    refs = [f"{i + 1:06d}@parts.mrcs" for i in range(n)]
    pixel = np.array([1.5, 1.5, 1.5, 2.0, 2.0, 1.5])
    angles = np.arange(n * 3, dtype=float).reshape(n, 3)
    origins = np.arange(n * 2, dtype=float).reshape(n, 2) / 3
    ctf = {"defocus_u_A": np.linspace(1e4, 2e4, n), "defocus_v_A": np.linspace(1e4, 2e4, n) - 100,
           "defocus_angle_deg": 30.0, "voltage_kV": 200.0}
    write_particles_from_arrays(tmp_path / "syn.star", refs, pixel, angles_deg=angles, origins_A=origins, ctf=ctf,
                                subset=[1, 2, 1, 2, 1, 2], cs_mm=1.4)
    p = read_particles(tmp_path / "syn.star")
    assert p.optics.nrows == 2 and p.table["rlnOpticsGroup"].tolist() == [1, 1, 1, 2, 2, 1]
    np.testing.assert_allclose(p.pixel_size_A, pixel)
    np.testing.assert_allclose(p.angles_deg, angles, atol=1e-6)
    np.testing.assert_allclose(p.origins_A, origins, atol=1e-6)
    c = p.ctf()
    np.testing.assert_allclose(c["defocus_u_A"], ctf["defocus_u_A"], atol=1e-6)
    np.testing.assert_allclose(c["defocus_v_A"], ctf["defocus_v_A"], atol=1e-6)
    assert c["voltage_kV"].tolist() == [200.0] * n and c["cs_mm"].tolist() == [1.4] * n
    assert c["defocus_angle_deg"].tolist() == [30.0] * n and c["amplitude_contrast"].tolist() == [0.1] * n
    assert p.subset.tolist() == [1, 2, 1, 2, 1, 2] and p.box_size == 16
    np.testing.assert_array_equal(p.read_images(), stack)
    with pytest.raises(InputError, match="give box_size"):
        write_particles_from_arrays(tmp_path / "x.star", ["1@nothing.mrcs"], 1.0)
    with pytest.raises(InputError, match="subset"):
        write_particles_from_arrays(tmp_path / "x.star", refs, 1.0, subset=[0] * n, box_size=16)
    assert not (tmp_path / "x.star").exists()


def test_large_file_round_trip(tmp_path):
    n = 20000
    rng = np.random.default_rng(2)
    refs = [f"{i % 500 + 1:06d}@Extract/job1/mic{i // 500:04d}.mrcs" for i in range(n)]
    angles = rng.uniform(-180, 180, (n, 3))
    write_particles_from_arrays(tmp_path / "big.star", refs, 1.1, angles_deg=angles, box_size=128,
                                ctf={"defocus_u_A": rng.uniform(5e3, 3e4, n)}, subset=rng.integers(1, 3, n))
    p = read_particles(tmp_path / "big.star")
    assert p.n == n and p.image_refs[-1] == refs[-1]
    np.testing.assert_allclose(p.angles_deg, angles, atol=1e-6)
    sub = p.select(p.subset == 2)
    assert sub.n == int((p.subset == 2).sum()) and set(sub.subset.tolist()) == {2}


def test_no_particles_block(tmp_path):
    (tmp_path / "optics_only.star").write_text("data_optics\nloop_\n_rlnOpticsGroup\n_rlnVoltage\n1 300\n")
    with pytest.raises(FileFormatError) as info:
        read_particles(tmp_path / "optics_only.star")
    assert "optics_only.star has no particles table" in str(info.value) and "data_optics (1 rows)" in str(info.value)


def test_undefined_optics_group(tmp_path):
    (tmp_path / "og.star").write_text("data_optics\nloop_\n_rlnOpticsGroup\n_rlnImagePixelSize\n1 1.0\n"
                                      "data_particles\nloop_\n_rlnImageName\n_rlnOpticsGroup\n1@a.mrcs 1\n2@a.mrcs 3\n")
    with pytest.raises(FileFormatError, match=r"og.star: particles use optics group\(s\) \[3\]"):
        read_particles(tmp_path / "og.star")


def test_ctf_without_voltage_and_no_pixel_size(tmp_path):
    (tmp_path / "partial.star").write_text("data_\nloop_\n_rlnImageName\n_rlnDefocusU\n1@nowhere.mrcs 10000\n")
    p = read_particles(tmp_path / "partial.star")
    with pytest.raises(FileFormatError, match="partial.star has defocus values but no rlnVoltage"):
        p.ctf()
    with pytest.raises(FileFormatError, match="partial.star gives no pixel size"):
        _ = p.pixel_size_A


def test_single_optics_group_without_group_column(tmp_path):
    (tmp_path / "one.star").write_text("data_optics\nloop_\n_rlnOpticsGroup\n_rlnImagePixelSize\n_rlnVoltage\n"
                                       "3 1.5 300\ndata_particles\nloop_\n_rlnImageName\n1@x.mrcs\n2@x.mrcs\n")
    p = read_particles(tmp_path / "one.star")
    assert p.pixel_size_A.tolist() == [1.5, 1.5]
    write_particles(tmp_path / "two.star", p, angles_deg=np.zeros((2, 3)))
    back = read_particles(tmp_path / "two.star")
    assert back.table["rlnOpticsGroup"].tolist() == [3, 3] and back.pixel_size_A.tolist() == [1.5, 1.5]
