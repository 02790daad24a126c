"""Kernel autotuning: offline search and dynamic (in-run) tuning, results kept per GPU and size class.

A kernel that can be tuned describes itself with a :class:`TunableKernel`: a
tuning space (parameter -> allowed values: block size, items per thread,
shared-memory tiling, table vs on-the-fly...), constraints, a default
configuration, ``build(params)`` that compiles one variant (CuPy ``RawModule``
with ``-D`` options or template ``name_expressions``), ``make_inputs(size)``
that builds realistic inputs and ``run(fn, inputs)`` that launches one variant
once. Every variant computes the same result; only its speed differs.

- :class:`Tuner` (offline, ``xmipp-accel tune``): compiles the variants (all of
  them when the space is small, else a bounded random sample that always holds
  the default), checks each against the default's output, times them with CUDA
  events on the real inputs and stores the best per (GPU, kernel, size class)
  in the :class:`~.cache.TuningCache`.
- :class:`DynamicTuner` (during a long run, as KTT's dynamic tuning): the first
  calls of the run each use a different candidate (at most ``budget``, 50 by
  default) and are timed; later calls use the fastest. Results never change,
  because every candidate computes the same thing on the same data.
- :func:`tuned_params`: what an algorithm calls: the cached best for this GPU and
  size class, or the default.

Kernels register themselves with :func:`register` from their own modules (e.g.
``gpu/reconstruct/insert_tuning.py``); this package imports no algorithm.
``xmipp-accel tune`` imports the modules that define kernels
(:data:`xmipp_accel.cli.tune.KERNEL_MODULES`) before listing :func:`registered`.
Petrovič et al., KTT, FGCS 108:161 (2020), doi:10.1016/j.future.2020.02.069.
"""
from __future__ import annotations

import functools
import itertools
import logging
import math
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence

import numpy as np

from ... import backend
from .cache import TuningCache, default_cache, make_key

logger = logging.getLogger(__name__)

__all__ = ["TunableKernel", "Timing", "TrialResult", "TuningResult", "Tuner", "DynamicTuner", "time_callable",
           "configurations", "size_class", "register", "get_kernel", "registered", "tuned_params"]


# ---------------------------------------------------------------------------------------------- timing
@dataclass
class Timing:
    """Run times of repeated calls (seconds)."""
    samples_s: List[float]

    @property
    def median_s(self) -> float:
        return float(np.median(self.samples_s))

    @property
    def min_s(self) -> float:
        return float(np.min(self.samples_s))


def time_callable(fn: Callable[[], Any], *, xp=None, repeats: int = 5, warmup: int = 1) -> Timing:
    """Time ``fn()``: CUDA events on the current stream when ``xp`` is CuPy, ``perf_counter`` otherwise.

    Parameters
    ----------
    fn : callable with no arguments
        The work to time (e.g. one kernel launch or one FFT).
    xp : module
        numpy or cupy; decides how to time.
    repeats, warmup : int
        Timed and untimed calls.
    """
    cp = backend.cupy_module()
    gpu = cp is not None and xp is cp
    for _ in range(max(0, warmup)):
        fn()
    if gpu:
        cp.cuda.get_current_stream().synchronize()
    samples = []
    for _ in range(max(1, repeats)):
        if gpu:
            start, end = cp.cuda.Event(), cp.cuda.Event()
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(cp.cuda.get_elapsed_time(start, end) * 1e-3)
        else:
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
    return Timing(samples)


# ---------------------------------------------------------------------------------------------- kernels
def size_class(size: Any) -> str:
    """Default problem-size class: each dimension rounded to the nearest power of two.

    Tuned configurations port across sizes at only 32-100% of the best (KTT), so results are kept
    per class; sizes of one class (e.g. boxes 200 and 256) share a result. ``size`` may be an int,
    a sequence of ints or a mapping name -> int (``{"box": 256, "batch": 1000}`` -> ``"batch=1024,box=256"``).
    """
    def bucket(v):
        v = int(v)
        return 0 if v <= 0 else 2 ** int(round(math.log2(v)))
    if isinstance(size, Mapping):
        return ",".join(f"{k}={bucket(v)}" for k, v in sorted(size.items()))
    if isinstance(size, (list, tuple)):
        return "x".join(str(bucket(v)) for v in size)
    return str(bucket(size))


