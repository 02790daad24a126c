"""Applying shifts: Fourier shifts, the local interpolation kernel against its NumPy twin, power spectrum."""
import os

import numpy as np
import pytest

from xmipp_accel import backend
from xmipp_accel.gpu.movie._fft import irfft2, rfft2
from xmipp_accel.gpu.movie.apply import (correct_local_motion, correct_local_motion_reference, power_spectrum,
                                         shift_spectra)
from xmipp_accel.gpu.movie.bspline import BSplineShiftModel


def _numba_or_skip() -> None:
    """Skip where Numba does not import; fail instead under CI (``CI`` set), where it is installed as a
    requirement, so that the compiled engine cannot go untested silently."""
    from xmipp_accel.gpu.movie.apply import _numba_module
    if _numba_module() is None:
        msg = "Numba does not import here: the CPU twin's compiled engine is not available"
        if os.environ.get("CI"):
            pytest.fail(msg + " (CI is set)", pytrace=False)
        pytest.skip(msg)


@pytest.fixture(params=["numba", "numpy"])
def engine(request) -> str:
    """Each CPU engine of the twin: the compiled loops and the NumPy passes."""
    if request.param == "numba":
        _numba_or_skip()
    return request.param


def test_shift_spectra_moves_content_by_plus_shift(xp):
    rng = np.random.default_rng(0)
    img = rng.standard_normal((2, 32, 40)).astype(np.float32)
    spec = rfft2(xp.asarray(img))
    out = backend.to_host(irfft2(shift_spectra(spec, [[3, -2], [-5, 7]], (32, 40)), (32, 40)))
    np.testing.assert_allclose(out[0], np.roll(img[0], (-2, 3), axis=(0, 1)), atol=1e-5)
    np.testing.assert_allclose(out[1], np.roll(img[1], (7, -5), axis=(0, 1)), atol=1e-5)


def _constant_field_model(shape, n, shift_xy):
    """A model whose field is the same shift everywhere (B-splines sum to one)."""
    coef = np.zeros((4, 4, 4, 2))
    coef[...] = shift_xy
    return BSplineShiftModel((4, 4, 4), (float(shape[1]), float(shape[0]), n), coef)


def test_local_correction_with_a_constant_integer_field_is_a_roll(engine):
    rng = np.random.default_rng(1)
    frames = rng.standard_normal((2, 40, 48)).astype(np.float32)
    m = _constant_field_model((40, 48), 2, (2.0, -3.0))
    hx, hy, _ = m.spacing
    out = correct_local_motion_reference(frames, m.frame_coefficients(), (hy, hx), engine=engine)
    expect = np.roll(frames, (-3, 2), axis=(1, 2))
    np.testing.assert_allclose(out[:, 5:-5, 5:-5], expect[:, 5:-5, 5:-5], atol=1e-5)


def test_local_correction_of_a_smooth_image_by_a_fractional_shift(engine):
    y, x = np.mgrid[0:64, 0:64].astype(np.float64)
    img = np.sin(2 * np.pi * x / 23.0) * np.cos(2 * np.pi * y / 31.0)
    m = _constant_field_model((64, 64), 1, (0.4, -0.7))
    hx, hy, _ = m.spacing
    out = correct_local_motion_reference(img[None].astype(np.float32), m.frame_coefficients(), (hy, hx),
                                         engine=engine)[0]
    expect = np.sin(2 * np.pi * (x - 0.4) / 23.0) * np.cos(2 * np.pi * (y + 0.7) / 31.0)
    assert np.abs(out - expect)[4:-4, 4:-4].max() < 5e-3


def _sample_positions(coef, shape, spacing_yx):
    """Per frame, where the output pixels sample it: ``(y - sy, x - sx)`` (float32 (ny, nx) each) for the B-spline
    field of ``coef`` (N, 2, Ly, Lx) evaluated per pixel; each field reaches past 2 px (past the frame's edges)."""
    from xmipp_accel.gpu.movie.bspline import basis_matrix
    (ny, nx), (hy, hx) = shape, spacing_yx
    bx = basis_matrix(np.arange(float(nx)), coef.shape[-1], hx).astype(np.float32)
    by = basis_matrix(np.arange(float(ny)), coef.shape[-2], hy).astype(np.float32)
    y, x = np.mgrid[0:ny, 0:nx].astype(np.float32)
    for c in coef:
        sx, sy = by @ (c[0] @ bx.T), by @ (c[1] @ bx.T)
        assert np.abs(sx).max() > 2                                  # the test reaches past the edges
        yield y - sy, x - sx


