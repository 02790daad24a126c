"""Local refinement of orientations and shifts around candidate poses (coarse to fine).

Each level searches, around every candidate rotation ``A`` and origin ``o``, the 27 rotations
``exp([a, b, c]_x) A`` with ``a, b, c in {-1, 0, 1} x step`` (small rotations about the axes of the
projection frame: two tilts of the projection direction and the in-plane angle) and the 9 origins
``o + {-1, 0, 1}^2 x shift_step``, at a frequency cut-off that grows as the step shrinks. The step
halves from level to level, so a level corrects an error of up to 1.5 steps of its own. After the
last level a parabola through the neighbours along each axis gives sub-step angles and shifts.

Scores are normalised cross-correlations between the particle and the CTF-modulated projection
over the half-plane of integer frequencies ``r_min <= |k| <= r_max`` of the particle's own DFT
(no interpolation on the particle side), with central-slice samples of the map from
:class:`~xmipp_accel.gpu.align.polar.CentralSlicer`::

    score = Re <X, C P>_w / (|X|_w |C P|_w),   <a, b>_w = sum_k w(|k|) a(k) conj b(k)

with optional frequency weights ``w`` (the matcher's whitening: inverse mean power of the particles
on each ring; 1 without).

Everything is batched: items (particle x candidate) x 27 rotations x K frequencies, one gather of
the map's transform and one batched real GEMM (``(9, 2K) @ (2K, 27)`` per item) per level.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import numpy as np

from ... import backend
from .polar import CentralSlicer, halfplane_points, shift_phases

__all__ = ["RefineLevel", "local_rotations", "gather_halfplane", "refine_candidates"]

_OFFSETS_3 = np.array([-1.0, 0.0, 1.0])


@dataclass(frozen=True)
class RefineLevel:
    """One level of local refinement.

    Attributes
    ----------
    step_deg : angular step of the 3 x 3 x 3 rotation grid, degrees.
    r_max : frequency cut-off, cycles per box.
    shift_step_px : step of the 3 x 3 origin grid, pixels.
    """
    step_deg: float
    r_max: float
    shift_step_px: float


def rotation_vectors_to_matrices(v: np.ndarray) -> np.ndarray:
    """Rotation matrices ``exp([v]_x)`` (Rodrigues) for rotation vectors ``v`` (n, 3) in radians."""
    v = np.asarray(v, dtype=np.float64).reshape(-1, 3)
    th = np.linalg.norm(v, axis=1)
    k = np.zeros_like(v)
    nz = th > 0
    k[nz] = v[nz] / th[nz, None]
    kx, ky, kz = k.T
    z = np.zeros_like(kx)
    kmat = np.stack([np.stack([z, -kz, ky], -1), np.stack([kz, z, -kx], -1), np.stack([-ky, kx, z], -1)], 1)
    s, c = np.sin(th)[:, None, None], np.cos(th)[:, None, None]
    return np.eye(3)[None] + s * kmat + (1 - c) * (kmat @ kmat)


def local_rotations(step_deg: float) -> np.ndarray:
    """The 27 rotations ``exp([a, b, c]_x)``, ``a, b, c in {-1, 0, 1} * step``; (27, 3, 3) float64.

    Index ``q = 9 * ia + 3 * ib + ic`` with ``i* in {0, 1, 2}`` for offsets ``{-1, 0, 1}``.
    """
    g = np.deg2rad(step_deg) * _OFFSETS_3
    v = np.stack(np.meshgrid(g, g, g, indexing="ij"), -1).reshape(-1, 3)
    return rotation_vectors_to_matrices(v)


def gather_halfplane(spectra, kx, ky):
    """Values of centred rfft spectra ``(n, N, N//2+1)`` at integer half-plane frequencies; (n, K)."""
    xp = backend.get_xp(spectra)
    n_y = spectra.shape[-2]
    idx = xp.asarray((np.asarray(ky) % n_y) * spectra.shape[-1] + np.asarray(kx))
    return spectra.reshape(spectra.shape[0], -1)[:, idx]


def _parabolic_offset(sm, s0, sp):
    """Vertex of the parabola through (-1, sm), (0, s0), (1, sp), clipped to [-0.5, 0.5]."""
    den = sm - 2.0 * s0 + sp
    off = np.where(den < 0, 0.5 * (sm - sp) / np.where(den < 0, den, -1.0), 0.0)
    return np.clip(off, -0.5, 0.5)


def _score_level(slicer: CentralSlicer, x_k, c_k, w_k, mats, origins, kx, ky, box: int, rots, shift_step: float,
                 max_shift_px: float):
    """Scores of 27 rotations x 9 origins around each item; returns (scores (I, 9, 27), new mats, new origins)."""
    xp = slicer.xp
    n_items = mats.shape[0]
    rots_x = xp.asarray(rots, dtype=xp.float32)
    new_mats = xp.matmul(rots_x[None], mats[:, None])                         # (I, 27, 3, 3)
    grid = np.stack(np.meshgrid(_OFFSETS_3, _OFFSETS_3, indexing="ij"), -1).reshape(-1, 2)  # (9, 2) (ix, iy)
    offs = origins[:, None, :] + xp.asarray(grid * shift_step, dtype=xp.float32)[None]     # (I, 9, 2)
    if max_shift_px is not None and np.isfinite(max_shift_px):
        norm = xp.sqrt((offs ** 2).sum(-1, keepdims=True))
        offs = xp.where(norm > max_shift_px, offs * (max_shift_px / xp.maximum(norm, 1e-12)), offs)
    refs = slicer.sample(new_mats.reshape(-1, 3, 3), kx, ky).reshape(n_items, 27, -1)   # (I, 27, K)
    z = ((c_k * w_k) * x_k) if c_k is not None else w_k * x_k                         # (I, K)
    zs = z[:, None, :] * shift_phases(kx, ky, offs, box)                              # (I, 9, K)
    zs_ri = xp.concatenate([zs.real, zs.imag], axis=-1)
    refs_ri = xp.concatenate([refs.real, refs.imag], axis=-1)
    num = xp.matmul(zs_ri, refs_ri.transpose(0, 2, 1))                                # (I, 9, 27)
    pow_ref = refs.real ** 2 + refs.imag ** 2
    if c_k is not None:
        den_ref = xp.matmul(pow_ref, (c_k * c_k * w_k)[:, :, None])[..., 0]           # (I, 27)
    else:
        den_ref = xp.matmul(pow_ref, w_k[:, None])[..., 0]
    den_x = (w_k * (x_k.real ** 2 + x_k.imag ** 2)).sum(-1)                           # (I,)
    den = xp.sqrt(xp.maximum(den_ref, 1e-30) * xp.maximum(den_x, 1e-30)[:, None])
    return num / den[:, None, :], new_mats, offs


def refine_candidates(slicer: CentralSlicer, spectra, ctf_fn, matrices, origins_px, *,
                      levels: Sequence[RefineLevel], r_min: float, box: int,
                      max_shift_px: Optional[float] = None, subpixel: bool = True,
                      weight_fn: Optional[Callable] = None, max_items_points: int = 1 << 22):
    """Refine candidate poses of a batch of particles.

    Parameters
    ----------
    slicer : CentralSlicer of the reference (on the same device as ``spectra``).
    spectra : complex64 (B, N, N//2 + 1), centred rfft of the particle images (:func:`centred_rfft2`).
    ctf_fn : callable ``(kx, ky) -> (B, K)`` float32 giving the effective CTF of each particle at integer
        frequencies (cycles per box), or None (no CTF).
    matrices : (B, k, 3, 3) candidate rotations.
    origins_px : (B, k, 2) candidate origins (x, y) in pixels (RELION convention).
    levels : refinement levels, coarse to fine.
    r_min : lowest frequency used, cycles per box.
    box : particle box ``N`` in pixels.
    max_shift_px : origins are kept inside this radius.
    subpixel : parabolic interpolation of angles and origins after the last level.
    weight_fn : callable ``radius (K,) -> (K,)`` host weights of the frequencies (whitening), or None.
    max_items_points : bound on items x 27 x K per pass (temporary memory).

    Returns
    -------
    matrices (B, k, 3, 3) float32, origins (B, k, 2) float32 (pixels), scores (B, k) float32,
    on the device of ``spectra``.
    """
    xp = backend.get_xp(spectra)
    mats = xp.asarray(matrices, dtype=xp.float32)
    origins = xp.asarray(origins_px, dtype=xp.float32)
    b, k = mats.shape[:2]
    mats = mats.reshape(b * k, 3, 3)
    origins = origins.reshape(b * k, 2)
    scores = xp.full(b * k, -np.inf, dtype=xp.float32)
    owner = np.repeat(np.arange(b), k)
    r_top = max(lv.r_max for lv in levels)
    kx_all, ky_all = halfplane_points(r_min, r_top)
    rad = np.hypot(kx_all, ky_all)
    x_all = gather_halfplane(spectra, kx_all, ky_all)
    c_all = ctf_fn(kx_all, ky_all) if ctf_fn is not None else None
    w_all = xp.asarray(weight_fn(rad) if weight_fn is not None else np.ones_like(rad), dtype=xp.float32)
    for li, lv in enumerate(levels):
        n_k = int(np.searchsorted(rad, lv.r_max, side="right"))
        kx, ky = xp.asarray(kx_all[:n_k]), xp.asarray(ky_all[:n_k])
        rots = local_rotations(lv.step_deg)
        chunk = max(1, max_items_points // (27 * max(n_k, 1)))
        last = subpixel and li == len(levels) - 1
        for s in range(0, b * k, chunk):
            e = min(b * k, s + chunk)
            own = xp.asarray(owner[s:e])
            x_k = x_all[own, :n_k]
            c_k = c_all[own, :n_k] if c_all is not None else None
            sc, new_mats, offs = _score_level(slicer, x_k, c_k, w_all[:n_k], mats[s:e], origins[s:e], kx, ky, box,
                                              rots, lv.shift_step_px, max_shift_px)
            n_it = e - s
            flat = sc.reshape(n_it, -1)
            best = xp.argmax(flat, axis=1)
            it = xp.arange(n_it)
            bs, bq = best // 27, best % 27
            scores[s:e] = flat[it, best]
            if last:
                mats[s:e], origins[s:e] = _subpixel(xp, sc, bs, bq, new_mats, offs, lv)
            else:
                mats[s:e] = new_mats[it, bq]
                origins[s:e] = offs[it, bs]
    return mats.reshape(b, k, 3, 3), origins.reshape(b, k, 2), scores.reshape(b, k)


def _subpixel(xp, sc, bs, bq, new_mats, offs, lv: RefineLevel):
    """Parabolic interpolation around the best grid point along each rotation and shift axis."""
    n_it = sc.shape[0]
    it = np.arange(n_it)
    sc_h = backend.to_host(sc).astype(np.float64)
    bs_h, bq_h = backend.to_host(bs), backend.to_host(bq)
    # rotation axes: q = 9 ia + 3 ib + ic
    ia, ib, ic = bq_h // 9, (bq_h // 3) % 3, bq_h % 3
    rot_scores = sc_h[it, bs_h]                                          # (I, 27)
    rvec = np.zeros((n_it, 3))
    for ax, (idx, mult) in enumerate(((ia, 9), (ib, 3), (ic, 1))):
        inner = (idx == 1)
        q0 = bq_h
        sm = rot_scores[it, np.where(inner, q0 - mult, q0)]
        sp = rot_scores[it, np.where(inner, q0 + mult, q0)]
        s0 = rot_scores[it, q0]
        rvec[:, ax] = np.where(inner, _parabolic_offset(sm, s0, sp), 0.0) * np.deg2rad(lv.step_deg)
    base = backend.to_host(new_mats)[it, bq_h].astype(np.float64)
    mats = rotation_vectors_to_matrices(rvec) @ base
    # shift axes: s = 3 ix + iy
    ix, iy = bs_h // 3, bs_h % 3
    sh_scores = sc_h[it, :, bq_h]                                        # (I, 9)
    dshift = np.zeros((n_it, 2))
    for ax, (idx, mult) in enumerate(((ix, 3), (iy, 1))):
        inner = (idx == 1)
        sm = sh_scores[it, np.where(inner, bs_h - mult, bs_h)]
        sp = sh_scores[it, np.where(inner, bs_h + mult, bs_h)]
        s0 = sh_scores[it, bs_h]
        dshift[:, ax] = np.where(inner, _parabolic_offset(sm, s0, sp), 0.0) * lv.shift_step_px
    origins = backend.to_host(offs)[it, bs_h].astype(np.float64) + dshift
    return xp.asarray(mats, dtype=xp.float32), xp.asarray(origins, dtype=xp.float32)


def levels_for(step0_deg: float, r0: float, r_res: float, shift_step0_px: float, n_levels: int) -> List[RefineLevel]:
    """Refinement levels after a global search at ``step0_deg``: steps halve, cut-off grows to ``r_res``.

    The cut-off of level ``l`` is ``min(r_res, max(r0, 1 / step_l))`` (one pixel of displacement at
    the cut-off per step), the last level uses ``r_res``.
    """
    out = []
    for li in range(1, n_levels + 1):
        step = step0_deg / 2 ** li
        r = min(r_res, max(r0, 1.0 / np.deg2rad(step)))
        if li == n_levels:
            r = r_res
        out.append(RefineLevel(step_deg=step, r_max=float(r), shift_step_px=shift_step0_px / 2 ** li))
    return out
