"""Reconstruction as a user runs it: particles on disk, half maps and FSC, our command against cryoDRGN's.

Writes one dataset (``--particles`` random images of ``--box`` px in one MRC stack, uniform orientations,
shifts, CTF, random half sets; the work does not depend on pixel values) with a RELION 3.1 STAR for
``xmipp-accel reconstruct`` and the pose/CTF pickles for cryoDRGN, then times, each as a subprocess
(process start, reading the stack, reconstruction, half maps, FSC, writing):

- ``xmipp-accel reconstruct PARTICLES.star -o map.mrc --halves --sym SYM --json`` (full map, both half
  maps, the FSC STAR) for each ``--syms``;
- ``cryodrgn backproject_voxel`` with its defaults (full map, half maps, FSC; C1 only, it has no
  symmetry), when cryoDRGN is importable (``--peer cryodrgn``).

Usage::

    python benchmarks/reconstruct_cli.py [--box 256] [--particles 10000] [--syms c1,i] [--peer cryodrgn]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))
sys.path.insert(0, os.path.abspath(os.path.dirname(__file__)))

from reconstruct import APIX, host_particles, write_cryodrgn_inputs  # noqa: E402

from xmipp_accel.em.geometry import matrix_to_euler  # noqa: E402
from xmipp_accel.io.images import write_stack  # noqa: E402
from xmipp_accel.io.particles import write_particles_from_arrays  # noqa: E402

PEER_SCRIPT = """
import sys, types
try:
    import igraph  # noqa: F401
except ImportError:  # cryodrgn.utils imports it at module level; backproject_voxel never uses it
    sys.modules["igraph"] = types.ModuleType("igraph")
from cryodrgn.commands import backproject_voxel as bv
import argparse
p = argparse.ArgumentParser()
bv.add_args(p)
bv.main(p.parse_args(sys.argv[1:]))
"""


def write_dataset(folder: str, box: int, n: int) -> dict:
    """Stack, STAR (RELION 3.1, with half sets) and cryoDRGN pickles of one random dataset."""
    images, mats, shifts, ctf = host_particles(box, n, seed=3)
    stack = os.path.join(folder, "particles.mrcs")
    write_stack(stack, images, APIX)
    rot, tilt, psi = matrix_to_euler(mats)
    subset = np.where(np.arange(n) % 2 == 0, 1, 2)
    star = os.path.join(folder, "particles.star")
    write_particles_from_arrays(star, [f"{i + 1}@particles.mrcs" for i in range(n)], APIX,
                                angles_deg=np.stack([rot, tilt, psi], axis=1), origins_A=shifts * APIX, ctf=ctf,
                                subset=subset, box_size=box)
    poses, ctf_pkl = write_cryodrgn_inputs(folder, mats, shifts, ctf, box)
    return {"stack": stack, "star": star, "poses": poses, "ctf": ctf_pkl, "bytes": images.nbytes}


def run_timed(cmd: list, env=None, timeout: float = 600) -> tuple:
    """Wall seconds and the completed process of ``cmd``."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    return time.perf_counter() - t0, proc


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--box", type=int, default=256)
    p.add_argument("--particles", type=int, default=10_000)
    p.add_argument("--syms", default="c1,i")
    p.add_argument("--device", default="auto")
    p.add_argument("--peer", choices=("none", "cryodrgn"), default="none")
    p.add_argument("--workdir", default=None, help="folder for the dataset (default: a temporary one, removed)")
    p.add_argument("--json", default=None, help="write the figures to this JSON file")
    args = p.parse_args(argv)
    workdir = args.workdir or tempfile.mkdtemp(prefix="reconstruct_cli_")
    os.makedirs(workdir, exist_ok=True)
    rows = []
    try:
        t0 = time.perf_counter()
        data = write_dataset(workdir, args.box, args.particles)
        print(f"# {time.strftime('%Y-%m-%d %H:%M')} dataset: {args.particles} x {args.box}² "
              f"({data['bytes'] / 1e9:.2f} GB) written in {time.perf_counter() - t0:.1f} s", flush=True)
        for sym in [s for s in args.syms.split(",") if s]:
            out = os.path.join(workdir, f"map_{sym}.mrc")
            wall, proc = run_timed([sys.executable, "-m", "xmipp_accel", "reconstruct", data["star"], "-o", out,
                                    "--halves", "--sym", sym, "--device", args.device, "--json", "--quiet"])
            if proc.returncode != 0:
                print(f"# ours ({sym}) failed: {proc.stderr.strip()[-400:]}")
                continue
            summary = json.loads(proc.stdout.strip().splitlines()[-1])
            rows.append({"who": "xmipp-accel reconstruct --halves", "sym": sym, "wall_s": wall, "summary": summary})
        if args.peer == "cryodrgn":
            outdir = os.path.join(workdir, "cryodrgn")
            wall, proc = run_timed([sys.executable, "-c", PEER_SCRIPT, data["stack"], "--poses", data["poses"],
                                    "--ctf", data["ctf"], "-o", outdir])
            if proc.returncode == 0:
                rows.append({"who": "cryodrgn backproject_voxel (half maps + FSC)", "sym": "c1", "wall_s": wall})
            else:
                print(f"# peer cryoDRGN failed: {(proc.stderr or proc.stdout).strip()[-400:]}")
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    print("| command | sym | wall s (process start to files written) | in the command (s) | resolution (Å) |")
    print("|---|---|---|---|---|")
    for r in rows:
        s = r.get("summary", {})
        inner = s.get("seconds", s.get("time_s", "-"))
        res = s.get("resolution_A")
        print(f"| {r['who']} | {r['sym']} | {r['wall_s']:.2f} | {inner} | "
              f"{'-' if res is None else f'{res:.2f}'} (random images) |")
    ours = [r for r in rows if r["who"].startswith("xmipp") and r["sym"] == "c1"]
    peer = [r for r in rows if r["who"].startswith("cryodrgn")]
    if ours and peer:
        print(f"\npeer / ours (C1, half maps + FSC, from files): {peer[0]['wall_s'] / ours[0]['wall_s']:.1f}x")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"box": args.box, "particles": args.particles, "rows": rows}, fh, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
