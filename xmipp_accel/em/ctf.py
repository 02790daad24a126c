"""The contrast transfer function (CTF) with RELION's formula and sign.

For a spatial frequency ``k = (kx, ky)`` in 1/Å, ``|k| = u`` and azimuth ``phi = atan2(ky, kx)``
(kx along image columns, ky along rows, angles counter-clockwise from x towards y)::

    defocus(phi) = (dU + dV)/2 + (dU - dV)/2 * cos(2 (phi - angle))        [Å, positive = underfocus]
    chi(k)       = -pi * lambda * defocus(phi) * u^2 + pi/2 * Cs * lambda^3 * u^4 - phase_shift - K3
    K3           = atan(Q / sqrt(1 - Q^2))                                  (Q = amplitude contrast)
    CTF(k)       = -sin(chi(k))

with the relativistic electron wavelength ``lambda = 12.2643247 / sqrt(V (1 + 0.978466e-6 V))`` Å
(V in volts) and Cs in Å (``cs_mm * 1e7``). This is RELION's ``CTF::getCTF`` (``src/ctf.h``,
``K1 = pi lambda``, ``K2 = pi/2 Cs lambda^3``, ``K5`` the phase shift, ``deltaf = -defocus``).

Sign: ``CTF(0) = sin(K3) = +Q`` and, for underfocus, the CTF is positive in the first lobe: RELION's
images have positive (white) particles and the CTF multiplies their Fourier transform as is.
Defocus U lies along ``angle`` (``defocus(angle) = dU``). Tests: ``xmipp_accel/tests/test_ctf.py``.
"""
from __future__ import annotations

from dataclasses import MISSING, dataclass, fields
from typing import Any, Dict, Mapping, Optional

import numpy as np

from .. import constants
from ..errors import InputError

__all__ = ["CTFParams", "CTF_DEFAULTS", "CTF_CORRECTIONS", "CTF_IMAGE_STATES", "electron_wavelength_A",
           "frequency_grid", "ctf_at", "ctf_2d", "ctf_coefficients", "ctf_zeros_A"]

#: How a reconstruction corrects for the CTF (the names are :mod:`xmipp_accel.constants`'): ``wiener``
#: accumulates CTF·F and CTF² weights, ``phase-flip`` multiplies by the CTF's sign, ``none`` ignores it.
#: The command line and the protocol add ``auto`` (:data:`xmipp_accel.constants.CTF_MODES`).
CTF_CORRECTIONS = constants.CTF_CORRECTIONS
#: What particle images already carry: ``normal`` (the microscope's CTF), ``phase_flipped``
#: (RELION ``rlnCtfDataArePhaseFlipped``) or ``premultiplied`` (``rlnCtfDataAreCtfPremultiplied``).
CTF_IMAGE_STATES = constants.CTF_IMAGE_STATES


def electron_wavelength_A(voltage_kV):
    """Relativistic electron wavelength (Å) at an acceleration voltage in kV (300 kV → 0.01969 Å).

    Scalar in, float out; array in, float64 array out.
    """
    v = np.asarray(voltage_kV, dtype=np.float64) * 1e3
    if np.any(v <= 0):
        raise InputError(f"voltage must be positive, got {voltage_kV} kV")
    lam = 12.2643247 / np.sqrt(v * (1.0 + v * 0.978466e-6))
    return float(lam) if lam.ndim == 0 else lam


def frequency_grid(box: int, pixel_size_A: float, *, rfft: bool = True, xp=np, dtype=np.float32):
    """Spatial frequencies (1/Å) of an unshifted 2-D FFT of a ``box`` × ``box`` image.

    Returns
    -------
    (fy, fx) : ``fy`` of shape ``(box, 1)`` (``np.fft.fftfreq``, rows) and ``fx`` of shape
        ``(1, box//2 + 1)`` (``rfftfreq``, columns) for ``rfft=True``, ``(1, box)`` (``fftfreq``) otherwise.
    """
    if box < 1 or pixel_size_A <= 0:
        raise InputError(f"box ({box}) and pixel size ({pixel_size_A} Å) must be positive")
    fy = xp.asarray(np.fft.fftfreq(box, d=pixel_size_A), dtype=dtype)[:, None]
    fxn = np.fft.rfftfreq(box, d=pixel_size_A) if rfft else np.fft.fftfreq(box, d=pixel_size_A)
    fx = xp.asarray(fxn, dtype=dtype)[None, :]
    return fy, fx


