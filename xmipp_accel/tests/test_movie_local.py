"""Local alignment on a movie with doming: patch shifts, B-spline model, sums against the motion-free truth."""
import numpy as np
import pytest

from xmipp_accel.em.synthetic_movies import frc, make_movie
from xmipp_accel import backend
from xmipp_accel.gpu.movie import AlignmentOptions, align_movie
from xmipp_accel.gpu.movie.local_align import patch_size_px, patch_starts, temporal_average

N_FRAMES = 16
SIZE = 512
OPTIONS = dict(pixel_size_A=2.0, patches_xy=(4, 4), patch_size_A=300.0, dose_per_frame=1.0, odd_even=True)


def test_patch_layout_and_temporal_average():
    assert patch_starts(100, 3, 40) == [0, 30, 60]
    assert patch_starts(100, 1, 40) == [30]
    assert patch_size_px(4096, 5, 1.0) == 820            # the grid must cover the frame
    assert patch_size_px(4096, 10, 1.0) == 500           # about 500 Å
    a = np.arange(5, dtype=np.float32)[:, None] * np.ones((5, 2), np.float32)
    np.testing.assert_allclose(temporal_average(a, 3)[:, 0], [0.5, 1, 2, 3, 3.5])


@pytest.fixture(scope="module")
def doming_movie():
    # ~20 px drift over 16 frames, 6 px of doming at the corners early on, 1 e/px/frame
    return make_movie((SIZE, SIZE), N_FRAMES, dose_per_pixel=1.0, drift_scale=40 / N_FRAMES, doming_px=6.0,
                      ice_sigma_px=1.0, seed=3)


@pytest.fixture(scope="module")
def numpy_result(doming_movie):
    frames, _ = doming_movie
    return align_movie(frames.copy(), AlignmentOptions(**OPTIONS))


def _grid_errors(result, truth, with_local=True):
    xs = np.linspace(0.1 * SIZE, 0.9 * SIZE, 6)
    X, Y = np.meshgrid(xs, xs)
    err = []
    for n in range(N_FRAMES):
        est = result.shifts_px[n] + (result.model.evaluate(X, Y, n) if with_local else 0.0)
        err.append(est - truth["total_shift"](X, Y, n))
    err = np.array(err)
    err -= err.mean(axis=0, keepdims=True)     # shifts are relative: remove each point's mean over frames
    return np.sqrt((err ** 2).sum(axis=-1))


def test_local_shifts_within_half_a_pixel(numpy_result, doming_movie):
    _, truth = doming_movie
    assert numpy_result.model is not None and numpy_result.warnings == []
    assert numpy_result.local.patch_ok.all()
    local = _grid_errors(numpy_result, truth)
    global_only = _grid_errors(numpy_result, truth, with_local=False)
    rms_local = np.sqrt((local ** 2).mean())
    rms_global = np.sqrt((global_only ** 2).mean())
    assert rms_local < 0.5, f"local RMS error {rms_local:.3f} px"
    # the local model captures most of the doming (what remains: a cubic spline through 4 x 4 patch
    # centres cannot follow the r^4 term into the corners)
    assert rms_local < 0.6 * rms_global, (rms_local, rms_global)
    assert local.max() < 1.0


