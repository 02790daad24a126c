"""DeepAlign-style assignment (gpu/align/deepalign.py) on a tiny problem with known poses."""
from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest

from xmipp_accel.em.geometry import angular_distance_deg
from xmipp_accel.em.symmetry import symmetry_matrices
from xmipp_accel.em.synthetic import make_particles, phantom_volume
from xmipp_accel.errors import InputError
from xmipp_accel import backend
from xmipp_accel.gpu.align.projmatch import ProjectionMatcher

torch = pytest.importorskip("torch")

from xmipp_accel.gpu.align import deepalign as da  # noqa: E402  (after the torch check)
from xmipp_accel.gpu.align import region_classifier as rc  # noqa: E402

CTF_KEYS = ("defocus_u_A", "defocus_v_A", "defocus_angle_deg", "voltage_kV", "cs_mm", "amplitude_contrast")
PX = 3.0


def _ctf(truth):
    return {k: np.broadcast_to(np.asarray(truth[k], float), truth["rot"].shape).copy() for k in CTF_KEYS}


@pytest.fixture(scope="module")
def trained():
    """Two small models trained on a 32 px phantom (45 deg regions: 20 classes), and the data they align."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # robust against other processes on a small CI machine
    vol = phantom_volume(32, seed=0)
    imgs, truth = make_particles(vol, 100, pixel_size_A=PX, snr=1.0, max_shift_px=1.5, seed=1)
    matcher = ProjectionMatcher(vol, pixel_size_A=PX, step_deg=5.0, max_shift_px=1.8)
    cfg = da.DeepAlignConfig(region_step_deg=45.0, cnn_box=24, width=8, train_steps=200, train_batch=64,
                             learning_rate=3e-3, n_regions_searched=3)
    aligner = da.DeepAligner(matcher, cfg)
    aligner.train(imgs, _ctf(truth))
    yield vol, imgs, truth, matcher, aligner
    torch.set_num_threads(threads)


def test_region_recognition_beats_chance(trained):
    _, imgs, truth, _, aligner = trained
    true_region = aligner.regions.assign_matrices(truth["matrices"])
    chance = 1.0 / aligner.regions.n_regions
    for p in aligner.region_probabilities(imgs):
        assert p.shape == (100, aligner.regions.n_regions)
        np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-4)
        top1 = np.mean(p.argmax(1) == true_region)
        top3 = np.mean((np.argsort(-p, 1)[:, :3] == true_region[:, None]).any(1))
        assert top1 > 4 * chance and top3 > 0.5, (top1, top3)


def test_deepalign_no_worse_than_projmatch(trained):
    """After restricted matching and refinement, errors within 1 deg (median) of full projection matching."""
    _, imgs, truth, matcher, aligner = trained
    res = aligner.align(imgs, _ctf(truth))
    err = angular_distance_deg(res.matrices, truth["matrices"])
    ref = angular_distance_deg(matcher.align(imgs, _ctf(truth)).matrices, truth["matrices"])
    assert np.median(err) <= np.median(ref) + 1.0, (np.median(err), np.median(ref))
    assert np.median(err) < 6.0
    c = res.extra["consensus_deg"]
    assert c.shape == (100,) and np.all(c >= 0)
    np.testing.assert_array_equal(res.extra["disagree"], (c > aligner.config.consensus_tolerance_deg).astype(int))
    assert 0 <= res.extra["region"].min() and res.extra["region"].max() < aligner.regions.n_regions


def test_models_save_and_load(trained, tmp_path):
    _, imgs, truth, matcher, aligner = trained
    aligner.save(str(tmp_path))
    meta = json.loads((tmp_path / da.MODEL_META).read_text())
    assert meta["n_regions"] == aligner.regions.n_regions and len(meta["models"]) == 2
    other = da.DeepAligner(matcher, da.DeepAlignConfig())
    assert da.DeepAligner.has_models(str(tmp_path))
    other.load(str(tmp_path))
    assert other.cnn_box == 24 and other.config.region_step_deg == 45.0
    for p, q in zip(aligner.region_probabilities(imgs[:10]), other.region_probabilities(imgs[:10])):
        np.testing.assert_allclose(p, q, atol=1e-5)


def test_corrupt_model_folder(trained, tmp_path):
    _, _, _, matcher, aligner = trained
    aligner.save(str(tmp_path))
    fresh = da.DeepAligner(matcher, da.DeepAlignConfig())
    (tmp_path / da.MODEL_FILE.format(1)).write_bytes(b"not a model")
    with pytest.raises(InputError, match="cannot be read"):
        fresh.load(str(tmp_path))
    os.remove(tmp_path / da.MODEL_FILE.format(1))
    with pytest.raises(InputError, match="missing"):
        fresh.load(str(tmp_path))
    (tmp_path / da.MODEL_META).write_text("{ truncated")
    with pytest.raises(InputError, match="corrupt"):
        fresh.load(str(tmp_path))


def test_missing_torch_gives_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(InputError, match="pip install"):
        da.require_torch()


def test_regions_respect_symmetry():
    regions = da.region_centres(30.0, "c4")
    assert regions.n_regions < da.region_centres(30.0, "c1").n_regions / 3
    rng = np.random.default_rng(0)
    d = rng.normal(size=(50, 3))
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    base = regions.assign(d)
    for g in symmetry_matrices("c4"):
        np.testing.assert_array_equal(regions.assign(d @ g), base)
    np.testing.assert_array_equal(regions.assign(regions.centres), np.arange(regions.n_regions))


def test_polar_images_turn_rotations_into_cyclic_shifts():
    img = phantom_volume(24, seed=2)[12][None].astype(np.float32)
    rot = np.roll(np.rot90(img, 1, axes=(1, 2)), 1, axis=1)      # 90 deg about the centre N//2
    a, b = da.polar_images(img), da.polar_images(rot)
    n_theta = a.shape[-1]
    shifted = [np.abs(np.roll(a, s, axis=-1) - b).max() for s in (n_theta // 4, -n_theta // 4)]
    assert min(shifted) < 1e-4 * np.abs(a).max()
    assert max(shifted) > 1e-2 * np.abs(a).max()


def test_network_is_invariant_to_cyclic_angle_shifts():
    torch.manual_seed(0)
    net = rc.build_network(7, width=4).eval()
    x = torch.randn(3, 1, 16, 48)
    with torch.no_grad():
        y0, y1 = net(x), net(torch.roll(x, 8, dims=3))
    torch.testing.assert_close(y0, y1, atol=1e-5, rtol=1e-5)


def test_noise_model_recovers_scale_and_noise():
    vol = phantom_volume(32, seed=3)
    imgs, truth = make_particles(vol, 300, pixel_size_A=PX, snr=0.5, max_shift_px=1.0, seed=5)
    regions = da.region_centres(30.0, "c1")
    gen = da.TrainingImages(vol, pixel_size_A=PX, cnn_box=32, regions=regions, ctf=_ctf(truth), max_shift_px=1.0)
    sim, labels = gen.batch(600)
    assert labels.shape == (600,) and labels.max() < regions.n_regions
    model = da.estimate_noise_model(imgs, sim)
    assert model.scale == pytest.approx(1.0, rel=0.1)
    white = truth["noise_sigma"] ** 2 * 32 * 32
    assert np.median(model.noise_power[2:]) == pytest.approx(white, rel=0.15)


@pytest.mark.gpu
def test_training_images_gpu_match_numpy():
    cp = backend.cupy_module()
    vol = phantom_volume(32, seed=4)
    regions = da.region_centres(30.0, "c1")
    ctf = {"defocus_u_A": np.array([15000.0, 20000.0]), "defocus_v_A": np.array([14500.0, 19000.0]),
           "defocus_angle_deg": np.array([10.0, 80.0]), "voltage_kV": np.array([300.0, 300.0]),
           "cs_mm": np.array([2.7, 2.7]), "amplitude_contrast": np.array([0.1, 0.1])}
    noise = da.NoiseModel(scale=1.0, noise_power=[50.0] * 17, box=32, snr=1.0)
    a, la = da.TrainingImages(vol, pixel_size_A=PX, cnn_box=32, regions=regions, ctf=ctf, max_shift_px=2,
                              noise=noise, seed=3).batch(16)
    b, lb = da.TrainingImages(cp.asarray(vol), pixel_size_A=PX, cnn_box=32, regions=regions, ctf=ctf,
                              max_shift_px=2, noise=noise, seed=3).batch(16)
    np.testing.assert_array_equal(la, lb)
    np.testing.assert_allclose(backend.to_host(b), a, atol=1e-3 * np.abs(a).max())


@pytest.mark.gpu
def test_deepalign_trains_and_predicts_on_gpu():
    cp = backend.cupy_module()
    if not torch.cuda.is_available():
        pytest.skip("PyTorch without CUDA")
    vol = phantom_volume(32, seed=0)
    imgs, truth = make_particles(cp.asarray(vol), 64, pixel_size_A=PX, snr=1.0, max_shift_px=1.5, seed=1)
    matcher = ProjectionMatcher(cp.asarray(vol), pixel_size_A=PX, step_deg=5.0, max_shift_px=1.8)
    cfg = da.DeepAlignConfig(region_step_deg=45.0, cnn_box=24, width=16, train_steps=300, train_batch=128)
    aligner = da.DeepAligner(matcher, cfg)
    assert aligner.torch_device.type == "cuda"
    aligner.train(imgs, _ctf(truth))
    res = aligner.align(imgs, _ctf(truth))
    err = angular_distance_deg(res.matrices, truth["matrices"])
    assert np.median(err) < 6.0


def test_region_shortlist_adapts_to_certainty():
    p = np.array([[0.95, 0.03, 0.01, 0.01, 0.0, 0.0, 0.0, 0.0],      # sure: the minimum of 2
                  [0.4, 0.3, 0.15, 0.1, 0.05, 0.0, 0.0, 0.0],        # 0.4+0.3+0.15+0.1 >= 0.9: 4
                  [0.125] * 8])                                       # flat: the cap of 6
    mask = da.region_shortlist(p, min_regions=2, max_regions=6, mass=0.9)
    assert mask.shape == p.shape and mask.dtype == bool
    np.testing.assert_array_equal(mask.sum(1), [2, 4, 6])
    np.testing.assert_array_equal(np.nonzero(mask[1])[0], [0, 1, 2, 3])
    assert mask[0, 0] and mask[0, 1]
    np.testing.assert_array_equal(da.region_shortlist(p, min_regions=3, mass=0.0).sum(1), [3, 3, 3])


def _fooled_aligner(trained, true_rank, probs_head, **cfg):
    """An aligner on the trained models whose classifiers rank the true region ``true_rank``-th (0-based)."""
    _, imgs, truth, matcher, aligner = trained
    regions = aligner.regions
    sel = slice(0, 30)
    true_dir = truth["matrices"][sel][:, 2, :]
    true_region = regions.assign(true_dir)
    n, n_reg = true_region.size, regions.n_regions
    cos = np.abs(true_dir @ regions.centres.T)                      # far from the direction and its mirror
    far = np.argsort(cos, axis=1)
    probs = np.full((n, n_reg), 0.0)
    rest = (1.0 - sum(probs_head)) / (n_reg - len(probs_head))
    for i in range(n):
        wrong = [r for r in far[i] if r != true_region[i]]
        order = wrong[:true_rank] + [true_region[i]] + wrong[true_rank:]
        probs[i] = rest
        probs[i, order[:len(probs_head)]] = probs_head
    config = da.DeepAlignConfig(**{**vars(aligner.config), "n_regions_searched": 2, **cfg})
    fooled = da.DeepAligner(matcher, config)
    fooled.models, fooled.noise, fooled.cnn_box = aligner.models, aligner.noise, aligner.cnn_box
    fooled.region_probabilities = lambda images: [probs[:images.shape[0]]] * 2
    return fooled, imgs[sel], {k: v[sel] for k, v in _ctf(truth).items()}, truth["matrices"][sel]


OLD_BEHAVIOUR = {"region_probability_mass": 0.0, "coarse_check_step_deg": 0.0, "union_on_disagreement": False}


def test_true_region_third_choice_recovered_by_adaptive_shortlist(trained):
    """Unsure classifiers (0.35, 0.3, 0.25 for the 3rd = true region): the shortlist grows to 3 regions."""
    head = [0.35, 0.3, 0.25]
    fooled, imgs, ctf, true = _fooled_aligner(trained, 2, head, coarse_check_step_deg=0.0)
    res = fooled.align(imgs, ctf)
    assert np.all(res.extra["regions_searched"] >= 3)
    err = angular_distance_deg(res.matrices, true)
    old, imgs, ctf, true = _fooled_aligner(trained, 2, head, **OLD_BEHAVIOUR)
    err_old = angular_distance_deg(old.align(imgs, ctf).matrices, true)
    assert np.median(err) < 6.0 and np.median(err_old) > 30.0, (np.median(err), np.median(err_old))


def test_true_region_missed_by_shortlist_recovered_by_coarse_check(trained):
    """True region 4th (probability 0.01) beyond the 0.9 mass: only the coarse check of uncertain particles finds it."""
    head = [0.45, 0.3, 0.2, 0.01]
    fooled, imgs, ctf, true = _fooled_aligner(trained, 3, head, coarse_check_step_deg=15.0)
    res = fooled.align(imgs, ctf)
    assert np.all(res.extra["uncertain"] == 1)
    err = angular_distance_deg(res.matrices, true)
    off, imgs, ctf, true = _fooled_aligner(trained, 3, head, coarse_check_step_deg=0.0)
    err_off = angular_distance_deg(off.align(imgs, ctf).matrices, true)
    assert np.median(err) < 6.0 and np.median(err_off) > 30.0, (np.median(err), np.median(err_off))
