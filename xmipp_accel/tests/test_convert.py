"""Scipion objects <-> STAR conversion (protocols/convert.py), without a project."""
from __future__ import annotations

import os

import numpy as np
import pytest

pytest.importorskip("pwem.protocols", reason="Scipion (pwem with tkinter) not importable here")

import pwem.objects as emobj  # noqa: E402
import pyworkflow.object as pwobj  # noqa: E402
from pwem.convert.transformations import euler_from_matrix, euler_matrix, translation_from_matrix  # noqa: E402

from xmipp_accel.em.geometry import euler_to_matrix  # noqa: E402
from xmipp_accel.io import particles, star  # noqa: E402
from xmipp_accel.io.mrc import write_mrc  # noqa: E402
from xmipp_accel.protocols import convert  # noqa: E402

PIXEL = 2.5


def _pwem_matrix(rot, tilt, psi, sx, sy):
    """Scipion's ALIGN_PROJ matrix built the way the RELION/Xmipp plugins do (pwem's transformations)."""
    m = euler_matrix(*(-np.deg2rad([rot, tilt, psi])), axes="szyz")
    m[:3, 3] = -np.array([sx, sy, 0.0])
    return np.linalg.inv(m)


def _random_geometry(n, seed=0):
    rng = np.random.default_rng(seed)
    angles = np.column_stack([rng.uniform(-180, 180, n), rng.uniform(1, 179, n), rng.uniform(-180, 180, n)])
    shifts = rng.uniform(-4, 4, (n, 2))
    return angles, shifts


def _make_set(tmp_path, n=12, with_ctf=True, with_subset=False, stack_name="ptcls.mrcs"):
    box = 16
    stack = os.path.join(tmp_path, stack_name)
    write_mrc(stack, np.random.default_rng(1).normal(size=(n, box, box)).astype(np.float32), PIXEL)
    angles, shifts = _random_geometry(n)
    rng = np.random.default_rng(2)
    defocus = np.column_stack([rng.uniform(15000, 25000, n), rng.uniform(14000, 24000, n), rng.uniform(0, 179, n)])
    pset = emobj.SetOfParticles(filename=os.path.join(tmp_path, "particles.sqlite"))
    pset.setSamplingRate(PIXEL)
    acq = emobj.Acquisition(voltage=200.0, sphericalAberration=2.0, amplitudeContrast=0.07)
    pset.setAcquisition(acq)
    pset.setAlignmentProj()
    pset.setHasCTF(with_ctf)
    for i in range(n):
        p = emobj.Particle(location=(i + 1, stack))
        p.setAcquisition(acq.clone())
        p.setTransform(emobj.Transform(_pwem_matrix(*angles[i], *shifts[i])))
        if with_ctf:
            ctf = emobj.CTFModel()
            ctf.setStandardDefocus(*defocus[i])
            p.setCTF(ctf)
        if with_subset:
            p._rlnRandomSubset = pwobj.Integer(1 + i % 2)
        pset.append(p)
    pset.write()
    return pset, angles, shifts, defocus


def test_transform_matches_pwem_convention():
    angles, shifts = _random_geometry(20, seed=5)
    for a, s in zip(angles, shifts):
        ours = convert.transform_from_euler(*a, *s)
        np.testing.assert_allclose(ours, _pwem_matrix(*a, *s), atol=1e-12)
        # and pwem's geometryFromMatrix reads our matrix back as the same RELION angles/origin
        inv = np.linalg.inv(ours)
        np.testing.assert_allclose(-np.rad2deg(euler_from_matrix(inv, axes="szyz")), a, atol=1e-9)
        np.testing.assert_allclose(-translation_from_matrix(inv)[:2], s, atol=1e-12)
    np.testing.assert_allclose(convert.transforms_from_euler(angles, shifts),
                               np.stack([convert.transform_from_euler(*a, *s) for a, s in zip(angles, shifts)]))


def test_transform_round_trip_including_degenerate_tilt():
    for a in [(10.0, 0.0, 30.0), (0.0, 180.0, -45.0), (120.0, 90.0, -170.0)]:
        rot, tilt, psi, sx, sy = convert.euler_from_transform(convert.transform_from_euler(*a, 1.5, -2.0))
        # the rotation is the same even when rot/psi are split differently at tilt 0 or 180
        np.testing.assert_allclose(euler_to_matrix(rot, tilt, psi), euler_to_matrix(*a), atol=1e-9)
        assert (sx, sy) == pytest.approx((1.5, -2.0), abs=1e-12)
    # identity angles with shifts (1, -2): the matrix the guide recorded for Scipion
    expected = [[1, 0, 0, 1], [0, 1, 0, -2], [0, 0, 1, 0], [0, 0, 0, 1]]
    np.testing.assert_allclose(convert.transform_from_euler(0, 0, 0, 1, -2), expected, atol=1e-12)


