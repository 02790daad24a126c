"""How precisely the data can fix a particle's orientation: the angular accuracy of RELION's auto-refine.

A particle image ``X`` is modelled as ``a C P(A) + N``: the reference projected at the particle's pose
``A``, multiplied by its CTF ``C`` and a scale ``a``, plus Gaussian noise of power ``sigma2(k)`` per
Fourier shell. Moving the pose by a rotation of ``delta`` changes the log-likelihood by

    D(delta) = 1/2 * sum_k |a C (P(R_delta A) - P(A))|^2 / sigma2(|k|)      (full 2-D FFT, both halves)

and the orientation is *determined* to within the ``delta`` at which ``D`` reaches ``ln 100 = 4.605``, the
probability ratio 0.01 that RELION uses (``calculateExpectedAngularErrors`` in ``ml_optimiser.cpp``, the
"accuracy rotations" of its model STAR). Searching a finer grid than that cannot place the particle
better; auto-refine stops refining its step there, and so does :func:`xmipp_accel.gpu.refine.autorefine
.run_iteration`. Written from the description of the method, not from RELION's code.

Here ``sigma2`` is measured from the residuals ``X - a C P(A)`` of the particles used (at their current
poses), ``R_delta`` is a rotation by ``delta`` about a random axis per particle, and the accuracy is the
median over the particles (RELION takes the mean over 100 particles; the median is not pulled by the few
empty or mis-posed images). ``D`` is evaluated on a ladder of angles and the crossing interpolated in
log-log (``D`` grows like ``delta^2`` at small angles).
"""
from __future__ import annotations

import math
from typing import Mapping, Optional

import numpy as np

from ... import backend
from ...constants import CTF_IMAGES_NORMAL
from ...em.projection import FourierProjector, fourier_shift_phase, rfft_column_weights
from ...em.symmetry import rotation_about_axis

__all__ = ["RELION_LOG_RATIO", "angular_accuracy_deg", "likelihood_drop"]

#: ln(1 / 0.01): the drop of the log-likelihood at which RELION calls two poses distinguishable.
RELION_LOG_RATIO = math.log(100.0)
#: Angles (degrees) at which the drop is evaluated.
LADDER_DEG = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0)


def _frequency_radius(box: int):
    ky = np.fft.fftfreq(box) * box
    kx = np.fft.rfftfreq(box) * box
    kyy, kxx = np.meshgrid(ky, kx, indexing="ij")
    return kxx, kyy, np.hypot(kxx, kyy)


def likelihood_drop(projector: FourierProjector, model, ctf_k, matrices, *, scale, inv_noise, delta_deg: float,
                    axes: np.ndarray):
    """``D(delta)`` per particle: the log-likelihood drop when each pose is rotated by ``delta_deg``.

    Parameters
    ----------
    projector : the reference's FourierProjector.
    model : (n, N, N//2+1) ``C P(A)``, the projections at the poses times the CTF.
    ctf_k : (n, N, N//2+1) effective CTF or None.
    matrices : (n, 3, 3) poses.
    scale : (n,) least-squares scale ``a`` of ``model`` to each particle.
    inv_noise : (N, N//2+1) ``multiplicity / sigma2`` on the compared frequencies, 0 elsewhere.
    delta_deg : rotation angle (degrees); axes : (n, 3) unit axes.

    Returns (n,) float64 on the host.
    """
    xp = projector.xp
    rot = np.stack([rotation_about_axis(ax, delta_deg) @ m for ax, m in zip(axes, backend.to_host(matrices))])
    moved = projector.project_fourier(xp.asarray(rot, dtype=xp.float32), ctf=ctf_k)
    diff = xp.abs(moved - model) ** 2 * (scale[:, None, None] ** 2)
    return backend.to_host(0.5 * xp.sum(diff * inv_noise[None], axis=(1, 2))).astype(np.float64)


def _scales(spectra, model, band, weights):
    """Least-squares scale ``a`` of ``model`` to ``spectra`` per particle, over ``band``."""
    xp = backend.get_xp(spectra)
    w = xp.where(band, weights, 0.0)[None]
    num = xp.sum(w * xp.real(xp.conj(model) * spectra), axis=(1, 2))
    den = xp.sum(w * xp.abs(model) ** 2, axis=(1, 2))
    return num / xp.maximum(den, 1e-30)


