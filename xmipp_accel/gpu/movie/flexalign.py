"""FlexAlign movie alignment, one movie at a time: preprocess, global, local, apply, dose-weight, PSD.

:func:`align_movie` takes the frames as a NumPy or CuPy array and returns the sums and the motion
(:class:`MovieAlignment`); it touches no files (the command ``xmipp-accel align-movies`` reads and
writes). Stages and their cost for a 4096² × 40 movie (H100 figures in ``benchmarks/results_movie.md``):

1. preprocess - checks, ``(raw - dark) · gain``, defect/hot pixels, pad to a fast FFT size;
2. fft - rfft2 of every frame (the only full-size forward transform of a global-only run);
3. bin (optional) and downscale - Fourier crop to the correlation size (~926 → 960 px) with the
   Gaussian low-pass of :mod:`.global_align`;
4. global - all pairs (780 for 40 frames), robust least squares, reference frame, then the
   high-resolution polish of :mod:`.polish` (each frame against the sum of the others; without it, a
   pre-aligned refinement pass of the pairs);
5. local - patches of the globally aligned coarse frames, per-patch all pairs, B-spline fit;
6. apply - global shifts as phase ramps; with a local model an inverse FFT, the interpolation kernel and
   a forward FFT again (for the dose weighting); sums, odd/even;
7. dose - exposure filter and weighted sum (:mod:`.dose`);
8. psd - averaged periodogram of the sum.

Units: shifts in pixels (x, y), MotionCor2 sign (moving frame n's content by ``+s_n`` aligns it);
``shifts_px`` are in pixels of the input movie, ``work_shifts_px`` in pixels of the (binned) frames the
sums are made of.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ...errors import InputError
from ... import backend
from ._fft import fast_shape, fourier_crop_rfft, irfft2, rfft2
from .apply import LOCAL_INTERPOLATIONS, correct_local_motion, power_spectrum, shift_spectra
from .bspline import BSplineShiftModel, auto_control_points, fit_bspline_grid
from .dose import dose_weighted_sum
from .global_align import (GlobalAlignment, correlation_pixel_size, correlation_shape, estimate_global_shifts,
                           lowpass_filter, refine_band)
from .local_align import (MIN_PATCH_PX, MIN_PEAK_Z, PATCH_SIZE_A, LocalAlignment, estimate_local_shifts,
                          max_patches, patch_size_px)
from .polish import DEFAULT_POLISH_BFACTOR_A2, polish_global_shifts
from .preprocess import check_frames, correct_dark_gain, find_hot_pixels, replace_defect_pixels

__all__ = ["AlignmentOptions", "MovieAlignment", "StageTimer", "align_movie", "auto_patches", "MIN_CORRELATION_PX",
           "correlation_frame_shape", "check_movie_options"]

#: smallest side (pixels) of the coarse correlation frames that can be aligned: the smallest patch that
#: :mod:`.local_align` correlates; below it the edge taper and the shift search have no room
MIN_CORRELATION_PX = MIN_PATCH_PX

logger = logging.getLogger(__name__)


@dataclass
class AlignmentOptions:
    """Parameters of :func:`align_movie` (units in the names; defaults as FlexAlign/Scipion).

    Attributes
    ----------
    pixel_size_A : float
        Pixel size of the input movie (Å).
    max_res_A : float
        Correlation resolution (Å), default 30.
    max_shift_A : float
        Largest shift between two frames searched (Å), default 50.
    binning : float
        Fourier binning factor (>= 1, fractional allowed).
    local : bool
        Local alignment with a B-spline model.
    local_interpolation : {"keys", "linear"}
        How the frames are resampled along the local shift field (:func:`.apply.correct_local_motion`):
        Keys cubic convolution (16 taps, default) or bilinear (4 taps, as RELION's own motion correction;
        ~3× less CPU time for this step, slightly more blur at high frequency; the shifts are the same).
    patches_xy : (int, int) or None
        Patch grid; None: about one per 500 Å, between 3 and 7 per axis.
    patch_size_A : float
        Minimum patch side (Å).
    control_points : (int, int, int) or None
        B-spline control points (x, y, t); None: Scipion's rule.
    patch_window : int
        Frames averaged per patch frame.
    local_max_shift_A : float or None
        Largest residual shift searched per patch (Å); None: 0.4 × max_shift_A.
    dose_per_frame : float or None
        Exposure per frame (e/Å²); gives the dose-weighted sum.
    pre_exposure : float
        Exposure before the first aligned frame (e/Å²).
    voltage_kV : float
    odd_even : bool
        Also return sums of the odd (1st, 3rd, ...) and even frames.
    save_stack : bool
        Also return the aligned frames.
    psd_size : int
        Side of the power spectrum (pixels); 0 disables it.
    hot_pixel_sigma : float
        Threshold for hot/dead pixels (robust σ of the frame sum); 0 disables.
    refine_global : bool or None
        Second, pre-aligned global pass (:func:`estimate_global_shifts`); None (default): only without the
        polish, which removes the same edge bias (measured: equal errors with and without it).
    polish_bfactor_A2 : float
        B-factor (Å²) of the high-resolution polish of the global shifts (:mod:`.polish`: each frame
        against the sum of the others); 0 disables it.
    batch_bytes : float
        Memory budget of one batch of correlations.
    seed : int
        Seed of the noise that replaces defect pixels.
    """
    pixel_size_A: float
    max_res_A: float = 30.0
    max_shift_A: float = 50.0
    binning: float = 1.0
    local: bool = True
    local_interpolation: str = "keys"
    patches_xy: Optional[Tuple[int, int]] = None
    patch_size_A: float = PATCH_SIZE_A
    control_points: Optional[Tuple[int, int, int]] = None
    patch_window: int = 3
    local_max_shift_A: Optional[float] = None
    dose_per_frame: Optional[float] = None
    pre_exposure: float = 0.0
    voltage_kV: float = 300.0
    odd_even: bool = False
    save_stack: bool = False
    psd_size: int = 512
    hot_pixel_sigma: float = 10.0
    refine_global: Optional[bool] = None
    polish_bfactor_A2: float = DEFAULT_POLISH_BFACTOR_A2
    batch_bytes: float = 1.0e9
    seed: int = 0

    def validate(self) -> None:
        """Raise InputError naming the option when a value is out of range."""
        if not (self.pixel_size_A > 0 and math.isfinite(self.pixel_size_A)):
            raise InputError(f"--pixel-size must be a positive number of Å, got {self.pixel_size_A}")
        if self.local_interpolation not in LOCAL_INTERPOLATIONS:
            raise InputError(f"--interpolation must be one of {', '.join(LOCAL_INTERPOLATIONS)}, "
                             f"got {self.local_interpolation!r}")
        if self.binning < 1:
            raise InputError(f"--bin must be at least 1 (Fourier binning only shrinks), got {self.binning}")
        if self.max_res_A < 2 * self.pixel_size_A * self.binning:
            raise InputError(f"--max-res {self.max_res_A} Å is finer than Nyquist of the (binned) frames "
                             f"({2 * self.pixel_size_A * self.binning:.2f} Å); use a larger value (default 30)")
        if self.max_shift_A <= 0:
            raise InputError(f"--max-shift must be positive (Å), got {self.max_shift_A}")
        if self.patches_xy is not None and min(self.patches_xy) < 1:
            raise InputError(f"--patches must be at least 1x1, got {self.patches_xy}")
        if self.control_points is not None and min(self.control_points) < 4:
            raise InputError(f"--control-points needs at least 4 per axis (cubic B-spline), got "
                             f"{'x'.join(str(v) for v in self.control_points)}")
        if self.dose_per_frame is not None and not self.dose_per_frame > 0:
            raise InputError(f"--dose-per-frame must be positive (e/Å²), got {self.dose_per_frame}")
        if self.pre_exposure < 0:
            raise InputError(f"--pre-exposure must not be negative (e/Å²), got {self.pre_exposure}")
        if not self.voltage_kV > 0:
            raise InputError(f"--voltage must be positive (kV), got {self.voltage_kV}")
        if self.psd_size < 0:
            raise InputError(f"--psd-size must be 0 (no power spectrum) or a positive size in pixels, got "
                             f"{self.psd_size}")
        if not self.polish_bfactor_A2 >= 0:
            raise InputError(f"--polish-bfactor must be 0 (off) or positive (Å²), got {self.polish_bfactor_A2}")
        if self.hot_pixel_sigma < 0:
            raise InputError(f"--hot-pixel-sigma must be 0 (off) or positive, got {self.hot_pixel_sigma}")


class StageTimer:
    """Wall time per stage; on the GPU, CUDA events on the current stream (read once at the end)."""

    def __init__(self, xp):
        self.xp = xp
        self._events: List[Tuple[str, object, object]] = []
        self._host: Dict[str, float] = {}

    def __call__(self, name: str):
        return _Stage(self, name)

    def milliseconds(self) -> Dict[str, float]:
        out = dict(self._host)
        if self._events:
            self._events[-1][2].synchronize()
            for name, start, stop in self._events:
                ms = self.xp.cuda.get_elapsed_time(start, stop)
                out[name] = out.get(name, 0.0) + float(ms)
        return out


class _Stage:
    def __init__(self, timer: StageTimer, name: str):
        self.timer, self.name = timer, name

    def __enter__(self):
        if self.timer.xp is not np:
            self.start = self.timer.xp.cuda.Event()
            self.start.record()
        else:
            self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.timer.xp is not np:
            stop = self.timer.xp.cuda.Event()
            stop.record()
            self.timer._events.append((self.name, self.start, stop))
        else:
            self.timer._host[self.name] = self.timer._host.get(self.name, 0.0) + 1e3 * (time.perf_counter() - self.t0)
        return False


@dataclass
class MovieAlignment:
    """What :func:`align_movie` returns (arrays on the device of the input).

    Attributes
    ----------
    sum : float32 array (oy, ox)
        Aligned sum (counts summed over frames).
    sum_dw : float32 array (oy, ox) or None
        Dose-weighted sum (same scale at low frequency).
    sum_odd, sum_even : float32 arrays or None
        Sums of frames 1, 3, 5 ... and 2, 4, 6 ... (1-based).
    stack : float32 array (N, oy, ox) or None
        Aligned frames.
    psd : float32 array (p, p) or None
        Power spectrum of ``sum`` (zero frequency at the centre).
    shifts_px : float64 ndarray (N, 2)
        Global shifts in pixels of the input movie (MotionCor2 sign, zero at the reference frame).
    work_shifts_px : float64 ndarray (N, 2)
        The same in pixels of the output (binned) frames.
    reference_frame : int
    global_alignment : GlobalAlignment
    local : LocalAlignment or None
    model : BSplineShiftModel or None
        Local shift remaining after the global shift, in output pixels over the padded work frame.
    pixel_size_A : float
        Pixel size of the outputs.
    binning : float
        Input pixels per output pixel.
    timings_ms : dict
        Milliseconds per stage.
    warnings : list of str
    """
    sum: object
    sum_dw: Optional[object]
    sum_odd: Optional[object]
    sum_even: Optional[object]
    stack: Optional[object]
    psd: Optional[object]
    shifts_px: np.ndarray
    work_shifts_px: np.ndarray
    reference_frame: int
    global_alignment: GlobalAlignment
    local: Optional[LocalAlignment]
    model: Optional[BSplineShiftModel]
    pixel_size_A: float
    binning: float
    work_shape: Tuple[int, int]
    timings_ms: Dict[str, float] = field(default_factory=dict)
    warnings: List[str] = field(default_factory=list)


def auto_patches(shape_yx, pixel_size_A: float, patch_size_A: float = PATCH_SIZE_A) -> Tuple[int, int]:
    """Patch grid (x, y): one patch per ``patch_size_A`` of the frame, between 3 and 7 per axis."""
    ny, nx = shape_yx
    def count(n):
        return int(min(7, max(3, round(n * pixel_size_A / patch_size_A))))
    return count(nx), count(ny)


def _refine_global(options: AlignmentOptions) -> bool:
    """Whether the pre-aligned second global pass runs (by default only when the polish does not)."""
    if options.refine_global is not None:
        return bool(options.refine_global)
    return not options.polish_bfactor_A2 > 0


def _work_shape(pad_shape: Tuple[int, int], binning: float) -> Tuple[int, int]:
    """Shape (y, x) of the (binned) frames the sums are made of, from the padded frame shape."""
    if binning > 1.0:
        return _even(pad_shape[0] / binning), _even(pad_shape[1] / binning)
    return tuple(pad_shape)


def correlation_frame_shape(frame_shape: Sequence[int], options: AlignmentOptions) -> Tuple[int, int]:
    """Size (y, x) of the coarse frames :func:`align_movie` correlates for frames of ``frame_shape`` (y, x) px."""
    pad = fast_shape(frame_shape)
    work = _work_shape(pad, options.binning)
    binning = 0.5 * (pad[0] / work[0] + pad[1] / work[1])
    return correlation_shape(work, options.pixel_size_A * binning, options.max_res_A)


def check_movie_options(options: AlignmentOptions, frame_shape: Sequence[int], *, name: str = "movie") -> None:
    """Raise InputError, before any work, when ``options`` cannot align frames of ``frame_shape`` (y, x) px.

    Limits: the coarse correlation frames (:func:`correlation_frame_shape`) need at least
    :data:`MIN_CORRELATION_PX` pixels per side, and a ``--patches`` grid at most
    :func:`~.local_align.max_patches` patches per axis of them. The message says the limit.
    """
    options.validate()
    ny, nx = (int(v) for v in frame_shape)
    cy, cx = correlation_frame_shape((ny, nx), options)
    if min(cy, cx) < MIN_CORRELATION_PX:
        coarse_A = max(correlation_pixel_size(options.max_res_A), options.pixel_size_A * options.binning)
        need = int(math.ceil(MIN_CORRELATION_PX * coarse_A / options.pixel_size_A))
        raise InputError(
            f"{name}: frames of {nx} x {ny} px are too small to align at {options.pixel_size_A:g} Å/px, --bin "
            f"{options.binning:g} and --max-res {options.max_res_A:g} Å: the correlation frames would be {cx} x {cy}"
            f" px, at least {MIN_CORRELATION_PX} are needed, i.e. frames of at least {need} x {need} px (a finer "
            "--max-res or a smaller --bin lowers the limit)")
    if options.local and options.patches_xy is not None:
        mx, my = max_patches(cx), max_patches(cy)
        npx, npy = options.patches_xy
        if npx > mx or npy > my:
            raise InputError(
                f"--patches {npx}x{npy} is too fine for {name} ({nx} x {ny} px): at most {mx}x{my} patches fit "
                f"(each at least {MIN_PATCH_PX} px of the {cx} x {cy} px correlation frames at --max-res "
                f"{options.max_res_A:g} Å, overlapping its neighbours by at most half); use a coarser grid")


def _pad_to(frames, shape):
    """Pad frames (n, y, x) at the bottom/right with each frame's mean to ``shape`` (y, x)."""
    xp = backend.get_xp(frames)
    n, ny, nx = frames.shape
    if (ny, nx) == tuple(shape):
        return frames
    out = xp.empty((n,) + tuple(shape), dtype=np.float32)
    out[...] = frames.mean(axis=2, dtype=np.float32).mean(axis=1)[:, None, None]
    out[:, :ny, :nx] = frames
    return out


