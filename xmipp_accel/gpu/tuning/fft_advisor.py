"""FFT size advisor: transform sizes that cuFFT runs fast, by a cost model and, on a GPU, by measurement.

cuFFT is fast for sizes 2^a·3^b·5^c·7^d and slow for large prime factors; among
those sizes the time still varies with the number of kernels the transform is
split into and with the radices used, and a crop or pad of a few percent can
save a quarter of the time (a 4092-row K3 frame transforms about 25% slower than
a 4096-row one on our H100). Like cuFFTAdvisor (Střelák & Filipovič, ANDARE 2018,
doi:10.1145/3295816.3295817), this module enumerates the smooth sizes within the
crop and pad a use allows, ranks them with a cost model, and on a GPU measures
the cuFFT time and plan memory of a shortlist; measurements are cached per GPU
model and CUDA/CuPy version (:mod:`.cache`), so later runs reuse them.

Shapes are in array order: ``(y, x)`` for images and ``(z, y, x)`` for volumes;
the command line shows them as ``width x height``. For a real-to-complex
transform the last axis is the one halved.

Functions
---------
candidate_sizes : smooth sizes near ``n``.
transform_cost : the model's time for one transform (seconds) and its memory.
recommend : ranked candidate shapes for a use (model, then measurement on a GPU).
good_fft_size, good_fft_shape : one cheap, deterministic answer for algorithms.
"""
from __future__ import annotations

import functools
import itertools
import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ... import backend
from .cache import TuningCache, default_cache, make_key

logger = logging.getLogger(__name__)

__all__ = ["Candidate", "candidate_sizes", "transform_cost", "recommend", "good_fft_size", "good_fft_shape",
           "measure_transform", "is_smooth", "factorize"]

SMOOTH_PRIMES = (2, 3, 5, 7)

# --- cost model constants (a memory-bound GPU FFT: each kernel reads and writes the data once) ---
#: points one cuFFT kernel transforms in shared memory before another pass over global memory is needed
_POINTS_PER_KERNEL = 4096
#: relative arithmetic per element per radix-p stage, per bit of log2(p) (radix 2 = 1)
_RADIX_EFFICIENCY = {2: 1.0, 3: 1.15, 5: 1.3, 7: 1.45}
#: arithmetic of one radix-2 stage over the data, in units of one memory pass (H100-like: memory bound)
_COMPUTE_PER_STAGE = 0.04
#: primes above this are done with Bluestein's algorithm (transforms of a padded power of two)
_LARGEST_DIRECT_PRIME = 127
#: extra passes of a length with a prime factor 11..127, and of one with a larger prime (fitted on an H100)
_GENERIC_RADIX_PASSES = 0.8
_BLUESTEIN_PASSES = 2.5
_BANDWIDTH_B_PER_S = 2.0e12
_LAUNCH_S = 4e-6


def factorize(n: int) -> Dict[int, int]:
    """Prime factorisation of ``n >= 1`` as ``{prime: exponent}``."""
    n = int(n)
    if n < 1:
        raise ValueError(f"size must be >= 1, got {n}")
    out: Dict[int, int] = {}
    p = 2
    while p * p <= n:
        while n % p == 0:
            out[p] = out.get(p, 0) + 1
            n //= p
        p += 1 if p == 2 else 2
    if n > 1:
        out[n] = out.get(n, 0) + 1
    return out


def is_smooth(n: int, primes: Sequence[int] = SMOOTH_PRIMES) -> bool:
    """True when ``n`` has no prime factor outside ``primes``."""
    n = int(n)
    if n < 1:
        return False
    for p in primes:
        while n % p == 0:
            n //= p
    return n == 1


def _smooth_numbers_upto(hi: int, primes: Sequence[int]) -> List[int]:
    nums = [1]
    for p in primes:
        extended = []
        for v in nums:
            while v <= hi:
                extended.append(v)
                v *= p
        nums = extended
    return sorted(nums)


