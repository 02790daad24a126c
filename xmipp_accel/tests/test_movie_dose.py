"""Exposure filter (Grant & Grigorieff 2015) and the dose-weighted sum."""
import numpy as np
import pytest

from xmipp_accel import backend
from xmipp_accel.gpu.movie._fft import rfft2
from xmipp_accel.gpu.movie.dose import (critical_exposure, dose_weighted_sum, exposure_filter, frame_exposures,
                                        voltage_scale)


def test_critical_exposure_values():
    # Ne(1/10 Å) = 0.245 * 10**1.665 + 2.81 = 14.14 e/Å² at 300 kV (Grant & Grigorieff 2015, eq. 3)
    assert float(critical_exposure(np.array(0.1))) == pytest.approx(0.245 * 10 ** 1.665 + 2.81, rel=1e-6)
    assert voltage_scale(300) == 1.0 and voltage_scale(200) == pytest.approx(0.8)
    assert np.isinf(critical_exposure(np.array(0.0)))
    np.testing.assert_allclose(frame_exposures(3, 1.5, 0.5), [2.0, 3.5, 5.0])


def test_exposure_filter_is_one_at_dc_and_decays_with_frequency():
    f = exposure_filter((64, 64), 1.0, 20.0)
    assert f[0, 0] == 1.0
    radial = f[0, :33]
    assert (np.diff(radial) < 0).all()
    # at 1/4 Å^-1 (column 16 of 64 at 1 Å/px): exp(-20 / (2 Ne(0.25)))
    assert radial[16] == pytest.approx(np.exp(-20 / (2 * float(critical_exposure(np.array(0.25))))), rel=1e-5)


def test_dose_weighted_sum_keeps_low_frequencies_and_noise_power(xp):
    rng = np.random.default_rng(0)
    n, size = 30, 128
    noise = xp.asarray(rng.standard_normal((n, size, size)).astype(np.float32))
    spec = rfft2(noise)
    plain = backend.to_host(spec.sum(axis=0))
    dw = backend.to_host(dose_weighted_sum(spec, 1.0, 2.0))
    assert dw[0, 0] == pytest.approx(plain[0, 0], rel=1e-4)          # all weights 1 at DC
    # white noise: the weighted sum has the plain sum's power at every frequency band
    k = np.hypot(np.fft.fftfreq(size)[:, None], np.fft.rfftfreq(size)[None, :])
    for lo, hi in [(0.05, 0.15), (0.3, 0.45)]:
        band = (k >= lo) & (k < hi)
        assert np.mean(np.abs(dw[band]) ** 2) == pytest.approx(np.mean(np.abs(plain[band]) ** 2), rel=0.1)
    # high-frequency content of the late frames is down-weighted relative to the first frame
    first = backend.to_host(spec[0])
    late = backend.to_host(spec[-1])
    band = (k >= 0.3) & (k < 0.45)
    expo = frame_exposures(n, 2.0)
    corr_first = np.abs(np.vdot(first[band], dw[band]))
    corr_late = np.abs(np.vdot(late[band], dw[band]))
    assert corr_first > 5 * corr_late and expo[-1] > expo[0]