def _as_column(v, xp, dtype, ndim):
    """Scalar → scalar; array (n,) → (n, 1, ..., 1) for broadcasting against frequency grids."""
    a = np.asarray(v) if not hasattr(v, "__cuda_array_interface__") else v
    if a.ndim == 0:
        return float(a)
    return xp.asarray(a, dtype=dtype).reshape((-1,) + (1,) * ndim)


def ctf_at(fx, fy, defocus_u_A, defocus_v_A, defocus_angle_deg, *, voltage_kV=300.0, cs_mm=2.7,
           amplitude_contrast=0.1, phase_shift_deg=0.0, xp=None):
    """RELION's CTF at given frequencies.

    Parameters
    ----------
    fx, fy : arrays of frequencies in 1/Å along x (columns) and y (rows), broadcastable together.
    defocus_u_A, defocus_v_A : Å, positive for underfocus; scalars or arrays ``(n,)``.
    defocus_angle_deg : azimuth of the U axis, degrees from x towards y; scalar or ``(n,)``.
    voltage_kV, cs_mm, amplitude_contrast, phase_shift_deg : scalars or arrays ``(n,)``.

    Returns
    -------
    Array of ``broadcast(fx, fy)`` shape, with a leading ``n`` axis if any parameter is an array;
    dtype of ``fx``. Values in ``[-1, 1]``; ``+amplitude_contrast`` at zero frequency.
    """
    xp = xp or _xp_of(fx)
    dtype = fx.dtype if hasattr(fx, "dtype") else np.float64
    ndim = max(np.ndim(fx), np.ndim(fy))
    col = lambda v: _as_column(v, xp, dtype, ndim)  # noqa: E731
    k1, k2, k35 = _aberration_constants(voltage_kV, cs_mm, amplitude_contrast, phase_shift_deg)
    du, dv = col(defocus_u_A), col(defocus_v_A)
    mean, half_diff = (du + dv) * 0.5, (du - dv) * 0.5
    u2 = fx * fx + fy * fy
    azimuth = xp.arctan2(fy, fx)
    defocus = mean + half_diff * xp.cos(2.0 * (azimuth - col(np.deg2rad(np.asarray(defocus_angle_deg, float)))))
    chi = -col(k1) * defocus * u2 + col(k2) * (u2 * u2) - col(k35)
    return (-xp.sin(chi)).astype(dtype, copy=False)


def _aberration_constants(voltage_kV, cs_mm, amplitude_contrast, phase_shift_deg):
    """RELION's ``K1 = pi lambda`` (Å), ``K2 = pi/2 Cs lambda^3`` (Å³) and ``K3 + K5`` (amplitude contrast
    and phase-plate phases, radians) so that ``chi = -K1 defocus |f|^2 + K2 |f|^4 - (K3 + K5)``."""
    q = np.asarray(amplitude_contrast, dtype=np.float64)
    if np.any(q < 0) or np.any(q >= 1):
        raise InputError(f"amplitude contrast must be in [0, 1), got {amplitude_contrast}")
    lam = electron_wavelength_A(voltage_kV)
    k1 = np.pi * lam
    k2 = np.pi / 2.0 * np.asarray(cs_mm, dtype=np.float64) * 1e7 * lam ** 3
    k3 = np.arctan(q / np.sqrt(1.0 - q * q))
    k5 = np.deg2rad(np.asarray(phase_shift_deg, dtype=np.float64))
    return k1, k2, k3 + k5


