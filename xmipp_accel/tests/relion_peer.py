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


def relion_ctf_particles(folder, volume, n: int, *, pixel_size_A: float, noise_sigma: float, seed: int = 0,
                         max_origin_px: float = 3.0, defocus_range_A=(8000.0, 25000.0),
                         astigmatism_A: float = 800.0, threads: int = 1) -> str:
    """Particles of ``volume`` made by ``relion_project --ctf --add_noise`` in ``folder``; returns the STAR path.

    A RELION 3.1 STAR (optics group: 300 kV, Cs 2.7 mm, amplitude contrast 0.1) is written with ``n``
    uniformly random orientations (degrees), origins uniform in ``±max_origin_px`` (Å in the STAR),
    defocus U uniform in ``defocus_range_A`` (Å), V = U − uniform(0, ``astigmatism_A``) and a random
    astigmatism angle; RELION projects ``volume`` (``(N, N, N)``, written as ``truth.mrc``), multiplies
    by each particle's CTF and adds white Gaussian noise of ``noise_sigma`` (image units). The result is
    ``folder/proj.star`` (with ``proj.mrcs``), read by both ``relion_reconstruct`` and ours.
    """
    import numpy as np

    from xmipp_accel.io.mrc import write_mrc
    from xmipp_accel.io.star import Table, write_star

    folder = os.fspath(folder)
    box = int(volume.shape[-1])
    write_mrc(os.path.join(folder, "truth.mrc"), np.asarray(volume, dtype=np.float32), pixel_size_A)
    rng = np.random.default_rng(seed)
    du = rng.uniform(*defocus_range_A, n)
    optics = Table({"rlnOpticsGroup": np.array([1]), "rlnOpticsGroupName": ["optics1"],
                    "rlnVoltage": np.array([300.0]), "rlnSphericalAberration": np.array([2.7]),
                    "rlnAmplitudeContrast": np.array([0.1]), "rlnImagePixelSize": np.array([pixel_size_A]),
                    "rlnImageSize": np.array([box]), "rlnImageDimensionality": np.array([2])})
    particles = Table({
        "rlnAngleRot": rng.uniform(0, 360, n), "rlnAngleTilt": np.degrees(np.arccos(rng.uniform(-1, 1, n))),
        "rlnAnglePsi": rng.uniform(0, 360, n),
        "rlnOriginXAngst": rng.uniform(-max_origin_px, max_origin_px, n) * pixel_size_A,
        "rlnOriginYAngst": rng.uniform(-max_origin_px, max_origin_px, n) * pixel_size_A,
        "rlnDefocusU": du, "rlnDefocusV": du - rng.uniform(0, astigmatism_A, n),
        "rlnDefocusAngle": rng.uniform(0, 180, n),
        "rlnRandomSubset": 1 + (np.arange(n) % 2), "rlnOpticsGroup": np.ones(n, dtype=np.int64)})
    write_star(os.path.join(folder, "angles.star"), {"optics": optics, "particles": particles})
    run_relion(["relion_project", "--i", "truth.mrc", "--ang", "angles.star", "--o", "proj", "--angpix",
                pixel_size_A, "--ctf", "--add_noise", "--white_noise", noise_sigma], cwd=folder, threads=threads)
    return os.path.join(folder, "proj.star")