def test_set_to_star_and_back(tmp_path):
    tmp_path = str(tmp_path)
    pset, angles, shifts, defocus = _make_set(tmp_path)
    path = os.path.join(tmp_path, "out.star")
    ids = convert.write_particles_star(pset, path)
    assert list(ids) == list(range(1, 13))
    parts = particles.read_particles(path)
    assert len(parts) == 12
    np.testing.assert_allclose(parts.pixel_size_A, PIXEL)
    np.testing.assert_allclose(parts.angles_deg, angles, atol=1e-5)
    np.testing.assert_allclose(parts.origins_A, shifts * PIXEL, atol=1e-5)
    ctf = parts.ctf()
    # the CTF model standardises (U >= V, angle in [0, 180)); the STAR holds what the model holds
    model = emobj.CTFModel()
    for i in range(12):
        model.setStandardDefocus(*defocus[i])
        assert ctf["defocus_u_A"][i] == pytest.approx(model.getDefocusU(), abs=1e-3)
        assert ctf["defocus_v_A"][i] == pytest.approx(model.getDefocusV(), abs=1e-3)
        assert ctf["defocus_angle_deg"][i] == pytest.approx(model.getDefocusAngle(), abs=1e-4)
    assert ctf["voltage_kV"][0] == 200.0 and ctf["cs_mm"][0] == 2.0 and ctf["amplitude_contrast"][0] == 0.07
    # no subsets in the set: a balanced random split
    assert sorted(np.bincount(parts.subset)[1:]) == [6, 6]
    # image references: absolute, 1-based, readable
    assert parts.image_refs[0] == f"1@{os.path.join(tmp_path, 'ptcls.mrcs')}"
    assert parts.read_images().shape == (12, 16, 16)

    # read back as alignment rows (what the assign-angles protocol does) and rebuild the transforms
    rows = convert.read_alignment_rows(path)
    for particle in pset.iterItems(orderBy="id"):
        row = rows[convert.particle_ref(particle)]
        matrix = convert.transform_from_euler(row["rot"], row["tilt"], row["psi"], row["shift_x_px"],
                                              row["shift_y_px"])
        np.testing.assert_allclose(matrix, particle.getTransform().getMatrix(), atol=1e-5)
        assert row["score"] is None


def test_subsets_and_scores_are_kept(tmp_path):
    tmp_path = str(tmp_path)
    pset, *_ = _make_set(tmp_path, n=6, with_ctf=False, with_subset=True)
    path = os.path.join(tmp_path, "out.star")
    convert.write_particles_star(pset, path, with_alignment=False)
    parts = particles.read_particles(path)
    assert parts.subset.tolist() == [1, 2, 1, 2, 1, 2]
    assert parts.angles_deg is None and parts.ctf() is None
    # a command's output with angles and a score column
    table = parts.table.with_columns(rlnAngleRot=np.arange(6.0), rlnAngleTilt=90.0, rlnAnglePsi=0.0,
                                     rlnOriginXAngst=PIXEL, rlnOriginYAngst=-PIXEL,
                                     rlnParticleFigureOfMerit=np.linspace(0, 1, 6),
                                     rlnXmippAccelConsensusDeg=np.full(6, 2.5))
    star.write_star(path, {"optics": parts.optics, "particles": table.without_columns(*parts.optics_columns)})
    rows = convert.read_alignment_rows(path)
    first = rows[convert.particle_ref(pset.getFirstItem())]
    assert (first["rot"], first["tilt"], first["shift_x_px"], first["shift_y_px"]) == pytest.approx((0, 90, 1, -1))
    assert first["score"] == 0.0
    assert first["extra"] == {"_xmippAccelConsensusDeg": 2.5}


def test_non_mrc_stack_is_converted(tmp_path):
    tmp_path = str(tmp_path)
    xmippLib = pytest.importorskip("xmippLib")
    pset, angles, *_ = _make_set(tmp_path, n=4, with_ctf=False)
    spider = os.path.join(tmp_path, "ptcls.stk")
    from pwem.emlib.image import ImageHandler
    ImageHandler().convertStack(os.path.join(tmp_path, "ptcls.mrcs"), spider)
    assert xmippLib.Image(f"1@{spider}").getData().shape == (16, 16)
    stk = emobj.SetOfParticles(filename=os.path.join(tmp_path, "stk.sqlite"))
    stk.copyInfo(pset)
    for p in pset:
        q = p.clone()
        q.setLocation(p.getIndex(), spider)
        stk.append(q)
    stk.write()
    out_dir = os.path.join(tmp_path, "converted")
    os.makedirs(out_dir)
    path = os.path.join(tmp_path, "stk.star")
    convert.write_particles_star(stk, path, stack_dir=out_dir)
    parts = particles.read_particles(path)
    assert all(ref.startswith(("1@", "2@", "3@", "4@")) and out_dir in ref for ref in parts.image_refs)
    np.testing.assert_allclose(parts.read_images(),
                               np.stack([xmippLib.Image(f"{i}@{spider}").getData() for i in range(1, 5)]),
                               atol=1e-6)