def test_numpy_twin_equals_keys_sampling_with_clamped_indices(engine):
    """The padded, offset-view gathers of the twin against plain per-pixel Keys sampling (``sample_keys``,
    indices clamped at every tap) of the same field: shifts up to ~5 px reach past the frame's edges."""
    from xmipp_accel.em.interpolation import sample_keys
    rng = np.random.default_rng(3)
    frames = rng.standard_normal((3, 70, 90)).astype(np.float32)
    m = BSplineShiftModel((5, 4, 4), (90.0, 70.0, 3), rng.normal(0, 1.0, (4, 4, 5, 2)))
    hx, hy, _ = m.spacing
    coef = rng.normal(0, 4.0, m.frame_coefficients().shape).astype(np.float32)   # (N, 2, Ly, Lx), px
    out = correct_local_motion_reference(frames, coef, (hy, hx), rows_per_chunk=16, workers=2, engine=engine)
    for f, (y, x) in enumerate(_sample_positions(coef, (70, 90), (hy, hx))):
        expect = sample_keys(frames[f], y, x)
        np.testing.assert_allclose(out[f], expect, rtol=0, atol=1e-5)   # float32 sums in another order


def _assert_gpu_kernel_matches_numpy_twin(seed: int, **options) -> None:
    """The CUDA kernel against :func:`correct_local_motion_reference` (same ``options``) on 3 random frames of
    70 x 90 px moved by a random B-spline field (coefficients of standard deviation 1.5 px)."""
    cp = backend.cupy_module()
    rng = np.random.default_rng(seed)
    frames = rng.standard_normal((3, 70, 90)).astype(np.float32)
    m = BSplineShiftModel((5, 4, 4), (90.0, 70.0, 3), rng.normal(0, 1.5, (4, 4, 5, 2)))
    hx, hy, _ = m.spacing
    ref = correct_local_motion_reference(frames, m.frame_coefficients(), (hy, hx), **options)
    gpu = correct_local_motion(cp.asarray(frames), cp.asarray(m.frame_coefficients()), (hy, hx), **options)
    np.testing.assert_allclose(backend.to_host(gpu), ref, atol=2e-4)


@pytest.mark.gpu
def test_gpu_kernel_matches_numpy_twin():
    _assert_gpu_kernel_matches_numpy_twin(2)


def test_linear_option_equals_scipy_bilinear_sampling_with_nearest_edges(engine):
    """``interpolation="linear"`` against an independent bilinear sampler (``scipy.ndimage.map_coordinates``,
    order 1, edge pixels repeated, which is the twin's clamping) of the same field, reaching past the edges."""
    from scipy.ndimage import map_coordinates
    rng = np.random.default_rng(6)
    frames = rng.standard_normal((3, 70, 90)).astype(np.float32)
    coef = rng.normal(0, 4.0, (3, 2, 5, 6)).astype(np.float32)
    hy, hx = 70 / 2.0, 90 / 3.0
    out = correct_local_motion_reference(frames, coef, (hy, hx), rows_per_chunk=16, workers=2,
                                         interpolation="linear", engine=engine)
    for f, (y, x) in enumerate(_sample_positions(coef, (70, 90), (hy, hx))):
        expect = map_coordinates(frames[f].astype(np.float64), [y, x], order=1, mode="nearest")
        np.testing.assert_allclose(out[f], expect, rtol=0, atol=1e-5)
    keys = correct_local_motion_reference(frames, coef, (hy, hx), engine=engine)
    assert np.abs(keys - out).max() > 0.1                           # the option does change the sampling


def test_linear_option_keeps_integer_shifts_exact_and_unknown_names_fail(engine):
    rng = np.random.default_rng(7)
    frames = rng.standard_normal((2, 40, 48)).astype(np.float32)
    m = _constant_field_model((40, 48), 2, (2.0, -3.0))
    hx, hy, _ = m.spacing
    out = correct_local_motion_reference(frames, m.frame_coefficients(), (hy, hx), interpolation="linear",
                                         engine=engine)
    expect = np.roll(frames, (-3, 2), axis=(1, 2))
    np.testing.assert_allclose(out[:, 5:-5, 5:-5], expect[:, 5:-5, 5:-5], atol=1e-5)
    with pytest.raises(ValueError, match="interpolation"):
        correct_local_motion(frames, m.frame_coefficients(), (hy, hx), interpolation="cubic")


@pytest.mark.gpu
def test_gpu_linear_kernel_matches_numpy_twin():
    _assert_gpu_kernel_matches_numpy_twin(8, interpolation="linear")


def test_power_spectrum_peaks_at_the_cosine_frequency(xp):
    y, x = np.mgrid[0:256, 0:256]
    img = np.cos(2 * np.pi * (16 * x / 128.0 + 8 * y / 128.0)).astype(np.float32)   # 16, 8 cycles per 128 px
    psd = backend.to_host(power_spectrum(xp.asarray(img), tile=128))
    assert psd.shape == (128, 128)
    peaks = set(zip(*np.nonzero(psd > 0.5 * psd.max())))
    assert peaks == {(64 + 8, 64 + 16), (64 - 8, 64 - 16)}