@dataclass
class TunableKernel:
    """What the tuner needs to know about one tunable kernel.

    Attributes
    ----------
    name : str
        Registry name (``"insert"``, ``"movie-correlate"``...).
    space : dict
        Parameter name -> sequence of allowed values.
    default : dict
        The configuration used when nothing is tuned (must satisfy the constraints).
    build : callable ``(params: dict) -> fn``
        Compile one variant (may raise for an impossible variant: it is skipped).
    make_inputs : callable ``(size, xp) -> inputs``
        Realistic inputs for a problem size (any object; given back to ``run``).
    run : callable ``(fn, inputs) -> output``
        Launch the variant once on the inputs and return its output (an array, or a tuple of them).
        It must give the same output every call: reset accumulators inside ``run``.
    constraints : sequence of callables ``(params) -> bool``
        A configuration is valid when all return True.
    size_class : callable ``(size) -> str``
        Problem-size class the result is kept under (default :func:`size_class`).
    check : callable ``(output, reference) -> bool``, optional
        Whether a variant's output matches the default's (default: allclose with rtol 1e-4, atol 1e-5
        relative to the reference's largest magnitude).
    sizes : sequence
        Sizes ``xmipp-accel tune`` uses when none is given.
    description : str
        One line for ``xmipp-accel tune --list``.
    """
    name: str
    space: Dict[str, Sequence[Any]]
    default: Dict[str, Any]
    build: Callable[[Dict[str, Any]], Any]
    make_inputs: Callable[[Any, Any], Any]
    run: Callable[[Any, Any], Any]
    constraints: Sequence[Callable[[Dict[str, Any]], bool]] = ()
    size_class: Callable[[Any], str] = size_class
    check: Optional[Callable[[Any, Any], bool]] = None
    sizes: Sequence[Any] = ()
    description: str = ""

    def valid(self, params: Mapping[str, Any]) -> bool:
        return all(c(dict(params)) for c in self.constraints)

    def outputs_match(self, output: Any, reference: Any) -> bool:
        if self.check is not None:
            return bool(self.check(output, reference))
        return _default_check(output, reference)

    @property
    def cache_kind(self) -> str:
        return f"kernel:{self.name}"


def _as_tuple(x):
    return tuple(x) if isinstance(x, (list, tuple)) else (x,)


def _default_check(output: Any, reference: Any) -> bool:
    """allclose on the arrays' device (rtol 1e-4, atol 1e-5 of the reference's largest magnitude)."""
    out_t, ref_t = _as_tuple(output), _as_tuple(reference)
    if len(out_t) != len(ref_t):
        return False
    for a, b in zip(out_t, ref_t):
        xp = backend.get_xp(a, b)
        a, b = xp.asarray(a), xp.asarray(b)
        if a.shape != b.shape:
            return False
        scale = float(xp.max(xp.abs(b))) if b.size else 0.0
        if not bool(xp.allclose(a, b, rtol=1e-4, atol=1e-5 * max(scale, 1e-30))):
            return False
    return True


def _copy_output(output: Any) -> Any:
    if isinstance(output, (list, tuple)):
        return type(output)(_copy_output(o) for o in output)
    return output.copy() if hasattr(output, "copy") else output


def configurations(space: Mapping[str, Sequence[Any]],
                   constraints: Sequence[Callable[[Dict[str, Any]], bool]] = ()) -> List[Dict[str, Any]]:
    """Every configuration of a tuning space that satisfies the constraints (product order)."""
    names = list(space)
    out = []
    for values in itertools.product(*(space[n] for n in names)):
        params = dict(zip(names, values))
        if all(c(params) for c in constraints):
            out.append(params)
    return out