def ctf_coefficients(defocus_u_A, defocus_v_A, defocus_angle_deg, *, voltage_kV=300.0, cs_mm=2.7,
                     amplitude_contrast=0.1, phase_shift_deg=0.0) -> np.ndarray:
    """Per-particle coefficients of the CTF phase as a polynomial in the frequency, for kernels that
    evaluate the CTF themselves (no angle or trigonometry per pixel).

    Parameters are scalars or arrays ``(n,)`` as for :func:`ctf_at`.

    Returns
    -------
    ``(n, 5)`` float64 ``(a, b, c, d, e)`` such that, with ``f = (fx, fy)`` in 1/Å and ``u2 = |f|^2``,
    ``chi = -(a u2 + b (fx^2 - fy^2) + c 2 fx fy) + d u2^2 - e`` and ``CTF = -sin(chi)`` equals
    :func:`ctf_at`: ``a = K1 (U + V)/2``, ``b = K1 (U - V)/2 cos 2angle``, ``c = K1 (U - V)/2 sin 2angle``
    (Å), ``d = K2`` (Å³), ``e = K3 + K5`` (radians).
    """
    k1, k2, k35 = _aberration_constants(voltage_kV, cs_mm, amplitude_contrast, phase_shift_deg)
    du = np.asarray(defocus_u_A, dtype=np.float64)
    dv = np.asarray(defocus_v_A, dtype=np.float64)
    ang2 = 2.0 * np.deg2rad(np.asarray(defocus_angle_deg, dtype=np.float64))
    half = k1 * (du - dv) * 0.5
    cols = np.broadcast_arrays(np.atleast_1d(k1 * (du + dv) * 0.5), np.atleast_1d(half * np.cos(ang2)),
                               np.atleast_1d(half * np.sin(ang2)), np.atleast_1d(k2), np.atleast_1d(k35))
    return np.ascontiguousarray(np.stack(cols, axis=1), dtype=np.float64)


def ctf_2d(box: int, pixel_size_A: float, defocus_u_A, defocus_v_A, defocus_angle_deg, *, voltage_kV=300.0,
           cs_mm=2.7, amplitude_contrast=0.1, phase_shift_deg=0.0, xp=np, rfft: bool = True,
           dtype=np.float32):
    """RELION's CTF on the grid of an unshifted 2-D FFT.

    Parameters
    ----------
    box : image side in pixels.
    pixel_size_A : Å per pixel.
    defocus_u_A, defocus_v_A, defocus_angle_deg : scalars, or arrays ``(n,)`` for a batch.
    voltage_kV, cs_mm, amplitude_contrast, phase_shift_deg : scalars or arrays ``(n,)``.
    xp : numpy or cupy (where the result lives).
    rfft : ``True`` for the ``np.fft.rfft2`` layout ``(box, box//2 + 1)``, ``False`` for ``fft2`` ``(box, box)``.
    dtype : float32 (default) or float64.

    Returns
    -------
    ``(box, box//2+1)`` (or ``(box, box)``) for scalar parameters, ``(n, box, box//2+1)`` for a batch.
    The layout matches ``rfft2(ifftshift(image))`` of an image centred at ``box // 2``: row ``i`` has
    frequency ``fftfreq(box)[i] / pixel_size_A`` along y, column ``j`` ``rfftfreq(box)[j] / pixel_size_A``
    along x.
    """
    fy, fx = frequency_grid(box, pixel_size_A, rfft=rfft, xp=xp, dtype=dtype)
    return ctf_at(fx, fy, defocus_u_A, defocus_v_A, defocus_angle_deg, voltage_kV=voltage_kV, cs_mm=cs_mm,
                  amplitude_contrast=amplitude_contrast, phase_shift_deg=phase_shift_deg, xp=xp)


def ctf_zeros_A(defocus_A: float, *, voltage_kV=300.0, cs_mm=2.7, amplitude_contrast=0.1, phase_shift_deg=0.0,
                count: int = 5) -> np.ndarray:
    """Frequencies (1/Å) of the first ``count`` zeros of an astigmatism-free CTF, in closed form.

    The CTF vanishes where ``chi = -m pi``; on the defocus-dominated branch (before the Cs term turns
    ``chi`` back up) these are the smaller positive roots ``s = u^2`` of
    ``K2 s^2 - K1 defocus s + (m pi - K3 - phase) = 0``. Returns ``(count,)`` float64 (fewer if the
    branch ends first).
    """
    lam = electron_wavelength_A(voltage_kV)
    k1, k2 = np.pi * lam, np.pi / 2.0 * cs_mm * 1e7 * lam ** 3
    q = float(amplitude_contrast)
    offset = np.arctan(q / np.sqrt(1.0 - q * q)) + np.deg2rad(phase_shift_deg)
    zeros = []
    for m in range(0, 100 * count):
        c = m * np.pi - offset
        disc = (k1 * defocus_A) ** 2 - 4.0 * k2 * c
        if disc < 0 or len(zeros) == count:
            break
        s = 2.0 * c / (k1 * defocus_A + np.sqrt(disc))  # smaller root, stable form
        if s > 0:
            zeros.append(np.sqrt(s))
    return np.array(zeros)


