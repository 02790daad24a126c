"""Cubic B-spline shift model: basis, fit, robust rejection, per-frame coefficients."""
import numpy as np
import pytest

from xmipp_accel.gpu.movie.bspline import (BSplineShiftModel, auto_control_points, basis_matrix, bspline3,
                                           fit_bspline_grid, fit_bspline_shifts)


def test_bspline3_values_and_partition_of_unity():
    assert bspline3(0.0) == pytest.approx(2 / 3)
    assert bspline3(1.0) == pytest.approx(1 / 6)
    assert bspline3(2.0) == 0.0
    u = np.linspace(0, 300, 301)
    np.testing.assert_allclose(basis_matrix(u, 6, 300 / 3).sum(axis=1), 1.0, atol=1e-12)


def test_auto_control_points_scipion_rule():
    assert auto_control_points((4096, 4096), 1.0, 40) == (7, 7, 8)      # 5+2, 5+2, ceil(40/7)+2
    assert auto_control_points((512, 512), 1.0, 10) == (4, 4, 4)        # minimum 4


def test_fit_recovers_a_spline_and_rejects_outliers():
    rng = np.random.default_rng(0)
    true = BSplineShiftModel((5, 4, 4), (400.0, 300.0, 12), rng.normal(0, 1.0, (4, 4, 5, 2)))
    xs, ys, ts = np.meshgrid(np.linspace(0, 400, 9), np.linspace(0, 300, 7), np.arange(12), indexing="ij")
    pts = np.stack([xs.ravel(), ys.ravel(), ts.ravel()], axis=1)
    vals = true.evaluate(pts[:, 0], pts[:, 1], pts[:, 2]) + rng.normal(0, 0.01, (len(pts), 2))
    vals[[5, 50, 300]] += 4.0
    model, inliers = fit_bspline_shifts(pts, vals, n_ctrl=(5, 4, 4), extent=(400, 300, 12), smoothness=1e-9)
    assert not inliers[[5, 50, 300]].any()
    grid = model.evaluate(pts[:, 0], pts[:, 1], pts[:, 2]) - true.evaluate(pts[:, 0], pts[:, 1], pts[:, 2])
    assert np.abs(grid).max() < 0.05


def test_frame_coefficients_match_evaluate():
    rng = np.random.default_rng(1)
    m = BSplineShiftModel((4, 5, 4), (64.0, 80.0, 6), rng.normal(size=(4, 5, 4, 2)))
    c = m.frame_coefficients()                                     # (N, 2, Ly, Lx)
    hx, hy, _ = m.spacing
    x, y, t = 17.3, 61.0, 4
    bx = basis_matrix([x], 4, hx)[0]
    by = basis_matrix([y], 5, hy)[0]
    direct = np.array([by @ c[t, k] @ bx for k in range(2)])
    np.testing.assert_allclose(direct, m.evaluate(x, y, t), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="at least 4"):
        fit_bspline_shifts(np.zeros((3, 3)), np.zeros((3, 2)), n_ctrl=(3, 4, 4), extent=(10, 10, 3))


def test_grid_fit_equals_general_fit():
    rng = np.random.default_rng(2)
    centres = np.stack(np.meshgrid(np.linspace(50, 450, 4), np.linspace(60, 340, 3), indexing="ij"), -1).reshape(-1, 2)
    vals = rng.normal(0, 0.3, (len(centres), 9, 2))
    vals[2, 4] += 5.0
    w = np.ones((len(centres), 9))
    w[7] = 0
    pts = np.array([(x, y, t) for (x, y) in centres for t in range(9)])
    general, inl_g = fit_bspline_shifts(pts, vals.reshape(-1, 2), n_ctrl=(5, 4, 4), extent=(500, 400, 9),
                                        weights=w.ravel())
    grid, inl = fit_bspline_grid(centres, vals, n_ctrl=(5, 4, 4), extent=(500, 400, 9), weights=w)
    np.testing.assert_allclose(grid.coefficients, general.coefficients, atol=1e-9)
    assert (inl.ravel() == inl_g).all() and not inl[2, 4]
