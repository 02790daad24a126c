"""3-D Fourier reconstruction from aligned particle images (gather formulation), NumPy or CuPy.

Pipeline per particle (Xmipp ``reconstruct_fourier``; Střelák et al., IJHPCA 2019,
doi:10.1177/1094342019832958):

1. pad the image to ``M = pad * N`` (even, FFT-friendly), centre it at the origin and
   take its rfft2; shift by the particle's origin (a phase ramp; RELION's sign: shifting
   the image by ``+origin / pixel_size`` centres the particle);
2. CTF: ``wiener`` multiplies by the CTF and accumulates ``CTF²`` weights, ``phase-flip``
   multiplies by its sign, ``none`` leaves the image;
3. gather-insert into the Hermitian half of the padded Fourier volume (:mod:`.insert`), once
   per particle (``sym_mode="volume"``: the accumulated data and weights are symmetrised once
   at the end, RELION-style) or once per symmetry operator (``sym_mode="expand"``, Xmipp-style);
   on the CPU the insertion can instead be RELION's trilinear scatter (``interp``, :mod:`.trilinear`);
4. finish: symmetrise, divide the data by ``weight + λ`` (``λ`` = ``wiener_constant`` times the
   mean weight of the voxel's shell), inverse FFT, crop to ``N`` and divide by the blob's
   real-space transform (gridding correction).

Particles arrive in batches; on a GPU each device runs a pipeline (pinned staging buffers, a
copy stream and a compute stream, so reading, transfer and FFT/insertion overlap) and memory
is bounded by the batch whatever the particle count. Several GPUs each take batches from one
queue and their partial volumes are summed; :func:`reduce_accumulators` sums them across MPI
ranks. Half maps keep one accumulator per random subset.

Array conventions: images ``(n, N, N)`` and volumes ``(N, N, N)`` float32, axes (z, y, x),
centre at ``N // 2``; rotations ``(n, 3, 3)`` of :mod:`xmipp_accel.em.geometry` (a projection
of the result along ``A`` matches the image of rotation ``A``); shifts ``(n, 2)`` (x, y) pixels.
"""
from __future__ import annotations

import concurrent.futures
import logging
import math
import os
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import numpy as np

from ...errors import InputError
from ... import backend
from .blob import KaiserBesselBlob
from .insert import (BLOB_MODES, FourierGrid, insert_gather, insert_packed_gpu, pack_projections_gpu, packed_width,
                     symmetrize_fourier_volume)
from .trilinear import (INTERP_MODES, TrilinearSums, insert_images_trilinear, insert_trilinear_numpy,
                        trilinear_gridding_correction)

__all__ = ["CTF_MODES", "SYM_MODES", "ReconstructionSettings", "ParticleBatch", "ReconstructionResult",
           "FourierAccumulator", "FourierReconstructor", "padded_box", "fourier_grid", "projection_transforms",
           "finish_volume", "reconstruct", "reconstruct_batches", "reduce_accumulators", "batches_from_arrays",
           "default_batch_size", "group_matrices", "replica_count",
           "packed_projections", "resolve_interp", "output_mask"]

logger = logging.getLogger(__name__)

CTF_MODES = ("wiener", "phase-flip", "none")
SYM_MODES = ("volume", "expand")
_CTF_SCALARS = (("voltage_kV", 300.0), ("cs_mm", 2.7), ("amplitude_contrast", 0.1), ("phase_shift_deg", 0.0))


# ---------------------------------------------------------------------------------------------- settings

@dataclass(frozen=True)
class ReconstructionSettings:
    """Parameters of a Fourier reconstruction (defaults: Xmipp's, with Wiener CTF correction).

    Attributes
    ----------
    pad : float
        Padding factor of images and volume (>= 1; Xmipp default 2).
    max_res_digital : float
        Highest frequency inserted, cycles per pixel of the input images (0 < f <= 0.5).
    sym : str
        Point group (``c1``, ``cN``, ``dN``, ``t``, ``o``, ``i``...; :mod:`xmipp_accel.em.symmetry`).
    sym_mode : {"volume", "expand"}
        ``volume``: insert each particle once and symmetrise the accumulated data and weights
        at the end (trilinear, 1/|G| of the insertion work); ``expand``: insert each particle
        once per symmetry operator.
    ctf_mode : {"wiener", "phase-flip", "none"}
        How CTF parameters, when given, are used.
    wiener_constant : float
        ``λ`` relative to the mean weight of each Fourier shell (0 divides by the weights alone).
    blob : KaiserBesselBlob
        Interpolation kernel (radius 1.9, alpha 15, order 0).
    blob_mode : {"table", "onthefly"}
        Blob values from a 10 000-entry table or evaluated per pixel.
    gridding_correction : bool
        Divide the volume by the blob's real-space transform.
    ctf_premultiplied : bool
        The images were already multiplied by their CTF (RELION ``rlnCtfDataAreCtfPremultiplied``):
        Wiener then accumulates them as they are, with ``CTF²`` weights.
    tuning : dict or None
        Insertion kernel parameters (:data:`.insert.INSERT_TUNING_SPACE`).
    interp : {"blob", "trilinear", "auto"}
        Insertion kernel: the Kaiser-Bessel gather (Xmipp, :mod:`.insert`; CPU and GPU), RELION's
        trilinear scatter (:mod:`.trilinear`; CPU only, ~10x faster there), or ``auto``: trilinear on
        the CPU, the blob on GPUs (:func:`resolve_interp`). The gridding correction follows the kernel.
    mask : bool
        Multiply the map by a soft sphere (:func:`output_mask`: 1 to ``N/2 - edge``, raised-cosine edge
        to 0 at ``N/2``), which removes the noise of the corners.
    """

    pad: float = 2.0
    max_res_digital: float = 0.5
    sym: str = "c1"
    sym_mode: str = "volume"
    ctf_mode: str = "wiener"
    wiener_constant: float = 0.01
    blob: KaiserBesselBlob = field(default_factory=KaiserBesselBlob)
    blob_mode: str = "table"
    gridding_correction: bool = True
    ctf_premultiplied: bool = False
    tuning: Optional[dict] = None
    interp: str = "blob"
    mask: bool = False

    def validated(self) -> ReconstructionSettings:
        """Check every field; returns self (raises InputError naming the option and the fix)."""
        if not self.pad >= 1:
            raise InputError(f"--pad must be >= 1, got {self.pad}")
        if not 0 < self.max_res_digital <= 0.5:
            raise InputError(f"maximum resolution must be between Nyquist (0.5 cycles/pixel) and 0, got "
                             f"{self.max_res_digital} cycles/pixel: use a --max-res in Å of at least 2 pixels")
        if self.sym_mode not in SYM_MODES:
            raise InputError(f"--sym-mode must be one of {', '.join(SYM_MODES)}, got {self.sym_mode!r}")
        if self.ctf_mode not in CTF_MODES:
            raise InputError(f"--ctf must be one of auto, {', '.join(CTF_MODES)}, got {self.ctf_mode!r}")
        if not self.wiener_constant >= 0:
            raise InputError(f"--wiener-constant must be >= 0, got {self.wiener_constant}")
        if self.ctf_premultiplied and self.ctf_mode == "phase-flip":
            raise InputError("--ctf phase-flip cannot be used on CTF-premultiplied images "
                             "(rlnCtfDataAreCtfPremultiplied): use --ctf wiener")
        if self.blob_mode not in BLOB_MODES:
            raise InputError(f"--blob-mode must be one of {', '.join(BLOB_MODES)}, got {self.blob_mode!r}")
        if self.interp not in INTERP_MODES:
            raise InputError(f"--interp must be one of {', '.join(INTERP_MODES)}, got {self.interp!r}")
        return self


