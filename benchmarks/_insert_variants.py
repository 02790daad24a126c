"""Temporary: time insertion-kernel variants at 256^2 (M=512), images resident (removed after the session)."""
import time

import numpy as np

from xmipp_accel.gpu import backend
from xmipp_accel.gpu.reconstruct import insert as ins
from xmipp_accel.gpu.reconstruct.blob import KaiserBesselBlob
from xmipp_accel.gpu.tuning.builtin_kernels import random_rotations

cp = backend.cupy_module()
grid = ins.FourierGrid(512, 256.0)
blob = KaiserBesselBlob()
W = ins.packed_width(grid, blob)
B = 240
packed = cp.random.standard_normal((B, W, W, 4), dtype=cp.float32)
mats = random_rotations(B, 1)
idx = np.arange(B)
R = 4
d = cp.zeros((R,) + grid.shape, cp.complex64)
w = cp.zeros((R,) + grid.shape, cp.float32)
contrib = ins.insertion_count(grid, blob)["contributions"] * B
VARIANTS = [
    ("base 32x4 global", {}),
    ("8x16 global", {"block_x": 8, "block_y": 16}),
    ("16x8 global", {"block_x": 16, "block_y": 8}),
    ("16x16 shared", {"block_x": 16, "block_y": 16, "table_memory": "shared"}),
    ("8x32 shared", {"block_x": 8, "block_y": 32, "table_memory": "shared"}),
    ("coop4 8x16 global", {"block_x": 8, "block_y": 16, "lanes_per_voxel": 4}),
    ("coop4 32x4 global", {"block_x": 32, "block_y": 4, "lanes_per_voxel": 4}),
    ("coop4 16x16 shared", {"block_x": 16, "block_y": 16, "lanes_per_voxel": 4, "table_memory": "shared"}),
    ("coop8 8x16 global", {"block_x": 8, "block_y": 16, "lanes_per_voxel": 8}),
    ("coop8 16x16 shared", {"block_x": 16, "block_y": 16, "lanes_per_voxel": 8, "table_memory": "shared"}),
    ("coop16 8x16 global", {"block_x": 8, "block_y": 16, "lanes_per_voxel": 16}),
    ("coop16 16x16 shared", {"block_x": 16, "block_y": 16, "lanes_per_voxel": 16, "table_memory": "shared"}),
]
ref = None
print(f"M=512 K={grid.K} W={W} B={B} replicas={R} contributions={contrib:.3e}")
print("| variant | regs | local B | ms / 240 img | G contrib/s | x10000 img (s) | rel L2 vs base |")
for label, tun in VARIANTS:
    t = ins._tuning(tun)
    mode = 2 if t["table_memory"] == "shared" else 1
    try:
        k = ins._kernel(ins._insert_name(t["tile"], mode, 0, t["lanes_per_voxel"]))
        regs, loc = k.num_regs, k.local_size_bytes
    except Exception as exc:  # noqa: BLE001
        regs, loc = f"? {exc}", "?"
    try:
        d.fill(0)
        w.fill(0)
        ins.insert_packed_gpu(d, w, packed, mats, idx, grid, blob, tuning=tun)
        out = (d.sum(0), w.sum(0))
        cp.cuda.Device().synchronize()
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            ins.insert_packed_gpu(d, w, packed, mats, idx, grid, blob, tuning=tun)
            cp.cuda.Device().synchronize()
            times.append(time.perf_counter() - t0)
        s = min(times)
        if ref is None:
            ref = out
            err = 0.0
        else:
            err = max(float(cp.linalg.norm(out[0] - ref[0]) / cp.linalg.norm(ref[0])),
                      float(cp.linalg.norm(out[1] - ref[1]) / cp.linalg.norm(ref[1])))
        print(f"| {label} | {regs} | {loc} | {s * 1e3:.1f} | {contrib / s / 1e9:.0f} | {s * 10000 / B:.3f} "
              f"| {err:.1e} |", flush=True)
    except Exception as exc:  # noqa: BLE001
        print(f"| {label} | {regs} | {loc} | failed: {type(exc).__name__}: {str(exc)[:200]} |", flush=True)
