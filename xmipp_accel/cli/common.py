"""Options and behaviour shared by every ``xmipp-accel`` subcommand."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import textwrap
import time
from contextlib import contextmanager
from typing import Any, Iterable, Optional

import numpy as np

from .. import backend
from ..io.paths import PATH_RULE

logger = logging.getLogger("xmipp_accel")


def add_common_args(parser: argparse.ArgumentParser, device: bool = True) -> None:
    """Add ``--json``, ``--quiet``, ``--verbose`` and (optionally) ``--device``/``--gpus``."""
    g = parser.add_argument_group("common options")
    if device:
        g.add_argument("--device", choices=backend.DEVICE_CHOICES, default=None,
                       help="where to compute: auto (GPU if usable, else CPU), gpu or cpu "
                            "(default: $XMIPP_ACCEL_DEVICE or auto)")
        g.add_argument("--gpus", default=None,
                       help="GPU ids to use, e.g. 0 or 0,1 (default: $XMIPP_ACCEL_GPU or 0)")
    g.add_argument("--json", action="store_true",
                   help="print one JSON object summarising the result as the last line of stdout")
    g.add_argument("--quiet", "-q", action="store_true", help="no progress bars or info messages")
    g.add_argument("--verbose", "-v", action="store_true", help="debug messages")


def add_path_args(parser: argparse.ArgumentParser, *, datadir: bool = True, absolute: bool = True) -> None:
    """Add ``--datadir`` (commands reading particle STAR files) and ``--absolute-paths`` (commands writing
    STAR files that name files), in a group whose description states the rule
    (:data:`xmipp_accel.io.paths.PATH_RULE`)."""
    g = parser.add_argument_group("file names in STAR files", textwrap.fill(PATH_RULE, width=76))
    if datadir:
        g.add_argument("--datadir", type=os.path.abspath, default=None, metavar="DIR",
                       help="folder where the image stacks named in the input STAR file are looked for first "
                            "(DIR/NAME, then DIR/<file name alone>), e.g. for a STAR file from another machine")
    if absolute:
        g.add_argument("--absolute-paths", action="store_true",
                       help="write absolute file names into output STAR files (default: relative to the working "
                            "directory, RELION's project folder)")


def configure_logging(args: argparse.Namespace) -> None:
    level = logging.DEBUG if getattr(args, "verbose", False) else (
        logging.WARNING if getattr(args, "quiet", False) else logging.INFO)
    logging.basicConfig(level=level, format="%(levelname)s: %(message)s", stream=sys.stderr, force=True)


def resolve_devices(args: argparse.Namespace) -> list[backend.Device]:
    """Devices requested by ``--device``/``--gpus`` (one per GPU id; one CPU device otherwise)."""
    ids = backend.parse_gpu_list(getattr(args, "gpus", None))
    first = backend.resolve_device(getattr(args, "device", None), ids[0] if ids else None)
    if not first.is_gpu:
        return [first]
    return [first] + [backend.resolve_device("gpu", i) for i in ids[1:]]


def rank_devices(args: argparse.Namespace, ctx) -> list[backend.Device]:
    """Devices of this process: all of ``--gpus`` alone, or one GPU per MPI rank (``ctx.pick_gpu``).

    ``ctx`` is an :func:`xmipp_accel.gpu.runtime.mpi.mpi_context`; under MPI on the CPU every rank
    uses the CPU.
    """
    devices = resolve_devices(args)
    if ctx.enabled and devices[0].is_gpu:
        ids = backend.parse_gpu_list(getattr(args, "gpus", None)) or [d.gpu_id for d in devices]
        return [backend.resolve_device("gpu", ctx.pick_gpu(ids))]
    return devices


def progress(iterable: Optional[Iterable] = None, *, total: Optional[int] = None, desc: str = "",
             args: Optional[argparse.Namespace] = None, unit: str = "it"):
    """A tqdm progress bar on stderr, silenced by ``--quiet`` or ``--json``-only pipelines."""
    from tqdm import tqdm   # the terminal bar (tqdm.auto also imports asyncio for notebooks: +0.1 s per command)
    disable = bool(args is not None and getattr(args, "quiet", False))
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=disable, file=sys.stderr,
                dynamic_ncols=True, mininterval=0.5)


def _jsonable(obj: Any):
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return str(obj)


def emit_result(args: argparse.Namespace, summary: dict, human_lines: Iterable[str] = ()) -> None:
    """Print the human-readable lines, then the JSON summary last when ``--json`` is given."""
    for line in human_lines:
        print(line)
    if getattr(args, "json", False):
        sys.stdout.flush()
        print(json.dumps(summary, default=_jsonable))
    sys.stdout.flush()


@contextmanager
def stopwatch():
    """Context yielding a dict whose ``seconds`` is filled at exit."""
    out = {"seconds": None}
    t0 = time.perf_counter()
    try:
        yield out
    finally:
        out["seconds"] = time.perf_counter() - t0
