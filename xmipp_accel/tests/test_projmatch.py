"""Projection matching (gpu/align/projmatch.py, refine.py, polar.py) against constructed ground truth."""
from __future__ import annotations

import numpy as np
import pytest

from xmipp_accel.em.geometry import angular_distance_deg, euler_to_matrix
from xmipp_accel.em.projection import FourierProjector
from xmipp_accel.em.sampling import random_rotations
from xmipp_accel.em.symmetry import symmetry_matrices
from xmipp_accel.em.synthetic import make_particles, phantom_volume
from xmipp_accel import backend
from xmipp_accel.gpu.align.polar import (CentralSlicer, centred_rfft2, fourier_crop, halfplane_points,
                                         oversampled_spectrum, polar_points, sample_rfft, shift_phases)
from xmipp_accel.gpu.align.projmatch import ProjectionMatcher
from xmipp_accel.gpu.align.search_plan import ctf_values, global_search_flops, plan_search
from xmipp_accel.gpu.align.refine import local_rotations, refine_candidates, RefineLevel

CTF_KEYS = ("defocus_u_A", "defocus_v_A", "defocus_angle_deg", "voltage_kV", "cs_mm", "amplitude_contrast")


def _ctf(truth, idx=slice(None)):
    return {k: np.broadcast_to(np.asarray(truth[k], float), truth["rot"].shape)[idx] for k in CTF_KEYS}


def _origins_px(truth, px):
    return np.stack([truth["origin_x_A"], truth["origin_y_A"]], 1) / px


# ------------------------------------------------------------------------------------------------------------
# Samplers
# ------------------------------------------------------------------------------------------------------------

def test_central_slicer_equals_fourier_projector(xp):
    """Central-slice samples at integer frequencies equal the spectrum of FourierProjector's projections."""
    vol = xp.asarray(phantom_volume(32, seed=3))
    mats = random_rotations(6, np.random.default_rng(0))
    ref = FourierProjector(vol, pad=2).project_fourier(mats)
    kx, ky = halfplane_points(1, 12)
    got = CentralSlicer(vol, r_max=12).sample(mats, kx, ky)
    want = ref[:, xp.asarray(ky % 32), xp.asarray(kx)]
    err = float(xp.abs(got - want).max() / xp.abs(want).max())
    assert err < 1e-4


def test_particle_polar_samples_match_slices():
    """Bilinear polar samples of an image's oversampled spectrum agree with the map's central slice."""
    vol = phantom_volume(32, seed=4)
    mats = random_rotations(4, np.random.default_rng(1))
    img = FourierProjector(vol).project(mats)
    px_, py_ = polar_points(np.arange(1.0, 12.0), 64)
    a = sample_rfft(oversampled_spectrum(img, box_work=32), px_, py_)
    b = CentralSlicer(vol, r_max=12).sample(mats, px_, py_)
    cc = np.real(np.sum(a * np.conj(b), 1)) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cc.min() > 0.999
    np.testing.assert_allclose(np.abs(a), np.abs(b), atol=0.05 * np.abs(b).max())


def test_shift_phase_moves_content_by_origin():
    """Multiplying by shift_phases(origin) centres a particle displaced by -origin (RELION convention)."""
    vol = phantom_volume(32, seed=5)
    mat = random_rotations(1, np.random.default_rng(2))
    proj = FourierProjector(vol)
    origin = np.array([[2.5, -1.25]])
    moved = proj.project(mat, shifts_px=-origin)                 # content displaced by -origin
    kx, ky = halfplane_points(1, 12)
    f = centred_rfft2(moved)[:, ky % 32, kx] * shift_phases(kx, ky, origin, 32)
    want = centred_rfft2(proj.project(mat))[:, ky % 32, kx]
    np.testing.assert_allclose(f, want, atol=1e-3 * np.abs(want).max())


def test_fourier_crop_keeps_intensities_and_centre():
    img = np.zeros((1, 32, 32), np.float32)
    yy, xx = np.mgrid[:32, :32] - 16
    img[0] = np.exp(-(xx ** 2 + yy ** 2) / (2 * 3.0 ** 2))
    small = fourier_crop(img, 16)
    assert small.shape == (1, 16, 16)
    assert np.unravel_index(np.argmax(small[0]), (16, 16)) == (8, 8)
    assert small.sum() * 4 == pytest.approx(img.sum(), rel=1e-3)


# ------------------------------------------------------------------------------------------------------------
# Plan and CTF
# ------------------------------------------------------------------------------------------------------------

