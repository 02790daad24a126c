"""FSC: against a float64 computation written with explicit loops over shells, against half maps
with a known spectral SNR, the size-dependent criteria, RELION's masked correction, directional
cones and bad input. Runs on NumPy and, where a GPU is usable, on CuPy (``xp`` fixture)."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from xmipp_accel.errors import InputError
from xmipp_accel import backend
from xmipp_accel.gpu.resolution import fsc as fscmod  # the module (the function is fscmod.fsc)
from xmipp_accel.gpu.resolution.fsc import (
    FSCResult,
    crossing_frequency,
    directional_fsc,
    fsc,
    hemisphere_directions,
    masked_fsc_corrected,
    resolution_at,
    threshold_curve,
)


# ------------------------------------------------------------------------------------ references
def _signed_indices(n: int) -> np.ndarray:
    """Fourier indices of an n-point full FFT: 0, 1, ..., then negative (written independently)."""
    return np.array([i if i <= (n - 1) // 2 else i - n for i in range(n)], dtype=np.float64)


def reference_fsc(a: np.ndarray, b: np.ndarray, direction=None, cone_deg: float = 90.0):
    """FSC in float64 with the full FFT and an explicit loop over shells (and an optional double cone)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    nref = max(a.shape)
    f1, f2 = np.fft.fftn(a), np.fft.fftn(b)
    kz, ky, kx = (_signed_indices(n) * nref / n for n in a.shape)
    grid = np.meshgrid(kz, ky, kx, indexing="ij")
    radius = np.sqrt(grid[0] ** 2 + grid[1] ** 2 + grid[2] ** 2)
    keep = np.ones(a.shape, dtype=bool)
    if direction is not None:
        d = np.asarray(direction, dtype=np.float64) / np.linalg.norm(direction)
        dot = np.abs(grid[2] * d[0] + grid[1] * d[1] + grid[0] * d[2])
        with np.errstate(invalid="ignore", divide="ignore"):
            angle = np.degrees(np.arccos(np.clip(dot / radius, -1, 1)))
        keep = (radius == 0) | (angle <= cone_deg)
    values, counts = [], []
    for shell in range(nref // 2 + 1):
        sel = keep & (radius >= shell - 0.5) & (radius < shell + 0.5)
        num = np.sum(f1[sel] * np.conj(f2[sel])).real
        den = math.sqrt(np.sum(np.abs(f1[sel]) ** 2) * np.sum(np.abs(f2[sel]) ** 2))
        values.append(num / den if den > 0 else 0.0)
        counts.append(int(sel.sum()))
    return np.array(values), np.array(counts)


def _pair(shape, seed=0, noise=1.0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    s = rng.standard_normal(shape)
    h1 = s + noise * rng.standard_normal(shape)
    h2 = s + noise * rng.standard_normal(shape)
    return h1.astype(dtype), h2.astype(dtype)


# ------------------------------------------------------------------------------ exactness
@pytest.mark.parametrize("shape", [(16, 16, 16), (17, 17, 17), (12, 16, 20), (1, 24, 24)])
def test_fsc_equals_float64_loop_reference(xp, shape):
    a, b = _pair(shape, seed=1)
    ref, counts = reference_fsc(a, b)
    got = fsc(xp.asarray(a), xp.asarray(b))
    assert got.fsc.shape == ref.shape
    np.testing.assert_allclose(got.fsc, ref, atol=1e-6, rtol=0)
    np.testing.assert_array_equal(got.n_voxels, counts)
    np.testing.assert_allclose(got.frequency, np.arange(ref.size) / max(shape))


def test_fsc_float32_input_close_to_float64(xp):
    a, b = _pair((24, 24, 24), seed=2)
    ref, _ = reference_fsc(a, b)
    got = fsc(xp.asarray(a, dtype=np.float32), xp.asarray(b, dtype=np.float32))
    np.testing.assert_allclose(got.fsc, ref, atol=2e-5)


def test_fsc_with_mask_equals_fsc_of_masked_maps(xp):
    a, b = _pair((20, 20, 20), seed=3)
    mask = np.zeros(a.shape)
    mask[4:16, 3:17, 5:15] = 1.0
    ref, _ = reference_fsc(a * mask, b * mask)
    got = fsc(xp.asarray(a), xp.asarray(b), mask=xp.asarray(mask))
    np.testing.assert_allclose(got.fsc, ref, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(32, 32, 32), (33, 30, 28)])
@pytest.mark.parametrize("dtype", [np.complex64, np.complex128])
@pytest.mark.parametrize("cone", [None, ((0.3, -0.5, 0.8), math.cos(math.radians(25)))])
def test_gpu_shell_sum_kernel_matches_bincount(shape, dtype, cone):
    cp = backend.cupy_module()
    rng = np.random.default_rng(4)
    half = (shape[0], shape[1], shape[2] // 2 + 1)
    f1 = (rng.standard_normal(half) + 1j * rng.standard_normal(half)).astype(dtype)
    f2 = (0.5 * f1 + rng.standard_normal(half) + 1j * rng.standard_normal(half)).astype(dtype)
    direction, cos_a = cone if cone else (None, -2.0)
    ref = fscmod._shell_sums_xp(f1, f2, shape, direction, cos_a)
    got = fscmod._shell_sums_gpu(cp.asarray(f1), cp.asarray(f2), shape, direction, cos_a)
    np.testing.assert_array_equal(got[3], ref[3])
    tol = 1e-5 if dtype == np.complex64 else 1e-10
    np.testing.assert_allclose(got[:3], ref[:3], rtol=tol, atol=tol * np.abs(ref[:3]).max())


# ------------------------------------------------------------------------------ known SNR
def test_known_spectral_snr_gives_predicted_fsc_and_resolution(xp):
    """Half maps = signal + independent noise with SNR(k) = 20 exp(-(k/0.15)²) → FSC = SNR/(1+SNR)."""
    n, pixel = 64, 1.3
    rng = np.random.default_rng(5)
    i = np.arange(n)
    k1 = np.where(2 * i < n, i, i - n) / n
    radius = np.sqrt(k1[:, None, None] ** 2 + k1[None, :, None] ** 2 + (np.arange(n // 2 + 1) / n)[None, None, :] ** 2)
    snr = 20.0 * np.exp(-(radius / 0.15) ** 2)
    signal = np.fft.irfftn(np.fft.rfftn(rng.standard_normal((n, n, n))) * np.sqrt(snr), s=(n, n, n))
    h1 = signal + rng.standard_normal(signal.shape)
    h2 = signal + rng.standard_normal(signal.shape)
    result = fsc(xp.asarray(h1, dtype=np.float32), xp.asarray(h2, dtype=np.float32))
    shells = np.arange(result.fsc.size)
    snr_shell = 20.0 * np.exp(-((shells / n) / 0.15) ** 2)
    predicted = snr_shell / (1.0 + snr_shell)
    sel = shells >= 2
    assert np.all(np.abs(result.fsc[sel] - predicted[sel]) < 5.0 / np.sqrt(result.n_voxels[sel]))
    k_star = 0.15 * math.sqrt(math.log(20.0 / (0.143 / (1 - 0.143))))  # cycles/px where FSC = 0.143
    expected_A = pixel / k_star
    assert resolution_at(result, 0.143, pixel) == pytest.approx(expected_A, rel=0.03)
    k_half = 0.15 * math.sqrt(math.log(20.0))  # FSC = 0.5 where SNR = 1
    assert resolution_at(result, 0.5, pixel) == pytest.approx(pixel / k_half, rel=0.03)


# ------------------------------------------------------------------------------ criteria
def test_threshold_formulas():
    r = FSCResult(np.arange(4) / 6.0, np.ones(4), np.array([1.0, 18.0, 62.0, 98.0]), 6)
    n = r.n_voxels
    np.testing.assert_allclose(threshold_curve(r, "half-bit"),
                               (0.2071 + 1.9102 / np.sqrt(n)) / (1.2071 + 0.9102 / np.sqrt(n)))
    np.testing.assert_allclose(threshold_curve(r, "3sigma", symmetry_order=2)[1:], 3.0 / np.sqrt(n[1:] / 2 / 2.0))
    np.testing.assert_allclose(threshold_curve(r, "0.143"), 0.143)
    np.testing.assert_allclose(threshold_curve(r, 0.3), 0.3)
    with pytest.raises(InputError):
        threshold_curve(r, "one-bit-ish")


def test_crossing_is_interpolated_and_searched_after_first_exceed():
    freq = np.arange(6) / 10.0
    # below the (size-dependent) threshold in shell 1, above in 2-3, crossing between 3 and 4
    curve = np.array([1.0, 0.30, 0.90, 0.70, 0.20, 0.10])
    thr = np.array([1.0, 0.80, 0.60, 0.50, 0.40, 0.40])
    f, status = crossing_frequency(freq, curve, thr)
    assert status == "crossed"
    t = (0.70 - 0.50) / ((0.70 - 0.50) - (0.20 - 0.40))
    assert f == pytest.approx(0.3 + t * 0.1)
    assert crossing_frequency(freq, np.ones(6), 0.5) == (0.5, "above_to_nyquist")
    f, status = crossing_frequency(freq, np.r_[1.0, np.zeros(5)], 0.5)
    assert status == "never_above" and math.isnan(f)


def test_identical_maps_give_fsc_one_and_nyquist_with_warning(xp):
    a, _ = _pair((20, 20, 20), seed=6)
    r = fsc(xp.asarray(a), xp.asarray(a))
    np.testing.assert_allclose(r.fsc, 1.0, atol=1e-6)
    assert r.is_identical
    with pytest.warns(UserWarning, match="identical"):
        assert resolution_at(r, 0.143, 1.5) == pytest.approx(3.0)


def test_uncorrelated_maps_never_above_give_inf_with_warning():
    rng = np.random.default_rng(7)
    a, b = rng.standard_normal((2, 16, 16, 16))
    r = fsc(a, -a + 1e-9 * b)  # anti-correlated: never above any positive threshold
    with pytest.warns(UserWarning, match="never exceeds"):
        assert resolution_at(r, 0.143, 1.0) == math.inf


# ------------------------------------------------------------------------------ masked (RELION)
def _blob_halves(n=48, noise=0.3, seed=8):
    """Low-pass (8 px) signal confined to a sphere of radius 11 px, plus independent noise."""
    rng = np.random.default_rng(seed)
    i = np.arange(n)
    k1 = np.where(2 * i < n, i, i - n) / n
    kx = np.arange(n // 2 + 1) / n
    radius_k = np.sqrt(k1[:, None, None] ** 2 + k1[None, :, None] ** 2 + kx[None, None, :] ** 2)
    x = i - n / 2
    radius = np.sqrt(x[:, None, None] ** 2 + x[None, :, None] ** 2 + x[None, None, :] ** 2)
    lowpass = radius_k <= 1.0 / 8.0
    s = np.fft.irfftn(np.fft.rfftn(rng.standard_normal((n, n, n))) * lowpass, s=(n, n, n)) * (radius < 11)
    s = np.fft.irfftn(np.fft.rfftn(s) * lowpass, s=(n, n, n))
    s /= s.std()
    h1 = (s + noise * rng.standard_normal(s.shape)).astype(np.float32)
    h2 = (s + noise * rng.standard_normal(s.shape)).astype(np.float32)
    return h1, h2, (radius < 14).astype(np.float32)


def test_masked_fsc_correction_removes_mask_induced_correlation(xp):
    h1, h2, mask = _blob_halves()
    r = masked_fsc_corrected(xp.asarray(h1), xp.asarray(h2), xp.asarray(mask), seed=1)
    shell = r.randomise_from_shell
    assert shell is not None and 4 <= shell <= 8  # the signal stops at shell 48/8 = 6
    beyond = np.arange(r.masked.fsc.size) >= shell + 2
    assert r.unmasked.fsc[beyond].mean() < 0.05           # no signal there
    assert r.masked.fsc[beyond].mean() > 0.2              # the sharp mask creates correlation
    assert abs(r.phase_randomised.fsc[beyond].mean() - r.masked.fsc[beyond].mean()) < 0.1
    assert abs(r.corrected.fsc[beyond].mean()) < 0.05     # ... which the correction removes
    np.testing.assert_array_equal(r.corrected.fsc[~beyond], r.masked.fsc[~beyond])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert resolution_at(r.corrected, 0.143, 1.0) > 1.3 * resolution_at(r.masked, 0.143, 1.0)


def test_masked_fsc_is_reproducible_across_backends(xp):
    h1, h2, mask = _blob_halves(n=32)
    ref = masked_fsc_corrected(h1, h2, mask, seed=3)
    got = masked_fsc_corrected(xp.asarray(h1), xp.asarray(h2), xp.asarray(mask), seed=3)
    assert got.randomise_from_shell == ref.randomise_from_shell
    np.testing.assert_allclose(got.corrected.fsc, ref.corrected.fsc, atol=1e-4)


def test_random_phases_are_uniform_and_seeded():
    p = fscmod._random_phases((64, 64, 33), 5, 0, np, np.float64)
    assert p.min() >= 0 and p.max() < 2 * math.pi
    assert abs(np.cos(p).mean()) < 0.01 and abs(np.sin(p).mean()) < 0.01
    np.testing.assert_array_equal(p, fscmod._random_phases((64, 64, 33), 5, 0, np, np.float64))
    assert not np.allclose(p, fscmod._random_phases((64, 64, 33), 5, 1, np, np.float64))


# ------------------------------------------------------------------------------ directional
def test_directional_fsc_equals_cone_loop_reference(xp):
    a, b = _pair((16, 16, 16), seed=9)
    directions = np.array([[0.0, 0.0, 1.0], [0.6, 0.0, 0.8], [1.0, 1.0, 0.0]])
    got = directional_fsc(xp.asarray(a), xp.asarray(b), directions, cone_half_angle_deg=27.0)
    for d, curve in zip(directions, got.curves):
        ref, counts = reference_fsc(a, b, direction=d, cone_deg=27.0)
        # the Nyquist shell holds voxels at ±N/2, whose cone membership depends on the sign convention
        np.testing.assert_array_equal(curve.n_voxels[:-1], counts[:-1])
        np.testing.assert_allclose(curve.fsc[:-1], ref[:-1], atol=1e-6)


def test_directional_fsc_finds_anisotropic_resolution(xp):
    """Signal resolved to 4 Å along z but 8 Å along x and y."""
    n = 48
    rng = np.random.default_rng(10)
    i = np.arange(n)
    k1 = np.where(2 * i < n, i, i - n) / n
    kz, ky, kx = k1[:, None, None], k1[None, :, None], (np.arange(n // 2 + 1) / n)[None, None, :]
    inside = (kx * 8) ** 2 + (ky * 8) ** 2 + (kz * 4) ** 2 <= 1.0
    s = np.fft.irfftn(np.fft.rfftn(rng.standard_normal((n, n, n))) * inside, s=(n, n, n))
    s /= s.std()
    h1, h2 = (s + 0.2 * rng.standard_normal(s.shape) for _ in range(2))
    dirs = np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    got = directional_fsc(xp.asarray(h1), xp.asarray(h2), dirs, cone_half_angle_deg=20.0)
    res = got.resolutions(0.143, pixel_size_A=1.0)
    assert 3.6 < res[0] < 4.8
    # a 20° cone around x or y also holds voxels towards z (better resolved): a little optimistic
    assert 6.0 < res[1] < 8.5 and 6.0 < res[2] < 8.5
    assert res[0] < 0.7 * min(res[1], res[2])


def test_hemisphere_directions_are_unit_and_spread():
    d = hemisphere_directions(50)
    np.testing.assert_allclose(np.linalg.norm(d, axis=1), 1.0)
    assert np.all(d[:, 2] >= 0)
    cosines = d @ d.T - 2 * np.eye(50)
    assert np.degrees(np.arccos(cosines.max())) > 8  # no two directions closer than 8°


# ------------------------------------------------------------------------------ bad input
def test_bad_inputs_raise_input_error():
    a, b = _pair((16, 16, 16))
    with pytest.raises(InputError, match="different sizes"):
        fsc(a, b[:-1])
    with pytest.raises(InputError, match="mask has shape"):
        fsc(a, b, mask=np.ones((8, 8, 8)))
    with pytest.raises(InputError, match="empty"):
        fsc(a, b, mask=np.zeros_like(a))
    with pytest.raises(InputError, match="empty"):
        masked_fsc_corrected(a, b, np.zeros_like(a))
    with pytest.raises(InputError, match="NaN"):
        c = a.copy()
        c[3, 3, 3] = np.nan
        fsc(c, b)
    with pytest.raises(InputError, match="pixel size"):
        resolution_at(fsc(a, b), 0.143, 0.0)
    with pytest.raises(InputError, match="cone"):
        directional_fsc(a, b, [[0, 0, 1]], cone_half_angle_deg=0)
    with pytest.raises(InputError, match=r"\(m, 3\)"):
        directional_fsc(a, b, [[0, 1]])