def resolve_interp(interp: str, *, gpu: bool) -> str:
    """The insertion kernel used: ``auto`` is trilinear on the CPU (the vectorised scatter is ~10x faster
    than the NumPy blob gather at the same accuracy, docs/reconstruction.md) and the blob on GPUs (the
    thesis's kernel, tuned there); ``trilinear`` on a GPU is refused (it runs on the CPU only)."""
    if interp == "auto":
        return "blob" if gpu else "trilinear"
    if interp == "trilinear" and gpu:
        raise InputError("--interp trilinear runs on the CPU only: use --device cpu, or --interp blob (or auto) "
                         "on GPUs")
    return interp


def output_mask(box: int, xp=np, edge_px: Optional[float] = None):
    """Soft spherical mask ``(N, N, N)`` float32 of a reconstruction: 1 within ``N/2 - edge``, raised-cosine
    edge of ``edge = max(3, N/20)`` pixels down to 0 at ``N/2`` (centre ``N // 2``)."""
    from ...em.masks import soft_spherical_mask  # noqa: PLC0415
    edge = max(3.0, box / 20.0) if edge_px is None else float(edge_px)
    return soft_spherical_mask(box, box / 2.0 - edge, edge, xp=xp)


def padded_box(box: int, pad: float) -> int:
    """Even padded size ``M >= pad * box`` with small prime factors (FFT advisor when available)."""
    target = int(math.ceil(pad * box - 1e-9))
    target += target % 2
    try:
        from ..tuning.fft_advisor import good_fft_size  # noqa: PLC0415
        m = int(good_fft_size(target, real=True, multiple_of=2, pad_max=0.1))
        if m >= target and m % 2 == 0:
            return m
    except Exception as exc:  # advisor missing or failing: plain even size
        logger.debug("FFT advisor not used: %s", exc)
    return target


def fourier_grid(box: int, settings: ReconstructionSettings) -> FourierGrid:
    """The padded grid for images of ``box`` pixels and the settings' padding and maximum resolution."""
    M = padded_box(box, settings.pad)
    return FourierGrid(M, min(settings.max_res_digital * M, M / 2))