def test_plan_search_sampling():
    plan = plan_search(64, 2.0, step_deg=3.0, max_res_A=6.0, max_shift_px=4.0)
    assert plan.r_res == pytest.approx(64 * 2.0 / 6.0)
    assert 360.0 / plan.n_theta <= 3.0 and plan.n_theta % 2 == 0
    assert np.all(np.hypot(*plan.shift_grid.T) <= 4.0 + 1e-9) and len(plan.shift_grid) > 1
    assert [lv.step_deg for lv in plan.refine] == [1.5, 0.75, 0.375]
    assert plan.refine[-1].r_max == plan.r_res
    assert len(plan_search(64, 2.0, max_shift_px=0.0).shift_grid) == 1
    with pytest.raises(ValueError, match="angular step"):
        plan_search(64, 2.0, step_deg=0.0)
    n_r, n_m = len(plan.radii), plan.n_theta // 2 + 1
    per = 8 * n_r * n_m + 2.5 * plan.n_theta * np.log2(plan.n_theta)
    assert global_search_flops(10, 100, plan) == pytest.approx(10 * 100 * len(plan.shift_grid) * per)


def test_ctf_values_match_ctf_2d_grid():
    from xmipp_accel.em.ctf import ctf_2d
    ctf = {"defocus_u_A": np.array([12000.0, 20000.0]), "defocus_v_A": np.array([11000.0, 19500.0]),
           "defocus_angle_deg": np.array([30.0, 100.0]), "voltage_kV": 300.0, "cs_mm": 2.7,
           "amplitude_contrast": 0.1}
    kx, ky = halfplane_points(1, 20)
    got = ctf_values(ctf, kx, ky, box=48, pixel_size_A=1.5)
    grid = ctf_2d(48, 1.5, ctf["defocus_u_A"], ctf["defocus_v_A"], ctf["defocus_angle_deg"])
    np.testing.assert_allclose(got, grid[:, ky % 48, kx], atol=1e-4)
    np.testing.assert_allclose(ctf_values(ctf, kx, ky, box=48, pixel_size_A=1.5, mode="premultiplied"), got ** 2,
                               atol=1e-6)
    assert ctf_values(None, kx, ky, box=48, pixel_size_A=1.5) is None


# ------------------------------------------------------------------------------------------------------------
# Refinement
# ------------------------------------------------------------------------------------------------------------

def test_local_rotations_grid():
    r = local_rotations(2.0)
    assert r.shape == (27, 3, 3)
    np.testing.assert_allclose(r[13], np.eye(3), atol=1e-12)
    ang = angular_distance_deg(r, np.broadcast_to(np.eye(3), r.shape))
    assert ang.max() == pytest.approx(2.0 * np.sqrt(3), rel=1e-6)


def test_refine_recovers_perturbed_poses():
    """Noiseless particles, poses perturbed by ~2 deg and ~1 px: refinement brings them back."""
    vol = phantom_volume(40, seed=6)
    imgs, truth = make_particles(vol, 12, pixel_size_A=2.5, snr=None, max_shift_px=2, seed=7)
    rng = np.random.default_rng(8)
    true_m = truth["matrices"]
    from xmipp_accel.gpu.align.refine import rotation_vectors_to_matrices
    v = rng.normal(size=(12, 3))
    v *= np.deg2rad(2.0) / np.linalg.norm(v, axis=1, keepdims=True)
    start = rotation_vectors_to_matrices(v) @ true_m
    o_true = _origins_px(truth, 2.5)
    o_start = o_true + rng.uniform(-1, 1, (12, 2))
    levels = [RefineLevel(1.5, 12.0, 0.8), RefineLevel(0.75, 16.0, 0.4), RefineLevel(0.375, 16.0, 0.2)]
    mats, origins, scores = refine_candidates(CentralSlicer(vol, r_max=16), centred_rfft2(imgs),
                                              lambda kx, ky: ctf_values(_ctf(truth), kx, ky, box=40,
                                                                        pixel_size_A=2.5),
                                              start[:, None], o_start[:, None], levels=levels, r_min=1.0, box=40)
    err = angular_distance_deg(mats[:, 0].astype(float), true_m)
    assert np.median(angular_distance_deg(start, true_m)) > 1.9
    assert np.median(err) < 0.4 and err.max() < 1.0
    assert np.abs(origins[:, 0] - o_true).max() < 0.25
    assert scores.min() > 0.98


# ------------------------------------------------------------------------------------------------------------
# End to end
# ------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def snr3_data():
    vol = phantom_volume(48, seed=0)
    imgs, truth = make_particles(vol, 64, pixel_size_A=3.0, snr=1 / 3, max_shift_px=1.5, seed=1)
    return vol, imgs, truth


def test_projmatch_accuracy_snr_one_third(snr3_data):
    """3 deg step, SNR 1/3, CTF, shifts: median angular error below 2 deg, shifts well below a pixel."""
    vol, imgs, truth = snr3_data
    m = ProjectionMatcher(vol, pixel_size_A=3.0, step_deg=3.0, max_shift_px=1.8)
    assert m.n_directions > 4000
    res = m.align(imgs, _ctf(truth), batch_size=32)
    err = angular_distance_deg(res.matrices, truth["matrices"])
    shift_err = np.hypot(*(res.origins_px - _origins_px(truth, 3.0)).T)
    assert np.median(err) < 2.0, np.median(err)
    assert np.percentile(err, 90) < 5.0
    assert np.median(shift_err) < 0.4 and np.percentile(shift_err, 90) < 1.0
    assert 0.3 < np.median(res.score) < 1.0
    ang = res.angles_deg
    np.testing.assert_allclose(euler_to_matrix(ang[:, 0], ang[:, 1], ang[:, 2]), res.matrices, atol=1e-6)


