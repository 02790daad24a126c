"""RELION as the peer in tests: find its programs and run them.

Tests that compare with RELION call :func:`relion_program` (or the ``relion`` fixture in the test
modules) to get the path of a ``relion_*`` program. Where it is not installed the test skips with the
reason, except when ``XMIPP_ACCEL_REQUIRE_RELION=1`` (set by ``.ci/run``, which installs Debian's
``relion`` package): then a missing program fails the test, so the comparisons cannot silently skip in CI.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from typing import Sequence

import pytest

REQUIRE_ENV = "XMIPP_ACCEL_REQUIRE_RELION"


def relion_required() -> bool:
    """True where a missing RELION must fail the tests (CI), not skip them."""
    return os.environ.get(REQUIRE_ENV, "").strip().lower() in ("1", "true", "yes")


def relion_program(name: str) -> str:
    """Absolute path of the RELION program ``name`` (e.g. ``relion_reconstruct``).

    Skips the calling test when it is missing, or fails it when RELION is required."""
    path = shutil.which(name)
    if path:
        return path
    msg = (f"{name} not found on PATH (install Debian's RELION: apt-get install relion)")
    if relion_required():
        pytest.fail(msg + f"; {REQUIRE_ENV}=1 says RELION must be there", pytrace=False)
    pytest.skip(msg)


def run_relion(args: Sequence[str], cwd: str | os.PathLike, timeout: float = 600,
               threads: int = 1) -> subprocess.CompletedProcess:
    """Run a RELION command (``args[0]`` a program name) in ``cwd``; fail the test with its output
    when it exits non-zero. ``threads`` sets OMP_NUM_THREADS for it."""
    exe = relion_program(args[0])
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    proc = subprocess.run([exe, *map(str, args[1:])], cwd=str(cwd), env=env, capture_output=True,
                          text=True, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(map(str, args))} exited {proc.returncode} in {cwd}:\n"
                    f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}", pytrace=False)
    return proc