def test_fsc_and_shift_tables(tmp_path):
    path = os.path.join(str(tmp_path), "fsc.star")
    freq = np.linspace(0, 0.2, 11)
    fsc = np.clip(1.2 - 8 * freq, -0.1, 1.0)
    star.write_star(path, {"fsc": {"rlnSpectralIndex": np.arange(11), "rlnResolution": freq,
                                   "rlnAngstromResolution": np.where(freq > 0, 1 / np.maximum(freq, 1e-9), 999.0),
                                   "rlnFourierShellCorrelation": fsc}})
    f, v = convert.fsc_from_star(path)
    np.testing.assert_allclose(f, freq)
    np.testing.assert_allclose(v, fsc)
    fobj = emobj.FSC()
    fobj.setData(f.tolist(), v.tolist())
    # FSC = 0.143 where 1.2 - 8 f = 0.143  ->  f = 0.1321  ->  7.57 Å
    assert float(fobj.calculateResolution(0.143)) == pytest.approx(1 / ((1.2 - 0.143) / 8), rel=1e-3)

    shifts = os.path.join(str(tmp_path), "shifts.star")
    star.write_star(shifts, {"general": star.Table({"rlnImageSizeX": 64, "rlnMicrographMovieName": "m.mrcs"},
                                                   loop=False),
                             "global_shift": {"rlnMicrographFrameNumber": [3, 1, 2],
                                              "rlnMicrographShiftX": [3.0, 1.0, 2.0],
                                              "rlnMicrographShiftY": [-3.0, -1.0, -2.0]}})
    xs, ys = convert.movie_shifts_from_star(shifts)
    assert xs == [1.0, 2.0, 3.0] and ys == [-1.0, -2.0, -3.0]


def test_helpers():
    assert convert.image_ref(3, "/a/b.mrc:mrcs") == "3@/a/b.mrc"
    assert convert.image_ref(0, "/a/b.mrc") == "/a/b.mrc"
    assert convert.parse_image_ref("12@x.mrcs") == (12, "x.mrcs")
    assert convert.normalize_ref("2@sub/../s.mrcs", "/base") == "2@/base/s.mrcs"
    assert [len(c) for c in convert.iter_chunks(range(7), 3)] == [3, 3, 1]
    s = convert.balanced_random_subsets(7, seed=3)
    assert sorted(np.bincount(s)[1:].tolist()) == [3, 4]
    assert np.array_equal(s, convert.balanced_random_subsets(7, seed=3))  # reproducible


def test_star_to_particles_round_trip(tmp_path):
    """A RELION STAR -> Scipion set (sqlite) -> STAR gives back the same angles, origins, CTF, subsets."""
    tmp_path = str(tmp_path)
    n, box = 8, 16
    write_mrc(os.path.join(tmp_path, "s.mrcs"), np.zeros((n, box, box), np.float32), PIXEL)
    angles, shifts = _random_geometry(n, seed=9)
    rng = np.random.default_rng(3)
    ctf = {"defocus_u_A": rng.uniform(20000, 25000, n), "defocus_v_A": rng.uniform(15000, 19000, n),
           "defocus_angle_deg": rng.uniform(0, 170, n), "voltage_kV": 300.0, "cs_mm": 2.7, "amplitude_contrast": 0.1}
    subset = np.array([1, 2] * (n // 2))
    src = os.path.join(tmp_path, "in.star")
    particles.write_particles_from_arrays(src, [f"{i + 1}@s.mrcs" for i in range(n)], PIXEL, angles_deg=angles,
                                     origins_A=shifts * PIXEL, ctf=ctf, subset=subset, box_size=box)
    parts = convert.star_to_particles(src, os.path.join(tmp_path, "p.sqlite"))
    parts = emobj.SetOfParticles(filename=os.path.join(tmp_path, "p.sqlite"))
    parts.loadAllProperties()
    assert parts.getSize() == n and parts.hasAlignmentProj() and parts.hasCTF()
    assert parts.getSamplingRate() == PIXEL
    out = os.path.join(tmp_path, "out.star")
    convert.write_particles_star(parts, out)
    back = particles.read_particles(out)
    np.testing.assert_allclose(back.angles_deg, angles, atol=1e-5)
    np.testing.assert_allclose(back.origins_A, shifts * PIXEL, atol=1e-5)
    np.testing.assert_allclose(back.ctf()["defocus_u_A"], ctf["defocus_u_A"], atol=1e-3)
    np.testing.assert_allclose(back.ctf()["defocus_v_A"], ctf["defocus_v_A"], atol=1e-3)
    np.testing.assert_allclose(back.ctf()["defocus_angle_deg"], ctf["defocus_angle_deg"], atol=1e-4)
    assert back.subset.tolist() == subset.tolist()
    assert back.image_refs[3] == f"4@{os.path.join(tmp_path, 's.mrcs')}"
