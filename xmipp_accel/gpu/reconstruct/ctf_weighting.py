"""The CTF as the reconstruction applies it: per-particle parameters, the CTF on the padded grid, the
packing kernel's phase coefficients, the fused GPU pass that shifts and CTF-weights the transforms, and
the treatment actually applied (Wiener, Wiener on CTF-premultiplied images, phase flip, none).
"""
from __future__ import annotations

from typing import Dict

import numpy as np

from ...em.ctf import CTFParams
from ... import backend

__all__ = ["ctf_columns", "ctf_images", "ctf_coefficients_of", "apply_phases_and_ctf_gpu", "effective_ctf_mode"]


def ctf_columns(ctf: Dict[str, np.ndarray], n: int):
    """Per-particle CTF parameters as host float64 arrays ``(n,)``: ``(du, dv, angle, {microscope: values})``
    (missing ones at :class:`~xmipp_accel.em.ctf.CTFParams`' defaults)."""
    p = CTFParams.from_mapping(ctf, n)
    return p.defocus_u_A, p.defocus_v_A, p.defocus_angle_deg, p.optics()


def ctf_images(ctf: Dict[str, np.ndarray], n: int, M: int, pixel_size_A: float, xp):
    """CTF of each particle on the padded rfft grid, ``(n, M, M//2+1)`` float32 (:func:`em.ctf.ctf_2d`)."""
    from ...em.ctf import ctf_2d  # noqa: PLC0415
    du, dv, angle, kw = ctf_columns(ctf, n)
    out = ctf_2d(M, pixel_size_A, du, dv, angle, xp=xp, **kw)
    return xp.ascontiguousarray(xp.asarray(out, dtype=xp.float32).reshape(n, M, M // 2 + 1))


def ctf_coefficients_of(ctf: Dict[str, np.ndarray], n: int) -> np.ndarray:
    """Per-particle CTF phase coefficients ``(n, 5)`` float64 for the packing kernel (em.ctf.ctf_coefficients)."""
    from ...em.ctf import ctf_coefficients  # noqa: PLC0415
    du, dv, angle, kw = ctf_columns(ctf, n)
    return ctf_coefficients(du, dv, angle, **kw)


_phase_kernel_cache: dict = {}


def apply_phases_and_ctf_gpu(ft, phy, phx, ctf, mode: str):
    """Fused GPU pass: ``F *= phy[y] phx[x] c(ctf)``; returns the weights (``ctf²``) or None."""
    cp = backend.cupy_module()
    n, M, Mh = ft.shape
    key = (cp.cuda.Device().id, mode)
    kern = _phase_kernel_cache.get(key)
    if kern is None:
        if mode == "wiener":
            body = ("const ptrdiff_t b = i / (M * Mh); const int y = (i / Mh) % M; const int x = i % Mh;"
                    "const float c = ctf[i]; f = f * phy[b * M + y] * phx[b * Mh + x] * c; w = c * c;")
            kern = cp.ElementwiseKernel("raw complex64 phy, raw complex64 phx, raw float32 ctf, int32 M, int32 Mh",
                                        "complex64 f, float32 w", body, "xa_recon_phase_wiener")
        elif mode == "wiener-premultiplied":
            body = ("const ptrdiff_t b = i / (M * Mh); const int y = (i / Mh) % M; const int x = i % Mh;"
                    "const float c = ctf[i]; f = f * phy[b * M + y] * phx[b * Mh + x]; w = c * c;")
            kern = cp.ElementwiseKernel("raw complex64 phy, raw complex64 phx, raw float32 ctf, int32 M, int32 Mh",
                                        "complex64 f, float32 w", body, "xa_recon_phase_wiener_premult")
        elif mode == "phase-flip":
            body = ("const ptrdiff_t b = i / (M * Mh); const int y = (i / Mh) % M; const int x = i % Mh;"
                    "const float c = ctf[i]; f = f * phy[b * M + y] * phx[b * Mh + x] * (c < 0.0f ? -1.0f : 1.0f);")
            kern = cp.ElementwiseKernel("raw complex64 phy, raw complex64 phx, raw float32 ctf, int32 M, int32 Mh",
                                        "complex64 f", body, "xa_recon_phase_flip")
        else:
            body = ("const ptrdiff_t b = i / (M * Mh); const int y = (i / Mh) % M; const int x = i % Mh;"
                    "f = f * phy[b * M + y] * phx[b * Mh + x];")
            kern = cp.ElementwiseKernel("raw complex64 phy, raw complex64 phx, int32 M, int32 Mh",
                                        "complex64 f", body, "xa_recon_phase")
        _phase_kernel_cache[key] = kern
    if mode in ("wiener", "wiener-premultiplied"):
        w = cp.empty(ft.shape, dtype=cp.float32)
        kern(phy, phx, ctf, np.int32(M), np.int32(Mh), ft, w)
        return w
    if mode == "phase-flip":
        kern(phy, phx, ctf, np.int32(M), np.int32(Mh), ft)
    else:
        kern(phy, phx, np.int32(M), np.int32(Mh), ft)
    return None


def effective_ctf_mode(ctf, ctf_mode: str, ctf_premultiplied: bool) -> str:
    """The CTF treatment actually applied: ``"none"`` without CTF values, ``"wiener-premultiplied"`` for
    Wiener on images already multiplied by their CTF, else ``ctf_mode``."""
    if ctf is None or ctf_mode == "none":
        return "none"
    if ctf_mode == "wiener" and ctf_premultiplied:
        return "wiener-premultiplied"
    return ctf_mode
