"""Gold-standard 3-D auto-refinement: two independent half sets, projection matching, Fourier reconstruction.

Each iteration, for each half set ``h`` (rlnRandomSubset 1 or 2) separately:

1. **Reference.** Iteration 1: the initial model low-passed to ``initial_lowpass_A`` (30 Å by default),
   the same for both halves (it carries no information about either half), symmetrised by the point group
   (only the asymmetric unit is searched). Later: the half's own map of
   the previous iteration, weighted per shell by ``sqrt(2 FSC / (1 + FSC))`` (the FSC of the two
   previous half maps, the expected correlation of each half with the truth) and low-passed with a
   raised cosine a few shells beyond the current resolution; then a soft spherical mask of the particle
   diameter (or the user's mask). A half never sees the other half's map, only the 1-D FSC curve.
2. **Orientations.** The first ``global_iterations`` iterations run the exhaustive global search of
   :class:`~xmipp_accel.gpu.align.projmatch.ProjectionMatcher` (polar gallery over the asymmetric unit at
   a coarse step, then its own local levels): with only a low-resolution initial model there is no prior
   pose, and a local search from random or inherited poses would stay in the wrong basin. Once poses are
   known (the next iterations) a local search around each particle's previous pose
   (:meth:`ProjectionMatcher.refine` with three levels from 2 steps to half a step, i.e. up to about
   3 steps away, and a shift grid of the same reach) is enough, is far cheaper and keeps the halves'
   handedness and frame. The step follows the resolution: ``step = d / (pi * r)`` radians for resolution
   ``d`` and particle radius ``r`` (Å) (the angle that moves the particle's edge by ``d / pi``), bounded to
   [``min_step_deg``, ``max_step_deg``]; the shift step is a quarter of the resolution (pixels), bounded.
   In local iterations the step is never below the angular accuracy the data allow
   (:func:`~xmipp_accel.gpu.refine.accuracy.angular_accuracy_deg`, RELION's ln 100 rule, measured on 100
   particles of half 1 at their current poses): a finer grid cannot place the particles better.
   The CTF enters the comparison: the matcher correlates each CTF-multiplied reference projection with
   the particle (``<X, C P>``, its matched filter), normalised by ``|X| |C P|``.
3. **Reconstruction** of each half by direct Fourier inversion with Wiener CTF correction
   (:func:`~xmipp_accel.gpu.reconstruct.batches.reconstruct` with ``halves=True``: one accumulator per
   subset, so the halves stay independent), then the FSC of the masked half maps and the resolution at
   0.143.

It stops when the resolution has not improved for two iterations and the mean angular change is below
the step, or after ``max_iterations``. Then the halves are averaged, a B-factor is fitted to the Guinier
plot (log amplitude against 1/d² between ``guinier_low_A`` and the resolution) and the map is sharpened
(multiplied by ``exp(B s² / 4)``, FSC-weighted and low-passed at the resolution).

All arrays are (z, y, x), centre ``N // 2``; angles ZYZ (Xmipp/RELION); origins in pixels, RELION sign
(shifting the image by +origin centres it). Volumes go in and out as host NumPy arrays; the search and the
reconstruction run on the given devices (NumPy or CuPy, same code).
"""
from __future__ import annotations

import logging
import math
import time
import warnings
from dataclasses import dataclass, field, replace
from typing import Callable, List, Mapping, Optional, Sequence

import numpy as np

from ...constants import CTF_IMAGES_NORMAL, CTF_NONE, CTF_WIENER
from ...em.geometry import angular_distance_deg
from ...em.masks import soft_spherical_mask  # noqa: F401  (part of this module's API)
from ...em.symmetry import symmetrize_volume, symmetry_order
from ... import backend
from ...threads import cpu_workers

