"""Local resolution: a map whose halves carry signal to 3.5 Å in one half of the box and to 6.6 Å in
the other must be mapped as such; plus the grid helpers, masks, GPU = CPU and bad input."""
from __future__ import annotations

import numpy as np
import pytest

from xmipp_accel.errors import InputError
from xmipp_accel import backend
from xmipp_accel.gpu.resolution import local as localmod
from xmipp_accel.gpu.resolution.local import local_resolution, synthetic_two_region_halves

BOX = 64
TRUTH_A = (3.5, 6.6)


@pytest.fixture(scope="module")
def two_region():
    """64³ halves at 1 Å/px: region A (x < 32) true 3.5 Å, region B (x >= 32) true 6.6 Å, spectral SNR 1."""
    return synthetic_two_region_halves(BOX, pixel_size_A=1.0, resolutions_A=TRUTH_A, snr=1.0, seed=1)


def _interiors(n: int):
    """x ranges well inside each region (the window blurs a few pixels around the boundaries)."""
    x = np.arange(n)
    return (x > 0.1 * n) & (x < 0.4 * n), (x > 0.6 * n) & (x < 0.9 * n)


def test_two_regions_are_separated_with_medians_near_truth(xp, two_region):
    h1, h2, _ = two_region
    result = local_resolution(xp.asarray(h1), xp.asarray(h2), pixel_size_A=1.0, window_px=16)
    res = backend.to_host(result.resolution_A)
    assert res.shape == (BOX,) * 3 and res.dtype == np.float32
    in_a, in_b = _interiors(BOX)
    med_a, med_b = float(np.median(res[..., in_a])), float(np.median(res[..., in_b]))
    assert med_a == pytest.approx(TRUTH_A[0], rel=0.15)
    assert med_b == pytest.approx(TRUTH_A[1], rel=0.15)
    # most voxels of each interior closer to their own truth than to the other's
    mid = np.sqrt(TRUTH_A[0] * TRUTH_A[1])
    assert np.mean(res[..., in_a] < mid) > 0.9 and np.mean(res[..., in_b] > mid) > 0.9
    assert res.min() >= 2.0 - 1e-4 and res.max() <= 16.0 + 1e-3


def test_uniform_resolution_map(xp):
    h1, h2, _ = synthetic_two_region_halves(48, pixel_size_A=1.25, resolutions_A=(5.0, 5.0), snr=0.7, seed=2)
    result = local_resolution(xp.asarray(h1), xp.asarray(h2), pixel_size_A=1.25, window_px=14)
    stats = result.summary()
    assert stats["median_A"] == pytest.approx(5.0, rel=0.12)
    assert stats["p25_A"] > 4.0 and stats["p75_A"] < 6.5


def test_mask_zeroes_outside_and_summary_uses_inside(two_region):
    h1, h2, _ = two_region
    mask = np.zeros(h1.shape, dtype=np.float32)
    mask[16:48, 16:48, 4:28] = 1.0  # inside region A only
    result = local_resolution(h1, h2, pixel_size_A=1.0, mask=mask, window_px=16)
    res = result.resolution_A
    assert np.all(res[mask < 0.5] == 0)
    assert np.all(res[mask > 0.5] > 0)
    assert result.values().size == int(mask.sum())
    assert result.summary()["median_A"] == pytest.approx(TRUTH_A[0], rel=0.15)


@pytest.mark.gpu
def test_gpu_equals_cpu(two_region):
    cp = backend.cupy_module()
    h1, h2, _ = two_region
    cpu = local_resolution(h1, h2, pixel_size_A=1.0, window_px=16).resolution_A
    gpu = cp.asnumpy(local_resolution(cp.asarray(h1), cp.asarray(h2), pixel_size_A=1.0, window_px=16).resolution_A)
    close = np.abs(gpu - cpu) <= 1e-3 * cpu
    assert close.mean() > 0.99  # float32 rounding may flip a crossing decision in rare voxels
    assert float(np.median(gpu)) == pytest.approx(float(np.median(cpu)), rel=1e-3)


def test_fourier_crop_equals_spectrum_of_subsampled_band_limited_map():
    n, m = 24, 12
    rng = np.random.default_rng(3)
    spec = np.fft.rfftn(rng.standard_normal((n, n, n)))
    radius = localmod._radius_rfft(n, np, np.float64)
    spec[radius >= 0.2] = 0  # band-limited below the small grid's Nyquist (0.25 cycles/px of the big grid)
    big = np.fft.irfftn(spec, s=(n, n, n))
    small_spec = localmod._fourier_crop(spec, n, m)
    small = np.fft.irfftn(small_spec, s=(m, m, m)) * (m ** 3 / n ** 3)
    np.testing.assert_allclose(small, big[::2, ::2, ::2], atol=1e-10)


def test_upsample_periodic_is_trilinear():
    m, n = 8, 20
    rng = np.random.default_rng(4)
    coarse = rng.standard_normal((m, m, m))
    fine = localmod._upsample_periodic(coarse, n)
    for z, y, x in [(0, 0, 0), (5, 7, 19), (10, 3, 12)]:
        u = np.array([z, y, x]) * m / n
        i0 = np.floor(u).astype(int)
        t = u - i0
        expected = 0.0
        for corner in np.ndindex(2, 2, 2):
            w = np.prod([t[a] if corner[a] else 1 - t[a] for a in range(3)])
            idx = tuple((i0[a] + corner[a]) % m for a in range(3))
            expected += w * coarse[idx]
        assert fine[z, y, x] == pytest.approx(expected)


def test_bands_cover_window_to_nyquist():
    centres, half_width, persistence = localmod._bands(64, 16.0)
    assert centres[0] == pytest.approx(1 / 16) and centres[-1] <= 0.5 + 1e-12
    assert half_width == pytest.approx(0.5 / 16) and persistence >= 1
    assert np.all(np.diff(centres) > 0)


def test_bad_inputs():
    h = np.zeros((16, 16, 16), dtype=np.float32)
    with pytest.raises(InputError, match="different sizes"):
        local_resolution(h, h[:-1], pixel_size_A=1.0, window_px=8)
    with pytest.raises(InputError, match="cubic"):
        local_resolution(h[:, :, :-2], h[:, :, :-2], pixel_size_A=1.0, window_px=8)
    with pytest.raises(InputError, match="larger than the box"):
        local_resolution(h, h, pixel_size_A=1.0, window_px=40)
    with pytest.raises(InputError, match="empty"):
        local_resolution(h, h, pixel_size_A=1.0, window_px=8, mask=np.zeros_like(h))
    with pytest.raises(InputError, match="mask has shape"):
        local_resolution(h, h, pixel_size_A=1.0, window_px=8, mask=np.ones((8, 8, 8)))
    with pytest.raises(InputError, match="pixel size"):
        local_resolution(h, h, pixel_size_A=0.0, window_px=8)
    with pytest.raises(InputError, match="threshold"):
        local_resolution(h, h, pixel_size_A=1.0, window_px=8, threshold=1.5)
