"""RELION's CTF: wavelength, sign at low frequency, zeros, astigmatism direction, FFT layout, batching."""
import numpy as np
import pytest

from xmipp_accel.em.ctf import (CTFParams, ctf_2d, ctf_at, ctf_coefficients, ctf_zeros_A, electron_wavelength_A,
                                 frequency_grid)
from xmipp_accel.errors import InputError


def _relion_bilinear(fx, fy, du, dv, angle_deg, kv, cs_mm, q, phase_deg):
    """RELION 3.1+ CTF::getCTF written from src/ctf.cpp (bilinear astigmatism form), independent of ours."""
    v = kv * 1e3
    lam = 12.2643247 / np.sqrt(v * (1.0 + v * 0.978466e-6))
    k1, k2 = np.pi / 2 * 2 * lam, np.pi / 2 * cs_mm * 1e7 * lam ** 3
    k3, k5 = np.arctan(q / np.sqrt(1 - q * q)), np.deg2rad(phase_deg)
    a = np.deg2rad(angle_deg)
    rq = np.array([[np.cos(a), np.sin(a)], [-np.sin(a), np.cos(a)]])
    m = rq.T @ np.diag([-du, -dv]) @ rq
    u2 = fx * fx + fy * fy
    gamma = k1 * (m[0, 0] * fx * fx + 2 * m[0, 1] * fx * fy + m[1, 1] * fy * fy) + k2 * u2 * u2 - k5 - k3
    return -np.sin(gamma)


def test_wavelength():
    assert electron_wavelength_A(300) == pytest.approx(0.019687, abs=2e-6)
    assert electron_wavelength_A(200) == pytest.approx(0.025079, abs=2e-6)
    assert electron_wavelength_A(np.array([200.0, 300.0])).shape == (2,)
    with pytest.raises(InputError):
        electron_wavelength_A(0)


@pytest.mark.parametrize("params", [(20000, 20000, 0, 300, 2.7, 0.1, 0), (15000, 11000, 35, 300, 2.7, 0.07, 0),
                                    (9000, 8000, 120, 200, 2.0, 0.1, 60), (30000, 25000, -20, 300, 0.01, 0.2, 0)])
def test_equals_relion_bilinear_form(params):
    du, dv, ang, kv, cs, q, ph = params
    box, ps = 96, 1.3
    ours = ctf_2d(box, ps, du, dv, ang, voltage_kV=kv, cs_mm=cs, amplitude_contrast=q, phase_shift_deg=ph,
                  dtype=np.float64)
    fy, fx = frequency_grid(box, ps, dtype=np.float64)
    np.testing.assert_allclose(ours, _relion_bilinear(fx, fy, du, dv, ang, kv, cs, q, ph), atol=1e-9)


def test_sign_at_low_frequency_is_plus_q_and_first_lobe_positive():
    c = ctf_2d(256, 1.0, 20000, 20000, 0, amplitude_contrast=0.1, dtype=np.float64)
    assert c[0, 0] == pytest.approx(0.1, abs=1e-12)  # RELION: CTF(0) = +Q
    radial = c[0, :12]
    assert np.all(np.diff(radial[:6]) > 0) and radial[5] > 0.5  # rises towards +1 before the first zero
    assert ctf_2d(64, 1.0, 20000, 20000, 0, amplitude_contrast=0.0, dtype=np.float64)[0, 0] == 0.0


def test_zeros_without_cs_and_amplitude_contrast_closed_form():
    """With Cs = 0 and Q = 0, CTF = sin(pi lambda dz u^2): zeros at u = sqrt(m / (lambda dz))."""
    dz, lam = 18000.0, electron_wavelength_A(300)
    expected = np.sqrt(np.arange(1, 5) / (lam * dz))
    zeros = ctf_zeros_A(dz, cs_mm=0.0, amplitude_contrast=0.0, count=4)
    np.testing.assert_allclose(zeros, expected, rtol=1e-9)
    values = ctf_at(expected, np.zeros(4), dz, dz, 0.0, cs_mm=0.0, amplitude_contrast=0.0)
    np.testing.assert_allclose(values, 0.0, atol=1e-9)
    mid = np.sqrt((np.arange(1, 5) - 0.5) / (lam * dz))  # extrema alternate +1, -1 ...
    np.testing.assert_allclose(ctf_at(mid, np.zeros(4), dz, dz, 0.0, cs_mm=0.0, amplitude_contrast=0.0),
                               [1, -1, 1, -1], atol=1e-9)