__all__ = ["RefineSettings", "RefineState", "IterationRecord", "auto_refine", "soft_spherical_mask",
           "lowpass_volume", "fsc_weighted", "half_reference", "angular_step_for", "guinier_bfactor", "sharpen",
           "assign_subsets", "combine_halves"]

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------------------
# Settings, state
# ------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RefineSettings:
    """Parameters of an auto-refinement.

    Attributes
    ----------
    pixel_size_A : pixel size of particles and maps (Å).
    diameter_A : particle diameter (Å): soft spherical mask and the angular step rule.
    sym : point group.
    initial_lowpass_A : low-pass of the initial model for iteration 1 (Å).
    max_iterations : iterations at most.
    global_iterations : first iterations with the exhaustive global search.
    global_step_deg : step of the global search (degrees); None: from ``initial_lowpass_A`` by the step rule.
    min_step_deg, max_step_deg : bounds of the angular step (degrees).
    max_shift_px : largest origin of the global search (pixels); None: 10 % of the box.
    ctf : correct for the CTF (Wiener reconstruction, CTF-multiplied references).
    mask_edge_px : width of the cosine edge of the spherical mask (pixels).
    lowpass_extra_shells : the reference is low-passed this many Fourier shells beyond the resolution.
    guinier_low_A : low-resolution end of the Guinier fit (Å); limited to 2x the resolution for small boxes.
    wiener_constant : reconstruction regularisation (see ReconstructionSettings).
    accuracy_floor : local iterations never search a finer step than the angular accuracy the data allow
        (:mod:`~xmipp_accel.gpu.refine.accuracy`, RELION's rule).
    interp : reconstruction kernel (:data:`~xmipp_accel.gpu.reconstruct.trilinear.INTERP_MODES`): ``blob``
        (the default: the same maps on the CPU and GPUs), ``trilinear`` (CPU only, ~15x less CPU time than
        the NumPy blob) or ``auto`` (trilinear on the CPU, blob on GPUs).
    """
    pixel_size_A: float
    diameter_A: float
    sym: str = "c1"
    initial_lowpass_A: float = 30.0
    max_iterations: int = 10
    global_iterations: int = 1
    global_step_deg: Optional[float] = None
    min_step_deg: float = 0.5
    max_step_deg: float = 15.0
    max_shift_px: Optional[float] = None
    ctf: bool = True
    mask_edge_px: float = 3.0
    lowpass_extra_shells: float = 2.0
    guinier_low_A: float = 10.0
    wiener_constant: float = 0.01
    accuracy_floor: bool = True
    interp: str = "blob"

    @property
    def radius_A(self) -> float:
        return 0.5 * float(self.diameter_A)


@dataclass
class IterationRecord:
    """What one iteration did (one line of ``iterations.jsonl``)."""
    iteration: int
    resolution_A: float
    angular_step_deg: float
    search: str
    mean_angular_change_deg: float
    changed_fraction: float
    mean_shift_change_px: float
    seconds: float
    angular_accuracy_deg: float = math.nan

    def as_dict(self) -> dict:
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in self.__dict__.items()}


@dataclass
class RefineState:
    """State after a finished iteration (enough to continue from it).

    Attributes
    ----------
    iteration : iterations done (0 before the first).
    matrices : (n, 3, 3) float64 rotations; origins_px : (n, 2) float64 (RELION sign); subset : (n,) int64 in {1, 2}.
    half1, half2 : (N, N, N) float32 unmasked half maps of this iteration (None at iteration 0).
    fsc : (N//2 + 1,) float64 masked FSC of the half maps (None at iteration 0).
    resolution_A : 0.143 resolution of ``fsc`` (inf at iteration 0).
    history : the IterationRecords so far.
    """
    iteration: int
    matrices: np.ndarray
    origins_px: np.ndarray
    subset: np.ndarray
    half1: Optional[np.ndarray] = None
    half2: Optional[np.ndarray] = None
    fsc: Optional[np.ndarray] = None
    resolution_A: float = float("inf")
    score: Optional[np.ndarray] = None
    history: List[IterationRecord] = field(default_factory=list)


@dataclass
class RefineResult:
    """Final products (host arrays)."""
    state: RefineState
    volume: np.ndarray
    sharpened: np.ndarray
    bfactor: float
    fsc: np.ndarray
    resolution_A: float
    converged: bool


# ------------------------------------------------------------------------------------------------------------
# Volume helpers (NumPy or CuPy, same code)
# ------------------------------------------------------------------------------------------------------------

def _radial_frequency(shape, xp):
    """|k| in cycles per box of an rfftn of a cube ``shape`` (float32)."""
    n = shape[0]
    f = np.fft.fftfreq(n) * n
    fr = np.fft.rfftfreq(n) * n
    k = np.sqrt(f[:, None, None] ** 2 + f[None, :, None] ** 2 + fr[None, None, :] ** 2)
    return xp.asarray(k.astype(np.float32))