def _xp_of(a):
    from .. import backend
    return backend.get_xp(a)


@dataclass
class CTFParams:
    """CTF parameters of one particle or micrograph, or of a batch (RELION's names and units).

    Each attribute is a scalar or an array ``(n,)`` (one value per particle). The defaults of the
    microscope values are the package's (:data:`CTF_DEFAULTS`), used wherever the data do not give them.

    Attributes
    ----------
    defocus_u_A, defocus_v_A : Å, positive for underfocus (rlnDefocusU/V).
    defocus_angle_deg : degrees, azimuth of U from x towards y (rlnDefocusAngle).
    voltage_kV : kV (rlnVoltage). cs_mm : mm (rlnSphericalAberration).
    amplitude_contrast : fraction (rlnAmplitudeContrast). phase_shift_deg : degrees (rlnPhaseShift).
    """
    defocus_u_A: Any
    defocus_v_A: Any
    defocus_angle_deg: Any
    voltage_kV: Any = 300.0
    cs_mm: Any = 2.7
    amplitude_contrast: Any = 0.1
    phase_shift_deg: Any = 0.0

    @classmethod
    def from_mapping(cls, ctf: Mapping[str, Any], n: Optional[int] = None) -> CTFParams:
        """Parameters from a mapping of columns (:meth:`xmipp_accel.io.star.ParticleSet.ctf`, a particle
        batch's ``ctf``): ``defocus_u_A`` is required; a missing (or None) ``defocus_v_A`` is U,
        ``defocus_angle_deg`` 0 and the microscope values :data:`CTF_DEFAULTS`.

        With ``n``, every attribute is a host float64 array ``(n,)`` (NumPy or CuPy values, scalars
        broadcast); without, the values are kept as given (the defaults as scalars).
        """
        def value(key, default):
            v = ctf.get(key)
            v = default if v is None else v
            if n is None:
                return v
            from .. import backend  # noqa: PLC0415
            return np.ascontiguousarray(np.broadcast_to(np.asarray(backend.to_host(v), dtype=np.float64), (int(n),)))
        if ctf.get("defocus_u_A") is None:
            raise InputError("CTF parameters need defocus_u_A (rlnDefocusU)")
        du = value("defocus_u_A", None)
        return cls(du, value("defocus_v_A", du), value("defocus_angle_deg", 0.0),
                   **{k: value(k, d) for k, d in CTF_DEFAULTS.items()})

    def optics(self) -> Dict[str, Any]:
        """The microscope keywords of :func:`ctf_at`, :func:`ctf_2d` and :func:`ctf_coefficients`."""
        return {k: getattr(self, k) for k in CTF_DEFAULTS}

    def ctf_2d(self, box: int, pixel_size_A: float, *, xp=np, rfft: bool = True, dtype=np.float32):
        """This CTF on an FFT grid; see :func:`ctf_2d`."""
        return ctf_2d(box, pixel_size_A, self.defocus_u_A, self.defocus_v_A, self.defocus_angle_deg,
                      voltage_kV=self.voltage_kV, cs_mm=self.cs_mm, amplitude_contrast=self.amplitude_contrast,
                      phase_shift_deg=self.phase_shift_deg, xp=xp, rfft=rfft, dtype=dtype)


#: Microscope values assumed when the data do not give them (the defaults of :class:`CTFParams`).
CTF_DEFAULTS: Dict[str, float] = {f.name: f.default for f in fields(CTFParams) if f.default is not MISSING}
