"""Synthetic data with known ground truth, for tests, benchmarks and the demo.

- :func:`phantom_volume`: a positive, asymmetric density with features at several scales (a soft
  ellipsoidal body, hard-edged ellipsoids, a cube and a rod, small Gaussian blobs), inside a sphere of
  radius ``0.4 * box``.
- :func:`make_particles`: projections at uniformly random orientations with RELION's CTF, random
  shifts and white Gaussian noise at a chosen SNR, with the truth in RELION's conventions.
- Movies (``make_movie``) live in :mod:`xmipp_accel.em.synthetic_movies` and are re-exported here.

Conventions are those of :mod:`xmipp_accel.em.projection` and :mod:`xmipp_accel.em.ctf`; see
``docs/conventions.md``. Tests: ``xmipp_accel/tests/test_synthetic.py``.
"""
from __future__ import annotations

import math

import numpy as np

from ..errors import InputError
from .. import backend
from .ctf import CTF_DEFAULTS, ctf_2d
from .geometry import euler_to_matrix, matrix_to_euler
from .projection import FourierProjector
from .sampling import random_rotations

__all__ = ["phantom_volume", "make_particles", "add_noise_at_snr", "gaussian_lowpass"]


def _rotation(rng) -> np.ndarray:
    return random_rotations(1, rng)[0]


def _add_ellipsoid(vol, centre, radii, rot, density, edge_px):
    """Add ``density`` inside an ellipsoid (in place), with a linear edge ``edge_px`` wide (0 = hard).

    ``centre`` and ``radii`` in voxels (x, y, z), ``rot`` (3, 3) maps volume axes to ellipsoid axes.
    """
    n = vol.shape[0]
    c = n // 2
    reach = max(radii) + edge_px + 1
    lo = [max(0, int(np.floor(c + centre[k] - reach))) for k in range(3)]
    hi = [min(n, int(np.ceil(c + centre[k] + reach)) + 1) for k in range(3)]
    if any(h <= low for low, h in zip(lo, hi)):
        return
    x = np.arange(lo[0], hi[0]) - c - centre[0]
    y = np.arange(lo[1], hi[1]) - c - centre[1]
    z = np.arange(lo[2], hi[2]) - c - centre[2]
    zz, yy, xx = z[:, None, None], y[None, :, None], x[None, None, :]
    u = [rot[k, 0] * xx + rot[k, 1] * yy + rot[k, 2] * zz for k in range(3)]
    q = np.sqrt(sum((u[k] / radii[k]) ** 2 for k in range(3)))  # 1 on the surface
    if edge_px > 0:
        dist = (q - 1.0) * min(radii)  # ~ voxels outside the surface
        w = np.clip(0.5 - dist / edge_px, 0.0, 1.0)
    else:
        w = (q <= 1.0).astype(np.float64)
    vol[lo[2]:hi[2], lo[1]:hi[1], lo[0]:hi[0]] += density * w


def _add_box(vol, centre, half_sides, rot, density):
    """Add a hard-edged rectangular box (cube or rod), centre and half sides in voxels (x, y, z)."""
    n = vol.shape[0]
    c = n // 2
    reach = float(np.linalg.norm(half_sides)) + 1
    lo = [max(0, int(np.floor(c + centre[k] - reach))) for k in range(3)]
    hi = [min(n, int(np.ceil(c + centre[k] + reach)) + 1) for k in range(3)]
    x = np.arange(lo[0], hi[0]) - c - centre[0]
    y = np.arange(lo[1], hi[1]) - c - centre[1]
    z = np.arange(lo[2], hi[2]) - c - centre[2]
    zz, yy, xx = z[:, None, None], y[None, :, None], x[None, None, :]
    inside = np.ones(np.broadcast_shapes(zz.shape, yy.shape, xx.shape), dtype=bool)
    for k in range(3):
        inside &= np.abs(rot[k, 0] * xx + rot[k, 1] * yy + rot[k, 2] * zz) <= half_sides[k]
    vol[lo[2]:hi[2], lo[1]:hi[1], lo[0]:hi[0]] += density * inside


def _random_point_in_ball(rng, radius) -> np.ndarray:
    v = rng.standard_normal(3)
    return v / np.linalg.norm(v) * radius * rng.uniform() ** (1.0 / 3.0)


