"""Angular accuracy (RELION's rule) against a real-space ground truth with known noise."""
import numpy as np
import pytest

from xmipp_accel.em.ctf import ctf_2d
from xmipp_accel.em.projection import project_volume, shift_images
from xmipp_accel.em.sampling import random_rotations
from xmipp_accel.em.symmetry import rotation_about_axis
from xmipp_accel.em.synthetic import gaussian_lowpass, phantom_volume
from xmipp_accel.gpu.refine.accuracy import RELION_LOG_RATIO, angular_accuracy_deg

BOX, PX, N = 48, 2.0, 80


def _ctf_filter(images, ctf):
    """Real-space images multiplied by the CTF in Fourier space (centre N//2)."""
    f = np.fft.rfft2(np.fft.ifftshift(images, axes=(-2, -1)))
    return np.fft.fftshift(np.fft.irfft2(f * ctf, s=images.shape[-2:]), axes=(-2, -1)).astype(np.float32)


def _drop(vol, m, p0, ax, c, delta_deg, sigma):
    """1/2 sum (P(R A) - P(A))^2 / sigma^2 in real space (CTF-filtered when ``c`` is given)."""
    dp = project_volume(vol, rotation_about_axis(ax, delta_deg) @ m) - p0
    if c is not None:
        dp = _ctf_filter(dp[None], c[None])[0]
    return 0.5 * float(np.sum(dp.astype(np.float64) ** 2)) / sigma ** 2


def _truth_deg(vol, mats, axes, sigma, ctf=None):
    """Median over particles of the angle where 1/2 sum (dP)^2 / sigma^2 reaches ln 100 (real-space
    projections, the noise sigma known, bisection): an implementation independent of the module's."""
    out = []
    for m, ax, c in zip(mats, axes, ctf if ctf is not None else [None] * len(mats)):
        p0, lo, hi = project_volume(vol, m), 0.0, 32.0
        for _ in range(13):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if _drop(vol, m, p0, ax, c, mid, sigma) < RELION_LOG_RATIO else (lo, mid)
        out.append(0.5 * (lo + hi))
    return float(np.median(out))


@pytest.fixture(scope="module")
def case():
    vol = gaussian_lowpass(phantom_volume(BOX, seed=1), resolution_A=8.0, pixel_size_A=PX).astype(np.float32)
    rng = np.random.default_rng(3)
    mats = random_rotations(N, rng)
    clean = project_volume(vol, mats)
    axes = rng.normal(size=(N, 3))
    axes /= np.linalg.norm(axes, axis=1, keepdims=True)
    return vol, mats, clean, axes, rng


@pytest.mark.parametrize("noise", [0.7, 1.4])
def test_accuracy_matches_real_space_truth(case, noise):
    vol, mats, clean, axes, rng = case
    sigma = float(np.std(clean)) * noise
    origins = rng.uniform(-3, 3, size=(N, 2))
    images = shift_images(clean + rng.normal(scale=sigma, size=clean.shape).astype(np.float32), -origins)
    acc = angular_accuracy_deg(vol, images, mats, origins, pixel_size_A=PX, r_max_px=BOX / 2 - 1)
    truth = _truth_deg(vol, mats, axes, sigma)
    # 80 particles, random axes on each side: the medians differ by sampling and the noise estimate (3 % seen)
    assert abs(acc - truth) < 0.08 * truth, (acc, truth)


def test_accuracy_scales_with_noise(case):
    vol, mats, clean, _, rng = case
    noise = rng.normal(size=clean.shape).astype(np.float32)
    zero = np.zeros((N, 2))
    s = float(np.std(clean))
    a1 = angular_accuracy_deg(vol, clean + 0.5 * s * noise, mats, zero, pixel_size_A=PX, r_max_px=BOX / 2 - 1)
    a2 = angular_accuracy_deg(vol, clean + 1.0 * s * noise, mats, zero, pixel_size_A=PX, r_max_px=BOX / 2 - 1)
    assert 1.7 < a2 / a1 < 2.3, (a1, a2)          # D ~ delta^2 / sigma^2 at small angles: delta ~ sigma


def test_accuracy_with_ctf(case):
    vol, mats, clean, axes, rng = case
    defocus = rng.uniform(8000, 20000, N)
    ctf = ctf_2d(BOX, PX, defocus, defocus, np.zeros(N), voltage_kV=300.0, cs_mm=2.7, amplitude_contrast=0.1)
    sigma = float(np.std(clean)) * 0.5
    images = _ctf_filter(clean, ctf) + rng.normal(scale=sigma, size=clean.shape).astype(np.float32)
    params = {"defocus_u_A": defocus, "defocus_v_A": defocus, "defocus_angle_deg": np.zeros(N),
              "voltage_kV": np.full(N, 300.0), "cs_mm": np.full(N, 2.7), "amplitude_contrast": np.full(N, 0.1)}
    acc = angular_accuracy_deg(vol, images, mats, np.zeros((N, 2)), pixel_size_A=PX, r_max_px=BOX / 2 - 1,
                               ctf=params)
    truth = _truth_deg(vol, mats, axes, sigma, ctf=ctf)
    assert abs(acc - truth) < 0.08 * truth, (acc, truth)
    no_ctf = angular_accuracy_deg(vol, images, mats, np.zeros((N, 2)), pixel_size_A=PX, r_max_px=BOX / 2 - 1)
    assert no_ctf > 1.1 * acc or no_ctf < 0.9 * acc      # ignoring the CTF changes the answer


def test_gpu_accuracy_matches_numpy(case):
    cp = pytest.importorskip("cupy")
    from xmipp_accel import backend
    if backend.cupy_module() is None:
        pytest.skip("no usable GPU")
    vol, mats, clean, _, rng = case
    images = clean + rng.normal(scale=float(np.std(clean)), size=clean.shape).astype(np.float32)
    zero = np.zeros((N, 2))
    cpu = angular_accuracy_deg(vol, images, mats, zero, pixel_size_A=PX, r_max_px=BOX / 2 - 1)
    gpu = angular_accuracy_deg(cp.asarray(vol), cp.asarray(images), mats, zero, pixel_size_A=PX,
                               r_max_px=BOX / 2 - 1, xp=cp)
    assert abs(gpu - cpu) < 0.02 * cpu, (cpu, gpu)