def _filter(volume, radial: Callable[[np.ndarray], np.ndarray]):
    """Multiply the transform of ``volume`` by ``radial(|k|)`` (|k| in cycles per box)."""
    xp = backend.get_xp(volume)
    vol = xp.asarray(volume, dtype=xp.float32)
    k = _radial_frequency(vol.shape, xp)
    f = xp.fft.rfftn(vol)
    f *= radial(k)
    return xp.fft.irfftn(f, s=vol.shape).astype(xp.float32)


def lowpass_volume(volume, resolution_A: float, pixel_size_A: float, *, edge_shells: float = 2.0):
    """Raised-cosine low-pass: 1 up to ``resolution_A`` (Å), falling to 0 over ``edge_shells`` shells beyond."""
    xp = backend.get_xp(volume)
    kc = volume.shape[0] * pixel_size_A / float(resolution_A)

    def radial(k):
        t = xp.clip((k - kc) / max(edge_shells, 1e-6), 0.0, 1.0)
        return (0.5 * (1.0 + xp.cos(np.pi * t))).astype(xp.float32)
    return _filter(volume, radial)


def fsc_weighted(volume, fsc: np.ndarray):
    """Weight the shells of ``volume`` by ``sqrt(2 FSC / (1 + FSC))`` (0 where FSC <= 0); ``fsc`` (N//2+1,)."""
    xp = backend.get_xp(volume)
    f = np.clip(np.asarray(fsc, dtype=np.float64), 0.0, 0.999999)
    w = np.sqrt(2.0 * f / (1.0 + f))
    w[0] = 1.0
    wx = xp.asarray(w.astype(np.float32))

    def radial(k):
        idx = xp.clip(xp.rint(k).astype(xp.int64), 0, w.size - 1)
        out = wx[idx]
        return xp.where(k > w.size - 0.5, 0.0, out).astype(xp.float32)
    return _filter(volume, radial)


def half_reference(half, *, fsc: Optional[np.ndarray], resolution_A: float, pixel_size_A: float, mask,
                   extra_shells: float = 2.0):
    """Reference of one half: FSC-weighted (when ``fsc`` is given), low-passed ``extra_shells`` beyond
    ``resolution_A`` and multiplied by ``mask``. Arrays (N, N, N) on one device; returns float32."""
    xp = backend.get_xp(half)
    vol = xp.asarray(half, dtype=xp.float32)
    if fsc is not None:
        vol = fsc_weighted(vol, fsc)
    n = vol.shape[0]
    kc = min(n / 2.0, n * pixel_size_A / resolution_A + extra_shells) if math.isfinite(resolution_A) else n / 2.0
    vol = lowpass_volume(vol, n * pixel_size_A / max(kc, 1.0), pixel_size_A, edge_shells=2.0)
    return vol * xp.asarray(mask, dtype=xp.float32)


def angular_step_for(resolution_A: float, radius_A: float, *, min_deg: float = 0.5, max_deg: float = 15.0) -> float:
    """Angular step (degrees) for a resolution: ``d / (pi r)`` radians, bounded to [min_deg, max_deg]."""
    if not math.isfinite(resolution_A):
        return float(max_deg)
    step = math.degrees(resolution_A / (math.pi * radius_A))
    return float(min(max_deg, max(min_deg, step)))


def _shift_step_px(resolution_A: float, pixel_size_A: float) -> float:
    """Local shift grid step (pixels): a quarter of the resolution, within [0.25, 2] pixels."""
    if not math.isfinite(resolution_A):
        return 2.0
    return float(min(2.0, max(0.25, 0.25 * resolution_A / pixel_size_A)))