def phantom_volume(box: int, *, seed: int = 0) -> np.ndarray:
    """A positive, asymmetric test density with features at several scales.

    Parameters
    ----------
    box : side in voxels (>= 16).
    seed : random seed; the same seed gives the same volume.

    Returns
    -------
    ``(box, box, box)`` float32 (z, y, x), centre ``box // 2``, values in ``[0, 1]`` (maximum 1), zero
    outside the sphere of radius ``0.4 * box``. Features (sizes relative to the box): a soft ellipsoidal
    body (semi-axes ~0.28, 0.2, 0.15), 6 hard-edged ellipsoids (0.04-0.1), a hard-edged cube (side
    ~0.12) and rod (0.3 × 0.04), and 24 Gaussian blobs (sigma 0.8-2.5 voxels, the finest details).
    """
    if box < 16:
        raise InputError(f"phantom box must be >= 16 voxels, got {box}")
    rng = np.random.default_rng(seed)
    vol = np.zeros((box, box, box), dtype=np.float64)
    s = float(box)
    _add_ellipsoid(vol, (0.0, 0.0, 0.0), (0.28 * s, 0.2 * s, 0.15 * s), _rotation(rng), 0.4, 0.03 * s)
    for _ in range(6):
        radii = rng.uniform(0.04, 0.1, 3) * s
        centre = _random_point_in_ball(rng, 0.38 * s - radii.max())
        _add_ellipsoid(vol, centre, radii, _rotation(rng), rng.uniform(0.3, 0.8), 0.0)
    _add_box(vol, _random_point_in_ball(rng, 0.2 * s), np.full(3, 0.06 * s), _rotation(rng), 0.6)
    _add_box(vol, _random_point_in_ball(rng, 0.1 * s), np.array([0.15, 0.02, 0.02]) * s, _rotation(rng), 0.7)
    zc, yc, xc = (np.arange(box) - box // 2 for _ in range(3))
    for _ in range(24):
        sigma = rng.uniform(0.8, 2.5)
        centre = _random_point_in_ball(rng, 0.38 * s - 3 * sigma)
        gx = np.exp(-0.5 * ((xc - centre[0]) / sigma) ** 2)
        gy = np.exp(-0.5 * ((yc - centre[1]) / sigma) ** 2)
        gz = np.exp(-0.5 * ((zc - centre[2]) / sigma) ** 2)
        vol += rng.uniform(0.5, 1.0) * gz[:, None, None] * gy[None, :, None] * gx[None, None, :]
    r2 = (zc[:, None, None] ** 2 + yc[None, :, None] ** 2 + xc[None, None, :] ** 2)
    vol[r2 > (0.4 * s) ** 2] = 0.0
    vol /= vol.max()
    return vol.astype(np.float32)


def gaussian_lowpass(volume: np.ndarray, *, resolution_A: float, pixel_size_A: float) -> np.ndarray:
    """Gaussian low-pass of a map ``(N, N, N)`` whose amplitude falls to 0.5 at ``resolution_A`` (Å).

    Used to make a reference that is not the exact truth. Returns float32 of the input's shape.
    """
    f = np.fft.rfftn(volume)
    axes = [np.fft.fftfreq(n) for n in volume.shape[:-1]] + [np.fft.rfftfreq(volume.shape[-1])]
    k2 = sum(a.reshape([-1 if i == j else 1 for j in range(3)]) ** 2 for i, a in enumerate(axes))
    cutoff = pixel_size_A / resolution_A                      # cycles per pixel
    f *= np.exp(-np.log(2.0) * k2 / cutoff ** 2)
    return np.fft.irfftn(f, volume.shape).astype(np.float32)


def add_noise_at_snr(images, snr: float, *, seed: int = 0):
    """Add white Gaussian noise so that ``var(signal) / var(noise) = snr`` over the whole box.

    Parameters
    ----------
    images : ``(n, Y, X)`` clean images (NumPy or CuPy).
    snr : signal variance over noise variance (> 0); the signal variance is the mean over the images
        of each image's variance.
    seed : random seed.

    Returns
    -------
    (noisy images float32, noise sigma float).
    """
    if snr is None or not snr > 0:
        raise InputError(f"SNR must be positive, got {snr}")
    xp = backend.get_xp(images)
    signal_var = float(xp.mean(xp.var(images.reshape(images.shape[0], -1), axis=1)))
    sigma = (signal_var / snr) ** 0.5
    if xp is np:
        noise = np.random.default_rng(seed).standard_normal(images.shape, dtype=np.float32)
    else:
        noise = xp.random.default_rng(seed).standard_normal(images.shape, dtype=xp.float32)
    return (images + sigma * noise).astype(xp.float32, copy=False), sigma


def make_particles(volume, n: int, *, pixel_size_A: float, snr=None, ctf: bool = True, max_shift_px: float = 0,
                   seed: int = 0, defocus_range_A=(10000, 25000), voltage_kV: float = CTF_DEFAULTS["voltage_kV"],
                   cs_mm: float = CTF_DEFAULTS["cs_mm"], amplitude_contrast: float = CTF_DEFAULTS["amplitude_contrast"],
                   astigmatism_A: float = 500.0, pad: float = 2,
                   batch_size: int = 256):
    """Particle images of ``volume`` at random orientations, with CTF, shifts and noise, and their truth.

    Parameters
    ----------
    volume : ``(N, N, N)`` density (NumPy or CuPy; the images are computed and returned on its device).
    n : number of particles.
    pixel_size_A : Å per pixel (for the CTF and the origins in Å).
    snr : signal variance / noise variance over the box (None: no noise).
    ctf : apply RELION's CTF (random defocus per particle) when True.
    max_shift_px : shifts drawn uniformly in ``[-max, max]`` pixels on x and y.
    seed : random seed (same seed, same particles and truth).
    defocus_range_A : (min, max) of defocus U in Å; V = U - uniform(0, astigmatism_A).
    voltage_kV, cs_mm, amplitude_contrast : microscope (scalars).
    pad : Fourier projector padding. batch_size : particles per projection batch.

    Returns
    -------
    images : ``(n, N, N)`` float32.
    truth : dict of NumPy arrays ``(n,)`` unless stated: ``rot``, ``tilt``, ``psi`` (degrees),
        ``matrices`` ``(n, 3, 3)`` (``euler_to_matrix(rot, tilt, psi)``), ``origin_x_A``, ``origin_y_A``
        (RELION: shifting the image by ``+origin / pixel_size`` centres the particle), ``shifts_px``
        ``(n, 2)`` (the displacement of the content, ``= -origin / pixel_size``), ``defocus_u_A``,
        ``defocus_v_A``, ``defocus_angle_deg``, ``subset`` (1, 2, 1, 2, ...), and scalars
        ``voltage_kV``, ``cs_mm``, ``amplitude_contrast``, ``phase_shift_deg`` (0), ``pixel_size_A``,
        ``ctf`` (bool), ``snr``, ``noise_sigma`` (0 without noise).
    """
    if n < 1:
        raise InputError(f"number of particles must be >= 1, got {n}")
    if pixel_size_A <= 0:
        raise InputError(f"pixel size must be positive, got {pixel_size_A} Å")
    lo, hi = float(defocus_range_A[0]), float(defocus_range_A[1])
    if not 0 < lo <= hi:
        raise InputError(f"defocus range must satisfy 0 < min <= max (Å), got {defocus_range_A}")
    xp = backend.get_xp(volume)
    rng = np.random.default_rng(seed)
    rot, tilt, psi = matrix_to_euler(random_rotations(n, rng))
    mats = euler_to_matrix(rot, tilt, psi)
    shifts = rng.uniform(-1.0, 1.0, (n, 2)) * float(max_shift_px)  # always drawn: same seed, same angles/defoci
    du = rng.uniform(lo, hi, n)
    dv = du - rng.uniform(0.0, astigmatism_A, n)
    dang = rng.uniform(0.0, 180.0, n)
    projector = FourierProjector(volume, pad=pad)
    box = projector.box
    images = xp.empty((n, box, box), dtype=xp.float32)
    for start in range(0, n, batch_size):
        sl = slice(start, min(n, start + batch_size))
        c = None
        if ctf:
            c = ctf_2d(box, pixel_size_A, du[sl], dv[sl], dang[sl], voltage_kV=voltage_kV, cs_mm=cs_mm,
                       amplitude_contrast=amplitude_contrast, xp=xp)
        images[sl] = projector.project(xp.asarray(mats[sl]), shifts_px=xp.asarray(shifts[sl]), ctf=c)
    sigma = 0.0
    if snr is not None:
        images, sigma = add_noise_at_snr(images, snr, seed=seed + 1)
    truth = {
        "rot": rot, "tilt": tilt, "psi": psi, "matrices": mats,
        "origin_x_A": -shifts[:, 0] * pixel_size_A, "origin_y_A": -shifts[:, 1] * pixel_size_A,
        "shifts_px": shifts,
        "defocus_u_A": du, "defocus_v_A": dv, "defocus_angle_deg": dang,
        "voltage_kV": float(voltage_kV), "cs_mm": float(cs_mm), "amplitude_contrast": float(amplitude_contrast),
        "phase_shift_deg": 0.0, "pixel_size_A": float(pixel_size_A), "ctf": bool(ctf),
        "subset": (np.arange(n) % 2 + 1).astype(np.int64),
        "snr": snr, "noise_sigma": float(sigma),
    }
    return images, truth


try:  # movies are written by another module; re-export them when present
    from .synthetic_movies import *  # noqa: F401,F403,E402
except ImportError:  # pragma: no cover
    pass


def two_resolution_half_maps(box: int, *, pixel_size_A: float, resolutions_A=(4.0, 7.5), snr: float = 1.0,
                             seed: int = 0):
    """Half maps of a particle in solvent whose two sides have known, different resolutions.

    The particle is :func:`phantom_volume` plus a white texture inside it (so that its spectrum
    does not fade before the cut-offs); side A (x < box/2) keeps frequencies up to
    ``1/resolutions_A[0]`` Å⁻¹, side B (x >= box/2) up to ``1/resolutions_A[1]`` (sharp spherical
    cut-offs, so the true resolution of each side is its cut-off), blended over a few px at
    x = box/2. Each half adds independent white noise over the whole box; ``snr`` is the ratio of
    the texture's to the noise's variance per voxel inside the particle (the spectral SNR below
    the cut-off, FSC ≈ snr/(1+snr)).

    Returns
    -------
    half1, half2 : (box, box, box) float32, (z, y, x)
    region : (box, box, box) int8
        0 solvent, 1 side A, 2 side B, -1 the rest of the particle: the blend zone
        (|x - box/2| < box/8) and the rim (radius > 0.4 box - 2 px). Truth is clear in 1 and 2.
    """
    rng = np.random.default_rng(seed)
    n = int(box)
    body = phantom_volume(n, seed=seed)
    support = body > 0.02
    texture = rng.standard_normal((n, n, n)) * support
    density = body / max(float(body[support].std()), 1e-6) + texture
    spec = np.fft.rfftn(density)
    axes = [np.fft.fftfreq(n)] * 2 + [np.fft.rfftfreq(n)]
    k = np.sqrt(axes[0][:, None, None] ** 2 + axes[1][None, :, None] ** 2 + axes[2][None, None, :] ** 2)
    k_A = k / pixel_size_A
    side = [np.fft.irfftn(spec * (k_A <= 1.0 / d), s=(n, n, n)) for d in resolutions_A]
    x = np.arange(n) - n / 2.0 + 0.5
    weight_a = 0.5 - 0.5 * np.tanh(x / 2.0)
    signal = weight_a * side[0] + (1.0 - weight_a) * side[1]
    noise_sd = 1.0 / math.sqrt(snr)
    h1 = (signal + noise_sd * rng.standard_normal(signal.shape)).astype(np.float32)
    h2 = (signal + noise_sd * rng.standard_normal(signal.shape)).astype(np.float32)
    r = np.sqrt(sum(g ** 2 for g in np.meshgrid(*[np.arange(n) - n // 2] * 3, indexing="ij")))
    inner = r < 0.4 * n - 2
    region = np.zeros((n, n, n), dtype=np.int8)
    region[support] = -1
    core = support & inner & (np.abs(x) >= n / 8.0)[None, None, :]
    region[core & (x < 0)[None, None, :]] = 1
    region[core & (x > 0)[None, None, :]] = 2
    return h1, h2, region