def test_zeros_with_cs_are_sign_changes():
    dz = 15000.0
    zeros = ctf_zeros_A(dz, count=5)
    u = np.linspace(1e-4, zeros[-1] + 0.002, 20000)
    c = ctf_at(u, np.zeros_like(u), dz, dz, 0.0)
    crossings = u[1:][np.sign(c[1:]) != np.sign(c[:-1])]
    np.testing.assert_allclose(crossings[:5], zeros, atol=2e-5)
    # amplitude contrast moves the first zero to a lower frequency than sqrt(1 / (lambda dz)) (17.2 Å here)
    assert np.sqrt(electron_wavelength_A(300) * dz) < 1 / zeros[0] < 18.0


def test_astigmatism_angle_direction():
    """Defocus U lies along the angle (from x towards y), V perpendicular to it."""
    du, dv, ang = 25000.0, 15000.0, 30.0
    zu, zv = ctf_zeros_A(du, count=1)[0], ctf_zeros_A(dv, count=1)[0]
    a = np.deg2rad(ang)
    along_u = ctf_at(np.array([zu * np.cos(a)]), np.array([zu * np.sin(a)]), du, dv, ang)
    along_v = ctf_at(np.array([-zv * np.sin(a)]), np.array([zv * np.cos(a)]), du, dv, ang)
    np.testing.assert_allclose([along_u[0], along_v[0]], 0.0, atol=1e-6)
    wrong = ctf_at(np.array([zu * np.cos(-a)]), np.array([zu * np.sin(-a)]), du, dv, ang)  # mirrored angle
    assert abs(wrong[0]) > 0.3