def assign_subsets(n: int, existing: Optional[np.ndarray] = None, *, seed: int = 0) -> np.ndarray:
    """rlnRandomSubset for ``n`` particles: ``existing`` when it holds only 1 and 2 (both present),
    else a random balanced split (half the particles in each, ``seed``). Returns int64 (n,)."""
    if existing is not None:
        s = np.asarray(existing).astype(np.int64)
        if s.shape == (n,) and np.all((s == 1) | (s == 2)) and np.any(s == 1) and np.any(s == 2):
            return s
    out = np.ones(n, dtype=np.int64)
    out[np.random.default_rng(seed).permutation(n)[: n // 2]] = 2
    return out


def combine_halves(half1, half2):
    """The full map: mean of the two half maps (host float32)."""
    return (0.5 * (np.asarray(half1, np.float32) + np.asarray(half2, np.float32))).astype(np.float32)


def guinier_bfactor(volume: np.ndarray, pixel_size_A: float, *, low_A: float, high_A: float) -> float:
    """B-factor (Å², positive for decaying amplitudes) from a line through ``ln <|F|>`` against ``s² = 1/d²``
    over the shells between ``low_A`` and ``high_A``: ``ln|F| = a - (B / 4) s²``. 0 with fewer than 3 shells."""
    vol = np.asarray(volume, dtype=np.float64)
    n = vol.shape[0]
    f = np.abs(np.fft.rfftn(vol))
    k = _radial_frequency(vol.shape, np)
    shell = np.rint(k).astype(np.int64)
    nsh = n // 2 + 1
    keep = shell < nsh
    amp = np.bincount(shell[keep], weights=f[keep], minlength=nsh) / np.maximum(
        np.bincount(shell[keep], minlength=nsh), 1)
    s = np.arange(nsh) / (n * pixel_size_A)
    with np.errstate(divide="ignore"):
        d = np.where(s > 0, 1.0 / np.maximum(s, 1e-12), np.inf)
    use = (d <= low_A) & (d >= high_A) & (amp > 0)
    if use.sum() < 3:
        return 0.0
    slope = np.polyfit(s[use] ** 2, np.log(amp[use]), 1)[0]
    return float(-4.0 * slope)


def sharpen(volume: np.ndarray, pixel_size_A: float, *, bfactor: float, resolution_A: float,
            fsc: Optional[np.ndarray] = None) -> np.ndarray:
    """Sharpened map: amplitudes times ``exp(B s² / 4)``, weighted by ``sqrt(2 FSC / (1 + FSC))`` of the
    half maps' ``fsc`` (the full map's expected correlation with the truth) and low-passed at ``resolution_A``."""
    n = volume.shape[0]
    vol = np.asarray(volume, dtype=np.float32)
    if fsc is not None:
        vol = fsc_weighted(vol, fsc)
    b = float(bfactor)

    def radial(k):
        s2 = (k / (n * pixel_size_A)) ** 2
        return np.exp(0.25 * b * s2).astype(np.float32)
    vol = _filter(vol, radial)
    if math.isfinite(resolution_A):
        vol = lowpass_volume(vol, resolution_A, pixel_size_A, edge_shells=2.0)
    return np.asarray(vol, dtype=np.float32)


# ------------------------------------------------------------------------------------------------------------
# One iteration
# ------------------------------------------------------------------------------------------------------------

def _ctf_rows(ctf: Optional[Mapping[str, np.ndarray]], idx: np.ndarray):
    if ctf is None:
        return None
    return {k: (np.asarray(v)[idx] if np.ndim(v) else v) for k, v in ctf.items()}


def _align_half(images, ctf, reference, *, settings: RefineSettings, step_deg: float, resolution_A: float,
                prev_mats: Optional[np.ndarray], prev_origins: Optional[np.ndarray], device,
                ctf_mode: str, batch: int, global_search: bool, on_batch=None):
    """Poses of one half's particles against its reference; returns (matrices, origins_px, scores) on the host."""
    from ..align.projmatch import ProjectionMatcher, align_in_batches, map_batches
    from ..align.refine import RefineLevel
    xp = device.xp
    px = settings.pixel_size_A
    box = int(reference.shape[0])
    # compare up to the reference's low-pass limit (a little beyond the resolution), at most box/2 - 3
    max_res_A = box * px / _compare_radius_px(box, resolution_A, settings)
    with device:
        ref = xp.asarray(reference, dtype=xp.float32)
        if global_search:
            matcher = ProjectionMatcher(ref, pixel_size_A=px, sym=settings.sym, step_deg=step_deg,
                                        max_res_A=max_res_A, max_shift_px=settings.max_shift_px, ctf_mode=ctf_mode)
        else:
            matcher = ProjectionMatcher(ref, pixel_size_A=px, sym=settings.sym, step_deg=max(step_deg, 1.0),
                                        max_res_A=max_res_A, max_shift_px=settings.max_shift_px, ctf_mode=ctf_mode,
                                        directions=(np.zeros(1), np.zeros(1)))
        sample = np.arange(min(images.shape[0], 128))
        matcher.set_whitening(xp.asarray(images[sample]), _ctf_rows(ctf, sample) if settings.ctf else None)
        use_ctf = ctf if settings.ctf else None
        workers = cpu_workers() if xp is np else 1      # the GPU queues batches on one stream
        if global_search:
            matcher.gallery()                            # built once, before the batches share it
            res = align_in_batches(matcher.align_batch, images, use_ctf, batch, on_batch, workers=workers)
            return res.matrices, res.origins_px, res.score
        r_top = matcher.plan.r_res
        sh = _shift_step_px(resolution_A, px)
        levels = [RefineLevel(step_deg=2.0 * step_deg, r_max=r_top, shift_step_px=2.0 * sh),
                  RefineLevel(step_deg=step_deg, r_max=r_top, shift_step_px=sh),
                  RefineLevel(step_deg=0.5 * step_deg, r_max=r_top, shift_step_px=0.5 * sh)]

        def one(s: int, e: int):
            imgs = xp.asarray(images[s:e], dtype=xp.float32)
            m, o, sc = matcher.refine(imgs, _ctf_rows(use_ctf, np.arange(s, e)) if use_ctf is not None else None,
                                      xp.asarray(prev_mats[s:e, None], dtype=xp.float32),
                                      xp.asarray(prev_origins[s:e, None], dtype=xp.float32), levels)
            return (backend.to_host(m[:, 0]).astype(np.float64), backend.to_host(o[:, 0]).astype(np.float64),
                    backend.to_host(sc[:, 0]).astype(np.float64))
        mats_out, orig_out, score_out = zip(*map_batches(one, images.shape[0], batch, workers=workers,
                                                         progress=on_batch))
        mats = np.concatenate(mats_out)
        u, _, vt = np.linalg.svd(mats)                       # back onto rotations (float32 drift)
        mats = u @ vt
        return mats, np.concatenate(orig_out), np.concatenate(score_out)


def _reconstruct_halves(images, mats, origins_px, ctf, subset, settings: RefineSettings, devices,
                        premultiplied: bool):
    from ..reconstruct.batches import reconstruct
    from ..reconstruct.fourier import ReconstructionSettings
    rs = ReconstructionSettings(sym=settings.sym,
                                ctf_mode=CTF_WIENER if (settings.ctf and ctf is not None) else CTF_NONE,
                                wiener_constant=settings.wiener_constant, ctf_premultiplied=premultiplied,
                                interp=settings.interp)
    res = reconstruct(images, mats, shifts_px=origins_px, ctf=ctf if settings.ctf else None, subset=subset,
                      pixel_size_A=settings.pixel_size_A, settings=rs, devices=list(devices), halves=True)
    return np.asarray(res.half1, np.float32), np.asarray(res.half2, np.float32)


def masked_fsc(half1, half2, mask, pixel_size_A: float):
    """FSC curve (N//2+1,) of the masked half maps and its 0.143 resolution (Å; inf when undefined)."""
    from ..resolution.fsc import fsc, resolution_at
    res = fsc(np.asarray(half1), np.asarray(half2), mask=np.asarray(mask))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = resolution_at(res, 0.143, pixel_size_A)
    return np.asarray(res.fsc, dtype=np.float64), float(r)


def _pose_changes(old_m, new_m, old_o, new_o, sym: str):
    from ...em.symmetry import symmetry_matrices
    ang = angular_distance_deg(old_m, new_m, symmetry_matrices(sym))
    sh = np.hypot(*(np.asarray(new_o) - np.asarray(old_o)).T)
    return np.atleast_1d(ang), np.atleast_1d(sh)


def _compare_radius_px(box: int, resolution_A: float, settings: RefineSettings) -> float:
    """Highest frequency (Fourier pixels) the search compares: a little beyond the resolution."""
    res = resolution_A if math.isfinite(resolution_A) else settings.initial_lowpass_A
    return max(box * settings.pixel_size_A / res + settings.lowpass_extra_shells, 4.0)


def _half_accuracy(reference, images, ctf, state: RefineState, settings: RefineSettings, resolution_A: float,
                   device, ctf_mode: str) -> float:
    """Angular accuracy (degrees) of 100 random particles of half 1 at their current poses, against its
    reference (the particles and the seed are the same every iteration)."""
    from .accuracy import angular_accuracy_deg
    idx = np.nonzero(state.subset == 1)[0]
    idx = np.sort(np.random.default_rng(0).permutation(idx)[:100])
    box = int(reference.shape[0])
    with device:
        xp = device.xp
        return angular_accuracy_deg(xp.asarray(reference, dtype=xp.float32), xp.asarray(images[idx]),
                                    state.matrices[idx], state.origins_px[idx], pixel_size_A=settings.pixel_size_A,
                                    r_max_px=min(_compare_radius_px(box, resolution_A, settings), box / 2 - 1),
                                    ctf=_ctf_rows(ctf, idx) if settings.ctf else None, ctf_mode=ctf_mode, xp=xp)


def run_iteration(state: RefineState, images, ctf, initial, mask, settings: RefineSettings, devices, *,
                  ctf_mode: str = CTF_IMAGES_NORMAL, premultiplied: bool = False, batch: int = 128,
                  on_batch=None) -> RefineState:
    """One iteration (references, per-half alignment, reconstruction, FSC); returns the new state."""
    t0 = time.perf_counter()
    it = state.iteration + 1
    px = settings.pixel_size_A
    global_search = it <= settings.global_iterations
    if state.half1 is None:
        res_for_step = settings.initial_lowpass_A
    else:
        res_for_step = state.resolution_A if math.isfinite(state.resolution_A) else settings.initial_lowpass_A
    if global_search and settings.global_step_deg is not None:
        step = float(settings.global_step_deg)
    else:
        step = angular_step_for(res_for_step, settings.radius_A, min_deg=settings.min_step_deg,
                                max_deg=settings.max_step_deg)
    refs = {}
    for h in (1, 2):
        if state.half1 is None:
            refs[h] = half_reference(initial, fsc=None, resolution_A=settings.initial_lowpass_A, pixel_size_A=px,
                                     mask=mask, extra_shells=0.0)
        else:
            refs[h] = half_reference(state.half1 if h == 1 else state.half2, fsc=state.fsc,
                                     resolution_A=res_for_step, pixel_size_A=px, mask=mask,
                                     extra_shells=settings.lowpass_extra_shells)
    accuracy = math.nan
    if not global_search and settings.accuracy_floor:
        accuracy = _half_accuracy(refs[1], images, ctf, state, settings, res_for_step, devices[0], ctf_mode)
        step = min(max(step, accuracy), settings.max_step_deg)
    mats = state.matrices.copy()
    origins = state.origins_px.copy()
    scores = np.zeros(images.shape[0]) if state.score is None else state.score.copy()
    for h in (1, 2):
        idx = np.nonzero(state.subset == h)[0]
        ref = refs[h]
        m, o, sc = _align_half(images[idx], _ctf_rows(ctf, idx), ref, settings=settings, step_deg=step,
                               resolution_A=res_for_step, prev_mats=mats[idx], prev_origins=origins[idx],
                               device=devices[0], ctf_mode=ctf_mode, batch=batch, global_search=global_search,
                               on_batch=on_batch)
        mats[idx], origins[idx], scores[idx] = m, o, sc
    ang, sh = _pose_changes(state.matrices, mats, state.origins_px, origins, settings.sym)
    half1, half2 = _reconstruct_halves(images, mats, origins, ctf, state.subset, settings, devices, premultiplied)
    curve, resolution = masked_fsc(half1, half2, mask, px)
    rec = IterationRecord(iteration=it, resolution_A=resolution, angular_step_deg=step,
                          angular_accuracy_deg=accuracy,
                          search="global" if global_search else "local",
                          mean_angular_change_deg=float(np.mean(ang)), changed_fraction=float(np.mean(ang > step)),
                          mean_shift_change_px=float(np.mean(sh)), seconds=time.perf_counter() - t0)
    return RefineState(iteration=it, matrices=mats, origins_px=origins, subset=state.subset, half1=half1,
                       half2=half2, fsc=curve, resolution_A=resolution, score=scores,
                       history=list(state.history) + [rec])


def converged(history: Sequence[IterationRecord], global_iterations: int) -> bool:
    """No resolution gain for two iterations and the last mean angular change below the step.

    Global iterations do not count (their poses come from scratch); at least two local ones are needed.
    """
    local = [r for r in history if r.search == "local"]
    if len(local) < 3:
        return False
    best_before = min(r.resolution_A for r in history[:-2])
    no_gain = all(r.resolution_A >= best_before * 0.999 for r in history[-2:])
    last = history[-1]
    return bool(no_gain and last.mean_angular_change_deg < last.angular_step_deg)


# ------------------------------------------------------------------------------------------------------------
# Driver
# ------------------------------------------------------------------------------------------------------------

def auto_refine(images, ctf: Optional[Mapping[str, np.ndarray]], initial, settings: RefineSettings, *,
                subset: np.ndarray, devices, mask=None, state: Optional[RefineState] = None,
                ctf_mode: str = CTF_IMAGES_NORMAL, premultiplied: bool = False, batch: int = 128,
                on_iteration: Optional[Callable[[RefineState], None]] = None,
                on_batch: Optional[Callable[[int], None]] = None) -> RefineResult:
    """Refine poses and half maps until convergence, then combine and sharpen.

    Parameters
    ----------
    images : (n, N, N) float32 host particle images.
    ctf : per-particle CTF arrays (n,) as :meth:`ParticleSet.ctf` returns, or None.
    initial : (N, N, N) initial model at the particles' box and pixel size.
    settings : RefineSettings.
    subset : (n,) int64 half set of each particle (1 or 2), kept throughout.
    devices : backend.Device list (the search uses the first; the reconstruction all).
    mask : (N, N, N) mask in [0, 1], default the soft sphere of ``settings.diameter_A``.
    state : a saved RefineState to continue from (default: start at iteration 0).
    ctf_mode : how the images carry the CTF (:data:`~xmipp_accel.gpu.align.projmatch.CTF_MODES`).
    premultiplied : the images were multiplied by their CTF (reconstruction accounts for it).
    batch : particles per alignment batch.
    on_iteration : called with each finished iteration's state (saving, progress).
    on_batch : called with the number of particles aligned after each batch (progress bars).

    Returns
    -------
    RefineResult
    """
    n, box = int(images.shape[0]), int(images.shape[-1])
    px = settings.pixel_size_A
    if mask is None:
        mask = soft_spherical_mask(box, settings.radius_A / px, settings.mask_edge_px)
    mask = np.asarray(mask, dtype=np.float32)
    initial = np.asarray(initial, dtype=np.float32)
    if state is None and symmetry_order(settings.sym) > 1:     # the first reference has the searched symmetry
        initial = symmetrize_volume(initial, settings.sym)
    if state is None:
        state = RefineState(iteration=0, matrices=np.repeat(np.eye(3)[None], n, 0), origins_px=np.zeros((n, 2)),
                            subset=np.asarray(subset, dtype=np.int64))
    done = state.iteration >= settings.max_iterations or converged(state.history, settings.global_iterations)
    while not done:
        state = run_iteration(state, images, ctf, initial, mask, settings, devices, ctf_mode=ctf_mode,
                              premultiplied=premultiplied, batch=batch, on_batch=on_batch)
        if on_iteration is not None:
            on_iteration(state)
        done = converged(state.history, settings.global_iterations)
        if state.iteration >= settings.max_iterations:
            break
    is_conv = converged(state.history, settings.global_iterations)
    volume = combine_halves(state.half1, state.half2)
    res = state.resolution_A
    high = res if math.isfinite(res) else 2.0 * px
    low = max(min(settings.guinier_low_A, 2.0 * high), high * 1.2)
    b = guinier_bfactor(volume * mask, px, low_A=low, high_A=high)
    sharp = sharpen(volume, px, bfactor=b, resolution_A=res, fsc=state.fsc)
    return RefineResult(state=state, volume=volume, sharpened=sharp, bfactor=b, fsc=state.fsc, resolution_A=res,
                        converged=is_conv)


def with_defaults(settings: RefineSettings, **kw) -> RefineSettings:
    """``settings`` with fields replaced (convenience for callers)."""
    return replace(settings, **kw)