def _select(kernel: TunableKernel, max_configs: Optional[int], strategy: str, seed: int) -> List[Dict[str, Any]]:
    """Configurations to try: all when few enough (or exhaustive), else a random sample holding the default."""
    allc = configurations(kernel.space, kernel.constraints)
    default = dict(kernel.default)
    if default not in allc:
        raise ValueError(f"kernel {kernel.name}: the default configuration {default} is not in its space "
                         "or breaks a constraint")
    others = [c for c in allc if c != default]
    if strategy not in ("auto", "exhaustive", "random"):
        raise ValueError(f"strategy must be auto, exhaustive or random, got {strategy!r}")
    if strategy == "exhaustive" or max_configs is None or len(allc) <= max_configs:
        rng = random.Random(seed)
        if strategy == "random":
            rng.shuffle(others)
        return [default] + others
    rng = random.Random(seed)
    return [default] + rng.sample(others, max(0, max_configs - 1))


# ---------------------------------------------------------------------------------------------- registry
_REGISTRY: Dict[str, TunableKernel] = {}


def register(kernel: TunableKernel) -> TunableKernel:
    """Add (or replace) a kernel in the registry; returns it (usable at module level)."""
    configurations_ok = kernel.valid(kernel.default)
    if not configurations_ok:
        raise ValueError(f"kernel {kernel.name}: default configuration breaks a constraint")
    _REGISTRY[kernel.name] = kernel
    return kernel


def registered() -> Dict[str, TunableKernel]:
    """Registered kernels by name (those whose modules have been imported)."""
    return dict(_REGISTRY)


def get_kernel(name: str) -> TunableKernel:
    """A registered kernel by name; ValueError lists the known names."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown tunable kernel {name!r}; known: {', '.join(sorted(_REGISTRY)) or 'none'}")
    return _REGISTRY[name]


def tuned_params(kernel: TunableKernel | str, size: Any, *, cache: Optional[TuningCache] = None) -> Dict[str, Any]:
    """The best known configuration of ``kernel`` for ``size`` on this GPU, or its default.

    Cheap (a dictionary look-up after the first call); algorithms call it before building their kernel.
    """
    k = get_kernel(kernel) if isinstance(kernel, str) else kernel
    cache = cache if cache is not None else default_cache()
    hit = cache.get(k.cache_kind, k.size_class(size))
    return _cached_params(k, hit) or dict(k.default)


def _cached_params(k: TunableKernel, hit: Any) -> Optional[Dict[str, Any]]:
    """The parameters of a cache entry when they are still a valid configuration of the kernel's space."""
    if not isinstance(hit, dict) or not isinstance(hit.get("params"), dict):
        return None
    params = hit["params"]
    if set(params) != set(k.space) or not all(params[p] in vals for p, vals in k.space.items()):
        return None  # the kernel's space changed since this was tuned
    return dict(params) if k.valid(params) else None


# ---------------------------------------------------------------------------------------------- offline
@dataclass
class TrialResult:
    """One configuration's outcome: median time (s) or the reason it was skipped."""
    params: Dict[str, Any]
    seconds: Optional[float] = None
    error: Optional[str] = None


@dataclass
class TuningResult:
    """Outcome of tuning one kernel at one size."""
    kernel: str
    size: Any
    size_class: str
    best: Dict[str, Any]
    best_s: float
    default_s: float
    trials: List[TrialResult] = field(default_factory=list)
    strategy: str = "auto"

    @property
    def speedup(self) -> float:
        """Default time / best time."""
        return self.default_s / self.best_s if self.best_s > 0 else float("nan")

    def as_dict(self) -> Dict[str, Any]:
        return {"kernel": self.kernel, "size": self.size, "size_class": self.size_class, "best": self.best,
                "best_ms": self.best_s * 1e3, "default_ms": self.default_s * 1e3, "speedup": self.speedup,
                "tried": len(self.trials), "failed": sum(1 for t in self.trials if t.error),
                "strategy": self.strategy}


