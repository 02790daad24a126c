"""Dispatcher of the ``xmipp-accel`` command (also ``python -m xmipp_accel``).

Example usage::

    xmipp-accel info
    xmipp-accel demo --json
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Optional, Sequence

from ..threads import keep_freed_heap_memory, let_idle_blas_threads_sleep, share_cores_with_local_ranks

share_cores_with_local_ranks()   # MPI ranks on one node: each its share of the cores, set before NumPy loads
let_idle_blas_threads_sleep()    # OpenBLAS's idle threads sleep instead of spinning (read when NumPy loads)
keep_freed_heap_memory()         # freed temporaries stay in the heap: the NumPy paths' chunks reuse their pages

from .. import __version__  # noqa: E402
from ..errors import USER_ERRORS  # noqa: E402
from .. import backend  # noqa: E402
from .common import configure_logging  # noqa: E402

# name -> module (relative to this package); each has add_args(parser) and main(args)
COMMANDS = {
    "info": "info",
    "demo": "demo",
    "reconstruct": "reconstruct",
    "align-movies": "align_movies",
    "assign-angles": "assign_angles",
    "refine": "refine",
    "fsc": "fsc",
    "local-resolution": "local_resolution",
    "fft-advisor": "fft_advisor",
    "tune": "tune",
}

logger = logging.getLogger("xmipp_accel")


def _load(name: str):
    try:
        return importlib.import_module(f".{COMMANDS[name]}", __package__)
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.endswith(COMMANDS[name]):
            return None  # command not available in this version
        raise


def _requested_command(argv: Optional[Sequence[str]]) -> Optional[str]:
    """The command named on the line (the first word not starting with '-'), if it is one of ours."""
    words = list(sys.argv[1:] if argv is None else argv)
    first = next((w for w in words if not w.startswith("-")), None)
    return first if first in COMMANDS else None


def build_parser(only: Optional[str] = None) -> argparse.ArgumentParser:
    """The parser of all commands, or of ``only`` (imports just that command's module: a faster start)."""
    parser = argparse.ArgumentParser(
        prog="xmipp-accel", description="GPU-accelerated single-particle analysis (xmipp_accel).")
    parser.add_argument("--version", action="version", version=f"xmipp-accel {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in ([only] if only else COMMANDS):
        module = _load(name)
        if module is None:
            continue
        doc = (module.__doc__ or "").strip()
        first, _, rest = doc.partition("\n")
        p = sub.add_parser(name, help=first, description=first, epilog=rest.strip() or None,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_args(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser(_requested_command(argv))
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 1
    configure_logging(args)
    try:
        result = args._module.main(args)
        return int(result or 0)
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if backend.is_out_of_memory(exc):
            print(f"error: out of memory ({exc}); use a smaller --batch or another GPU", file=sys.stderr)
            return 3
        raise


if __name__ == "__main__":
    sys.exit(main())
