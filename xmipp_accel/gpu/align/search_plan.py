"""Plan of a projection-matching search: rings, angles, origins and batches from the box, the pixel
size and the requested resolution; the FLOPs and memory it needs; the CTF values on the search's grid.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Mapping, Optional, Tuple

import numpy as np

from ...constants import CTF_IMAGE_STATES, CTF_IMAGES_NORMAL, CTF_IMAGES_PHASE_FLIPPED, CTF_IMAGES_PREMULTIPLIED
from ... import backend
from .polar import good_size
from .refine import RefineLevel, levels_for

CTF_MODES = CTF_IMAGE_STATES   # normal, phase_flipped, premultiplied (xmipp_accel.constants)

__all__ = ["SearchPlan", "plan_search", "global_search_flops", "ctf_values", "memory_budget_bytes",
           "default_batch_size"]

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------------------
# Plan
# ------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SearchPlan:
    """Sampling of the search (all frequencies in cycles per box, shifts in pixels of the particles).

    Attributes
    ----------
    box : particle box ``N`` (pixels).
    pixel_size_A : particle pixel size (Å).
    step_deg : angular step of the global gallery and of psi (degrees).
    r_min : lowest frequency compared.
    r0 : cut-off of the global search (about one pixel of displacement per step).
    r_res : cut-off of the last refinement level (from ``max_res``).
    n_theta : angular samples of the polar rings (psi step = 360 / n_theta <= step).
    shift_step_px : step of the global origin grid (a disk of radius ``max_shift_px``).
    max_shift_px : largest origin searched.
    refine : local refinement levels.
    """
    box: int
    pixel_size_A: float
    step_deg: float
    r_min: float
    r0: float
    r_res: float
    n_theta: int
    shift_step_px: float
    max_shift_px: float
    refine: Tuple[RefineLevel, ...] = field(default_factory=tuple)

    @property
    def radii(self) -> np.ndarray:
        """Ring radii of the global search, (n_r,) float64."""
        return np.arange(self.r_min, self.r0 + 1e-9, 1.0)

    @property
    def shift_grid(self) -> np.ndarray:
        """Origins of the global search, (T, 2) float64 pixels, a disk of radius ``max_shift_px``."""
        h = self.shift_step_px
        m = int(math.floor(self.max_shift_px / h + 1e-9)) if h > 0 else 0
        g = np.arange(-m, m + 1) * h
        xx, yy = np.meshgrid(g, g, indexing="ij")
        pts = np.stack([xx.ravel(), yy.ravel()], -1)
        keep = np.hypot(pts[:, 0], pts[:, 1]) <= self.max_shift_px + 1e-6
        return pts[keep] if keep.any() else np.zeros((1, 2))

    @property
    def resolution_A(self) -> float:
        """Resolution of the last refinement level, Å."""
        return self.box * self.pixel_size_A / self.r_res


def plan_search(box: int, pixel_size_A: float, *, step_deg: float = 3.0, max_res_A: Optional[float] = None,
                max_shift_px: Optional[float] = None, n_refine_levels: int = 3, r_min: float = 1.0) -> SearchPlan:
    """Choose cut-offs, polar sampling and shift grids for a search.

    Parameters
    ----------
    box : particle box in pixels.
    pixel_size_A : pixel size in Å.
    step_deg : global angular step in degrees (gallery directions and psi).
    max_res_A : highest resolution compared (Å); default 2/3 of Nyquist (3 pixels). Limited to
        ``box/2 - 3`` cycles per box.
    max_shift_px : largest origin searched (pixels); default 10 % of the box.
    n_refine_levels : local refinement levels (each halves the step).
    r_min : lowest frequency compared (cycles per box).

    Returns
    -------
    SearchPlan
    """
    if not (0 < step_deg <= 90):
        raise ValueError(f"angular step must be in (0, 90] degrees, got {step_deg}")
    if box < 16:
        raise ValueError(f"particle box {box} px is too small (16 px at least)")
    r_cap = box / 2.0 - 3.0
    if max_res_A is None:
        r_res = box / 3.0
    else:
        if max_res_A <= 0:
            raise ValueError(f"max_res_A must be positive, got {max_res_A}")
        r_res = box * pixel_size_A / max_res_A
    r_res = float(min(max(r_res, r_min + 3.0), r_cap))
    step_rad = math.radians(step_deg)
    r0 = float(min(r_res, max(6.0, 1.0 / step_rad)))
    n_theta = good_size(max(360.0 / step_deg, 2.0 * math.pi * r0, 16))
    if max_shift_px is None:
        max_shift_px = 0.1 * box
    max_shift_px = float(max(0.0, max_shift_px))
    shift_step = box / (3.0 * r0)
    levels = tuple(levels_for(step_deg, r0, r_res, shift_step, n_refine_levels))
    return SearchPlan(box=int(box), pixel_size_A=float(pixel_size_A), step_deg=float(step_deg), r_min=float(r_min),
                      r0=r0, r_res=r_res, n_theta=int(n_theta), shift_step_px=float(shift_step),
                      max_shift_px=max_shift_px, refine=levels)


def global_search_flops(n_particles: int, n_directions: int, plan: SearchPlan) -> float:
    """Floating-point operations of the global search (GEMM + inverse FFT along psi)."""
    n_r = len(plan.radii)
    n_m = plan.n_theta // 2 + 1
    per = 8.0 * n_r * n_m + 2.5 * plan.n_theta * math.log2(plan.n_theta)
    return float(n_particles) * len(plan.shift_grid) * n_directions * per


# ------------------------------------------------------------------------------------------------------------
# CTF
# ------------------------------------------------------------------------------------------------------------

def ctf_values(ctf: Optional[Mapping[str, np.ndarray]], kx, ky, *, box: int, pixel_size_A: float, xp=np,
               mode: str = CTF_IMAGES_NORMAL):
    """Effective CTF of each particle at frequencies ``(kx, ky)`` (cycles per box).

    Parameters
    ----------
    ctf : mapping of arrays (n,) with keys ``defocus_u_A``, ``defocus_v_A``, ``defocus_angle_deg``,
        ``voltage_kV``, ``cs_mm``, ``amplitude_contrast`` and optionally ``phase_shift_deg``
        (as :meth:`xmipp_accel.io.particles.ParticleSet.ctf` returns); None means no CTF.
    kx, ky : arrays (K,) of frequencies in cycles per box.
    box, pixel_size_A : particle box (pixels) and pixel size (Å).
    mode : ``normal`` (images carry the CTF: returns C), ``phase_flipped`` (|C|) or
        ``premultiplied`` (images were multiplied by C: returns C^2).

    Returns
    -------
    float32 array (n, K) on ``xp``, or None without CTF.
    """
    if ctf is None:
        return None
    if mode not in CTF_MODES:
        raise ValueError(f"unknown CTF mode {mode!r}: choose one of {', '.join(CTF_MODES)}")
    from ...em.ctf import CTFParams, ctf_at
    n = np.asarray(ctf["defocus_u_A"]).size
    p = CTFParams.from_mapping(ctf, n)

    scale = 1.0 / (box * pixel_size_A)
    fx = xp.asarray(np.asarray(backend.to_host(kx), np.float32) * scale)[None, :]
    fy = xp.asarray(np.asarray(backend.to_host(ky), np.float32) * scale)[None, :]
    c = ctf_at(fx, fy, p.defocus_u_A, p.defocus_v_A, p.defocus_angle_deg, xp=xp, **p.optics())
    c = xp.asarray(c, dtype=xp.float32).reshape(n, -1)
    if mode == CTF_IMAGES_PHASE_FLIPPED:
        c = xp.abs(c)
    elif mode == CTF_IMAGES_PREMULTIPLIED:
        c = c * c
    return c


# ------------------------------------------------------------------------------------------------------------
# Result
# ------------------------------------------------------------------------------------------------------------


def memory_budget_bytes(xp) -> int:
    """Bytes the search may use for temporaries: a quarter of the free GPU memory (<= 8 GiB), 384 MiB on CPU."""
    if xp is np:
        return 384 << 20
    free, _ = xp.cuda.runtime.memGetInfo()
    return int(min(free // 4, 8 << 30))


def default_batch_size(box: int, n_directions: int, xp=np) -> int:
    """Particles per batch of a search: on a GPU up to 512, bounded by its free memory; 128 on the CPU.

    Parameters
    ----------
    box : particle box (pixels).
    n_directions : gallery directions searched.
    xp : numpy or cupy (the current CuPy device's free memory is used).
    """
    if xp is np:
        return 128
    per = int(box) ** 2 * 4 * 8 + int(n_directions) * 12
    return int(max(16, min(512, memory_budget_bytes(xp) // (4 * per))))
