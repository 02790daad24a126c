"""Synthetic particles: shapes, a truth that reproduces the images, the SNR, the phantom's properties."""
import numpy as np
import pytest

from xmipp_accel.em.ctf import ctf_2d
from xmipp_accel.em.geometry import euler_to_matrix
from xmipp_accel.em.projection import project_volume, shift_images
from xmipp_accel.em.synthetic import add_noise_at_snr, make_particles, phantom_volume
from xmipp_accel.errors import InputError

TRUTH_KEYS = {"rot", "tilt", "psi", "matrices", "origin_x_A", "origin_y_A", "defocus_u_A", "defocus_v_A",
              "defocus_angle_deg", "voltage_kV", "cs_mm", "amplitude_contrast", "subset"}


def corr(a, b):
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    a, b = a - a.mean(), b - b.mean()
    return float(a @ b / np.sqrt((a @ a) * (b @ b)))


@pytest.fixture(scope="module")
def phantom():
    return phantom_volume(40, seed=3)


def test_phantom_properties():
    v = phantom_volume(48, seed=1)
    assert v.shape == (48, 48, 48) and v.dtype == np.float32
    assert v.min() >= 0 and v.max() == pytest.approx(1.0)
    r = np.sqrt(sum(g ** 2 for g in np.meshgrid(*[np.arange(48) - 24] * 3, indexing="ij")))
    assert np.all(v[r > 0.4 * 48] == 0)
    assert 0.05 < (v > 0.01).mean() < 0.4
    np.testing.assert_array_equal(v, phantom_volume(48, seed=1))
    assert corr(v, phantom_volume(48, seed=2)) < 0.9
    # features at several scales: power at high frequency (sharp edges, small blobs) and low frequency
    p = np.abs(np.fft.fftshift(np.fft.fftn(v))) ** 2
    shell = np.sqrt(sum(g ** 2 for g in np.meshgrid(*[np.arange(48) - 24] * 3, indexing="ij")))
    hi, lo = p[(shell > 12) & (shell < 20)].mean(), p[(shell > 1) & (shell < 4)].mean()
    assert hi > 1e-5 * lo
    # no symmetry: the volume differs from its rotations by 90/180 degrees
    assert corr(v, np.rot90(v, 2, axes=(1, 2))) < 0.8 and corr(v, np.rot90(v, 1, axes=(0, 2))) < 0.8
    with pytest.raises(InputError):
        phantom_volume(8)


def test_shapes_and_truth(phantom):
    imgs, truth = make_particles(phantom, 10, pixel_size_A=2.5, snr=1.0, max_shift_px=3, seed=4)
    assert imgs.shape == (10, 40, 40) and imgs.dtype == np.float32
    assert TRUTH_KEYS <= set(truth)
    for key in ("rot", "tilt", "psi", "origin_x_A", "origin_y_A", "defocus_u_A", "defocus_v_A",
                "defocus_angle_deg", "subset"):
        assert np.shape(truth[key]) == (10,), key
    np.testing.assert_allclose(truth["matrices"], euler_to_matrix(truth["rot"], truth["tilt"], truth["psi"]),
                               atol=1e-12)
    assert sorted(set(truth["subset"].tolist())) == [1, 2] and abs((truth["subset"] == 1).sum() - 5) <= 1
    assert np.all((truth["defocus_u_A"] >= 10000) & (truth["defocus_u_A"] <= 25000))
    assert np.all(truth["defocus_v_A"] <= truth["defocus_u_A"])
    assert np.abs(truth["origin_x_A"]).max() <= 3 * 2.5 and np.abs(truth["origin_x_A"]).max() > 0.5
    np.testing.assert_allclose(truth["shifts_px"][:, 0], -truth["origin_x_A"] / 2.5)
    again, truth2 = make_particles(phantom, 10, pixel_size_A=2.5, snr=1.0, max_shift_px=3, seed=4)
    np.testing.assert_array_equal(imgs, again)
    np.testing.assert_array_equal(truth["rot"], truth2["rot"])


