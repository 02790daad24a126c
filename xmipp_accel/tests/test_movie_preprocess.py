"""Movie preprocessing: gain orientation, checks, dark/gain, defects, hot pixels, Fourier crop."""
import numpy as np
import pytest

from xmipp_accel.errors import InputError
from xmipp_accel import backend
from xmipp_accel.gpu.movie._fft import fourier_crop_rfft, irfft2, rfft2
from xmipp_accel.gpu.movie.preprocess import (check_frames, check_reference_shape, correct_dark_gain,
                                              defect_mask_from_rectangles, find_hot_pixels, orient_reference,
                                              replace_defect_pixels)


def test_orient_reference_clockwise_then_flip():
    g = np.array([[1, 2, 3],
                  [4, 5, 6]], dtype=np.float32)
    # one clockwise quarter turn as displayed with row 0 on top: the left column becomes the top row
    np.testing.assert_array_equal(orient_reference(g, rotation=1), [[4, 1], [5, 2], [6, 3]])
    np.testing.assert_array_equal(orient_reference(g, rotation=2), g[::-1, ::-1])
    np.testing.assert_array_equal(orient_reference(g, rotation=3), [[3, 6], [2, 5], [1, 4]])
    np.testing.assert_array_equal(orient_reference(g, flip=1), [[4, 5, 6], [1, 2, 3]])
    np.testing.assert_array_equal(orient_reference(g, flip=2), [[3, 2, 1], [6, 5, 4]])
    # rotation first, then flip (MotionCor2's order)
    np.testing.assert_array_equal(orient_reference(g, rotation=1, flip=2), [[1, 4], [2, 5], [3, 6]])
    with pytest.raises(InputError, match="gain-rot"):
        orient_reference(g, rotation=4)


def test_reference_shape_error_names_both_shapes_and_hints_rotation():
    with pytest.raises(InputError) as e:
        check_reference_shape((100, 80), (80, 100), what="gain", path="gain.mrc", movie="m.tif")
    msg = str(e.value)
    assert "gain.mrc" in msg and "80 x 100" in msg and "100 x 80" in msg and "--gain-rot" in msg
    with pytest.raises(InputError, match="64 x 64"):
        check_reference_shape((64, 64), (80, 100))
    check_reference_shape((80, 100), (10, 80, 100))


def test_check_frames_reports_bad_movies(xp):
    good = xp.ones((4, 8, 8), dtype=np.float32)
    check_frames(good, name="ok.mrc")
    with pytest.raises(InputError, match="few.mrc has 2 frame"):
        check_frames(good[:2], name="few.mrc")
    nan = good.copy()
    nan[2, 3, 3] = np.nan
    with pytest.raises(InputError, match=r"nan.mrc.*frames 3"):
        check_frames(nan, name="nan.mrc")
    with pytest.raises(InputError, match="zero.mrc has no signal"):
        check_frames(xp.zeros((4, 8, 8), dtype=np.uint8), name="zero.mrc")
    empty = good.copy()
    empty[3] = 0
    with pytest.raises(InputError, match=r"frames 4.*--frames"):
        check_frames(empty, name="tail.mrc")


def test_correct_dark_gain(xp):
    raw = xp.asarray(np.arange(2 * 3 * 4, dtype=np.uint16).reshape(2, 3, 4))
    gain = xp.full((3, 4), 2.0, dtype=np.float32)
    dark = xp.ones((3, 4), dtype=np.float32)
    out = correct_dark_gain(raw, gain=gain, dark=dark)
    assert out.dtype == np.float32
    np.testing.assert_allclose(backend.to_host(out), (np.arange(24).reshape(2, 3, 4) - 1.0) * 2.0)


def test_defect_rectangles_are_clipped():
    m = defect_mask_from_rectangles((10, 12), [(2, 3, 4, 2), (10, 8, 5, 5)])
    assert m.sum() == 4 * 2 + 2 * 2
    assert m[3:5, 2:6].all() and m[8:, 10:].all() and not m[0].any()


def test_hot_pixels_found_and_replaced_by_matching_noise(xp):
    rng = np.random.default_rng(1)
    frames = rng.poisson(2.0, (20, 64, 64)).astype(np.float32)
    frames[:, 10, 20] = 50.0     # hot
    frames[:, 40, 5] = 0.0       # dead
    frames = xp.asarray(frames)
    hot = find_hot_pixels(frames.sum(axis=0), n_sigma=5)
    assert set(zip(*np.nonzero(backend.to_host(hot)))) == {(10, 20), (40, 5)}
    replace_defect_pixels(frames, hot, seed=3)
    vals = backend.to_host(frames[:, hot])
    assert abs(vals.mean() - 2.0) < 0.6 and 0.6 < vals.std() < 2.5
    assert np.isfinite(backend.to_host(frames)).all()


def test_fourier_crop_keeps_mean_and_low_frequencies(xp):
    ny, nx = 48, 64
    y, x = np.mgrid[0:ny, 0:nx]
    img = 3.0 + np.cos(2 * np.pi * (2 * x / nx + 3 * y / ny))            # frequencies well inside the crop
    spec = rfft2(xp.asarray(img[None].astype(np.float32)))
    small = irfft2(fourier_crop_rfft(spec, (ny, nx), (24, 32)), (24, 32))
    ys, xs = np.mgrid[0:24, 0:32]
    expect = 3.0 + np.cos(2 * np.pi * (2 * xs / 32 + 3 * ys / 24))
    np.testing.assert_allclose(backend.to_host(small)[0], expect, atol=1e-4)