def _host_spectra_like(spec):
    """On the CPU, an empty complex64 array like ``spec`` (one contiguous complex64 stack); None on the GPU."""
    if backend.get_xp(spec) is not np or spec.dtype != np.complex64 or not spec.flags.c_contiguous:
        return None
    return np.empty(spec.shape, dtype=np.complex64)


def _as_frames(spec, shape):
    """Float32 frames of ``shape`` (n, y, x) in the memory of contiguous complex64 spectra (n, y, x//2 + 1),
    which hold more bytes than their frames."""
    size = int(np.prod(shape))
    return spec.view(np.float32).reshape(-1)[:size].reshape(tuple(shape))


def _even(v: float) -> int:
    return max(2, int(round(v / 2.0)) * 2)


def align_movie(frames, options: AlignmentOptions, *, gain=None, dark=None, defect_mask=None,
                name: str = "movie") -> MovieAlignment:
    """Align a movie and return its sums and motion.

    Parameters
    ----------
    frames : array (N, y, x), NumPy or CuPy, any real dtype
        Raw frames; NumPy runs on the CPU, CuPy on its GPU. A float32 array may be modified in place.
    options : AlignmentOptions
    gain, dark : float32 arrays (y, x), optional
        Oriented gain and dark references (same array module as ``frames``).
    defect_mask : bool array (y, x), optional
        Defective pixels to replace.
    name : str
        The movie's name, used in messages.

    Returns
    -------
    MovieAlignment

    Raises
    ------
    InputError
        Too few frames, NaN/inf, empty frames, bad options.
    """
    n, ny, nx = (int(v) for v in frames.shape)
    check_movie_options(options, (ny, nx), name=name)
    xp = backend.get_xp(frames)
    timer = StageTimer(xp)
    warnings_: List[str] = []
    ps = float(options.pixel_size_A)

    with timer("preprocess"):
        check_frames(frames, name=name)
        frames = correct_dark_gain(frames, gain=gain, dark=dark)
        bad = None if defect_mask is None else xp.asarray(defect_mask, dtype=bool)
        if options.hot_pixel_sigma > 0:
            hot = find_hot_pixels(frames.sum(axis=0), n_sigma=options.hot_pixel_sigma, exclude=bad)
            bad = hot if bad is None else (bad | hot)
        if bad is not None:
            replace_defect_pixels(frames, bad, seed=options.seed)
        pad_shape = fast_shape((ny, nx))
        frames = _pad_to(frames, pad_shape)

    with timer("fft"):
        spec = rfft2(frames)
        del frames

    py, px = pad_shape
    work_shape = _work_shape(pad_shape, options.binning)
    if work_shape != tuple(pad_shape):
        with timer("bin"):
            spec = fourier_crop_rfft(spec, pad_shape, work_shape)
    wy, wx = work_shape
    bin_y, bin_x = py / wy, px / wx
    binning = 0.5 * (bin_y + bin_x)
    out_shape = (min(wy, int(round(ny / bin_y))), min(wx, int(round(nx / bin_x))))
    work_ps = ps * binning
    max_shift_px = options.max_shift_A / work_ps

    with timer("downscale"):
        cshape = correlation_shape(work_shape, work_ps, options.max_res_A)
        scale_yx = (cshape[0] / wy, cshape[1] / wx)
        coarse = fourier_crop_rfft(spec, work_shape, cshape)
        coarse *= lowpass_filter(cshape, (work_ps / scale_yx[0], work_ps / scale_yx[1]), options.max_res_A, xp=xp)

    with timer("global"):
        band = refine_band(work_ps / (0.5 * (scale_yx[0] + scale_yx[1])), options.max_res_A)
        galign = estimate_global_shifts(coarse, cshape, scale_yx=scale_yx, max_shift_px=max_shift_px,
                                        refine=_refine_global(options), band=band, batch_bytes=options.batch_bytes,
                                        timer=timer)
    if options.polish_bfactor_A2 > 0:
        with timer("global.polish"):
            polished = polish_global_shifts(spec, work_shape, galign.shifts_px, pixel_size_A=work_ps,
                                            bfactor_A2=options.polish_bfactor_A2, content_shape=out_shape)
            galign = dataclasses.replace(galign, shifts_px=polished - polished[galign.reference_frame])
    shifts = galign.shifts_px
    global_z = float(np.median(galign.peak_z))
    if global_z < MIN_PEAK_Z:
        msg = (f"the frame correlations have no clear peak (median {global_z:.1f} σ of the map, "
               f"expected > {MIN_PEAK_Z:.0f} σ): the movie may hold no signal and its shifts are unreliable")
        warnings_.append(f"{name}: {msg}")
        logger.warning("%s: %s", name, msg)

    local = None
    model = None
    if options.local:
        with timer("local"):
            local, model, msg = _local_alignment(coarse, cshape, scale_yx, work_shape, work_ps, galign, options, band,
                                                 timer)
        if msg:
            warnings_.append(f"{name}: {msg}")
            logger.warning("%s: %s", name, msg)
    del coarse

    with timer("apply"):
        shift_spectra(spec, shifts, work_shape, out=spec)
        sum_odd = sum_even = stack = None
        if model is not None:
            with timer("apply.inverse_fft"):
                # CPU: the frames in one spectrum-sized buffer that later receives the forward transform, the
                # interpolated frames in the memory of these spectra (the inverse transform's scratch): one
                # fresh full-size array instead of three (whose pages the kernel zeroes and faults in)
                buf = _host_spectra_like(spec)
                frame_shape = (int(spec.shape[0]),) + tuple(work_shape)
                frames = irfft2(spec, work_shape, overwrite=True,
                                out=None if buf is None else _as_frames(buf, frame_shape))
                frames = frames.astype(np.float32, copy=False)
                aligned = None if buf is None else _as_frames(spec, frame_shape)
                del spec
            with timer("apply.interpolate"):
                hx, hy, _ = model.spacing
                aligned = correct_local_motion(frames, xp.asarray(model.frame_coefficients()), (hy, hx),
                                               out=aligned, interpolation=options.local_interpolation)
                del frames
            total = aligned.sum(axis=0)
            if options.odd_even:
                sum_odd = aligned[0::2].sum(axis=0)
                sum_even = aligned[1::2].sum(axis=0)
            if options.save_stack:
                stack = aligned[:, :out_shape[0], :out_shape[1]].copy()
            with timer("apply.forward_fft"):
                spec = rfft2(aligned, out=buf) if options.dose_per_frame else None   # buf: the frames are done
                del buf
            del aligned
        else:
            total = irfft2(spec.sum(axis=0), work_shape)
            if options.odd_even:
                sum_odd = irfft2(spec[0::2].sum(axis=0), work_shape)
                sum_even = irfft2(spec[1::2].sum(axis=0), work_shape)
            if options.save_stack:
                stack = irfft2(spec, work_shape)[:, :out_shape[0], :out_shape[1]].astype(np.float32)

    sum_dw = None
    if options.dose_per_frame:
        with timer("dose"):
            dw = dose_weighted_sum(spec, work_ps, options.dose_per_frame, pre_exposure=options.pre_exposure,
                                   voltage_kV=options.voltage_kV)
            sum_dw = irfft2(dw, work_shape)[:out_shape[0], :out_shape[1]].astype(np.float32)
    del spec

    def crop(img):
        return None if img is None else xp.ascontiguousarray(img[:out_shape[0], :out_shape[1]], dtype=np.float32)

    total = crop(total)
    psd = None
    if options.psd_size:
        with timer("psd"):
            psd = power_spectrum(total, tile=options.psd_size)

    return MovieAlignment(sum=total, sum_dw=sum_dw, sum_odd=crop(sum_odd), sum_even=crop(sum_even), stack=stack,
                          psd=psd, shifts_px=shifts * np.array([bin_x, bin_y]), work_shifts_px=shifts,
                          reference_frame=galign.reference_frame, global_alignment=galign, local=local, model=model,
                          pixel_size_A=work_ps, binning=binning, work_shape=work_shape,
                          timings_ms=timer.milliseconds(), warnings=warnings_)