def test_truth_reproduces_noiseless_images(phantom):
    """Independent path: real-space projection, RELION origin, CTF applied by hand."""
    ps = 3.0
    imgs, t = make_particles(phantom, 3, pixel_size_A=ps, snr=None, max_shift_px=4, seed=7)
    proj = project_volume(phantom, t["matrices"])
    shifted = shift_images(proj, -np.column_stack([t["origin_x_A"], t["origin_y_A"]]) / ps)
    c = ctf_2d(40, ps, t["defocus_u_A"], t["defocus_v_A"], t["defocus_angle_deg"], voltage_kV=t["voltage_kV"],
               cs_mm=t["cs_mm"], amplitude_contrast=t["amplitude_contrast"], dtype=np.float64)
    f = np.fft.rfft2(np.fft.ifftshift(shifted, axes=(1, 2))) * c
    expected = np.fft.fftshift(np.fft.irfft2(f, s=(40, 40)), axes=(1, 2))
    for k in range(3):
        assert corr(imgs[k], expected[k]) > 0.98
        assert imgs[k].std() == pytest.approx(expected[k].std(), rel=0.1)
    # RELION's origin: shifting by +origin/pixel centres the particle
    centred = shift_images(imgs, np.column_stack([t["origin_x_A"], t["origin_y_A"]]) / ps)
    unshifted, _ = make_particles(phantom, 3, pixel_size_A=ps, snr=None, max_shift_px=0, seed=7)
    assert min(corr(a, b) for a, b in zip(centred, unshifted)) > 0.999


def test_without_ctf_images_are_projections(phantom):
    imgs, t = make_particles(phantom, 2, pixel_size_A=2.0, ctf=False, seed=1)
    proj = project_volume(phantom, t["matrices"])
    assert min(corr(a, b) for a, b in zip(imgs, proj)) > 0.99


@pytest.mark.parametrize("snr", [0.05, 1.0])
def test_measured_snr(phantom, snr):
    clean, _ = make_particles(phantom, 200, pixel_size_A=2.0, snr=None, max_shift_px=2, seed=5)
    noisy, t = make_particles(phantom, 200, pixel_size_A=2.0, snr=snr, max_shift_px=2, seed=5)
    noise = noisy - clean
    measured = clean.reshape(200, -1).var(axis=1).mean() / noise.var()
    assert measured == pytest.approx(snr, rel=0.03)
    assert t["noise_sigma"] == pytest.approx(noise.std(), rel=0.02) and t["snr"] == snr


def test_noise_helper_rejects_bad_snr():
    with pytest.raises(InputError):
        add_noise_at_snr(np.zeros((1, 4, 4), np.float32), 0.0)


def test_gpu_generation_matches_cpu(xp, phantom):
    cpu, t_cpu = make_particles(phantom, 6, pixel_size_A=2.0, snr=None, max_shift_px=2, seed=9)
    dev, t_dev = make_particles(xp.asarray(phantom), 6, pixel_size_A=2.0, snr=None, max_shift_px=2, seed=9)
    dev = dev.get() if hasattr(dev, "get") else dev
    np.testing.assert_array_equal(t_cpu["rot"], t_dev["rot"])
    np.testing.assert_allclose(dev, cpu, atol=1e-4 * np.abs(cpu).max())
    noisy, t = make_particles(xp.asarray(phantom), 50, pixel_size_A=2.0, snr=0.5, seed=2)
    assert noisy.shape == (50, 40, 40) and t["noise_sigma"] > 0


def test_bad_arguments(phantom):
    with pytest.raises(InputError):
        make_particles(phantom, 0, pixel_size_A=1.0)
    with pytest.raises(InputError):
        make_particles(phantom, 2, pixel_size_A=0.0)
    with pytest.raises(InputError):
        make_particles(phantom, 2, pixel_size_A=1.0, defocus_range_A=(2e4, 1e4))