class Tuner:
    """Offline search of one kernel's tuning space.

    Parameters
    ----------
    kernel : TunableKernel or str
        The kernel (or its registry name).
    cache : TuningCache, optional
        Where the best configuration is kept (default: the process-wide cache of the current device).
    max_configs : int or None
        Largest number of configurations tried (None: all).
    strategy : {"auto", "exhaustive", "random"}
        ``auto``: exhaustive when the space fits in ``max_configs``, else random.
    repeats : int
        Timed launches per configuration (the median is kept).
    seed : int
        Seed of the random sample.
    timer : callable ``(fn) -> seconds``, optional
        How to time one configuration's ``fn()`` (default: median of :func:`time_callable`).
    """

    def __init__(self, kernel: TunableKernel | str, *, cache: Optional[TuningCache] = None,
                 max_configs: Optional[int] = 200, strategy: str = "auto", repeats: int = 5, seed: int = 0,
                 timer: Optional[Callable[[Callable[[], Any]], float]] = None):
        self.kernel = get_kernel(kernel) if isinstance(kernel, str) else kernel
        self.cache = cache
        self.max_configs = max_configs
        self.strategy = strategy
        self.repeats = repeats
        self.seed = seed
        self.timer = timer

    def _cache(self) -> TuningCache:
        if self.cache is None:
            self.cache = default_cache()
        return self.cache

    def tune(self, size: Any, *, xp=None, store: bool = True,
             configs: Optional[Iterable[Mapping[str, Any]]] = None) -> TuningResult:
        """Try configurations on inputs of ``size``; keep the fastest that matches the default's output.

        Parameters
        ----------
        size : problem size understood by the kernel's ``make_inputs``.
        xp : numpy or cupy; default cupy when a GPU is usable.
        store : keep the best in the cache.
        configs : explicit configurations to try (default: chosen by the strategy; the default is always tried).

        Returns
        -------
        TuningResult
        """
        k = self.kernel
        xp = xp if xp is not None else (backend.cupy_module() or np)
        if configs is None:
            chosen = _select(k, self.max_configs, self.strategy, self.seed)
        else:
            chosen = [dict(k.default)] + [dict(c) for c in configs if dict(c) != k.default]
        inputs = k.make_inputs(size, xp)
        trials: List[TrialResult] = []
        reference = None
        for params in chosen:
            trial = TrialResult(dict(params))
            trials.append(trial)
            if not k.valid(params):
                trial.error = "breaks a constraint"
                continue
            try:
                fn = k.build(dict(params))
                out = k.run(fn, inputs)
                backend.synchronize(xp)
                if reference is None:
                    reference = _copy_output(out)  # the default runs first: its output is the reference
                elif not k.outputs_match(out, reference):
                    trial.error = "output differs from the default configuration"
                    logger.warning("kernel %s: configuration %s gives a different result; skipped", k.name, params)
                    continue
                call = functools.partial(k.run, fn, inputs)
                trial.seconds = (self.timer(call) if self.timer is not None else
                                 time_callable(call, xp=xp, repeats=self.repeats, warmup=0).median_s)
            except Exception as exc:  # compile errors, too many resources for a launch...
                if reference is None:
                    raise
                trial.error = f"{type(exc).__name__}: {exc}"[:300]
        good = [t for t in trials if t.seconds is not None]
        best = min(good, key=lambda t: t.seconds)
        result = TuningResult(k.name, size, k.size_class(size), best.params, best.seconds, trials[0].seconds,
                              trials, self.strategy)
        if store:
            self._store(result)
        return result

    def _store(self, result: TuningResult) -> None:
        self._cache().put(self.kernel.cache_kind, result.size_class, {
            "params": result.best, "ms": result.best_s * 1e3, "default_ms": result.default_s * 1e3,
            "size": result.size, "tried": len(result.trials), "mode": "offline"})


