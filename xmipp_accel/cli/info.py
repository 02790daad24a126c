"""Show versions, compute devices, GPU memory and the tuning cache folder.

Example usage::

    xmipp-accel info
    xmipp-accel info --json
"""
from __future__ import annotations

import argparse
import platform

from .. import __version__
from .. import backend
from .common import add_common_args, emit_result


def add_args(parser: argparse.ArgumentParser) -> None:
    add_common_args(parser, device=False)


def cache_dir() -> str:
    """The tuning cache folder ($XMIPP_ACCEL_CACHE or the user cache folder)."""
    try:
        from ..gpu.tuning.cache import default_cache_dir
        return str(default_cache_dir())
    except ImportError:
        import os

        import platformdirs
        return os.environ.get("XMIPP_ACCEL_CACHE") or platformdirs.user_cache_dir("xmipp_accel")


def main(args: argparse.Namespace) -> int:
    vers = backend.versions()
    gpus = backend.list_gpus()
    optional = {}
    for mod in ("torch", "mpi4py", "pwem", "pyworkflow", "xmippLib"):
        try:
            m = __import__(mod)
            optional[mod] = getattr(m, "__version__", "installed")
        except Exception:
            optional[mod] = None
    summary = {"xmipp_accel": __version__, "python": platform.python_version(), **vers,
               "gpus": gpus, "default_device": "gpu" if gpus else "cpu",
               "tuning_cache": cache_dir(), "optional": optional}
    lines = [f"xmipp_accel {__version__} (python {summary['python']}, numpy {vers['numpy']}, "
             f"cupy {vers['cupy'] or 'not usable'})"]
    if gpus:
        for g in gpus:
            lines.append(f"GPU {g['id']}: {g['name']} (sm {g['compute_capability']}), "
                         f"{g['free_bytes'] / 2**30:.1f} of {g['total_bytes'] / 2**30:.1f} GiB free")
    else:
        lines.append("GPU: none usable (computations run on the CPU with numpy)")
    lines.append(f"tuning cache: {summary['tuning_cache']}")
    lines.append("optional: " + ", ".join(f"{k} {v or 'missing'}" for k, v in optional.items()))
    emit_result(args, summary, lines)
    return 0