def test_rfft_layout_and_full_layout():
    box, ps = 33, 2.0
    half = ctf_2d(box, ps, 12000, 11000, 40)
    full = ctf_2d(box, ps, 12000, 11000, 40, rfft=False)
    assert half.shape == (box, box // 2 + 1) and full.shape == (box, box) and half.dtype == np.float32
    np.testing.assert_allclose(full[:, :box // 2 + 1], half, atol=1e-6)
    i, j = 5, 7
    fy, fx = np.fft.fftfreq(box)[i] / ps, np.fft.rfftfreq(box)[j] / ps
    assert half[i, j] == pytest.approx(float(ctf_at(np.array(fx), np.array(fy), 12000, 11000, 40)), abs=1e-6)
    # the CTF is point-symmetric: C(-k) = C(k), so the full grid matches its own flip
    np.testing.assert_allclose(full, np.roll(full[::-1, ::-1], 1, axis=(0, 1)), atol=1e-5)


def test_batched_matches_single(xp):
    du = np.array([10000.0, 15000.0, 22000.0])
    dv, ang = du - 800, np.array([0.0, 45.0, 100.0])
    batch = ctf_2d(64, 1.5, du, dv, ang, xp=xp)
    assert batch.shape == (3, 64, 33)
    for k in range(3):
        single = ctf_2d(64, 1.5, du[k], dv[k], ang[k])
        np.testing.assert_allclose(backend_to_numpy(batch[k]), single, atol=2e-5)


def test_dataclass_and_errors():
    p = CTFParams(12000.0, 11000.0, 20.0, phase_shift_deg=30.0)
    np.testing.assert_array_equal(p.ctf_2d(32, 1.0), ctf_2d(32, 1.0, 12000.0, 11000.0, 20.0, phase_shift_deg=30.0))
    with pytest.raises(InputError):
        ctf_2d(32, 1.0, 1e4, 1e4, 0, amplitude_contrast=1.0)
    with pytest.raises(InputError):
        ctf_2d(32, -1.0, 1e4, 1e4, 0)


def test_params_from_columns_fill_the_one_set_of_defaults():
    """Missing columns take defocus V = U, angle 0 and CTF_DEFAULTS; the batch equals per-particle CTFs."""
    from xmipp_accel.em.ctf import CTF_DEFAULTS
    assert CTF_DEFAULTS == {"voltage_kV": 300.0, "cs_mm": 2.7, "amplitude_contrast": 0.1, "phase_shift_deg": 0.0}
    du = np.array([9000.0, 15000.0, 21000.0])
    p = CTFParams.from_mapping({"defocus_u_A": du, "cs_mm": 1.4, "phase_shift_deg": None}, 3)
    np.testing.assert_array_equal(p.defocus_v_A, du)
    np.testing.assert_array_equal(p.defocus_angle_deg, np.zeros(3))
    assert {k: v.tolist() for k, v in p.optics().items()} == {"voltage_kV": [300.0] * 3, "cs_mm": [1.4] * 3,
                                                               "amplitude_contrast": [0.1] * 3,
                                                               "phase_shift_deg": [0.0] * 3}
    batch = ctf_2d(32, 1.2, p.defocus_u_A, p.defocus_v_A, p.defocus_angle_deg, **p.optics())
    for k in range(3):
        np.testing.assert_array_equal(batch[k], CTFParams(du[k], du[k], 0.0, cs_mm=1.4).ctf_2d(32, 1.2))
    kept = CTFParams.from_mapping({"defocus_u_A": 1e4})            # without n: values as given
    assert kept.defocus_v_A == 1e4 and kept.voltage_kV == 300.0
    with pytest.raises(InputError, match="defocus_u_A"):
        CTFParams.from_mapping({"defocus_v_A": du}, 3)


def test_one_vocabulary_of_ctf_modes():
    """The reconstruction, the alignment and the command line use the names of xmipp_accel.constants."""
    from xmipp_accel import constants as c
    from xmipp_accel.cli import reconstruct as cli_reconstruct
    from xmipp_accel.gpu.align import projmatch
    from xmipp_accel.gpu.reconstruct import fourier
    assert c.CTF_MODES == (c.CTF_AUTO,) + c.CTF_CORRECTIONS
    assert tuple(cli_reconstruct.CTF_CHOICES) == c.CTF_MODES
    assert fourier.CTF_MODES == c.CTF_CORRECTIONS == ("wiener", "phase-flip", "none")
    assert projmatch.CTF_MODES == c.CTF_IMAGE_STATES == ("normal", "phase_flipped", "premultiplied")


def backend_to_numpy(a):
    return a.get() if hasattr(a, "get") else np.asarray(a)


def test_coefficients_reproduce_the_ctf_without_atan2():
    """The per-particle coefficients, put into the formula of their docstring (as the packing kernel
    evaluates it), give ctf_2d, astigmatism, phase plate and amplitude contrast included."""
    rng = np.random.default_rng(5)
    n, box, px = 3, 40, 1.2
    du, dv = rng.uniform(8000, 30000, n), rng.uniform(8000, 30000, n)
    ang = rng.uniform(0, 180, n)
    kw = {"voltage_kV": np.array([300.0, 200.0, 100.0]), "cs_mm": np.array([2.7, 0.01, 1.4]),
          "amplitude_contrast": np.array([0.1, 0.07, 0.0]), "phase_shift_deg": np.array([0.0, 90.0, 45.0])}
    ref = ctf_2d(box, px, du, dv, ang, dtype=np.float64, **kw)
    c = ctf_coefficients(du, dv, ang, **kw)
    assert c.shape == (n, 5)
    fy, fx = frequency_grid(box, px, dtype=np.float64)
    u2 = fx * fx + fy * fy
    got = np.empty_like(ref)
    for i in range(n):
        chi = -(c[i, 0] * u2 + c[i, 1] * (fx * fx - fy * fy) + c[i, 2] * 2 * fx * fy) + c[i, 3] * u2 * u2 - c[i, 4]
        got[i] = -np.sin(chi)
    np.testing.assert_allclose(got, ref, atol=1e-9)
    k1 = np.pi * electron_wavelength_A(300.0)
    np.testing.assert_allclose(ctf_coefficients(20000.0, 18000.0, 45.0)[0, :3], [19000.0 * k1, 0.0, 1000.0 * k1],
                               atol=1e-12)