def _local_alignment(coarse, cshape, scale_yx, work_shape, work_ps, galign, options, band, timer):
    """Patches, per-patch shifts and the B-spline fit; returns (local, model or None, warning or '')."""
    n = int(coarse.shape[0])
    wy, wx = work_shape
    if options.patches_xy is not None:
        npx, npy = options.patches_xy
    else:
        npx, npy = auto_patches(work_shape, work_ps, options.patch_size_A)
        npx, npy = min(npx, max_patches(cshape[1])), min(npy, max_patches(cshape[0]))   # small frames
    size_yx = (patch_size_px(wy, npy, work_ps, patch_size_A=options.patch_size_A),
               patch_size_px(wx, npx, work_ps, patch_size_A=options.patch_size_A))
    coarse_shift = galign.shifts_px * np.array([scale_yx[1], scale_yx[0]])
    aligned = irfft2(shift_spectra(coarse, coarse_shift, cshape), cshape).astype(np.float32, copy=False)
    local_max = options.local_max_shift_A if options.local_max_shift_A else 0.4 * options.max_shift_A
    local = estimate_local_shifts(aligned, scale_yx=scale_yx, n_patches_xy=(npx, npy), patch_size_px_yx=size_yx,
                                  reference_frame=galign.reference_frame, window=options.patch_window,
                                  max_shift_px=local_max / work_ps, band=band, batch_bytes=options.batch_bytes,
                                  timer=timer)
    if not local.ok:
        return local, None, f"local alignment skipped, using the global shifts only: {local.reason}"
    ctrl = options.control_points or auto_control_points(work_shape, work_ps, n)
    weights = np.repeat(local.patch_ok[:, None], n, axis=1).astype(np.float64)
    with timer("local.fit"):
        model, _ = fit_bspline_grid(local.patch_centres_px, local.shifts_px, n_ctrl=ctrl, extent=(wx, wy, n),
                                    weights=weights)
    return local, model, ""