def _band_frc(a, b, margin=40, rings_per_band=8):
    a = np.asarray(a)[margin:-margin, margin:-margin]
    b = np.asarray(b)[margin:-margin, margin:-margin]
    ring = frc(a, b)                       # one ring per 1/N (unused here, checks the helper runs)
    fa, fb = np.fft.rfft2(a - a.mean()), np.fft.rfft2(b - b.mean())
    n = a.shape[0]
    r = np.hypot(np.fft.fftfreq(n)[:, None], np.fft.rfftfreq(n)[None, :]) * n
    band = (np.floor(r) // rings_per_band).astype(int).ravel()
    nb = n // 2 // rings_per_band
    num = np.bincount(band, (fa * np.conj(fb)).real.ravel())[:nb]
    den = np.sqrt(np.bincount(band, (np.abs(fa) ** 2).ravel())[:nb] * np.bincount(band, (np.abs(fb) ** 2).ravel())[:nb])
    return num / den, ring


def test_aligned_sum_beats_unaligned_up_to_two_thirds_nyquist(numpy_result, doming_movie):
    frames, truth = doming_movie
    reference = truth["expected_frame"](numpy_result.reference_frame) * N_FRAMES   # motion-free, frame of the ref
    aligned, _ = _band_frc(numpy_result.sum, reference)
    unaligned, _ = _band_frc(frames.sum(axis=0), reference)
    upto = int(np.ceil(len(aligned) * 2 / 3))
    assert (aligned[:upto] > unaligned[:upto]).all(), np.round(np.stack([aligned, unaligned]), 3)
    assert aligned[upto - 1] > 0.2


def test_odd_even_and_dose_weighted_sums(numpy_result):
    r = numpy_result
    np.testing.assert_allclose(r.sum_odd + r.sum_even, r.sum, rtol=1e-4, atol=1e-2)
    assert r.sum_dw.shape == r.sum.shape
    # same mean (DC weight 1), less high-frequency power (late frames down-weighted, noise power kept)
    assert r.sum_dw.mean() == pytest.approx(r.sum.mean(), rel=1e-3)


def test_pure_noise_falls_back_to_global_with_a_warning():
    frames = np.random.default_rng(0).poisson(1.0, (10, 256, 256)).astype(np.float32)
    r = align_movie(frames, AlignmentOptions(pixel_size_A=2.0, patches_xy=(3, 3), psd_size=0))
    assert r.model is None and r.local is not None and not r.local.ok
    assert any("local alignment skipped" in w for w in r.warnings)
    assert any("no clear peak" in w for w in r.warnings)


@pytest.mark.gpu
def test_gpu_local_agrees_with_numpy(doming_movie, numpy_result):
    cp = backend.cupy_module()
    frames, _ = doming_movie
    r = align_movie(cp.asarray(frames), AlignmentOptions(**OPTIONS))
    np.testing.assert_allclose(r.shifts_px, numpy_result.shifts_px, atol=0.01)
    np.testing.assert_allclose(r.local.shifts_px, numpy_result.local.shifts_px, atol=0.02)
    for gpu, cpu in ((r.sum, numpy_result.sum), (r.sum_dw, numpy_result.sum_dw)):
        gpu = backend.to_host(gpu)
        assert gpu.dtype == np.float32 and gpu.shape == cpu.shape
        assert np.corrcoef(gpu.ravel(), cpu.ravel())[0, 1] > 0.999     # shifts differ by < 0.01 px
        assert abs(gpu.mean() - cpu.mean()) < 1e-3 * abs(cpu.mean())


def test_bilinear_option_same_shifts_and_a_sum_nearly_as_good(doming_movie, numpy_result):
    """``local_interpolation="linear"`` (RELION's bilinear resampling) changes only the resampling: the
    same shifts and model, a sum that still beats the unaligned one up to 2/3 Nyquist and loses little
    FRC against the motion-free truth (bilinear damps high frequencies more than Keys)."""
    frames, truth = doming_movie
    r = align_movie(frames.copy(), AlignmentOptions(**OPTIONS, local_interpolation="linear"))
    np.testing.assert_array_equal(r.shifts_px, numpy_result.shifts_px)
    np.testing.assert_array_equal(r.local.shifts_px, numpy_result.local.shifts_px)
    assert not np.array_equal(r.sum, numpy_result.sum)
    reference = truth["expected_frame"](r.reference_frame) * N_FRAMES
    linear, _ = _band_frc(r.sum, reference)
    keys, _ = _band_frc(numpy_result.sum, reference)
    unaligned, _ = _band_frc(frames.sum(axis=0), reference)
    upto = int(np.ceil(len(linear) * 2 / 3))
    assert (linear[:upto] > unaligned[:upto]).all()
    assert (linear[:upto] > keys[:upto] - 0.05).all(), np.round(np.stack([linear, keys]), 3)


def test_unknown_local_interpolation_is_an_input_error():
    from xmipp_accel.errors import InputError
    with pytest.raises(InputError, match="--interpolation"):
        AlignmentOptions(pixel_size_A=1.0, local_interpolation="cubic").validate()