def candidate_sizes(n: int, *, crop_max: float = 0.1, pad_max: float = 0.2, primes: Sequence[int] = SMOOTH_PRIMES,
                    multiple_of: int = 1) -> List[int]:
    """Sizes ``m = 2^a·3^b·5^c·7^d`` with ``n·(1 - crop_max) <= m <= n·(1 + pad_max)``, ascending.

    Parameters
    ----------
    n : int
        Requested size (pixels), >= 1.
    crop_max, pad_max : float
        Largest allowed relative crop and pad (0.1 = 10%); 0 forbids that direction.
    primes : sequence of int
        Allowed prime factors (add 11 for recent cuFFT versions that have a radix-11 kernel).
    multiple_of : int
        Keep only multiples of this (2 for the even boxes most algorithms need).

    Returns
    -------
    list of int
        May be empty when the window holds no smooth size (tiny windows around large primes).
    """
    n = int(n)
    if n < 1:
        raise ValueError(f"size must be >= 1, got {n}")
    if not 0 <= crop_max < 1 or pad_max < 0:
        raise ValueError(f"crop_max must be in [0, 1) and pad_max >= 0, got {crop_max}, {pad_max}")
    lo = max(1, math.ceil(n * (1 - crop_max) - 1e-9))
    hi = max(n, math.floor(n * (1 + pad_max) + 1e-9))
    return [m for m in _smooth_numbers_upto(hi, tuple(primes)) if m >= lo and m % multiple_of == 0]


@functools.lru_cache(maxsize=4096)
def _axis_passes(n: int) -> float:
    """Model cost of a complex 1D transform of length ``n``, in full passes over the data (memory + arithmetic).

    Smooth lengths: one pass per kernel (``_POINTS_PER_KERNEL`` points each) plus the radix stages'
    arithmetic. A prime factor 11..127 (generic-radix kernels) adds ``_GENERIC_RADIX_PASSES``; a larger one
    (Bluestein's algorithm) adds ``_BLUESTEIN_PASSES``. The two penalties were fitted to 122 random sizes
    measured on an H100 with CUDA 12 (RMS error of the predicted speed-up of padding: a factor 1.35).
    """
    if n <= 1:
        return 0.0
    f = factorize(n)
    stages = sum(e * math.log2(p) * _RADIX_EFFICIENCY.get(p, 2.0 + p / 64.0)
                 for p, e in f.items() if p <= _LARGEST_DIRECT_PRIME)
    kernels = max(1, math.ceil(math.log2(n) / math.log2(_POINTS_PER_KERNEL) - 1e-9))
    cost = kernels + _COMPUTE_PER_STAGE * stages
    largest = max(f)
    if largest > _LARGEST_DIRECT_PRIME:
        cost += _BLUESTEIN_PASSES
    elif largest > 7:
        cost += _GENERIC_RADIX_PASSES
    return cost