def test_in_place_keys_weights_are_bit_identical_to_keys_weights():
    """The CPU twin computes the Keys weights in place (:func:`_keys_weights_into`): the same float32
    operations in the same order as :func:`keys_weights`, so the same bits."""
    from xmipp_accel.em.interpolation import keys_weights
    from xmipp_accel.gpu.movie.apply import _keys_weights_into
    t = np.random.default_rng(4).random(1000).astype(np.float32)
    w = np.empty((4, t.size), np.float32)
    _keys_weights_into(t, w, np.empty((2, t.size), np.float32))
    for got, expect in zip(w, keys_weights(t)):
        assert expect.dtype == np.float32 and np.array_equal(got, expect)


def test_numpy_twin_does_not_depend_on_the_threads_and_hardly_on_the_chunk(engine):
    """Threads change nothing (same bits). The shift field is made chunk by chunk (a small matrix product
    per chunk), and BLAS may round a product's last bit differently for another number of rows: that moves a
    sample by ~1 ulp of its coordinate (< 1e-5 px here), i.e. values by < 1e-5 for these unit-variance
    frames, the tolerance of the comparison with per-pixel sampling above."""
    rng = np.random.default_rng(5)
    frames = rng.standard_normal((3, 50, 70)).astype(np.float32)
    coef = rng.normal(0, 2.0, (3, 2, 4, 5)).astype(np.float32)
    ref = correct_local_motion_reference(frames, coef, (25.0, 35.0), rows_per_chunk=50, workers=1, engine=engine)
    assert np.array_equal(correct_local_motion_reference(frames, coef, (25.0, 35.0), rows_per_chunk=50, workers=3,
                                                         engine=engine), ref)
    for rows, workers in ((1, 1), (7, 2), (32, 3)):
        out = correct_local_motion_reference(frames, coef, (25.0, 35.0), rows_per_chunk=rows, workers=workers,
                                             engine=engine)
        np.testing.assert_allclose(out, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("interpolation", ["keys", "linear"])
def test_numpy_twin_into_a_strided_output_equals_a_contiguous_one(interpolation, engine):
    """The samples are summed straight into contiguous output rows, or in a scratch copied to a strided
    ``out`` (a view of a wider array): both give the same bits, and leave the columns beyond untouched."""
    rng = np.random.default_rng(6)
    frames = rng.standard_normal((2, 40, 60)).astype(np.float32)
    coef = rng.normal(0, 2.0, (2, 2, 4, 5)).astype(np.float32)
    ref = correct_local_motion_reference(frames, coef, (20.0, 30.0), rows_per_chunk=16, workers=1,
                                         interpolation=interpolation, engine=engine)
    wide = np.full((2, 40, 64), 7.0, dtype=np.float32)
    got = correct_local_motion_reference(frames, coef, (20.0, 30.0), rows_per_chunk=16, workers=1,
                                         interpolation=interpolation, out=wide[:, :, :60], engine=engine)
    assert np.array_equal(got, ref) and np.all(wide[:, :, 60:] == 7.0)


@pytest.mark.parametrize("interpolation", ["keys", "linear"])
def test_compiled_engine_gives_the_numpy_engines_bits(interpolation):
    """The Numba loops against the NumPy passes on frames whose fields reach ~10 px past the edges (clamped
    taps on every side), for a float64, non-contiguous input and a strided output: the same bits, since
    both do the same float32 operations in the same order on the same BLAS field."""
    _numba_or_skip()
    rng = np.random.default_rng(11)
    frames = rng.standard_normal((3, 90, 2 * 77)).astype(np.float64)[:, :, ::2]   # (3, 90, 77), strided
    coef = rng.normal(0, 5.0, (3, 2, 5, 6)).astype(np.float32)
    options = dict(rows_per_chunk=32, workers=2, interpolation=interpolation)
    ref = correct_local_motion_reference(frames, coef, (30.0, 26.0), engine="numpy", **options)
    wide = np.zeros((3, 90, 80), np.float32)
    got = correct_local_motion_reference(frames, coef, (30.0, 26.0), engine="numba", out=wide[:, :, :77],
                                         **options)
    assert np.array_equal(got, ref)
    assert np.array_equal(correct_local_motion_reference(frames, coef, (30.0, 26.0), **options), ref)   # auto


@pytest.mark.parametrize("interpolation", ["keys", "linear"])
def test_prepare_cpu_engine_loads_the_compiled_loop_before_the_first_frame(interpolation):
    """The movie workers' set-up calls it: afterwards the loop of ``interpolation`` has its compiled code
    for the layouts of the frames' rows, so the first movie does not compile or load it."""
    _numba_or_skip()
    from xmipp_accel.gpu.movie import _interp_cpu
    from xmipp_accel.gpu.movie.apply import prepare_cpu_engine
    loop = _interp_cpu.keys_rows if interpolation == "keys" else _interp_cpu.linear_rows
    assert prepare_cpu_engine(interpolation) is True
    before = len(loop.signatures)
    assert before >= 1
    rng = np.random.default_rng(12)
    correct_local_motion_reference(rng.standard_normal((2, 20, 24)).astype(np.float32),
                                   rng.normal(0, 1.0, (2, 2, 4, 4)).astype(np.float32), (10.0, 12.0),
                                   interpolation=interpolation, workers=1, engine="numba")
    assert len(loop.signatures) == before                  # no new compilation for a movie's frames


def test_without_numba_auto_falls_back_to_numpy_and_numba_asked_for_is_a_clear_error(monkeypatch):
    from xmipp_accel.gpu.movie import apply
    monkeypatch.setattr(apply, "_numba_module", lambda: None)       # as where Numba does not import
    rng = np.random.default_rng(13)
    frames = rng.standard_normal((2, 20, 24)).astype(np.float32)
    coef = rng.normal(0, 1.0, (2, 2, 4, 4)).astype(np.float32)
    auto = correct_local_motion_reference(frames, coef, (10.0, 12.0), workers=1)
    assert np.array_equal(auto, correct_local_motion_reference(frames, coef, (10.0, 12.0), workers=1,
                                                               engine="numpy"))
    assert apply.prepare_cpu_engine("keys") is False
    with pytest.raises(RuntimeError, match="pip install numba"):
        correct_local_motion_reference(frames, coef, (10.0, 12.0), engine="numba")


def test_unknown_cpu_engine_names_the_choices():
    frames = np.zeros((1, 8, 8), np.float32)
    with pytest.raises(ValueError, match="engine must be one of"):
        correct_local_motion_reference(frames, np.zeros((1, 2, 4, 4), np.float32), (4.0, 4.0), engine="cython")


@pytest.mark.parametrize("shape", [(3, 64, 64), (2, 96, 90), (2, 97, 64), (48, 50)])
def test_cpu_ffts_equal_scipy_to_float32_rounding(shape):
    """rfft2/irfft2 on the CPU run SciPy's transforms in two in-place steps: equal to ``scipy.fft.rfft2`` and
    ``irfft2`` to float32 rounding (bit-identical for powers of two; ~2e-7 relative otherwise, measured)."""
    import scipy.fft as sfft
    x = np.random.default_rng(6).standard_normal(shape).astype(np.float32)
    spec = rfft2(x)
    np.testing.assert_array_equal(spec, sfft.rfft2(x, axes=(-2, -1)))
    expect = sfft.irfft2(spec, s=shape[-2:], axes=(-2, -1))
    scale = np.abs(expect).max()
    for out in (irfft2(spec, shape[-2:]), irfft2(spec.copy(), shape[-2:], overwrite=True)):
        assert out.dtype == np.float32
        np.testing.assert_allclose(out, expect, rtol=0, atol=1e-6 * scale)
    np.testing.assert_allclose(irfft2(spec, shape[-2:]), x, rtol=0, atol=1e-5)   # and it inverts rfft2


@pytest.mark.parametrize("binding", ["pocketfft", "chunks"])
def test_cpu_ffts_into_given_arrays_are_the_same_numbers(monkeypatch, binding):
    """rfft2/irfft2 with ``out`` write into the given array (used by align_movie's apply stage to reuse its
    buffers), through pocketfft's ``out`` or, without that binding, a few frames at a time (chunks of 3, 3, 1
    frames here): the same bits as the whole-stack transforms."""
    from xmipp_accel.gpu.movie import _fft
    if binding == "chunks":
        monkeypatch.setattr(_fft, "_pocketfft", lambda: None)
    elif _fft._pocketfft() is None:
        pytest.skip("this SciPy has no pocketfft binding with out=")
    monkeypatch.setattr(_fft, "_CHUNK_BYTES", 3 * 40 * 48 * 4)
    x = np.random.default_rng(9).standard_normal((7, 40, 48)).astype(np.float32)
    whole = rfft2(x)
    out = np.full(whole.shape, np.nan, dtype=np.complex64)
    assert rfft2(x, out=out) is out and np.array_equal(out, whole)
    back = irfft2(whole, (40, 48))
    rout = np.full(x.shape, np.nan, dtype=np.float32)
    assert irfft2(whole, (40, 48), out=rout) is rout and np.array_equal(rout, back)
    scratch = whole.copy()
    assert np.array_equal(irfft2(scratch, (40, 48), overwrite=True, out=np.empty_like(x)), back)
    np.testing.assert_array_equal(whole, rfft2(x))                   # without overwrite the input is kept