def default_batch_size(box: int, settings: ReconstructionSettings, *, gpu: bool,
                       budget_bytes: float = 2.0e9) -> int:
    """Particles per batch keeping the per-batch buffers near ``budget_bytes`` (GPU) or small (CPU).

    A GPU batch holds the images, their padded transforms and CTFs (rfft layout) and the packed
    projections (``W² x 16`` bytes each, :func:`.insert.packed_width`).
    """
    grid = fourier_grid(box, settings)
    M = grid.padded_box
    W = packed_width(grid, settings.blob)
    per_image = M * (M // 2 + 1) * (8 + 4) + M * M * 4 + W * W * 16 + box * box * 4 * 3
    if not gpu:
        budget_bytes = 1.5e8
    return int(max(1, min(4096, budget_bytes // per_image)))


def group_matrices(sym: str) -> np.ndarray:
    """Operators ``(k, 3, 3)`` float64 of a point group (identity first; :mod:`xmipp_accel.em.symmetry`)."""
    if str(sym).strip().lower() == "c1":
        return np.eye(3)[None]
    from ...em.symmetry import symmetry_matrices  # noqa: PLC0415
    return np.asarray(symmetry_matrices(sym), dtype=np.float64).reshape(-1, 3, 3)


# ---------------------------------------------------------------------------------------------- batches

@dataclass
class ParticleBatch:
    """A batch of aligned particles.

    Attributes
    ----------
    images : ndarray ``(n, N, N)`` float32 (NumPy or CuPy).
    matrices : ndarray ``(n, 3, 3)``: projection rotations (``euler_to_matrix(rot, tilt, psi)``).
    shifts_px : ndarray ``(n, 2)`` or None: (x, y) shifts in pixels applied to the images
        (``origin_A / pixel_size_A`` in RELION's convention).
    ctf : dict or None: per-particle ``defocus_u_A``, ``defocus_v_A``, ``defocus_angle_deg`` and
        optionally ``voltage_kV``, ``cs_mm``, ``amplitude_contrast``, ``phase_shift_deg`` arrays ``(n,)``.
    subset : ndarray ``(n,)`` int (1 or 2) or None: half-map subset of each particle.
    first_index : int
        Index of the first particle in the whole data set (for messages).
    """

    images: object
    matrices: np.ndarray
    shifts_px: Optional[np.ndarray] = None
    ctf: Optional[Dict[str, np.ndarray]] = None
    subset: Optional[np.ndarray] = None
    first_index: int = 0

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def take(self, start: int, stop: int) -> ParticleBatch:
        """Particles ``start:stop`` of this batch."""
        def sl(a):
            return None if a is None else a[start:stop]
        return ParticleBatch(self.images[start:stop], np.asarray(self.matrices)[start:stop], sl(self.shifts_px),
                             None if self.ctf is None else {k: np.asarray(v)[start:stop] for k, v in self.ctf.items()},
                             sl(self.subset), self.first_index + start)


def batches_from_arrays(images, matrices, *, shifts_px=None, ctf=None, subset=None,
                        batch_size: int = 256) -> Iterable[ParticleBatch]:
    """Split in-memory arrays into :class:`ParticleBatch` objects of ``batch_size`` particles."""
    n = int(images.shape[0])
    for name, arr, width in (("matrices", matrices, 9), ("shifts_px", shifts_px, 2), ("subset", subset, 1)):
        if arr is not None and np.asarray(arr).size != n * width:
            raise InputError(f"{name} must describe the {n} images (shape ({n}, ...)), got shape {np.shape(arr)}")
    full = ParticleBatch(images, np.asarray(matrices, dtype=np.float64).reshape(-1, 3, 3),
                         None if shifts_px is None else np.asarray(shifts_px, dtype=np.float64).reshape(-1, 2),
                         None if ctf is None else {k: np.broadcast_to(np.asarray(v, dtype=np.float64), (n,))
                                                   for k, v in ctf.items()},
                         None if subset is None else np.asarray(subset).reshape(-1))
    for start in range(0, n, batch_size):
        yield full.take(start, min(n, start + batch_size))


# ---------------------------------------------------------------------------------------------- per batch

def _ctf_columns(ctf: Dict[str, np.ndarray], n: int):
    """Per-particle CTF parameters as host float64 arrays ``(n,)``: ``(du, dv, angle, {scalar: values})``."""
    def per_particle(key, default):
        return np.broadcast_to(np.asarray(backend.to_host(ctf.get(key, default)), dtype=np.float64), (n,))
    du = per_particle("defocus_u_A", 0.0)
    return du, per_particle("defocus_v_A", du), per_particle("defocus_angle_deg", 0.0), \
        {k: per_particle(k, d) for k, d in _CTF_SCALARS}


def _ctf_images(ctf: Dict[str, np.ndarray], n: int, M: int, pixel_size_A: float, xp):
    """CTF of each particle on the padded rfft grid, ``(n, M, M//2+1)`` float32 (:func:`em.ctf.ctf_2d`)."""
    from ...em.ctf import ctf_2d  # noqa: PLC0415
    du, dv, angle, kw = _ctf_columns(ctf, n)
    out = ctf_2d(M, pixel_size_A, du, dv, angle, xp=xp, **kw)
    return xp.ascontiguousarray(xp.asarray(out, dtype=xp.float32).reshape(n, M, M // 2 + 1))


def _ctf_coefficients(ctf: Dict[str, np.ndarray], n: int) -> np.ndarray:
    """Per-particle CTF phase coefficients ``(n, 5)`` float64 for the packing kernel (em.ctf.ctf_coefficients)."""
    from ...em.ctf import ctf_coefficients  # noqa: PLC0415
    du, dv, angle, kw = _ctf_columns(ctf, n)
    return ctf_coefficients(du, dv, angle, **kw)


_phase_kernel_cache: dict = {}


def _apply_phases_and_ctf_gpu(ft, phy, phx, ctf, mode: str):
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


def projection_transforms(images, grid: FourierGrid, *, shifts_px=None, ctf=None, pixel_size_A: float = 1.0,
                          ctf_mode: str = "wiener", ctf_premultiplied: bool = False):
    """Padded, centred, shifted and CTF-treated rfft2 of particle images.

    Parameters
    ----------
    images : ndarray ``(n, N, N)`` float32 (NumPy or CuPy), centre at ``N // 2``.
    grid : FourierGrid
        Gives the padded size ``M``.
    shifts_px : array ``(n, 2)`` or None
        (x, y) shifts in pixels: the content moves by ``+shift`` (as ``em.projection.shift_images``).
    ctf : dict or None
        Per-particle CTF parameters (see :class:`ParticleBatch`); None: no CTF treatment.
    pixel_size_A : float
        Pixel size (Å), for the CTF.
    ctf_mode : {"wiener", "phase-flip", "none"}
    ctf_premultiplied : bool
        The images already carry one factor of the CTF (Wiener then only adds the ``CTF²`` weights).

    Returns
    -------
    (ft, weight) : ``ft (n, M, M//2+1)`` complex64 with ``ft[ky, kx]`` the transform of the image
        padded to ``M`` with its centre at the origin (times the CTF for Wiener, its sign for phase
        flipping); ``weight`` ``(n, M, M//2+1)`` float32 ``CTF²`` for Wiener, else None.
    """
    xp = backend.get_xp(images)
    n, N = int(images.shape[0]), int(images.shape[-1])
    M = grid.padded_box
    Mh = grid.half
    mode = effective_ctf_mode(ctf, ctf_mode, ctf_premultiplied)
    use_ctf = mode != "none"
    ft = xp.fft.rfft2(xp.asarray(images, dtype=xp.float32), s=(M, M))
    if ft.dtype != xp.complex64:
        ft = ft.astype(xp.complex64)
    # content sits at [0:N, 0:N] with its centre at N//2: move the centre to the origin and apply the shift
    c = N // 2
    sh = np.zeros((n, 2)) if shifts_px is None else np.asarray(backend.to_host(shifts_px), dtype=np.float64)
    ky = np.fft.fftfreq(M, 1.0 / M)
    kx = np.arange(Mh, dtype=np.float64)
    phx = np.exp(-2j * np.pi * kx[None, :] * (sh[:, 0:1] - c) / M).astype(np.complex64)
    phy = np.exp(-2j * np.pi * ky[None, :] * (sh[:, 1:2] - c) / M).astype(np.complex64)
    ctf_img = _ctf_images(ctf, n, M, pixel_size_A, xp) if use_ctf else None
    if xp is np:
        ft *= phy[:, :, None]
        ft *= phx[:, None, :]
        if mode == "wiener":
            ft *= ctf_img
        if mode in ("wiener", "wiener-premultiplied"):
            return ft, (ctf_img * ctf_img).astype(np.float32)
        if mode == "phase-flip":
            ft *= np.where(ctf_img < 0, -1.0, 1.0).astype(np.float32)
        return ft, None
    ft = xp.ascontiguousarray(ft)
    w = _apply_phases_and_ctf_gpu(ft, xp.asarray(phy), xp.asarray(phx), ctf_img, mode)
    return ft, w


def packed_projections(images, grid: FourierGrid, *, shifts_px=None, ctf=None, pixel_size_A: float = 1.0,
                       ctf_mode: str = "wiener", ctf_premultiplied: bool = False,
                       blob: KaiserBesselBlob = KaiserBesselBlob()):
    """GPU: images ``(n, N, N)`` → packed projections for :func:`.insert.insert_packed_gpu`.

    The same transforms as :func:`projection_transforms` (padding, centring, shift, CTF), but the
    phase ramp and the CTF are applied on the GPU while packing (:func:`.insert.pack_projections_gpu`),
    so the host only sends the shifts and defoci. Returns cupy ``(n, W, W, 4)`` float32.
    """
    cp = backend.cupy_module()
    n, N = int(images.shape[0]), int(images.shape[-1])
    M = grid.padded_box
    mode = effective_ctf_mode(ctf, ctf_mode, ctf_premultiplied)
    use_ctf = mode != "none"
    ft = cp.fft.rfft2(cp.asarray(images, dtype=cp.float32), s=(M, M))
    sh = np.zeros((n, 2)) if shifts_px is None else np.asarray(backend.to_host(shifts_px), dtype=np.float64)
    centre_shift = cp.asarray(sh - N // 2)   # content moves by +shift, its centre N//2 goes to the origin
    coef = _ctf_coefficients(ctf, n) if use_ctf else None
    return pack_projections_gpu(ft, None, centre_shift, grid, blob, mode, ctf_coefficients=coef,
                                pixel_size_A=pixel_size_A)


# ---------------------------------------------------------------------------------------------- accumulators

@dataclass
class FourierAccumulator:
    """Accumulated data and weights of one (sub)set of particles.

    Attributes
    ----------
    data : ``(M, M, M//2+1)`` complex64; weight : same shape, float32 (NumPy or CuPy).
    count : int, particles inserted.
    replicas : (data, weight) stacks ``(R, M, M, M//2+1)`` whose first element is ``data``/``weight``,
        or None. The GPU kernel inserts into all ``R`` in parallel; :meth:`collapse` sums them.
    pending : .trilinear.TrilinearSums or None
        Trilinear scatter sums not yet added (CPU); :meth:`collapse` adds them.
    """

    data: object
    weight: object
    count: int = 0
    replicas: Optional[tuple] = None
    pending: Optional[TrilinearSums] = None

    @classmethod
    def zeros(cls, grid: FourierGrid, xp, replicas: int = 1) -> FourierAccumulator:
        if replicas <= 1:
            return cls(xp.zeros(grid.shape, dtype=xp.complex64), xp.zeros(grid.shape, dtype=xp.float32), 0)
        d = xp.zeros((replicas,) + grid.shape, dtype=xp.complex64)
        w = xp.zeros((replicas,) + grid.shape, dtype=xp.float32)
        return cls(d[0], w[0], 0, (d, w))

    @property
    def insert_targets(self) -> tuple:
        """Arrays the insertion writes into: the replica stacks, or data and weight."""
        return self.replicas if self.replicas is not None else (self.data, self.weight)

    def collapse(self) -> None:
        """Add the replicas (and pending trilinear sums) into ``data``/``weight`` and clear them."""
        if self.pending is not None:
            self.pending.flush(self.data, self.weight)
        if self.replicas is None:
            return
        d, w = self.replicas
        for j in range(1, d.shape[0]):
            d[0] += d[j]
            w[0] += w[j]
        d[1:] = 0
        w[1:] = 0

    def add(self, other: FourierAccumulator) -> None:
        """Add another accumulator (any device) to this one in place."""
        self.collapse()
        other.collapse()
        xp = backend.get_xp(self.data)
        same = backend.get_xp(other.data) is xp
        self.data += other.data if same else xp.asarray(backend.to_host(other.data))
        self.weight += other.weight if same else xp.asarray(backend.to_host(other.weight))
        self.count += other.count

    def to_host(self) -> FourierAccumulator:
        self.collapse()
        return FourierAccumulator(backend.to_host(self.data), backend.to_host(self.weight), self.count)


def replica_count(grid: FourierGrid, *, target_threads: int = 1 << 19, budget_bytes: Optional[float] = None) -> int:
    """Replicas of a GPU accumulator so that about ``target_threads`` columns run at once.

    One thread owns a column of the half volume, ``(K+1)(2K+1)`` of them: a 64-pixel box
    (``M = 128``) has 8 000, too few to fill a GPU; replicas multiply the threads while the
    extra memory stays within ``budget_bytes`` (default: 4 GB or a fifth of the free memory).
    """
    if budget_bytes is None:
        budget_bytes = 4.0e9
        cp = backend.cupy_module()
        if cp is not None:
            budget_bytes = min(budget_bytes, 0.2 * cp.cuda.runtime.memGetInfo()[0])
    K = grid.K
    face = (K + 1) * (2 * K + 1)
    want = int(math.ceil(target_threads / face))
    vol_bytes = int(np.prod(grid.shape)) * 12
    cap = max(1, int(budget_bytes // vol_bytes))
    return int(max(1, min(want, cap, 64)))


def _tuned_insert(grid: FourierGrid) -> Optional[dict]:
    """The autotuner's best insertion parameters for this grid on the current GPU (its cache), or None.

    None (the kernel's defaults, :data:`.insert.DEFAULT_INSERT_TUNING`) when nothing was tuned or the
    tuning machinery is unavailable.
    """
    try:
        from ..tuning.autotune import tuned_params  # noqa: PLC0415
        from ..tuning import builtin_kernels  # noqa: F401, PLC0415  (registers the "insert" adapter)
        return dict(tuned_params("insert", {"padded_box": grid.padded_box, "images": 256}))
    except Exception as exc:  # noqa: BLE001  a tuning cache problem must never stop a reconstruction
        logger.debug("insertion tuning not used: %s", exc)
        return None


def reduce_accumulators(accumulators: List[FourierAccumulator], mpi=None) -> Optional[List[FourierAccumulator]]:
    """Sum per-subset accumulators across MPI ranks (``gpu.runtime.mpi``); the sums on root, None elsewhere."""
    if mpi is None or not getattr(mpi, "enabled", False):
        return accumulators
    out = []
    for acc in accumulators:
        d = mpi.reduce_sum(acc.data)
        w = mpi.reduce_sum(acc.weight)
        counts = mpi.gather(int(acc.count))
        out.append(None if d is None else FourierAccumulator(d, w, int(sum(counts))))
    return out if mpi.is_root else None


class FourierReconstructor:
    """Accumulates particles into one or two (half-map) Fourier volumes on one device.

    Parameters
    ----------
    box : int
        Image box ``N`` (pixels).
    settings : ReconstructionSettings
    pixel_size_A : float
        Pixel size (Å), for the CTF.
    xp : module
        numpy or cupy (the current CuPy device holds the volumes).
    n_subsets : int
        1, or 2 for half maps (particles carry ``subset`` 1 or 2).
    """

    def __init__(self, box: int, *, settings: ReconstructionSettings = ReconstructionSettings(),
                 pixel_size_A: float = 1.0, xp=np, n_subsets: int = 1):
        settings = settings.validated()
        self.settings = replace(settings, interp=resolve_interp(settings.interp, gpu=xp is not np))
        if int(box) < 4:
            raise InputError(f"box size must be >= 4 pixels, got {box}")
        if n_subsets not in (1, 2):
            raise ValueError(f"n_subsets must be 1 or 2, got {n_subsets}")
        self.box = int(box)
        self.pixel_size_A = float(pixel_size_A)
        self.xp = xp
        self.grid = fourier_grid(self.box, self.settings)
        self.sym_matrices = group_matrices(self.settings.sym)
        self.n_subsets = n_subsets
        reps = 1 if xp is np else replica_count(self.grid)
        self.accumulators = [FourierAccumulator.zeros(self.grid, xp, reps) for _ in range(n_subsets)]
        self.tuning = self.settings.tuning if self.settings.tuning or xp is np else _tuned_insert(self.grid)

    # ------------------------------------------------------------------ insertion
    def entries(self, matrices: np.ndarray):
        """Rotations and image indices to insert: one per image (volume mode) or per image and operator."""
        m = np.asarray(matrices, dtype=np.float64).reshape(-1, 3, 3)
        if self.settings.sym_mode == "expand" and self.sym_matrices.shape[0] > 1:
            k = self.sym_matrices.shape[0]
            mats = np.einsum("nij,gjk->ngik", m, self.sym_matrices).reshape(-1, 3, 3)
            return mats, np.repeat(np.arange(m.shape[0]), k)
        return m, np.arange(m.shape[0])

    def insert_transforms(self, ft, weight, matrices, subset=None, *, packed: bool = False) -> None:
        """Insert prepared transforms with their rotations ``(n, 3, 3)``.

        ``ft``/``weight``: :func:`projection_transforms` output (rfft layout), or with ``packed=True``
        the GPU's packed projections (:func:`packed_projections`; ``weight`` is then unused), or with the
        trilinear kernel the half-plane values (:func:`.trilinear.half_plane_values`).
        """
        mats, idx = self.entries(matrices)
        k = mats.shape[0] // max(1, np.asarray(matrices).reshape(-1, 9).shape[0])
        if self.n_subsets == 1 or subset is None:
            groups = [(0, np.arange(mats.shape[0]))]
            if self.n_subsets == 2:
                raise ValueError("half-map reconstruction needs the subset (1 or 2) of each particle")
        else:
            sub = np.asarray(backend.to_host(subset)).reshape(-1)
            groups = [(s - 1, np.nonzero(sub[idx] == s)[0]) for s in (1, 2)]
        for s, sel in groups:
            if sel.size == 0:
                continue
            acc = self.accumulators[s]
            target_d, target_w = acc.insert_targets
            if packed:
                insert_packed_gpu(target_d, target_w, ft, mats[sel], idx[sel], self.grid, self.settings.blob,
                                  blob_mode=self.settings.blob_mode, tuning=self.tuning)
            elif self.settings.interp == "trilinear":
                if acc.pending is None:
                    acc.pending = TrilinearSums(self.grid)
                insert_trilinear_numpy(target_d, target_w, ft, weight, mats[sel], idx[sel], self.grid,
                                       sums=acc.pending)
            else:
                insert_gather(target_d, target_w, ft, weight, mats[sel], idx[sel], self.grid, self.settings.blob,
                              blob_mode=self.settings.blob_mode, tuning=self.tuning)
            acc.count += sel.size // max(k, 1)

    def insert(self, images, matrices, *, shifts_px=None, ctf=None, subset=None) -> None:
        """Insert particle images ``(n, N, N)`` with rotations ``(n, 3, 3)`` (see :class:`ParticleBatch`)."""
        images = self.xp.asarray(images, dtype=self.xp.float32)
        if images.ndim != 3 or images.shape[1:] != (self.box, self.box):
            raise InputError(f"images must have shape (n, {self.box}, {self.box}), got {tuple(images.shape)}")
        if self.xp is not np:
            packed = packed_projections(images, self.grid, shifts_px=shifts_px, ctf=ctf,
                                        pixel_size_A=self.pixel_size_A, ctf_mode=self.settings.ctf_mode,
                                        ctf_premultiplied=self.settings.ctf_premultiplied, blob=self.settings.blob)
            self.insert_transforms(packed, None, matrices, subset, packed=True)
            return
        if self.settings.interp == "trilinear":
            self._insert_trilinear(images, matrices, shifts_px, ctf, subset)
            return
        ft, w = projection_transforms(images, self.grid, shifts_px=shifts_px, ctf=ctf,
                                      pixel_size_A=self.pixel_size_A, ctf_mode=self.settings.ctf_mode,
                                      ctf_premultiplied=self.settings.ctf_premultiplied)
        self.insert_transforms(ft, w, matrices, subset)

    def _insert_trilinear(self, images, matrices, shifts_px, ctf, subset) -> None:
        """CPU trilinear path: each subset's images transformed and scattered chunk by chunk
        (:func:`.trilinear.insert_images_trilinear`) into the accumulator's pending sums."""
        n = int(images.shape[0])
        mats = np.asarray(matrices, dtype=np.float64).reshape(n, 3, 3)
        if self.n_subsets == 2 and subset is None:
            raise ValueError("half-map reconstruction needs the subset (1 or 2) of each particle")
        if self.n_subsets == 1 or subset is None:
            groups = [(0, slice(None))]
        else:
            sub = np.asarray(backend.to_host(subset)).reshape(-1)
            groups = [(s - 1, np.nonzero(sub == s)[0]) for s in (1, 2)]
        mode = effective_ctf_mode(ctf, self.settings.ctf_mode, self.settings.ctf_premultiplied)
        ops = self.sym_matrices if self.settings.sym_mode == "expand" and len(self.sym_matrices) > 1 else None
        for s, sel in groups:
            imgs = images[sel]
            if imgs.shape[0] == 0:
                continue
            acc = self.accumulators[s]
            if acc.pending is None:
                acc.pending = TrilinearSums(self.grid)
            insert_images_trilinear(
                acc.data, acc.weight, imgs, mats[sel], self.grid,
                shifts_px=None if shifts_px is None else np.asarray(backend.to_host(shifts_px)).reshape(n, 2)[sel],
                ctf=None if ctf is None else {k: np.broadcast_to(np.asarray(backend.to_host(v)), (n,))[sel]
                                              for k, v in ctf.items()},
                pixel_size_A=self.pixel_size_A, mode=mode, operators=ops, sums=acc.pending)
            acc.count += int(imgs.shape[0])

    # ------------------------------------------------------------------ results
    def merged(self) -> FourierAccumulator:
        """All subsets summed (a new accumulator on this device)."""
        for acc in self.accumulators:
            acc.collapse()
        out = FourierAccumulator(self.accumulators[0].data.copy(), self.accumulators[0].weight.copy(),
                                 self.accumulators[0].count)
        for acc in self.accumulators[1:]:
            out.add(acc)
        return out

    def volume(self, subset: Optional[int] = None):
        """Reconstructed volume ``(N, N, N)`` float32 of one subset (1, 2) or of all particles (None)."""
        acc = self.merged() if subset is None else self.accumulators[subset - 1]
        acc.collapse()
        return finish_volume(acc, self.box, self.grid, self.settings, self.sym_matrices)


# ---------------------------------------------------------------------------------------------- finishing

def _shell_index(grid: FourierGrid, xp):
    M, Mh = grid.padded_box, grid.half
    f = xp.asarray(np.fft.fftfreq(M, 1.0 / M).astype(np.float32))
    kx = xp.arange(Mh, dtype=xp.float32)
    r = xp.sqrt(f[:, None, None] ** 2 + f[None, :, None] ** 2 + kx[None, None, :] ** 2)
    return xp.rint(r).astype(xp.int32)


def _normalised_transform(data, weight, grid: FourierGrid, wiener_constant: float):
    """``data / (weight + λ_shell)`` where the weight is positive, else 0."""
    xp = backend.get_xp(data)
    shells = _shell_index(grid, xp).ravel()
    nshell = int(grid.padded_box)  # radii up to sqrt(3) M / 2 < M
    wflat = weight.ravel()
    positive = wflat > 0
    sums = xp.bincount(shells, weights=xp.where(positive, wflat, 0).astype(xp.float64), minlength=nshell)
    counts = xp.bincount(shells, weights=positive.astype(xp.float64), minlength=nshell)
    mean = sums / xp.maximum(counts, 1)
    lam = (wiener_constant * mean).astype(xp.float32)
    floor = (1e-6 * mean).astype(xp.float32)
    denom = wflat + lam[shells]
    keep = wflat > floor[shells]
    out = xp.where(keep, data.ravel() / xp.where(keep, denom, 1).astype(xp.float32), 0)
    return out.astype(xp.complex64).reshape(data.shape)


def finish_volume(acc: FourierAccumulator, box: int, grid: FourierGrid, settings: ReconstructionSettings,
                  sym_matrices=None):
    """Volume ``(N, N, N)`` float32 from accumulated data and weights (on their device).

    Symmetrises (``sym_mode="volume"`` with more than one operator), divides by the weights
    with the Wiener constant, inverse-transforms, crops the centre ``N`` voxels (centre at
    ``N // 2``), applies the gridding correction of the kernel (blob or trilinear; ``settings.interp``
    resolved, ``auto`` counts as the blob) and the soft mask (``settings.mask``).
    """
    xp = backend.get_xp(acc.data)
    data, weight = acc.data, acc.weight
    if sym_matrices is not None and settings.sym_mode == "volume" and len(sym_matrices) > 1:
        data, weight = symmetrize_fourier_volume(data, weight, sym_matrices, grid)
    ft = _normalised_transform(data, weight, grid, settings.wiener_constant)
    del data, weight
    M = grid.padded_box
    vol = xp.fft.irfftn(ft, s=(M, M, M))
    del ft
    idx = xp.asarray((np.arange(box) - box // 2) % M)
    vol = xp.take(xp.take(xp.take(vol, idx, axis=0), idx, axis=1), idx, axis=2)
    vol = xp.ascontiguousarray(vol, dtype=xp.float32)
    if settings.gridding_correction:
        if settings.interp == "trilinear":
            vol /= trilinear_gridding_correction(box, M, xp=xp)
        else:
            vol /= settings.blob.gridding_correction(box, M, xp=xp)
    if settings.mask:
        vol *= output_mask(box, xp=xp)
    return vol


# ---------------------------------------------------------------------------------------------- drivers

@dataclass
class ReconstructionResult:
    """Output of :func:`reconstruct_batches` (host arrays; None on non-root MPI ranks).

    Attributes
    ----------
    volume : ``(N, N, N)`` float32; half1, half2 : same or None (without half maps).
    n_particles : int, particles inserted (all ranks); timings : dict of seconds per stage.
    """

    volume: Optional[np.ndarray]
    half1: Optional[np.ndarray] = None
    half2: Optional[np.ndarray] = None
    n_particles: int = 0
    timings: dict = field(default_factory=dict)


class _DeviceWorker:
    """Inserts batches on one device; on a GPU through a pinned, two-stream pipeline with OOM retry."""

    def __init__(self, device: backend.Device, box: int, settings: ReconstructionSettings, pixel_size_A: float,
                 n_subsets: int, chunk: int, stager: Optional[concurrent.futures.Executor] = None,
                 check_finite: bool = True, stage_parts: int = 4):
        self.device = device
        self.check_finite = check_finite
        self.stage_parts = max(1, int(stage_parts))
        self.chunk = max(1, int(chunk))
        self.stager = stager
        with backend.on_device(device):
            self.xp = device.xp
            self.rec = FourierReconstructor(box, settings=settings, pixel_size_A=pixel_size_A, xp=self.xp,
                                            n_subsets=n_subsets)
            if device.is_gpu:
                cp = self.xp
                self.copy_stream = cp.cuda.Stream(non_blocking=True)
                self.compute_stream = cp.cuda.Stream(non_blocking=True)
                self.pinned = [None, None]
                self.dev_images = [None, None]
                self.h2d_done = [None, None]
                self.compute_done = [None, None]
                self.slot = 0
                self.finite_checks: list = []   # (first particle index, device bool per particle)
                cp.cuda.Device().synchronize()   # accumulators zeroed before the non-blocking streams use them

    # ------------------------------------------------------------------ batches
    def process(self, batch: ParticleBatch) -> None:
        """Insert a batch, in chunks; on GPU out-of-memory halve the chunk and retry (message logged)."""
        with backend.on_device(self.device):
            start = 0
            n = len(batch)
            while start < n:
                stop = min(n, start + self.chunk)
                part = batch.take(start, stop)
                try:
                    if self.device.is_gpu:
                        self._process_gpu(part)
                    else:
                        self.rec.insert(part.images, part.matrices, shifts_px=part.shifts_px, ctf=part.ctf,
                                        subset=part.subset)
                except Exception as exc:
                    if not backend.is_out_of_memory(exc) or self.chunk <= 1 or getattr(exc, "_inserted", False):
                        raise
                    self.chunk = max(1, (stop - start) // 2)
                    logger.warning("%s ran out of memory with %d particles per batch: retrying with %d",
                                   self.device.describe() if self.device.is_gpu else "cpu", stop - start, self.chunk)
                    if self.device.is_gpu:
                        self.xp.cuda.Device().synchronize()
                        self.xp.get_default_memory_pool().free_all_blocks()
                    continue
                start = stop

    def _stage(self, dst: np.ndarray, src) -> None:
        """Copy host images into pinned memory, in parallel chunks when a stager pool is given."""
        n = src.shape[0]
        if self.stager is None or n < 8:
            np.copyto(dst[:n], src)
            return
        parts = self.stage_parts
        bounds = [n * i // parts for i in range(parts + 1)]
        futures = [self.stager.submit(np.copyto, dst[a:b], src[a:b]) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
        for f in futures:
            f.result()

    def _process_gpu(self, part: ParticleBatch) -> None:
        cp = self.xp
        n = len(part)
        s = self.slot
        self.slot = 1 - s
        if isinstance(part.images, cp.ndarray):
            images = part.images.astype(cp.float32, copy=False)
            ready = cp.cuda.Event(disable_timing=True)   # the caller's work on them (legacy stream) comes first
            ready.record(cp.cuda.Stream.null)
        else:
            host = np.asarray(part.images, dtype=np.float32)
            if self.pinned[s] is None or self.pinned[s].shape[0] < n or self.pinned[s].shape[1:] != host.shape[1:]:
                if self.h2d_done[s] is not None:
                    self.h2d_done[s].synchronize()
                if self.compute_done[s] is not None:
                    self.compute_done[s].synchronize()
                self.pinned[s] = backend.pinned_empty((max(n, self.chunk),) + host.shape[1:], np.float32)
                self.dev_images[s] = cp.empty(self.pinned[s].shape, dtype=cp.float32)
            if self.h2d_done[s] is not None:
                self.h2d_done[s].synchronize()        # the pinned buffer is free again
            self._stage(self.pinned[s], host)
            if self.compute_done[s] is not None:
                self.copy_stream.wait_event(self.compute_done[s])   # the device buffer is free again
            images = self.dev_images[s][:n]
            images.set(self.pinned[s][:n], stream=self.copy_stream)
            ready = cp.cuda.Event(disable_timing=True)
            ready.record(self.copy_stream)
            self.h2d_done[s] = ready
        with self.compute_stream:
            if ready is not None:
                self.compute_stream.wait_event(ready)
            if self.check_finite:   # on the device, read back once at the end (no synchronisation here)
                self.finite_checks.append((part.first_index, cp.isfinite(images).all(axis=(1, 2))))
            settings = self.rec.settings
            packed = packed_projections(images, self.rec.grid, shifts_px=part.shifts_px, ctf=part.ctf,
                                        pixel_size_A=self.rec.pixel_size_A, ctf_mode=settings.ctf_mode,
                                        ctf_premultiplied=settings.ctf_premultiplied, blob=settings.blob)
            try:
                self.rec.insert_transforms(packed, None, part.matrices, part.subset, packed=True)
            except Exception as exc:  # past this point a retry would insert twice
                exc._inserted = True
                raise
            done = cp.cuda.Event(disable_timing=True)
            done.record(self.compute_stream)
            self.compute_done[s] = done

    def synchronize(self) -> None:
        """Wait for the device's queued work; raise InputError for particles found holding NaN/inf."""
        if self.device.is_gpu:
            with backend.on_device(self.device):
                self.compute_stream.synchronize()
                self.copy_stream.synchronize()
                for first, flags in self.finite_checks:
                    ok = backend.to_host(flags)
                    if not ok.all():
                        raise InputError(f"particle {first + int(np.argmin(ok)) + 1} has NaN or infinite pixels: "
                                         "fix or remove it (e.g. re-extract the particles)")
                self.finite_checks = []


def _check_batch(batch: ParticleBatch, box: int, n_subsets: int) -> None:
    shape = tuple(batch.images.shape)
    if len(shape) != 3 or shape[1:] != (box, box):
        raise InputError(f"particles {batch.first_index + 1}..{batch.first_index + len(batch)} have images of shape "
                         f"{shape[1:]} but the first ones are {box} x {box}: all particles must have the same box")
    m = np.asarray(batch.matrices)
    if m.shape != (shape[0], 3, 3) or not np.all(np.isfinite(m)):
        raise InputError(f"particles {batch.first_index + 1}..: rotations must be finite (n, 3, 3) arrays")
    if n_subsets == 2:
        sub = None if batch.subset is None else np.asarray(batch.subset)
        if sub is None or not np.all((sub == 1) | (sub == 2)):
            raise InputError("half maps need a subset of 1 or 2 for every particle (rlnRandomSubset)")


def reconstruct_batches(batches: Iterable[ParticleBatch], box: int, *, pixel_size_A: float = 1.0,
                        settings: ReconstructionSettings = ReconstructionSettings(),
                        devices: Optional[Sequence[backend.Device]] = None, halves: bool = False,
                        chunk: Optional[int] = None, mpi=None,
                        on_batch: Optional[Callable[[int], None]] = None,
                        check_finite: bool = True) -> ReconstructionResult:
    """Reconstruct from a stream of batches on one or several devices (and MPI ranks).

    Parameters
    ----------
    batches : iterable of ParticleBatch
        Read lazily (in the calling thread, overlapping the devices' work).
    box : int
        Image box ``N``.
    pixel_size_A : float
        Pixel size (Å), for the CTF.
    settings : ReconstructionSettings
    devices : sequence of backend.Device or None
        One or more GPUs (each gets batches from a shared queue) or one CPU device; default
        ``backend.resolve_device()``.
    halves : bool
        Keep two accumulators (``batch.subset``) and return both half maps as well.
    chunk : int or None
        Largest number of particles a device transforms at once (default: :func:`default_batch_size`).
    mpi : gpu.runtime.mpi.MPIContext or None
        With several ranks, partial sums are reduced to root, which finishes the volumes.
    on_batch : callable or None
        Called with the number of particles of each batch once it is queued (progress bars).
    check_finite : bool
        Raise InputError for a batch holding NaN or infinite pixels.

    Returns
    -------
    ReconstructionResult (volumes on the host; None on non-root ranks).
    """
    settings = settings.validated()
    if devices is None:
        devices = [backend.resolve_device()]
    devices = list(devices)
    if not devices:
        raise ValueError("no device given")
    if any(not d.is_gpu for d in devices):
        devices = [backend.Device("cpu")]
    n_subsets = 2 if halves else 1
    if chunk is None:
        chunk = default_batch_size(box, settings, gpu=devices[0].is_gpu)
    timings = {}
    t0 = time.perf_counter()
    n_stage = max(2, min(12, (os.cpu_count() or 4) - 2))   # threads copying host images into pinned memory
    stager = concurrent.futures.ThreadPoolExecutor(max_workers=n_stage) if devices[0].is_gpu else None
    workers = [_DeviceWorker(d, box, settings, pixel_size_A, n_subsets, chunk, stager, check_finite, n_stage)
               for d in devices]
    timings["setup"] = time.perf_counter() - t0

    def validate(batch: ParticleBatch) -> None:
        _check_batch(batch, box, n_subsets)
        if check_finite and not devices[0].is_gpu:   # GPU workers check on the device
            xp = backend.get_xp(batch.images)
            if not bool(xp.all(xp.isfinite(batch.images))):
                bad = np.nonzero(~np.isfinite(backend.to_host(batch.images)).reshape(len(batch), -1).all(axis=1))[0]
                raise InputError(f"particle {batch.first_index + int(bad[0]) + 1} has NaN or infinite pixels: "
                                 "fix or remove it (e.g. re-extract the particles)")

    t1 = time.perf_counter()
    try:
        _run_threads(workers, batches, validate, on_batch)
        for w in workers:
            w.synchronize()
    finally:
        if stager is not None:
            stager.shutdown(wait=True)
    timings["insert"] = time.perf_counter() - t1

    # sum the devices' partial volumes on the first device, then across MPI ranks
    t2 = time.perf_counter()
    main = workers[0]
    with backend.on_device(main.device):
        for a in main.rec.accumulators:
            a.collapse()
        for w in workers[1:]:
            for a, b in zip(main.rec.accumulators, w.rec.accumulators):
                with backend.on_device(w.device):
                    host = b.to_host()
                a.add(host)
        accs = reduce_accumulators(main.rec.accumulators, mpi)
        n_particles = 0 if accs is None else sum(a.count for a in accs)
        timings["reduce"] = time.perf_counter() - t2
        if accs is None:
            return ReconstructionResult(None, n_particles=0, timings=timings)
        t3 = time.perf_counter()
        main.rec.accumulators = [FourierAccumulator(main.xp.asarray(a.data), main.xp.asarray(a.weight), a.count)
                                 for a in accs]
        result = ReconstructionResult(backend.to_host(main.rec.volume()), n_particles=n_particles)
        if halves:
            result.half1 = backend.to_host(main.rec.volume(1))
            result.half2 = backend.to_host(main.rec.volume(2))
        backend.synchronize(main.xp)
        timings["finish"] = time.perf_counter() - t3
    result.timings = timings
    return result


def _run_threads(workers: List[_DeviceWorker], batches: Iterable[ParticleBatch],
                 validate: Callable[[ParticleBatch], None], on_batch) -> None:
    """Run the batches through the task runtime: one compute worker per device, each owning its
    :class:`_DeviceWorker` (accumulators, pinned buffers, streams); batches are validated in the
    runtime's reader threads and memory stays bounded by its queues. The first error is re-raised."""
    from ..runtime.pipeline import Pipeline

    by_device = {(w.device.kind, w.device.gpu_id): w for w in workers}

    def read(batch: ParticleBatch) -> ParticleBatch:
        validate(batch)
        return batch

    def compute(batch: ParticleBatch, worker) -> None:
        worker.state.process(batch)

    def write(batch: ParticleBatch, _result) -> None:
        if on_batch:
            on_batch(len(batch))

    pipe = Pipeline(compute, read=read, write=write,
                    setup=lambda worker: by_device[(worker.device.kind, worker.device.gpu_id)],
                    devices=[w.device for w in workers], read_workers=1, queue_depth=1,
                    pinned=False, to_host=False, fail_fast=True,
                    on_error=lambda result: None)  # the first error is re-raised below, with its message
    pipe.run(batches)


def reconstruct(images, matrices, *, shifts_px=None, ctf=None, subset=None, pixel_size_A: float = 1.0,
                settings: Optional[ReconstructionSettings] = None, devices=None, halves: bool = False,
                batch_size: Optional[int] = None, **overrides) -> ReconstructionResult:
    """Reconstruct a volume from in-memory particles (convenience over :func:`reconstruct_batches`).

    Parameters
    ----------
    images : ndarray ``(n, N, N)`` float32 (NumPy, or CuPy already on the GPU).
    matrices : ndarray ``(n, 3, 3)``: rotations of the particles.
    shifts_px, ctf, subset : see :class:`ParticleBatch`.
    pixel_size_A : float
    settings : ReconstructionSettings or None; ``overrides`` (e.g. ``sym="d7"``) replace its fields.
    devices : sequence of backend.Device, a device string or None (``backend.resolve_device``).
    halves : bool
    batch_size : int or None

    Returns
    -------
    ReconstructionResult with host volumes.

    Examples
    --------
    >>> res = reconstruct(images, euler_to_matrix(rot, tilt, psi), shifts_px=origins_A / apix,
    ...                   ctf=dict(defocus_u_A=du, defocus_v_A=dv, defocus_angle_deg=da),
    ...                   pixel_size_A=apix, sym="i", devices="cpu")
    """
    settings = replace(settings or ReconstructionSettings(), **overrides)
    if devices is None or isinstance(devices, str):
        devices = [backend.resolve_device(devices)]
    box = int(images.shape[-1])
    n = int(images.shape[0])
    if halves and subset is None:
        subset = 1 + (np.arange(n) % 2)
    bs = int(batch_size or default_batch_size(box, settings, gpu=devices[0].is_gpu))
    return reconstruct_batches(batches_from_arrays(images, matrices, shifts_px=shifts_px, ctf=ctf, subset=subset,
                                                   batch_size=bs),
                               box, pixel_size_A=pixel_size_A, settings=settings, devices=devices, halves=halves,
                               chunk=bs)

