"""Rank FFT sizes near a requested size by a cost model and, on a GPU, by measured cuFFT time and memory.

Sizes are given and shown as width x height (x depth with --3d). Candidates are
2^a 3^b 5^c 7^d sizes within the allowed crop and pad; on a GPU the best few are
measured (CUDA events) and the measurements are cached per GPU model and
CUDA/CuPy version, so a second call is instant.

Example usage::

    xmipp-accel fft-advisor 5760x4092 --batch 30 --crop-max 10%
    xmipp-accel fft-advisor 5760x4092 --batch 30 --crop-max 10% --pad-max 0 --json
    xmipp-accel fft-advisor 360 --3d --pad-max 20% --even
    xmipp-accel fft-advisor 1000x1000 --complex --device cpu
"""
from __future__ import annotations

import argparse
import logging
import re
from typing import List, Tuple

from ..errors import InputError
from .. import backend
from ..gpu.tuning import fft_advisor as fa
from .common import add_common_args, emit_result, resolve_devices, stopwatch

logger = logging.getLogger(__name__)


def parse_fraction(text: str, option: str) -> float:
    """``"10%"``, ``"0.1"`` or ``"10"`` (above 1 means percent) -> 0.1."""
    t = str(text).strip()
    try:
        value = float(t[:-1]) / 100.0 if t.endswith("%") else float(t)
    except ValueError:
        raise InputError(f"{option} {text!r} is not a number; give e.g. 10% or 0.1") from None
    if value > 1.0 and not t.endswith("%"):
        value /= 100.0
    if value < 0:
        raise InputError(f"{option} must be >= 0, got {text}")
    return value


def parse_size(text: str, three_d: bool) -> Tuple[int, ...]:
    """``"5760x4092"`` (width x height[, x depth]) -> array-order shape ``(4092, 5760)``."""
    parts = [p for p in re.split(r"[xX,*\s]+", str(text).strip()) if p]
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise InputError(f"size {text!r} is not WIDTHxHEIGHT (e.g. 5760x4092) or a single number") from None
    if not values or min(values) < 1:
        raise InputError(f"size {text!r}: every dimension must be a positive integer")
    ndim = 3 if three_d else 2
    if len(values) == 1:
        values = values * ndim
    if len(values) == 3 and not three_d:
        raise InputError(f"size {text!r} has three dimensions: add --3d")
    if len(values) != ndim:
        raise InputError(f"size {text!r} must have {ndim} dimensions (width x height{' x depth' if three_d else ''})")
    return tuple(reversed(values))


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("size", help="requested size, width x height (e.g. 5760x4092), or one number for a "
                                     "square (cube with --3d)")
    g = parser.add_argument_group("transform")
    g.add_argument("--batch", type=int, default=1, help="transforms done together, e.g. frames (default: %(default)s)")
    g.add_argument("--crop-max", default="0", help="largest crop allowed per axis, e.g. 10%% (default: no crop)")
    g.add_argument("--pad-max", default="20%", help="largest pad allowed per axis (default: %(default)s)")
    g.add_argument("--3d", dest="three_d", action="store_true", help="volume transform (width x height x depth)")
    g.add_argument("--complex", action="store_true", help="complex-to-complex instead of real-to-complex")
    g.add_argument("--double", action="store_true", help="double precision")
    g.add_argument("--even", action="store_true", help="only even sizes (boxes that must stay even)")
    g.add_argument("--rank-by", choices=fa.RANK_BY, default="time_per_pixel",
                   help="time per pixel kept (default), time alone, or memory")
    g.add_argument("--top", type=int, default=10, help="candidates shown (default: %(default)s)")
    g.add_argument("--shortlist", type=int, default=6,
                   help="model candidates measured on the GPU (default: %(default)s)")
    g.add_argument("--no-measure", action="store_true", help="cost model only, even with a GPU")
    add_common_args(parser)


def _recommended(ranked: List[fa.Candidate]) -> List[List[int]]:
    out = []
    for c in ranked:
        if c.requested and c.measured_ms is None and not all(fa.is_smooth(s) for s in c.shape):
            continue  # shown for comparison only
        out.append(c.width_height)
    return out


def main(args: argparse.Namespace) -> int:
    shape = parse_size(args.size, args.three_d)
    crop = parse_fraction(args.crop_max, "--crop-max")
    pad = parse_fraction(args.pad_max, "--pad-max")
    if crop >= 1:
        raise InputError(f"--crop-max must be below 100%, got {args.crop_max}")
    if args.batch < 1:
        raise InputError(f"--batch must be >= 1, got {args.batch}")
    if args.top < 1:
        raise InputError(f"--top must be >= 1, got {args.top}")
    device = resolve_devices(args)[0]
    measure = device.is_gpu and not args.no_measure
    with backend.on_device(device), stopwatch() as sw:
        ranked = fa.recommend(shape, batch=args.batch, real=not args.complex, double=args.double, crop_max=crop,
                              pad_max=pad, multiple_of=2 if args.even else 1, measure=measure,
                              shortlist=args.shortlist, rank_by=args.rank_by, top=args.top)
    size_txt = " x ".join(str(v) for v in reversed(shape))
    kind = "complex" if args.complex else "real-to-complex"
    lines = [f"FFT size advisor: {size_txt}, batch {args.batch}, {kind}, crop <= {100 * crop:.0f}%, "
             f"pad <= {100 * pad:.0f}%, {'measured on ' + device.describe() if measure else 'cost model only'}"]
    lines += fa.speedup_table(shape, ranked)
    best = ranked[0]
    lines.append(f"recommended: {' x '.join(str(v) for v in best.width_height)}")
    summary = {
        "requested": list(reversed(shape)), "batch": args.batch, "real": not args.complex, "double": args.double,
        "crop_max": crop, "pad_max": pad, "measured": measure, "device": device.describe(),
        "recommended": _recommended(ranked), "candidates": [c.as_dict() for c in ranked],
        "seconds": sw["seconds"],
    }
    emit_result(args, summary, lines)
    return 0