def transform_cost(shape: Sequence[int], *, batch: int = 1, real: bool = True,
                   double: bool = False) -> Tuple[float, int, int]:
    """Model of one batched transform: (seconds, kernel launches, bytes of input + output + work area).

    Parameters
    ----------
    shape : sequence of int
        Transform shape in array order (``(y, x)`` or ``(z, y, x)``); the last axis is halved for ``real``.
    batch : int
        Number of transforms done together.
    real : bool
        Real-to-complex (True) or complex-to-complex.
    double : bool
        float64/complex128 instead of float32/complex64.

    Notes
    -----
    Each kernel reads and writes the data once, so the time is bytes x passes / bandwidth plus a
    launch latency per kernel; a radix-p stage adds arithmetic in proportion to log2(p) and the
    radix's inefficiency. A real transform of even length n runs as a complex one of n/2 plus a
    post-processing pass; of odd length as a complex one of n on the real data. The constants
    describe an H100-like GPU; the measurement in :func:`recommend` corrects them.
    """
    shape = tuple(int(s) for s in shape)
    n_elem = int(np.prod(shape)) * int(batch)
    real_bytes = 8 if double else 4
    passes = 0.0
    for axis, n in enumerate(shape):
        if real and axis == len(shape) - 1:
            passes += (_axis_passes(n // 2) + 0.5) if n % 2 == 0 else (_axis_passes(n) + 1.0)
        else:
            passes += _axis_passes(n)
    data_bytes = n_elem * real_bytes * (1 if real else 2)  # the half spectrum is as large as the real data
    launches = max(1, math.ceil(passes))
    seconds = 2.0 * data_bytes * passes / _BANDWIDTH_B_PER_S + launches * _LAUNCH_S
    out_bytes = (int(np.prod(shape[:-1])) * (shape[-1] // 2 + 1) * batch * 2 * real_bytes) if real else data_bytes
    work = out_bytes if launches > len(shape) else 0
    return seconds, launches, int(data_bytes + out_bytes + work)


@dataclass
class Candidate:
    """One ranked transform shape.

    Attributes
    ----------
    shape : tuple of int
        Array order (``(y, x)``/``(z, y, x)``).
    model_ms : float
        Model time of one batched transform (milliseconds).
    memory_bytes : int
        Input + output + work area, modelled or (when measured) with cuFFT's own work area.
    measured_ms : float or None
        Median cuFFT time measured with CUDA events (None when not measured).
    plan_bytes : int or None
        cuFFT work area of the plan (None when not measured).
    requested : bool
        This is the shape that was asked for (shown for comparison even if it is not smooth).
    """
    shape: Tuple[int, ...]
    model_ms: float
    memory_bytes: int
    measured_ms: Optional[float] = None
    plan_bytes: Optional[int] = None
    requested: bool = False
    change: Tuple[float, ...] = field(default=())

    @property
    def time_ms(self) -> float:
        """Measured time where there is one, else the model's."""
        return self.measured_ms if self.measured_ms is not None else self.model_ms

    @property
    def width_height(self) -> List[int]:
        """The shape as the command line shows it: ``[width, height(, depth)]`` (reversed array order)."""
        return list(reversed(self.shape))

    def as_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d["shape"] = list(self.shape)
        d["change"] = list(self.change)
        d["width_height"] = self.width_height
        return d


def _per_axis_shortlist(n: int, *, real_last: bool, crop_max: float, pad_max: float, multiple_of: int,
                        primes: Sequence[int], keep: int) -> List[int]:
    sizes = candidate_sizes(n, crop_max=crop_max, pad_max=pad_max, primes=primes, multiple_of=multiple_of)
    if not sizes:
        return []

    def cost(m):
        if real_last:
            axis = (_axis_passes(m // 2) + 0.5) if m % 2 == 0 else (_axis_passes(m) + 1.0)
        else:
            axis = _axis_passes(m)
        return (m * axis, abs(m - n))
    return sorted(sizes, key=cost)[:keep]


def _model_candidates(shape: Tuple[int, ...], *, batch: int, real: bool, double: bool, crop_max: float,
                      pad_max: float, multiple_of: int, primes: Sequence[int], keep_per_axis: int) -> List[Candidate]:
    per_axis = []
    for axis, n in enumerate(shape):
        sizes = _per_axis_shortlist(n, real_last=real and axis == len(shape) - 1, crop_max=crop_max,
                                    pad_max=pad_max, multiple_of=multiple_of, primes=primes, keep=keep_per_axis)
        per_axis.append(sizes)
    out = []
    if all(per_axis):
        for combo in itertools.product(*per_axis):
            s, _, mem = transform_cost(combo, batch=batch, real=real, double=double)
            out.append(Candidate(tuple(combo), s * 1e3, mem, change=tuple(round(c / n - 1, 4)
                                                                              for c, n in zip(combo, shape))))
    return out


RANK_BY = ("time_per_pixel", "time", "memory")


def _metric(c: Candidate, shape: Tuple[int, ...], rank_by: str) -> float:
    if rank_by == "memory":
        return float(c.memory_bytes)
    if rank_by == "time_per_pixel":
        kept = float(np.prod([min(a, b) for a, b in zip(c.shape, shape)]))
        return c.time_ms / kept
    return c.time_ms


def _rank(cands: List[Candidate], shape: Tuple[int, ...], rank_by: str, tolerance: float) -> List[Candidate]:
    """Measured candidates first, each group by the metric; near-ties (within ``tolerance``) by least change."""
    def distance(c):
        return sum(abs(a - b) / b for a, b in zip(c.shape, shape))

    out: List[Candidate] = []
    for group in ([c for c in cands if c.measured_ms is not None], [c for c in cands if c.measured_ms is None]):
        group = sorted(group, key=lambda c: (_metric(c, shape, rank_by), distance(c)))
        while group:
            limit = _metric(group[0], shape, rank_by) * (1 + tolerance)
            ties = sorted((c for c in group if _metric(c, shape, rank_by) <= limit),
                          key=lambda c: (distance(c), _metric(c, shape, rank_by)))
            out.extend(ties)
            group = [c for c in group if _metric(c, shape, rank_by) > limit]
    return out


def recommend(shape: Sequence[int], *, batch: int = 1, real: bool = True, double: bool = False,
              crop_max: float = 0.0, pad_max: float = 0.2, multiple_of: int = 1,
              primes: Sequence[int] = SMOOTH_PRIMES, measure: Optional[bool] = None, shortlist: int = 6,
              rank_by: str = "time_per_pixel", tolerance: float = 0.03, cache: Optional[TuningCache] = None,
              keep_per_axis: int = 8, top: int = 10) -> List[Candidate]:
    """Rank transform shapes near ``shape`` for a use, best first.

    Parameters
    ----------
    shape : sequence of int
        Requested transform shape in array order, ``(y, x)`` or ``(z, y, x)`` (or ``(n,)``).
    batch : int
        Transforms done together (e.g. 30 movie frames).
    real : bool
        Real-to-complex (the last axis is halved) or complex-to-complex.
    double : bool
        Double precision.
    crop_max, pad_max : float
        Largest relative crop and pad per axis (0.1 = 10%).
    multiple_of : int
        Keep only sizes that are multiples of this on every axis (2 for even boxes).
    primes : sequence of int
        Allowed prime factors of candidate sizes.
    measure : bool or None
        Measure the ``shortlist`` best model candidates (and the requested shape) with cuFFT on the
        current GPU: None = when a GPU is usable, True = required, False = model only.
    shortlist : int
        How many model candidates to measure.
    rank_by : {"time_per_pixel", "time", "memory"}
        ``time_per_pixel`` (default): transform time divided by the pixels of the request that a
        candidate keeps (a crop loses data, a pad keeps all), so a crop wins only when it is faster
        per pixel kept; ``time``: transform time alone (the most cropped size usually wins);
        ``memory``: input + output + work area.
    tolerance : float
        Candidates within this relative margin of the best (3%: about the noise of a measurement) count
        as equally fast and are ordered by the least change of size.
    cache : TuningCache, optional
        Where measurements are kept; default the process-wide cache of the current GPU.
    keep_per_axis : int
        Sizes kept per axis before forming combinations (the model's best).
    top : int
        Number of candidates returned (plus the requested shape, flagged ``requested``, when it is not among them).

    Returns
    -------
    list of Candidate
        Measured candidates first (by measured time), then the others by model time; the requested
        shape is included for comparison, flagged ``requested=True``.

    Raises
    ------
    ValueError
        On sizes < 1, bad fractions, an unknown ``rank_by``, or ``measure=True`` without a GPU.
    """
    shape = tuple(int(s) for s in shape)
    if not shape or min(shape) < 1:
        raise ValueError(f"shape must be a non-empty sequence of sizes >= 1, got {shape}")
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    if rank_by not in RANK_BY:
        raise ValueError(f"rank_by must be one of {', '.join(RANK_BY)}, got {rank_by!r}")
    cp = backend.cupy_module()
    if measure and cp is None:
        raise ValueError("measure=True needs a usable GPU (CuPy with a CUDA device); use measure=False")
    do_measure = cp is not None if measure is None else bool(measure)

    cands = _model_candidates(shape, batch=batch, real=real, double=double, crop_max=crop_max, pad_max=pad_max,
                              multiple_of=multiple_of, primes=primes, keep_per_axis=keep_per_axis)
    cands = _rank(cands, shape, rank_by, tolerance)
    req = next((c for c in cands if c.shape == shape), None)
    if req is None:
        s, _, mem = transform_cost(shape, batch=batch, real=real, double=double)
        req = Candidate(shape, s * 1e3, mem, change=tuple(0.0 for _ in shape))
    req.requested = True
    if do_measure:
        cache = cache if cache is not None else default_cache()
        to_measure = cands[:shortlist] + ([req] if req not in cands[:shortlist] else [])
        for c in to_measure:
            ms, plan_bytes = _measured(c.shape, batch=batch, real=real, double=double, cache=cache)
            c.measured_ms, c.plan_bytes = ms, plan_bytes
            if plan_bytes is not None:
                c.memory_bytes = _io_bytes(c.shape, batch, real, double) + plan_bytes
    pool = _rank(cands + ([req] if req not in cands else []), shape, rank_by, tolerance)
    ranked = [c for c in pool if not c.requested or c in cands or c.measured_ms is not None][:top]
    if req not in ranked:
        ranked.append(req)
    return ranked


def _io_bytes(shape, batch, real, double) -> int:
    real_bytes = 8 if double else 4
    n_in = int(np.prod(shape)) * batch
    if real:
        n_out = int(np.prod(shape[:-1])) * (shape[-1] // 2 + 1) * batch
        return n_in * real_bytes + n_out * 2 * real_bytes
    return 2 * n_in * 2 * real_bytes


def _measured(shape, *, batch, real, double, cache) -> Tuple[Optional[float], Optional[int]]:
    key = make_key("r2c" if real else "c2c", "f64" if double else "f32", batch=batch, shape=list(shape))
    hit = cache.get("fft", key)
    if hit is not None:
        return hit.get("ms"), hit.get("plan_bytes")
    try:
        ms, plan_bytes = measure_transform(shape, batch=batch, real=real, double=double)
    except Exception as exc:  # out of memory, cuFFT refusing a size: leave it unmeasured
        logger.info("could not measure FFT of %s x %d: %s", shape, batch, exc)
        return None, None
    finally:
        cp = backend.cupy_module()
        if cp is not None:  # give the measurement's buffers back so large shortlists fit
            cp.get_default_memory_pool().free_all_blocks()
    cache.put("fft", key, {"ms": ms, "plan_bytes": plan_bytes})
    return ms, plan_bytes


def measure_transform(shape: Sequence[int], *, batch: int = 1, real: bool = True, double: bool = False,
                      repeats: int = 5) -> Tuple[float, Optional[int]]:
    """Median time (ms, CUDA events) of one batched forward cuFFT transform, and its plan's work area (bytes).

    Runs on the current CuPy device; the data are random and allocated here.
    """
    from .autotune import time_callable  # noqa: PLC0415  (shared event timer)
    cp = backend.cupy_module()
    if cp is None:
        raise ValueError("measuring an FFT needs a usable GPU")
    shape = tuple(int(s) for s in shape)
    axes = tuple(range(1, len(shape) + 1))
    full = (int(batch),) + shape
    rdt = np.float64 if double else np.float32
    cdt = np.complex128 if double else np.complex64
    a = cp.random.standard_normal(full, dtype=rdt)
    if not real:
        a = a.astype(cdt)
    plan_bytes = None
    try:
        plan = backend.cupyx_fft_module().get_fft_plan(a, axes=axes, value_type="R2C" if real else "C2C")
        plan_bytes = int(plan.work_area.mem.size) if getattr(plan, "work_area", None) is not None else 0
    except Exception as exc:  # older CuPy, or a shape get_fft_plan does not cover
        logger.debug("no plan information for %s: %s", shape, exc)
        plan = None

    def plain():
        return cp.fft.rfftn(a, axes=axes) if real else cp.fft.fftn(a, axes=axes)

    def with_plan():
        with plan:
            return plain()

    run = plain
    if plan is not None:
        try:
            with_plan()
            run = with_plan
        except Exception as exc:  # a plan CuPy's rfftn does not accept: let CuPy make its own
            logger.debug("explicit plan refused for %s: %s", shape, exc)
    timing = time_callable(run, xp=cp, repeats=repeats, warmup=1)
    return timing.median_s * 1e3, plan_bytes  # data and plan are freed with this frame


@functools.lru_cache(maxsize=1024)
def _good_size_model(n: int, allow_crop: bool, crop_max: float, pad_max: float, real: bool, multiple_of: int,
                     primes: Tuple[int, ...]) -> int:
    keep = _per_axis_shortlist(n, real_last=real, crop_max=crop_max if allow_crop else 0.0, pad_max=pad_max,
                               multiple_of=multiple_of, primes=primes, keep=1)
    if keep:
        return keep[0]
    # no smooth size in the window: the next one above (always exists)
    m = n
    while not (is_smooth(m, primes) and m % multiple_of == 0):
        m += 1
    return m


def good_fft_size(n: int, *, allow_crop: bool = False, crop_max: float = 0.1, pad_max: float = 0.2,
                  real: bool = False, multiple_of: int = 1, primes: Sequence[int] = SMOOTH_PRIMES) -> int:
    """A transform length near ``n`` that cuFFT runs fast (cost model only: cheap and deterministic).

    Parameters
    ----------
    n : int
        Requested length (pixels), e.g. a padded box ``2 * box`` or a movie frame side.
    allow_crop : bool
        Allow sizes below ``n`` (down to ``n·(1 - crop_max)``), e.g. to crop movie frames.
    crop_max, pad_max : float
        Largest relative crop (when allowed) and pad.
    real : bool
        ``n`` is the halved (last) axis of a real-to-complex transform, where even sizes are much faster.
    multiple_of : int
        Return a multiple of this (2 for even boxes).

    Returns
    -------
    int
        The model's best size in the window; when the window holds none, the smallest smooth
        multiple of ``multiple_of`` above ``n``.

    Notes
    -----
    The answer does not depend on the GPU, so results (which change slightly with the padded size)
    are the same on every machine; :func:`recommend` with ``measure=True`` ranks by measured time.
    """
    n = int(n)
    if n < 1:
        raise ValueError(f"size must be >= 1, got {n}")
    return _good_size_model(n, bool(allow_crop), float(crop_max), float(pad_max), bool(real), int(multiple_of),
                            tuple(primes))


def good_fft_shape(shape: Sequence[int], *, allow_crop: bool = False, crop_max: float = 0.1, pad_max: float = 0.2,
                   real: bool = True, batch: int = 1, multiple_of: int = 1) -> Tuple[int, ...]:
    """The model's best transform shape near ``shape`` (array order), e.g. the crop of a movie frame.

    Same rules as :func:`good_fft_size`, ranking whole shapes with :func:`transform_cost`.
    """
    ranked = recommend(shape, batch=batch, real=real, crop_max=crop_max if allow_crop else 0.0, pad_max=pad_max,
                       multiple_of=multiple_of, measure=False, top=1)
    best = ranked[0]
    if best.requested and not all(is_smooth(s) for s in best.shape):
        return tuple(good_fft_size(s, allow_crop=allow_crop, crop_max=crop_max, pad_max=pad_max,
                                   real=real and i == len(shape) - 1, multiple_of=multiple_of)
                     for i, s in enumerate(shape))
    return tuple(best.shape)


def speedup_table(shape: Sequence[int], ranked: List[Candidate]) -> List[str]:
    """Human-readable lines of a ranking (width x height, times, memory, change)."""
    req = next((c for c in ranked if c.requested), None)
    ref = req.time_ms if req is not None else None
    lines = [f"{'rank':>4}  {'size (w x h)':>18}  {'model ms':>9}  {'measured ms':>11}  {'speedup':>7}  "
             f"{'memory MiB':>10}  change"]
    for i, c in enumerate(ranked, 1):
        size = " x ".join(str(v) for v in c.width_height)
        meas = f"{c.measured_ms:.3f}" if c.measured_ms is not None else "-"
        sp = f"{ref / c.time_ms:.2f}x" if ref and c.time_ms > 0 else "-"
        change = ", ".join(f"{100 * v:+.1f}%" for v in reversed(c.change))
        tag = "  (requested)" if c.requested else ""
        lines.append(f"{i:>4}  {size:>18}  {c.model_ms:>9.3f}  {meas:>11}  {sp:>7}  "
                     f"{c.memory_bytes / 2**20:>10.1f}  {change}{tag}")
    return lines