def _crossing_deg(drops: np.ndarray, ladder: np.ndarray, level: float) -> np.ndarray:
    """Per particle, the angle at which ``drops`` (n, L) first reaches ``level``, log-log interpolated;
    the largest angle where it never does, and ``ladder[0] * sqrt(level / D0)`` where it already does."""
    out = np.full(drops.shape[0], ladder[-1])
    for i, d in enumerate(drops):
        above = np.nonzero(d >= level)[0]
        if above.size == 0:
            continue
        j = int(above[0])
        if j == 0:
            out[i] = ladder[0] * math.sqrt(level / max(d[0], 1e-30))
            continue
        d0, d1 = max(d[j - 1], 1e-30), d[j]
        t = (math.log(level) - math.log(d0)) / (math.log(d1) - math.log(d0))
        out[i] = math.exp(math.log(ladder[j - 1]) + t * (math.log(ladder[j]) - math.log(ladder[j - 1])))
    return out


def angular_accuracy_deg(reference, images, matrices, origins_px, *, pixel_size_A: float, r_max_px: float,
                         ctf: Optional[Mapping[str, np.ndarray]] = None, ctf_mode: str = CTF_IMAGES_NORMAL,
                         seed: int = 0, xp=None) -> float:
    """Angular accuracy (degrees) of the poses that ``reference`` and the particles allow (RELION's rule).

    Parameters
    ----------
    reference : (N, N, N) map the particles are compared with (z, y, x), N even.
    images : (n, N, N) particle images, on the device of ``xp`` (RELION uses n = 100).
    matrices : (n, 3, 3) current poses (Euler matrices A); origins_px : (n, 2) origins (x, y) px, RELION sign.
    pixel_size_A : Å per pixel; r_max_px : highest frequency compared (pixels of the Fourier box).
    ctf : per-particle CTF arrays (n,) or None; ctf_mode : how the images carry it.
    seed : the random rotation axes.
    xp : numpy or cupy (default: that of ``reference``).

    Returns
    -------
    The median over the particles of the angle (degrees) at which the log-likelihood drops by ln 100.
    """
    from ..align.polar import centred_rfft2
    from ..align.search_plan import ctf_values
    xp = xp or backend.get_xp(reference)
    box = int(reference.shape[0])
    n = int(images.shape[0])
    mats = xp.asarray(np.asarray(matrices), dtype=xp.float32)
    spectra = centred_rfft2(xp.asarray(images, dtype=xp.float32)).astype(xp.complex64)
    spectra *= fourier_shift_phase(box, np.asarray(origins_px, np.float64), xp=xp)   # centre them
    kxx, kyy, rad = _frequency_radius(box)
    band = xp.asarray((rad > 0.5) & (rad <= r_max_px))
    shells = xp.asarray(np.minimum(np.rint(rad).astype(np.int64), box))
    weights = xp.broadcast_to(rfft_column_weights(box, xp=xp, dtype=np.float32)[None, :], kxx.shape)
    ctf_k = None
    if ctf is not None:
        ctf_k = ctf_values(ctf, kxx.ravel(), kyy.ravel(), box=box, pixel_size_A=pixel_size_A, xp=xp,
                           mode=ctf_mode).reshape((n,) + kxx.shape)
    projector = FourierProjector(xp.asarray(reference, dtype=xp.float32))
    model = projector.project_fourier(mats, ctf=ctf_k)
    scale = _scales(spectra, model, band, weights)
    resid = xp.abs(spectra - scale[:, None, None] * model) ** 2 * weights[None]
    power = xp.bincount(xp.broadcast_to(shells, resid.shape).ravel(), weights=resid.ravel().astype(xp.float64),
                        minlength=box + 1)
    count = xp.bincount(shells.ravel(), weights=weights.ravel().astype(xp.float64), minlength=box + 1) * n
    sigma2 = xp.maximum(xp.where(count > 0, power / xp.maximum(count, 1.0), 1.0), 1e-30)
    inv_noise = xp.where(band, weights / sigma2.astype(xp.float32)[shells], 0.0)
    axes = np.random.default_rng(seed + 1).normal(size=(n, 3))
    axes /= np.linalg.norm(axes, axis=1, keepdims=True)
    ladder = np.asarray(LADDER_DEG)
    drops = np.stack([likelihood_drop(projector, model, ctf_k, mats, scale=scale, inv_noise=inv_noise,
                                      delta_deg=float(d), axes=axes) for d in ladder], axis=1)
    return float(np.median(_crossing_deg(drops, ladder, RELION_LOG_RATIO)))