# ---------------------------------------------------------------------------------------------- dynamic
class DynamicTuner:
    """Tune a kernel during a long run: the first calls try candidates, the rest use the fastest.

    Parameters
    ----------
    kernel : TunableKernel or str
    size : problem size of the run (decides the size class).
    budget : int
        Most calls spent trying candidates (KTT's thesis: 50 configurations reached 88-96% of the best).
    cache : TuningCache, optional
        A cached best for this GPU and size class is used at once (no trials) unless ``retune``;
        the best found is stored at the end of the trials.
    strategy, seed : as for :class:`Tuner`.
    xp : numpy or cupy (how to time).
    retune : bool
        Try candidates even when a cached result exists.
    timer : callable ``(fn) -> (output, seconds)``, optional
        How a trial call is run and timed (default: CUDA events on a GPU, ``perf_counter`` on the CPU).

    Examples
    --------
    >>> tuner = DynamicTuner("movie-correlate", size={"pixels": 2048 * 1025, "pairs": 435})
    >>> for batch in batches:
    ...     out = tuner.run(batch)       # same result whatever configuration runs it

    Notes
    -----
    Every candidate computes the same output, so the results of the run do not depend on which
    calls tried which candidates. Each candidate is compiled before its call (compile time is not
    timed) and timed once with CUDA events, which synchronises only during the trials.
    """

    def __init__(self, kernel: TunableKernel | str, size: Any, *, budget: int = 50,
                 cache: Optional[TuningCache] = None, strategy: str = "auto", seed: int = 0, xp=None,
                 retune: bool = False, timer: Optional[Callable[[Callable[[], Any]], Any]] = None):
        self.kernel = get_kernel(kernel) if isinstance(kernel, str) else kernel
        self.timer = timer or self._timed
        self.size = size
        self.size_key = self.kernel.size_class(size)
        self.cache = cache if cache is not None else default_cache()
        self.xp = xp if xp is not None else (backend.cupy_module() or np)
        self.trials: List[TrialResult] = []
        self._fns: Dict[str, Any] = {}
        hit = None if retune else _cached_params(self.kernel, self.cache.get(self.kernel.cache_kind, self.size_key))
        if hit is not None:
            self._pending: List[Dict[str, Any]] = []
            self.best: Dict[str, Any] = hit
            self.from_cache = True
        else:
            self._pending = _select(self.kernel, budget, strategy, seed)
            self.best = dict(self.kernel.default)
            self.from_cache = False

    @property
    def tuning(self) -> bool:
        """True while calls still try candidates."""
        return bool(self._pending)

    def _fn(self, params: Dict[str, Any]):
        key = make_key(params)
        if key not in self._fns:
            self._fns[key] = self.kernel.build(dict(params))
        return self._fns[key]

    def run(self, inputs: Any) -> Any:
        """Run the kernel on ``inputs`` with the candidate under trial, or with the best once tuning ended."""
        if not self._pending:
            return self.kernel.run(self._fn(self.best), inputs)
        params = self._pending.pop(0)
        trial = TrialResult(params)
        try:
            fn = self._fn(params)
        except Exception as exc:
            trial.error = f"build failed: {exc}"[:300]
            self.trials.append(trial)
            return self._fallback(inputs)
        try:
            out, trial.seconds = self.timer(functools.partial(self.kernel.run, fn, inputs))
        except Exception as exc:  # e.g. too many resources requested for launch: nothing was computed
            trial.error = f"{type(exc).__name__}: {exc}"[:300]
            self.trials.append(trial)
            return self._fallback(inputs)
        self.trials.append(trial)
        if not self._pending:
            self._finish()
        return out

    def _timed(self, call: Callable[[], Any]):
        """Run ``call()`` once and time it: CUDA events on the GPU (synchronises), ``perf_counter`` on the CPU."""
        cp = backend.cupy_module()
        if cp is not None and self.xp is cp:
            start, end = cp.cuda.Event(), cp.cuda.Event()
            start.record()
            out = call()
            end.record()
            end.synchronize()
            return out, cp.cuda.get_elapsed_time(start, end) * 1e-3
        t0 = time.perf_counter()
        out = call()
        return out, time.perf_counter() - t0

    def _fallback(self, inputs: Any) -> Any:
        out = self.kernel.run(self._fn(self.best), inputs)
        if not self._pending:
            self._finish()
        return out

    def _finish(self) -> None:
        good = [t for t in self.trials if t.seconds is not None]
        if not good:
            return
        best = min(good, key=lambda t: t.seconds)
        self.best = dict(best.params)
        default = next((t.seconds for t in good if t.params == self.kernel.default), None)
        self.cache.put(self.kernel.cache_kind, self.size_key, {
            "params": self.best, "ms": best.seconds * 1e3,
            "default_ms": default * 1e3 if default is not None else None,
            "size": self.size, "tried": len(self.trials), "mode": "dynamic"})
        self._fns = {k: f for k, f in self._fns.items() if k == make_key(self.best)}  # free the other variants
        logger.info("kernel %s (%s): dynamic tuning tried %d configurations; best %s (%.3f ms)",
                    self.kernel.name, self.size_key, len(self.trials), self.best, best.seconds * 1e3)
