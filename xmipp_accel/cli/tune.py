"""Autotune CUDA kernels on this GPU and keep the best configuration per size class in the tuning cache.

Without a kernel name every registered kernel is tuned at its usual sizes.
Sizes are key=value lists (``padded_box=256,images=500``), plain numbers or
WxH. Results are stored per GPU model and CUDA/CuPy version; the algorithms pick
them up automatically (and tune themselves during long runs when nothing is stored).

Example usage::

    xmipp-accel tune --list
    xmipp-accel tune movie-local-motion --size frames=30,height=4096,width=4096 --json
    xmipp-accel tune                      # every kernel, its default sizes
    xmipp-accel tune insert --max-configs 50 --strategy random
"""
from __future__ import annotations

import argparse
import importlib
import logging
from typing import Any, Dict, List

from ..errors import InputError
from .. import backend
from ..gpu.tuning import autotune as at
from ..gpu.tuning.cache import default_cache
from .common import add_common_args, emit_result, resolve_devices, stopwatch

logger = logging.getLogger(__name__)

#: Algorithm modules that register tunable kernels with the tuner when imported.
KERNEL_MODULES = (
    "xmipp_accel.gpu.reconstruct.insert_tuning",   # insert
    "xmipp_accel.gpu.movie.apply",                 # movie-local-motion
)


def load_kernels() -> Dict[str, at.TunableKernel]:
    """Import :data:`KERNEL_MODULES` (a failing one is logged and skipped) and return the registered kernels."""
    for name in KERNEL_MODULES:
        try:
            importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001  one broken module must not hide the other kernels
            logger.warning("could not load tunable kernels from %s: %s", name, exc)
    return at.registered()


def parse_kernel_size(text: str) -> Any:
    """``"a=1,b=2"`` -> dict, ``"256"`` -> int, ``"64x64"`` -> tuple of ints."""
    t = str(text).strip()
    try:
        if "=" in t:
            out = {}
            for item in t.split(","):
                key, _, value = item.partition("=")
                if not key.strip():
                    raise ValueError
                out[key.strip()] = int(value)
            return out
        if "x" in t.lower():
            return tuple(int(v) for v in t.lower().split("x"))
        return int(t)
    except ValueError:
        raise InputError(f"--size {text!r}: use key=value pairs (padded_box=256,images=500), a number or WxH") from None


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("kernel", nargs="?", help="kernel to tune (default: all registered kernels)")
    parser.add_argument("--size", action="append", default=None,
                        help="problem size (repeatable); default: the kernel's usual sizes")
    parser.add_argument("--list", action="store_true", help="list tunable kernels and the results cached for this GPU")
    parser.add_argument("--max-configs", type=int, default=200,
                        help="most configurations tried per size (default: %(default)s)")
    parser.add_argument("--strategy", choices=("auto", "exhaustive", "random"), default="auto",
                        help="auto: all configurations when they fit in --max-configs, else a random sample")
    parser.add_argument("--repeats", type=int, default=5, help="timed launches per configuration (median kept)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random sample")
    add_common_args(parser)


def _list(args, kernels) -> int:
    lines, summary = [], {"kernels": {}}
    cache = default_cache() if backend.gpu_available() else None
    for name, k in sorted(kernels.items()):
        n = len(at.configurations(k.space, k.constraints))
        cached = cache.items(k.cache_kind) if cache is not None else {}
        lines.append(f"{name}: {k.description} ({n} configurations; default {k.default})")
        for size_key, entry in sorted(cached.items()):
            lines.append(f"    {size_key}: {entry.get('params')}  {entry.get('ms', float('nan')):.4f} ms "
                         f"(default {entry.get('default_ms') or float('nan'):.4f} ms, {entry.get('mode')})")
        summary["kernels"][name] = {"configurations": n, "default": k.default, "cached": cached,
                                    "description": k.description}
    if cache is not None:
        summary["cache"] = cache.path
        lines.append(f"cache: {cache.path}")
    emit_result(args, summary, lines)
    return 0


def main(args: argparse.Namespace) -> int:
    kernels = load_kernels()
    if args.list:
        return _list(args, kernels)
    if args.kernel is not None and args.kernel not in kernels:
        raise InputError(f"unknown kernel {args.kernel!r}; tunable kernels: {', '.join(sorted(kernels)) or 'none'} "
                         "(see xmipp-accel tune --list)")
    if args.max_configs < 1 or args.repeats < 1:
        raise InputError("--max-configs and --repeats must be >= 1")
    device = resolve_devices(args)[0]
    if not device.is_gpu:
        raise InputError("tuning measures CUDA kernels: it needs a GPU (use --device gpu on a machine with one)")
    chosen = [kernels[args.kernel]] if args.kernel else [kernels[n] for n in sorted(kernels)]
    sizes_given = [parse_kernel_size(s) for s in args.size] if args.size else None
    results: List[dict] = []
    lines = [f"tuning on {device.describe()}"]
    with backend.on_device(device), stopwatch() as sw:
        cp = backend.cupy_module()
        for k in chosen:
            sizes = sizes_given or list(k.sizes)
            if not sizes:
                lines.append(f"{k.name}: no usual sizes declared; give --size")
                continue
            tuner = at.Tuner(k, max_configs=args.max_configs, strategy=args.strategy, repeats=args.repeats,
                             seed=args.seed)
            for size in sizes:
                res = tuner.tune(size, xp=cp)
                d = res.as_dict()
                results.append(d)
                lines.append(f"{k.name} {res.size_class}: best {res.best} {d['best_ms']:.4f} ms, default "
                             f"{d['default_ms']:.4f} ms ({res.speedup:.2f}x), {d['tried']} tried, {d['failed']} failed")
    emit_result(args, {"device": device.describe(), "results": results, "seconds": sw["seconds"],
                       "cache": at.default_cache().path}, lines)
    return 0
