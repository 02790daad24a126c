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

This module holds the maths on one device (:class:`FourierReconstructor`); batches of particles,
several GPUs and MPI ranks are driven by :mod:`.batches` on the task runtime. Half maps keep one
accumulator per random subset.

Array conventions: images ``(n, N, N)`` and volumes ``(N, N, N)`` float32, axes (z, y, x),
centre at ``N // 2``; rotations ``(n, 3, 3)`` of :mod:`xmipp_accel.em.geometry` (a projection
of the result along ``A`` matches the image of rotation ``A``); shifts ``(n, 2)`` (x, y) pixels.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, replace
from typing import Optional

import numpy as np

from ...constants import CTF_CORRECTIONS
from ...errors import InputError
from ... import backend
from .blob import KaiserBesselBlob
from .ctf_weighting import (apply_phases_and_ctf_gpu, ctf_coefficients_of, ctf_images,  # noqa: F401
                            effective_ctf_mode)
from .insert import BLOB_MODES, FourierGrid, insert_gather, insert_packed_gpu, pack_projections_gpu
from .symmetrize import symmetrize_fourier_volume
from .insert_tuning import replica_count  # noqa: F401  (part of this module's API)
from .trilinear import (INTERP_MODES, TrilinearSums, insert_images_trilinear, insert_trilinear_numpy,
                        trilinear_gridding_correction)

__all__ = ["CTF_MODES", "SYM_MODES", "ReconstructionSettings", "FourierAccumulator", "FourierReconstructor",
           "padded_box", "fourier_grid", "projection_transforms", "finish_volume", "group_matrices", "replica_count",
           "packed_projections", "resolve_interp", "output_mask"]

logger = logging.getLogger(__name__)

CTF_MODES = CTF_CORRECTIONS   # wiener, phase-flip, none (xmipp_accel.constants)
SYM_MODES = ("volume", "expand")


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


def group_matrices(sym: str) -> np.ndarray:
    """Operators ``(k, 3, 3)`` float64 of a point group (identity first; :mod:`xmipp_accel.em.symmetry`)."""
    if str(sym).strip().lower() == "c1":
        return np.eye(3)[None]
    from ...em.symmetry import symmetry_matrices  # noqa: PLC0415
    return np.asarray(symmetry_matrices(sym), dtype=np.float64).reshape(-1, 3, 3)


# ---------------------------------------------------------------------------------------------- per batch

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
        Per-particle CTF parameters (see :class:`.batches.ParticleBatch`); None: no CTF treatment.
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
    ctf_img = ctf_images(ctf, n, M, pixel_size_A, xp) if use_ctf else None
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
    w = apply_phases_and_ctf_gpu(ft, xp.asarray(phy), xp.asarray(phx), ctf_img, mode)
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
    coef = ctf_coefficients_of(ctf, n) if use_ctf else None
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


def _tuned_insert(grid: FourierGrid) -> Optional[dict]:
    """The autotuner's best insertion parameters for this grid on the current GPU (its cache), or None.

    None (the kernel's defaults, :data:`.insert.DEFAULT_INSERT_TUNING`) when nothing was tuned or the
    tuning machinery is unavailable.
    """
    try:
        from ..tuning.autotune import tuned_params  # noqa: PLC0415
        from .insert_tuning import INSERT_KERNEL  # noqa: PLC0415  (registers the kernel with the tuner)
        return dict(tuned_params(INSERT_KERNEL, {"padded_box": grid.padded_box, "images": 256}))
    except Exception as exc:  # noqa: BLE001  a tuning cache problem must never stop a reconstruction
        logger.debug("insertion tuning not used: %s", exc)
        return None


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
        """Insert particle images ``(n, N, N)`` with rotations ``(n, 3, 3)`` (see :class:`.batches.ParticleBatch`)."""
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
