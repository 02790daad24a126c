"""GPU Fourier reconstruction against its NumPy twin (float32 rounding: relative L2 < 1e-4)."""
from __future__ import annotations

import itertools
import logging

import numpy as np
import pytest

from xmipp_accel.em.ctf import ctf_2d
from xmipp_accel import backend
from xmipp_accel.gpu.reconstruct import batches as rb
from xmipp_accel.gpu.reconstruct import fourier as fr
from xmipp_accel.gpu.reconstruct import insert as ins
from xmipp_accel.gpu.reconstruct import symmetrize as sym
from xmipp_accel.gpu.reconstruct import ctf_weighting as cw
from xmipp_accel.gpu.reconstruct.blob import KaiserBesselBlob
from xmipp_accel.gpu.reconstruct.insert import FourierGrid
from xmipp_accel.tests.test_reconstruct import (APIX, apply_ctf, blob_projections, blob_volume, gaussian_blobs,
                                                random_rotations)

pytestmark = pytest.mark.gpu


def rel(a, b) -> float:
    a, b = backend.to_host(a), backend.to_host(b)
    return float(np.linalg.norm((a - b).ravel()) / np.linalg.norm(b.ravel()))


@pytest.fixture(scope="module")
def cp():
    return backend.cupy_module()


def random_batch(M: int, B: int, seed: int):
    rng = np.random.default_rng(seed)
    proj = (rng.normal(size=(B, M, M // 2 + 1)) + 1j * rng.normal(size=(B, M, M // 2 + 1))).astype(np.complex64)
    pw = rng.uniform(0, 1, (B, M, M // 2 + 1)).astype(np.float32)
    return proj, pw


GRIDS = [FourierGrid(64, 32), FourierGrid(48, 17.3), FourierGrid(40, 20), FourierGrid(128, 40.5)]


@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: f"M{g.padded_box}-k{g.kmax}")
@pytest.mark.parametrize("blob_mode,order", [("table", 0), ("onthefly", 0), ("onthefly", 1), ("onthefly", 2)])
def test_insert_kernel_matches_numpy_twin(cp, grid, blob_mode, order):
    M = grid.padded_box
    proj, pw = random_batch(M, 5, 1)
    mats = random_rotations(37, 2)
    mats[0] = np.eye(3)
    idx = np.random.default_rng(3).integers(0, 5, 37)
    blob = KaiserBesselBlob(alpha=15.0 if order == 0 else 10.0, order=order)
    d0 = np.zeros(grid.shape, np.complex64)
    w0 = np.zeros(grid.shape, np.float32)
    ins.insert_gather_numpy(d0, w0, proj, pw, mats, idx, grid, blob, blob_mode=blob_mode)
    for replicas in (1, 3):
        d1 = cp.zeros((replicas,) + grid.shape, cp.complex64)
        w1 = cp.zeros((replicas,) + grid.shape, cp.float32)
        target = (d1[0], w1[0]) if replicas == 1 else (d1, w1)
        ins.insert_gather_gpu(*target, cp.asarray(proj), cp.asarray(pw), mats, idx, grid, blob, blob_mode=blob_mode)
        assert rel(d1.sum(0), d0) < 1e-5
        assert rel(w1.sum(0), w0) < 1e-5


def test_insert_kernel_without_pixel_weights(cp):
    grid = FourierGrid(64, 32)
    proj, _ = random_batch(64, 4, 4)
    mats = random_rotations(20, 5)
    idx = np.arange(20) % 4
    d0 = np.zeros(grid.shape, np.complex64)
    w0 = np.zeros(grid.shape, np.float32)
    ins.insert_gather_numpy(d0, w0, proj, None, mats, idx, grid)
    d1 = cp.zeros(grid.shape, cp.complex64)
    w1 = cp.zeros(grid.shape, cp.float32)
    ins.insert_gather_gpu(d1, w1, cp.asarray(proj), None, mats, idx, grid)
    assert rel(d1, d0) < 1e-5 and rel(w1, w0) < 1e-5


def test_every_tuning_point_gives_the_same_result(cp):
    grid = FourierGrid(48, 24)
    proj, pw = random_batch(48, 3, 6)
    mats = random_rotations(40, 7)
    idx = np.arange(40) % 3
    ref = None
    space = ins.INSERT_TUNING_SPACE
    names = ("block_x", "block_y", "tile", "table_memory", "lanes_per_voxel")
    points = [dict(zip(names, p)) for p in itertools.product(*(space[n] for n in names))]
    points = [p for p in points if p["block_x"] * p["block_y"] <= 1024
              and (p["lanes_per_voxel"] == 1 or p["block_x"] * p["block_y"] % 32 == 0)]
    pick = np.random.default_rng(14).choice(len(points), 12, replace=False)   # bounded compile time
    for tuning in [dict(ins.DEFAULT_INSERT_TUNING)] + [points[i] for i in pick]:
        d = cp.zeros(grid.shape, cp.complex64)
        w = cp.zeros(grid.shape, cp.float32)
        ins.insert_gather_gpu(d, w, cp.asarray(proj), cp.asarray(pw), mats, idx, grid, tuning=tuning)
        if ref is None:
            ref = (d, w)
        else:   # the cooperative kernel sums a voxel's pixels in another order: float32 rounding only
            assert rel(d, ref[0]) < 2e-6 and rel(w, ref[1]) < 2e-6, tuning


@pytest.mark.parametrize("lanes", [4, 8, 16])
@pytest.mark.parametrize("blob_mode,order,memory", [("table", 0, "global"), ("table", 0, "shared"),
                                                    ("onthefly", 1, "global")])
def test_cooperative_kernel_matches_numpy_twin(cp, lanes, blob_mode, order, memory):
    blob = KaiserBesselBlob(alpha=15.0 if order == 0 else 10.0, order=order)
    for grid in (GRIDS[1], GRIDS[3]):
        M = grid.padded_box
        proj, pw = random_batch(M, 4, 11)
        mats = random_rotations(29, 12)
        mats[0] = np.eye(3)
        mats[1] = [[0, 0, 1], [0, 1, 0], [-1, 0, 0]]      # plane normal along x
        idx = np.random.default_rng(13).integers(0, 4, 29)
        d0 = np.zeros(grid.shape, np.complex64)
        w0 = np.zeros(grid.shape, np.float32)
        ins.insert_gather_numpy(d0, w0, proj, pw, mats, idx, grid, blob, blob_mode=blob_mode)
        for replicas in (1, 3):
            d1 = cp.zeros((replicas,) + grid.shape, cp.complex64)
            w1 = cp.zeros((replicas,) + grid.shape, cp.float32)
            target = (d1[0], w1[0]) if replicas == 1 else (d1, w1)
            ins.insert_gather_gpu(*target, cp.asarray(proj), cp.asarray(pw), mats, idx, grid, blob,
                                  blob_mode=blob_mode, tuning={"block_x": 8, "block_y": 16,
                                                               "table_memory": memory, "lanes_per_voxel": lanes})
            assert rel(d1.sum(0), d0) < 1e-5
            assert rel(w1.sum(0), w0) < 1e-5


@pytest.mark.parametrize("grid", GRIDS[:3], ids=lambda g: f"M{g.padded_box}")
def test_symmetrize_kernel_matches_numpy_twin(cp, grid):
    from xmipp_accel.em.symmetry import symmetry_matrices
    proj, pw = random_batch(grid.padded_box, 2, 8)
    d = np.zeros(grid.shape, np.complex64)
    w = np.zeros(grid.shape, np.float32)
    ins.insert_gather_numpy(d, w, proj, pw, random_rotations(6, 9), [0, 1, 0, 1, 0, 1], grid)
    syms = symmetry_matrices("d7")
    ds, ws = sym.symmetrize_fourier_volume_numpy(d, w, syms, grid)
    dg, wg = sym.symmetrize_fourier_volume_gpu(cp.asarray(d), cp.asarray(w), syms, grid)
    assert rel(dg, ds) < 1e-5 and rel(wg, ws) < 1e-5


@pytest.mark.parametrize("mode,premult", [("wiener", False), ("wiener", True), ("phase-flip", False),
                                          ("none", False)])
def test_projection_transforms_match(cp, mode, premult):
    rng = np.random.default_rng(10)
    imgs = rng.normal(size=(6, 30, 30)).astype(np.float32)
    shifts = rng.uniform(-4, 4, (6, 2))
    ctf = {"defocus_u_A": rng.uniform(5000, 9000, 6), "defocus_v_A": rng.uniform(5000, 9000, 6),
           "defocus_angle_deg": rng.uniform(0, 180, 6)}
    grid = fr.fourier_grid(30, fr.ReconstructionSettings())
    f0, w0 = fr.projection_transforms(imgs, grid, shifts_px=shifts, ctf=ctf, pixel_size_A=1.5, ctf_mode=mode,
                                      ctf_premultiplied=premult)
    f1, w1 = fr.projection_transforms(cp.asarray(imgs), grid, shifts_px=shifts, ctf=ctf, pixel_size_A=1.5,
                                      ctf_mode=mode, ctf_premultiplied=premult)
    assert f1.dtype == cp.complex64 and f1.shape == (6, grid.padded_box, grid.half)
    assert rel(f1, f0) < 1e-5
    assert (w0 is None) == (w1 is None)
    if w0 is not None:
        assert rel(w1, w0) < 1e-5


@pytest.mark.parametrize("mode,premult", [("wiener", False), ("wiener", True), ("phase-flip", False),
                                          ("none", False)])
@pytest.mark.parametrize("max_res", [0.5, 0.31])
def test_packed_projections_match_numpy(cp, mode, premult, max_res):
    """GPU packing (phases + CTF on the device) equals the NumPy transforms packed on the host."""
    rng = np.random.default_rng(11)
    imgs = rng.normal(size=(5, 30, 30)).astype(np.float32)
    shifts = rng.uniform(-4, 4, (5, 2))
    ctf = {"defocus_u_A": rng.uniform(5000, 9000, 5), "defocus_v_A": rng.uniform(5000, 9000, 5),
           "defocus_angle_deg": rng.uniform(0, 180, 5)}
    settings = fr.ReconstructionSettings(max_res_digital=max_res)
    grid = fr.fourier_grid(30, settings)
    use = None if mode == "none" else ctf
    f0, w0 = fr.projection_transforms(imgs, grid, shifts_px=shifts, ctf=use, pixel_size_A=1.5, ctf_mode=mode,
                                      ctf_premultiplied=premult)
    ref = ins.pack_projections_numpy(f0, w0, grid)
    got = fr.packed_projections(cp.asarray(imgs), grid, shifts_px=shifts, ctf=use, pixel_size_A=1.5, ctf_mode=mode,
                                ctf_premultiplied=premult)
    assert got.shape == ref.shape
    assert rel(got, ref) < 1e-5


@pytest.mark.parametrize("box,pixel_size,defocus", [(30, 1.5, (5000, 9000)), (64, 1.0, (25000, 32000))])
def test_ctf_coefficients_in_the_packer_equal_the_ctf_image(cp, box, pixel_size, defocus):
    """The packer's own CTF (five phase coefficients, chi reduced in double precision) equals packing
    with the em.ctf image, also at high defocus and Nyquist where chi reaches hundreds of radians."""
    rng = np.random.default_rng(21)
    n = 4
    ctf = {"defocus_u_A": rng.uniform(*defocus, n), "defocus_v_A": rng.uniform(*defocus, n),
           "defocus_angle_deg": rng.uniform(0, 180, n), "voltage_kV": np.full(n, 200.0), "cs_mm": np.full(n, 1.4),
           "amplitude_contrast": np.full(n, 0.07), "phase_shift_deg": np.array([0.0, 30.0, 60.0, 90.0])}
    grid = fr.fourier_grid(box, fr.ReconstructionSettings())
    imgs = cp.asarray(rng.normal(size=(n, box, box)).astype(np.float32))
    ft = cp.fft.rfft2(imgs, s=(grid.padded_box,) * 2).astype(cp.complex64)
    du, dv, angle, kw = cw.ctf_columns(ctf, n)
    image = ctf_2d(grid.padded_box, pixel_size, du, dv, angle, dtype=np.float64, **kw)   # float64 reference
    for mode in ("wiener", "phase-flip"):
        ref = ins.pack_projections_gpu(ft, cp.asarray(image.astype(np.float32)), None, grid, mode=mode)
        got = ins.pack_projections_gpu(ft, None, None, grid, mode=mode, ctf_coefficients=cw.ctf_coefficients_of(ctf, n),
                                       pixel_size_A=pixel_size)
        assert rel(got, ref) < 1e-5, mode


@pytest.mark.parametrize("radius", [1.25, 1.9, 2.4])
def test_unrolled_cooperative_kernel_equals_runtime_loop_and_numpy(cp, radius):
    blob = KaiserBesselBlob(radius=radius)
    assert ins.candidate_side(blob) in ins.UNROLLED_SIDES
    grid = GRIDS[3]
    proj, pw = random_batch(grid.padded_box, 4, 31)
    mats = random_rotations(23, 32)
    idx = np.random.default_rng(33).integers(0, 4, 23)
    d0 = np.zeros(grid.shape, np.complex64)
    w0 = np.zeros(grid.shape, np.float32)
    ins.insert_gather_numpy(d0, w0, proj, pw, mats, idx, grid, blob)
    out = []
    for unroll in (0, 1):
        d = cp.zeros(grid.shape, cp.complex64)
        w = cp.zeros(grid.shape, cp.float32)
        ins.insert_gather_gpu(d, w, cp.asarray(proj), cp.asarray(pw), mats, idx, grid, blob,
                              tuning={"lanes_per_voxel": 4, "unroll": unroll})
        assert rel(d, d0) < 1e-5 and rel(w, w0) < 1e-5, unroll
        out.append((d, w))
    assert rel(out[0][0], out[1][0]) < 2e-6


@pytest.fixture(scope="module")
def particles():
    box, n = 32, 300
    rng = np.random.default_rng(1)
    blobs = gaussian_blobs(box)
    mats = random_rotations(n, 1)
    origins = rng.uniform(-3, 3, (n, 2))
    clean = blob_projections(box, blobs, mats, -origins)
    du = rng.uniform(3000, 6000, n)
    ctf = {"defocus_u_A": du, "defocus_v_A": du - 200, "defocus_angle_deg": rng.uniform(0, 180, n)}
    return {"volume": blob_volume(box, blobs), "matrices": mats, "origins": origins,
            "images": apply_ctf(clean, ctf, APIX), "ctf": ctf}


def gpu0():
    return [backend.resolve_device("gpu", 0)]


@pytest.mark.parametrize("kw", [dict(), dict(sym="d7"), dict(sym="d7", sym_mode="expand"), dict(halves=True),
                                dict(ctf_mode="phase-flip", blob_mode="onthefly")],
                         ids=["c1", "d7-volume", "d7-expand", "halves", "phaseflip-onthefly"])
def test_gpu_reconstruction_matches_cpu(particles, kw):
    kw = dict(kw)
    halves = kw.pop("halves", False)
    n = 300 if kw.get("sym_mode") != "expand" else 40
    args = (particles["images"][:n], particles["matrices"][:n])
    common = dict(shifts_px=particles["origins"][:n], ctf={k: v[:n] for k, v in particles["ctf"].items()},
                  pixel_size_A=APIX, halves=halves, **kw)
    cpu = rb.reconstruct(*args, devices="cpu", **common)
    gpu = rb.reconstruct(*args, devices=gpu0(), batch_size=64, **common)
    assert gpu.n_particles == cpu.n_particles == n
    assert rel(gpu.volume, cpu.volume) < 1e-4
    if halves:
        assert rel(gpu.half1, cpu.half1) < 1e-4 and rel(gpu.half2, cpu.half2) < 1e-4
    if not kw:
        assert np.corrcoef(gpu.volume.ravel(), particles["volume"].ravel())[0, 1] > 0.99


def test_gpu_pipeline_batches_resident_images_and_two_workers(cp, particles):
    """Pinned double buffering over many small batches, CuPy input, and two worker threads on one GPU."""
    args = (particles["images"], particles["matrices"])
    common = dict(shifts_px=particles["origins"], ctf=particles["ctf"], pixel_size_A=APIX)
    ref = rb.reconstruct(*args, devices=gpu0(), batch_size=300, **common).volume
    small = rb.reconstruct(*args, devices=gpu0(), batch_size=17, **common).volume
    resident = rb.reconstruct(cp.asarray(particles["images"]), particles["matrices"], devices=gpu0(), batch_size=50,
                              **common).volume
    two = rb.reconstruct(*args, devices=gpu0() * 2, batch_size=23, **common).volume
    for v in (small, resident, two):
        assert rel(v, ref) < 1e-5


def test_gpu_out_of_memory_retries(particles, monkeypatch, caplog):
    common = dict(shifts_px=particles["origins"][:60], ctf={k: v[:60] for k, v in particles["ctf"].items()},
                  pixel_size_A=APIX)
    ref = rb.reconstruct(particles["images"][:60], particles["matrices"][:60], devices=gpu0(), batch_size=60,
                         **common).volume
    real = fr.packed_projections

    def limited(images, *a, **k):
        if images.shape[0] > 16:
            raise MemoryError("simulated GPU out of memory")
        return real(images, *a, **k)

    monkeypatch.setattr(fr, "packed_projections", limited)
    with caplog.at_level(logging.WARNING):
        vol = rb.reconstruct(particles["images"][:60], particles["matrices"][:60], devices=gpu0(), batch_size=60,
                             **common).volume
    assert "retrying with" in caplog.text
    assert rel(vol, ref) < 1e-5


def test_gpu_rejects_nan_particles(particles):
    from xmipp_accel.errors import InputError
    imgs = particles["images"][:40].copy()
    imgs[33, 5, 5] = np.inf
    with pytest.raises(InputError, match="particle 34 has NaN"):
        rb.reconstruct(imgs, particles["matrices"][:40], devices=gpu0(), batch_size=16, ctf_mode="none")