def _c2_phantom(box):
    """Phantom averaged with its 180 deg rotation about z through the centre N//2 (C2)."""
    v = phantom_volume(box, seed=9)
    r = np.roll(np.roll(v[:, ::-1, ::-1], 1, axis=1), 1, axis=2)
    return ((v + r) / 2).astype(np.float32)


def test_projmatch_symmetry_reduces_search_and_errors_modulo_symmetry():
    """Noiseless C2 particles without CTF: half the directions searched, every error below 1.5 deg mod C2."""
    vol = _c2_phantom(32)
    imgs, truth = make_particles(vol, 16, pixel_size_A=3.0, snr=None, ctf=False, max_shift_px=1, seed=2)
    m2 = ProjectionMatcher(vol, pixel_size_A=3.0, sym="c2", step_deg=6.0, max_shift_px=1.5)
    m1_dirs = ProjectionMatcher(vol, pixel_size_A=3.0, sym="c1", step_deg=6.0).n_directions
    assert m2.n_directions < 0.55 * m1_dirs
    res = m2.align(imgs, None)
    g = symmetry_matrices("c2")
    err = angular_distance_deg(res.matrices, truth["matrices"], g)
    assert np.median(err) < 0.6 and err.max() < 1.5
    # the gallery covers half the sphere, so about half of the assignments are the other symmetry copy
    assert angular_distance_deg(res.matrices, truth["matrices"]).max() > 90.0


def test_whitening_rescues_low_frequency_dominated_scores():
    """Without frequency weights the strong low frequencies of a CTF-free phantom flatten the scores."""
    vol = _c2_phantom(32)
    imgs, truth = make_particles(vol, 16, pixel_size_A=3.0, snr=None, ctf=False, max_shift_px=1, seed=2)
    g = symmetry_matrices("c2")
    errs = []
    for whiten in (False, True):
        m = ProjectionMatcher(vol, pixel_size_A=3.0, sym="c2", step_deg=6.0, max_shift_px=1.5, whiten=whiten)
        errs.append(angular_distance_deg(m.align(imgs, None).matrices, truth["matrices"], g))
    assert errs[0].max() > 20.0 and errs[1].max() < 1.5


def test_projmatch_premultiplied_ctf_mode():
    """Images multiplied by their CTF once more are matched with ctf_mode='premultiplied'."""
    vol = phantom_volume(32, seed=10)
    imgs, truth = make_particles(vol, 12, pixel_size_A=3.0, snr=None, max_shift_px=0, seed=3)
    from xmipp_accel.em.ctf import ctf_2d
    c = ctf_2d(32, 3.0, truth["defocus_u_A"], truth["defocus_v_A"], truth["defocus_angle_deg"])
    pre = np.fft.fftshift(np.fft.irfft2(centred_rfft2(imgs) * c, s=(32, 32)), axes=(-2, -1)).astype(np.float32)
    m = ProjectionMatcher(vol, pixel_size_A=3.0, step_deg=10.0, max_shift_px=0.0, ctf_mode="premultiplied")
    err = angular_distance_deg(m.align(pre, _ctf(truth)).matrices, truth["matrices"])
    assert np.median(err) < 1.5


@pytest.mark.gpu
def test_projmatch_gpu_matches_numpy():
    """The CuPy path gives the poses of the NumPy path (same search, float32 round-off only)."""
    cp = backend.cupy_module()
    vol = phantom_volume(40, seed=11)
    imgs, truth = make_particles(vol, 24, pixel_size_A=3.0, snr=1.0, max_shift_px=1.5, seed=4)
    kw = dict(pixel_size_A=3.0, step_deg=6.0, max_shift_px=1.8)
    r_np = ProjectionMatcher(vol, **kw).align(imgs, _ctf(truth))
    r_cp = ProjectionMatcher(cp.asarray(vol), **kw).align(cp.asarray(imgs), _ctf(truth))
    d = angular_distance_deg(r_np.matrices, r_cp.matrices)
    assert np.median(d) < 0.05 and np.mean(d < 0.5) > 0.9
    np.testing.assert_allclose(np.median(r_cp.score), np.median(r_np.score), rtol=1e-3)
    g_np = ProjectionMatcher(vol, **kw).global_search(imgs[:8], _ctf(truth, slice(0, 8)))
    g_cp = ProjectionMatcher(cp.asarray(vol), **kw).global_search(cp.asarray(imgs[:8]), _ctf(truth, slice(0, 8)))
    np.testing.assert_allclose(backend.to_host(g_cp[2])[:, 0], g_np[2][:, 0], atol=2e-4)   # best score
