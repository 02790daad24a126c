"""Projection matching: global polar-Fourier search over a sphere sampling, then local refinement.

Global search (one level)
-------------------------
For every projection direction ``j`` of ``sphere_sampling(step, sym)`` the central slice of the
reference's transform is sampled on polar rings ``r = r_min .. r0`` with ``n_theta`` angles
(:class:`~xmipp_accel.gpu.align.polar.CentralSlicer`) and Fourier transformed along the angle,
``P_j(r, m)``. Each particle's spectrum is sampled on the same rings, multiplied by its CTF
(matched filter: ``<X, C P> = <C X, P>`` because the CTF is real, so one CTF-free gallery serves
every particle), shifted by each origin ``t`` of a grid (a phase factor) and transformed along the
angle, ``X_it(r, m)``. The correlation for every in-plane angle at once is then::

    c_ijt(psi) = sum_r r sum_theta X_it(r, theta) conj P_j(r, theta + psi)
               = irfft_m( sum_r r conj(X_it(r, m)) P_j(r, m) )

i.e. one batched complex GEMM per angular frequency ``m`` (rows = particle x origin, columns =
directions, inner dimension = rings) followed by a real inverse FFT along ``m`` and a maximum over
``psi``. It is normalised by ``|X_i| |C_i P_j|`` where the second norm uses ring averages of
``C_i^2`` (``sum_r r <C_i^2>_theta(r) sum_theta |P_j(r, theta)|^2``, a small GEMM), which ignores
only the correlation between astigmatism and the projection's anisotropy. A particle batch keeps
its best ``n_candidates`` directions, separated by at least two steps.

FLOPs of the global search: ``8 n_r (n_theta/2+1)`` per (particle, origin, direction) for the GEMM
plus ``~2.5 n_theta log2 n_theta`` for the inverse FFT (:func:`.search_plan.global_search_flops`; the
search's sizes, memory budget and CTF values are planned in :mod:`.search_plan`).

Then :func:`~xmipp_accel.gpu.align.refine.refine_candidates` refines each candidate locally
(3 x 3 x 3 rotations x 3 x 3 origins per level, step halving, cut-off growing to ``max_res``), the
best candidate after the first level is kept, and sub-step parabolic interpolation ends it.

Pose convention: the particle is the projection along ``A = R_z(psi) A_j`` (:mod:`em.geometry`),
shifted so that moving it by ``+origin`` pixels centres it (RELION ``rlnOriginX/Y``).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional, Sequence, Tuple

import numpy as np

from ...constants import CTF_IMAGES_NORMAL
from ...em.geometry import euler_to_matrix, matrix_to_euler
from ... import backend
from ...threads import fft_workers, map_in_order
from .polar import (CentralSlicer, angular_spectrum, centred_rfft2, good_size, halfplane_points,
                    oversampled_spectrum, polar_points, polar_samples_hermitian, sample_rfft, shift_phases)
from .refine import RefineLevel, refine_candidates
from .search_plan import CTF_MODES, ctf_values, default_batch_size, memory_budget_bytes, plan_search

__all__ = ["AlignmentResult", "ProjectionMatcher", "align_in_batches", "CTF_MODES"]

logger = logging.getLogger(__name__)

_PAD = 2


@dataclass
class AlignmentResult:
    """Poses assigned to particles (host arrays).

    Attributes
    ----------
    matrices : (n, 3, 3) float64 rotations (projection along ``A``).
    origins_px : (n, 2) float64 (x, y) origins in pixels (RELION: shifting the image by +origin centres it).
    score : (n,) float64 normalised cross-correlation with the CTF-modulated projection, in [-1, 1].
    extra : per-particle arrays added by callers (e.g. DeepAlign's consensus).
    """
    matrices: np.ndarray
    origins_px: np.ndarray
    score: np.ndarray
    extra: dict = field(default_factory=dict)

    @property
    def angles_deg(self) -> np.ndarray:
        """(n, 3) (rot, tilt, psi) in degrees."""
        rot, tilt, psi = matrix_to_euler(self.matrices)
        return np.stack([np.atleast_1d(rot), np.atleast_1d(tilt), np.atleast_1d(psi)], 1)

    @staticmethod
    def concatenate(parts: Sequence[AlignmentResult]) -> AlignmentResult:
        keys = set(parts[0].extra) if parts else set()
        return AlignmentResult(np.concatenate([p.matrices for p in parts]),
                               np.concatenate([p.origins_px for p in parts]),
                               np.concatenate([p.score for p in parts]),
                               {k: np.concatenate([p.extra[k] for p in parts]) for k in keys})


# ------------------------------------------------------------------------------------------------------------
# Matcher
# ------------------------------------------------------------------------------------------------------------

class ProjectionMatcher:
    """Projection matching of particles against a reference map.

    Parameters
    ----------
    reference : (N, N, N) map, numpy or cupy (the search runs on its device), same box and pixel
        size as the particles.
    pixel_size_A : pixel size of particles and map (Å).
    sym : symmetry group (the global gallery covers its asymmetric unit).
    step_deg, max_res_A, max_shift_px, n_refine_levels : see :func:`plan_search`.
    n_candidates : directions kept per particle after the global search.
    ctf_mode : how the images carry the CTF (see :func:`ctf_values`).
    directions : optional (rot, tilt) arrays (degrees) replacing ``sphere_sampling(step, sym)``.
    whiten : weight frequencies by the inverse of the particles' mean power on their ring (set from the
        first batch, or by :meth:`set_whitening`): noise whitening at low SNR, equal weight of the rings
        at high SNR, where the low frequencies would otherwise make every pose score near 1.

    Examples
    --------
    >>> m = ProjectionMatcher(volume, pixel_size_A=2.0, step_deg=3.0)   # doctest: +SKIP
    >>> res = m.align(images, ctf)                                     # doctest: +SKIP
    >>> res.angles_deg, res.origins_px, res.score                       # doctest: +SKIP
    """

    def __init__(self, reference, *, pixel_size_A: float, sym: str = "c1", step_deg: float = 3.0,
                 max_res_A: Optional[float] = None, max_shift_px: Optional[float] = None,
                 n_refine_levels: int = 3, n_candidates: int = 3, ctf_mode: str = CTF_IMAGES_NORMAL,
                 directions: Optional[Tuple[np.ndarray, np.ndarray]] = None, whiten: bool = True):
        xp = backend.get_xp(reference)
        self.xp = xp
        box = int(reference.shape[-1])
        if reference.ndim != 3 or any(int(s) != box for s in reference.shape):
            raise ValueError(f"reference must be a cube (N, N, N), got shape {tuple(reference.shape)}")
        if ctf_mode not in CTF_MODES:
            raise ValueError(f"unknown CTF mode {ctf_mode!r}: choose one of {', '.join(CTF_MODES)}")
        self.plan = plan_search(box, pixel_size_A, step_deg=step_deg, max_res_A=max_res_A,
                                max_shift_px=max_shift_px, n_refine_levels=n_refine_levels)
        self.reference = reference
        self.sym = sym
        self.ctf_mode = ctf_mode
        self.n_candidates = int(max(1, n_candidates))
        self.slicer = CentralSlicer(reference, r_max=max(self.plan.r_res, self.plan.r0))
        if directions is None:
            from ...em.sampling import sphere_sampling
            rot, tilt = sphere_sampling(step_deg, sym)
        else:
            rot, tilt = directions
        self.rot = np.asarray(rot, dtype=np.float64).reshape(-1)
        self.tilt = np.asarray(tilt, dtype=np.float64).reshape(-1)
        if self.rot.size == 0:
            raise ValueError("no projection directions to search")
        self.dir_matrices = euler_to_matrix(self.rot, self.tilt, np.zeros_like(self.rot))
        self._gallery = None
        self.whiten = bool(whiten)
        self.ring_power: Optional[np.ndarray] = None
        self._dir_vectors = xp.asarray(self.dir_matrices[:, 2, :], dtype=xp.float32)

    # -- gallery -------------------------------------------------------------------------------------------
    @property
    def n_directions(self) -> int:
        return int(self.rot.size)

    def gallery(self):
        """Angular spectra of the reference's central slices (complex64 (n_m, n_r, J)) and ring powers (n_r, J)."""
        if self._gallery is None:
            xp, plan = self.xp, self.plan
            n_r = len(plan.radii)
            spec = xp.empty((plan.n_theta // 2 + 1, n_r, self.n_directions), dtype=xp.complex64)
            power = xp.empty((n_r, self.n_directions), dtype=xp.float32)
            step = max(1, (1 << 22) // (n_r * plan.n_theta))
            for s in range(0, self.n_directions, step):
                e = min(self.n_directions, s + step)
                mats = self.dir_matrices[s:e]
                pol = polar_samples_hermitian(lambda kx, ky, m=mats: self.slicer.sample(m, kx, ky), plan.radii,
                                              plan.n_theta)
                power[:, s:e] = (pol.real ** 2 + pol.imag ** 2).sum(-1).T
                spec[:, :, s:e] = angular_spectrum(pol, plan.n_theta).transpose(2, 1, 0)
            self._gallery = (spec, power)
        return self._gallery

    # -- frequency weights ---------------------------------------------------------------------------------
    def set_whitening(self, images, ctf=None, *, n_sim: int = 64, seed: int = 0) -> np.ndarray:
        """Set the frequency weights from particles (n, N, N) and their CTFs.

        The particles' mean power per ring is fitted as ``D(r) = a^2 S(r) + s^2`` where ``S`` is the power of
        CTF-modulated central slices of the reference at random orientations; the noise power is
        ``N(r) = max(D - a^2 S, s^2 / 10, D / 1000)`` and the weights ``1 / (N(r) + beta a^2 S(r))`` with
        ``beta = 0.03``: inverse noise power (the matched filter for coloured noise) where the noise
        dominates, equal weight of the rings where the signal does (otherwise the low frequencies make
        every pose score near 1 and the coarse search loses the true basin).
        """
        xp, plan = self.xp, self.plan
        box = plan.box
        n_sh = int(math.ceil(plan.r_res)) + 3
        kx, ky = halfplane_points(0.5, n_sh - 1)
        rad = np.hypot(kx, ky)
        shell = np.rint(rad).astype(np.int64)
        f = centred_rfft2(xp.asarray(images, dtype=xp.float32))
        p_data = backend.to_host((f.real ** 2 + f.imag ** 2).mean(0)).astype(np.float64)[ky % box, kx]
        from ...em.sampling import random_rotations
        mats = random_rotations(n_sim, np.random.default_rng(seed))
        sl = self.slicer.sample(mats, kx, ky)
        p_sim = sl.real ** 2 + sl.imag ** 2
        if ctf is not None:
            n = int(np.asarray(ctf["defocus_u_A"]).size)
            pick = np.arange(n_sim) % n
            sub = {k: (np.asarray(v)[pick] if np.ndim(v) else v) for k, v in ctf.items()}
            c = ctf_values(sub, kx, ky, box=box, pixel_size_A=plan.pixel_size_A, xp=xp, mode=self.ctf_mode)
            p_sim = p_sim * c * c
        p_sim = backend.to_host(p_sim.mean(0)).astype(np.float64)
        cnt = np.maximum(np.bincount(shell, minlength=n_sh), 1)
        d = np.bincount(shell, weights=p_data, minlength=n_sh) / cnt
        sim = np.bincount(shell, weights=p_sim, minlength=n_sh) / cnt
        use = slice(max(1, int(plan.r_min)), n_sh - 1)
        a_mat = np.stack([sim[use], np.ones_like(sim[use])], 1)
        (a2, s2), *_ = np.linalg.lstsq(a_mat, d[use], rcond=None)
        if a2 <= 0:
            a2, s2 = 0.0, float(d[use].mean())
        s2 = max(float(s2), 0.0)
        noise = np.maximum.reduce([d - a2 * sim, np.full_like(d, 0.1 * s2), 1e-3 * d])
        self.ring_power = np.maximum(noise + 0.03 * a2 * sim, 1e-30)
        self.noise_fit = {"signal_scale": float(np.sqrt(a2)), "white_noise_power": s2}
        return self.ring_power

    def ring_weight(self, radius):
        """Weight of frequencies at ``radius`` (cycles per box, host array): 1 / ring power, or 1 without whitening."""
        r = np.asarray(radius, dtype=np.float64)
        if not self.whiten or self.ring_power is None:
            return np.ones_like(r)
        w = 1.0 / np.interp(r, np.arange(self.ring_power.size), self.ring_power)
        return w / w.max()

    def _ensure_whitening(self, images, ctf) -> None:
        if self.whiten and self.ring_power is None:
            self.set_whitening(images, ctf)

    # -- particles -----------------------------------------------------------------------------------------
    def _polar_particles(self, images, ctf):
        """CTF-filtered, ring-weighted polar samples (B, n_r, n_theta), |X|^2 (B,) and ring <C^2> (B, n_r)."""
        xp, plan = self.xp, self.plan
        spec = oversampled_spectrum(images, box_work=self.box_work, pad=_PAD)
        kx, ky = polar_points(plan.radii, plan.n_theta)
        n_r = len(plan.radii)
        pol = polar_samples_hermitian(lambda x, y: sample_rfft(spec, x, y, pad=_PAD), plan.radii, plan.n_theta)
        w = xp.asarray(plan.radii * self.ring_weight(plan.radii), dtype=xp.float32)[None, :, None]
        norm2 = (w * (pol.real ** 2 + pol.imag ** 2)).sum((1, 2))
        c = ctf_values(ctf, kx, ky, box=plan.box, pixel_size_A=plan.pixel_size_A, xp=xp, mode=self.ctf_mode)
        if c is not None:
            c = c.reshape(-1, n_r, plan.n_theta)
            c2 = (c * c).mean(-1)
            pol = pol * c
        else:
            c2 = xp.ones((pol.shape[0], n_r), dtype=xp.float32)
        return (pol * w).astype(xp.complex64), norm2, c2 * w[:, :, 0]

    @property
    def box_work(self) -> int:
        """Box (pixels) the particles are Fourier-cropped to before the polar sampling of the global search."""
        plan = self.plan
        return min(plan.box + plan.box % 2, good_size(2 * math.ceil(plan.r0) + 8))

    # -- global search -------------------------------------------------------------------------------------
    def global_search(self, images, ctf=None, *, allowed: Optional[Sequence[Tuple[np.ndarray, np.ndarray]]] = None,
                      n_candidates: Optional[int] = None):
        """Best directions of a particle batch over the gallery.

        Parameters
        ----------
        images : (B, N, N) float32 on the matcher's device.
        ctf : CTF parameters of the batch (see :func:`ctf_values`) or None.
        allowed : optional blocks ``(particle_indices, direction_indices)``: only these pairs are
            computed (DeepAlign's restriction to recognised regions). Default: everything.
        n_candidates : directions kept per particle.

        Returns
        -------
        matrices (B, k, 3, 3) float32, origins_px (B, k, 2) float32, scores (B, k) float32
        (``-inf`` where fewer than ``k`` directions were allowed).
        """
        xp, plan = self.xp, self.plan
        k = int(n_candidates or self.n_candidates)
        nb = images.shape[0]
        self._ensure_whitening(images, ctf)
        spec, power = self.gallery()
        n_m, n_r, n_dir = spec.shape
        pol, norm2, c2w = self._polar_particles(images, ctf)
        shifts = plan.shift_grid
        n_t = shifts.shape[0]
        kx, ky = polar_points(plan.radii, plan.n_theta)
        ph = shift_phases(xp.asarray(kx), xp.asarray(ky), xp.asarray(shifts), plan.box).reshape(n_t, n_r, plan.n_theta)
        best = xp.full((nb, n_dir), -np.inf, dtype=xp.float32)
        best_psi = xp.zeros((nb, n_dir), dtype=xp.int32)
        best_t = xp.zeros((nb, n_dir), dtype=xp.int32)
        if allowed is None:
            allowed = [(np.arange(nb), np.arange(n_dir))]
        budget = memory_budget_bytes(xp)
        per_triple = n_m * 8 * 2 + plan.n_theta * 4 * 3
        for p_idx, d_idx in allowed:
            p_idx = np.asarray(p_idx, dtype=np.int64)
            d_idx = np.asarray(d_idx, dtype=np.int64)
            if p_idx.size == 0 or d_idx.size == 0:
                continue
            rows_per = max(1, budget // (per_triple * max(1, min(d_idx.size, 4096))))
            pb = max(1, rows_per // n_t)
            for ps in range(0, p_idx.size, pb):
                pi = p_idx[ps:ps + pb]
                pi_x = xp.asarray(pi)
                xs = pol[pi_x][:, None] * ph[None]                                   # (b, T, n_r, n_theta)
                xh = xp.conj(angular_spectrum(xs, plan.n_theta))                      # (b, T, n_r, n_m)
                xh = xh.reshape(-1, n_r, n_m).transpose(2, 0, 1)                      # (n_m, b*T, n_r)
                xh = xp.ascontiguousarray(xh)
                dchunk = max(1, budget // (per_triple * xh.shape[1]))
                for ds in range(0, d_idx.size, dchunk):
                    di = d_idx[ds:ds + dchunk]
                    di_x = xp.asarray(di)
                    g = spec[:, :, di_x] if di.size != n_dir else spec
                    y = xp.matmul(xh, g)                                              # (n_m, b*T, J)
                    c = _irfft_last(xp.ascontiguousarray(y.transpose(1, 2, 0)), plan.n_theta)  # (b*T, J, n_theta)
                    del y
                    carg = c.argmax(axis=-1)
                    cmax = xp.take_along_axis(c, carg[..., None], axis=-1)[..., 0]
                    carg = carg.astype(xp.int32)
                    del c
                    cmax = cmax.reshape(pi.size, n_t, di.size)
                    carg = carg.reshape(pi.size, n_t, di.size)
                    targ = cmax.argmax(axis=1)                                        # (b, J)
                    val = xp.take_along_axis(cmax, targ[:, None, :], axis=1)[:, 0]
                    psi_i = xp.take_along_axis(carg, targ[:, None, :], axis=1)[:, 0]
                    den = xp.matmul(c2w[pi_x], power[:, di_x])                        # (b, J)
                    den = xp.sqrt(xp.maximum(den, 1e-30) * xp.maximum(norm2[pi_x], 1e-30)[:, None])
                    score = val / den
                    best[pi_x[:, None], di_x[None, :]] = score
                    best_psi[pi_x[:, None], di_x[None, :]] = psi_i
                    best_t[pi_x[:, None], di_x[None, :]] = targ.astype(xp.int32)
        return self._select_candidates(best, best_psi, best_t, k)

    def _select_candidates(self, best, best_psi, best_t, k):
        """Top-k directions per particle, each at least two steps from those chosen before it."""
        xp, plan = self.xp, self.plan
        nb = best.shape[0]
        work = best.copy()
        rows = xp.arange(nb)
        cos_sep = math.cos(math.radians(2.0 * plan.step_deg))
        idx = []
        for _ in range(min(k, best.shape[1])):
            j = xp.argmax(work, axis=1)
            idx.append(j)
            near = xp.matmul(self._dir_vectors[j], self._dir_vectors.T) > cos_sep      # (B, J)
            work = xp.where(near, -np.inf, work)
        idx = xp.stack(idx, 1)                                                          # (B, k)
        scores = best[rows[:, None], idx]
        psi_deg = best_psi[rows[:, None], idx].astype(xp.float32) * (360.0 / plan.n_theta)
        shifts = xp.asarray(plan.shift_grid, dtype=xp.float32)[best_t[rows[:, None], idx]]
        dirs = xp.asarray(self.dir_matrices, dtype=xp.float32)[idx]                     # (B, k, 3, 3)
        rz = _rz(psi_deg, xp)
        mats = xp.matmul(rz, dirs)
        return mats, shifts, scores

    # -- full alignment ------------------------------------------------------------------------------------
    def refine(self, images, ctf, matrices, origins_px, levels: Optional[Sequence[RefineLevel]] = None):
        """Local refinement of candidates (see :func:`refine_candidates`); returns mats, origins, scores."""
        xp, plan = self.xp, self.plan
        levels = plan.refine if levels is None else levels
        self._ensure_whitening(images, ctf)
        spectra = centred_rfft2(xp.asarray(images, dtype=xp.float32)).astype(xp.complex64)

        def ctf_fn(kx, ky):
            return ctf_values(ctf, kx, ky, box=plan.box, pixel_size_A=plan.pixel_size_A, xp=xp, mode=self.ctf_mode)

        return refine_candidates(self.slicer, spectra, ctf_fn if ctf is not None else None, matrices, origins_px,
                                 levels=levels, r_min=plan.r_min, box=plan.box, max_shift_px=plan.max_shift_px,
                                 weight_fn=self.ring_weight,
                                 max_items_points=(1 << 24) if xp is not np else (1 << 21))

    def align_batch(self, images, ctf=None, *, allowed=None) -> AlignmentResult:
        """Global search, refinement of the candidates (first level), then of the best one (other levels)."""
        xp = self.xp
        images = xp.asarray(images, dtype=xp.float32)
        mats, origins, scores = self.global_search(images, ctf, allowed=allowed)
        return self.refine_from_candidates(images, ctf, mats, origins, scores)

    def refine_from_candidates(self, images, ctf, mats, origins, scores) -> AlignmentResult:
        """Refine candidates ``(B, k, ...)`` and keep the best per particle."""
        xp, plan = self.xp, self.plan
        nb = images.shape[0]
        rows = xp.arange(nb)
        levels = plan.refine
        if levels:
            valid = xp.isfinite(scores)
            mats, origins, sc1 = self.refine(images, ctf, mats, origins, levels[:1])
            sc1 = xp.where(valid, sc1, -np.inf)
            b = xp.argmax(sc1, axis=1)
            mats, origins, scores = mats[rows, b][:, None], origins[rows, b][:, None], sc1[rows, b][:, None]
            if len(levels) > 1:
                mats, origins, scores = self.refine(images, ctf, mats, origins, levels[1:])
        else:
            b = xp.argmax(scores, axis=1)
            mats, origins, scores = mats[rows, b][:, None], origins[rows, b][:, None], scores[rows, b][:, None]
        m = backend.to_host(mats[:, 0]).astype(np.float64)
        m = _orthonormalise(m)
        return AlignmentResult(m, backend.to_host(origins[:, 0]).astype(np.float64),
                               backend.to_host(scores[:, 0]).astype(np.float64))

    def align(self, images, ctf: Optional[Mapping[str, np.ndarray]] = None, *, batch_size: Optional[int] = None,
              progress: Optional[Callable[[int], None]] = None) -> AlignmentResult:
        """Align a stack ``(n, N, N)`` (host or device) in batches; returns host arrays.

        ``ctf`` holds arrays of length n (see :func:`ctf_values`); ``progress(k)`` is called with the
        number of particles done after each batch.
        """
        return align_in_batches(self.align_batch, images, ctf, int(batch_size or self.default_batch_size()),
                                progress)

    def default_batch_size(self) -> int:
        """Particles per batch: GPU 512 (bounded by memory), CPU 128 (see :func:`.search_plan.default_batch_size`)."""
        return default_batch_size(self.plan.box, self.n_directions, self.xp)


def _irfft_last(y, n: int):
    """Real inverse FFT of length ``n`` along the last axis (float32 kept on the CPU)."""
    xp = backend.get_xp(y)
    if xp is np:
        import scipy.fft as sfft
        return sfft.irfft(y, n=n, axis=-1, workers=fft_workers())
    return xp.fft.irfft(y, n=n, axis=-1)


def _rz(psi_deg, xp):
    """In-plane rotations ``R_z(psi)`` of :func:`euler_to_matrix` (rot = tilt = 0), shape psi.shape + (3, 3)."""
    p = xp.deg2rad(psi_deg)
    c, s = xp.cos(p), xp.sin(p)
    z, o = xp.zeros_like(c), xp.ones_like(c)
    return xp.stack([xp.stack([c, s, z], -1), xp.stack([-s, c, z], -1), xp.stack([z, z, o], -1)], -2)


def _orthonormalise(m: np.ndarray) -> np.ndarray:
    """Nearest rotation matrices (SVD) of nearly orthogonal ones, (n, 3, 3) float64."""
    u, _, vt = np.linalg.svd(m)
    r = u @ vt
    det = np.linalg.det(r)
    u[det < 0, :, -1] *= -1
    return u @ vt


def map_batches(fn: Callable[[int, int], object], n: int, batch_size: int, *, workers: int = 1,
                progress: Optional[Callable[[int], None]] = None) -> list:
    """``[fn(s, e) for each batch [s, e) of range(n)]`` in order, ``workers`` batches at once on threads when
    more than one (the NumPy path: its element-wise work releases the GIL; inside the threads FFTs and BLAS are
    single-threaded, :func:`xmipp_accel.threads.map_in_order`); the results are the same and in the same
    order. ``progress(k)`` is called with the particles done after each batch. ``fn`` must not build caches
    lazily when it runs on threads."""
    ranges = [(s, min(n, s + batch_size)) for s in range(0, n, batch_size)]
    out = []
    for (s, e), result in zip(ranges, map_in_order(lambda r: fn(*r), ranges, min(int(workers), len(ranges)),
                                                   ahead=len(ranges))):
        out.append(result)
        if progress is not None:
            progress(e - s)
    return out


def align_in_batches(align_batch: Callable, images, ctf, batch_size: int,
                     progress: Optional[Callable[[int], None]] = None, *, workers: int = 1) -> AlignmentResult:
    """Run ``align_batch(images[s:e], ctf[s:e])`` over consecutive batches and concatenate the results.

    ``ctf`` holds per-particle arrays of length n (scalars are passed through); ``progress(k)`` is called
    with the number of particles done after each batch; ``workers`` as :func:`map_batches`.
    """
    def one(s: int, e: int):
        sub = None if ctf is None else {k: np.asarray(v)[s:e] if np.ndim(v) else v for k, v in ctf.items()}
        return align_batch(images[s:e], sub)
    parts = map_batches(one, images.shape[0], batch_size, workers=workers, progress=progress)
    return AlignmentResult.concatenate(parts)
