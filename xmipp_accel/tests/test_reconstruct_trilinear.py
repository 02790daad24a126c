"""Trilinear insertion (gpu/reconstruct/trilinear.py) on the CPU: against a direct loop of the formula, the
half-plane values against ``projection_transforms``, ground-truth reconstructions, the kernel choice and the mask.

Ground truth as in test_reconstruct.py: Gaussian-blob phantoms with analytic projections.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from xmipp_accel.em.geometry import euler_to_matrix
from xmipp_accel.errors import InputError
from xmipp_accel.gpu.reconstruct import trilinear as tri
from xmipp_accel.gpu.reconstruct.batches import reconstruct
from xmipp_accel.gpu.reconstruct.fourier import (ReconstructionSettings, fourier_grid, output_mask,
                                                 projection_transforms, resolve_interp)
from xmipp_accel.gpu.reconstruct.fourier import group_matrices as fr_group
from xmipp_accel.gpu.reconstruct.insert import FourierGrid
from xmipp_accel.tests.test_cli_reconstruct import run_cli, write_dataset
from xmipp_accel.tests.test_reconstruct import APIX, BOX, random_rotations, shell_fsc
from xmipp_accel.tests.test_reconstruct import c1_data, d7_data  # noqa: F401  (fixtures)


def _splat_reference(F: np.ndarray, W: np.ndarray, A: np.ndarray, grid: FourierGrid):
    """Direct loop: every pixel p of the full plane (mates read as conj F(-p)) spread over the 8 voxels around
    k = Aᵀ (p, 0) of a full (M, M, M) volume, then its kx >= 0 half in rfft layout."""
    M, K = grid.padded_box, grid.K
    full_d = np.zeros((M, M, M), np.complex128)
    full_w = np.zeros((M, M, M))
    for py in range(-K, K + 1):
        for px in range(-K, K + 1):
            if px * px + py * py > grid.kmax2:
                continue
            val = F[py % M, px] if px >= 0 else np.conj(F[(-py) % M, -px])
            wt = W[py % M, px] if px >= 0 else W[(-py) % M, -px]
            k = A.T @ np.array([px, py, 0.0])
            base = np.floor(k).astype(int)
            for dz in (0, 1):
                for dy in (0, 1):
                    for dx in (0, 1):
                        v = base + (dx, dy, dz)
                        t = np.prod(1.0 - np.abs(k - v))
                        if np.any(np.abs(v) > K) or (v * v).sum() > grid.kmax2:
                            continue
                        full_d[v[2] % M, v[1] % M, v[0] % M] += t * val
                        full_w[v[2] % M, v[1] % M, v[0] % M] += t * wt
    return full_d[:, :, :grid.half], full_w[:, :, :grid.half]


def test_scatter_equals_the_direct_loop_of_the_formula():
    """Hermitian half, the kx = 0 fold and the origin at half weight: the vectorised scatter is the loop."""
    grid = FourierGrid(16, 8)
    rng = np.random.default_rng(0)
    F = np.fft.rfft2(rng.standard_normal((16, 16)))          # a real image: its px = 0 column is Hermitian
    W = rng.uniform(0.2, 1.0, (16, 16))
    W = 0.5 * (W + np.roll(W[::-1, ::-1], 1, axis=(0, 1)))   # W(-p) = W(p), as CTF² is
    W = W[:, :9]
    hp = tri.half_plane(grid)
    for A in (euler_to_matrix(30.0, 50.0, 70.0), euler_to_matrix(0.0, 0.0, 0.0), euler_to_matrix(10.0, 90.0, 0.0)):
        d = np.zeros(grid.shape, np.complex128)
        w = np.zeros(grid.shape)
        tri.insert_trilinear_numpy(d, w, F.reshape(1, -1)[:, hp.flat], W.reshape(1, -1)[:, hp.flat], A[None], [0],
                                   grid, threads=1)
        ref_d, ref_w = _splat_reference(F, W, A, grid)
        np.testing.assert_allclose(w, ref_w, atol=1e-10)
        np.testing.assert_allclose(d, ref_d, atol=1e-9)


def test_threads_and_chunks_do_not_change_the_sum():
    grid = FourierGrid(32, 16)
    hp = tri.half_plane(grid)
    rng = np.random.default_rng(1)
    vals = (rng.standard_normal((20, hp.flat.size)) + 1j * rng.standard_normal((20, hp.flat.size)))
    mats = random_rotations(20, 3)
    out = []
    for threads, chunk in ((1, 1 << 20), (2, 700), (2, 1 << 12)):
        d = np.zeros(grid.shape, np.complex128)
        w = np.zeros(grid.shape)
        tri.insert_trilinear_numpy(d, w, vals, None, mats, np.arange(20), grid, chunk_points=chunk, threads=threads)
        out.append((d, w))
    for d, w in out[1:]:
        np.testing.assert_allclose(d, out[0][0], atol=1e-9)
        np.testing.assert_allclose(w, out[0][1], atol=1e-9)


@pytest.mark.parametrize("mode", ["wiener", "wiener-premultiplied", "phase-flip", "none"])
def test_half_plane_values_equal_projection_transforms(c1_data, mode):  # noqa: F811
    """Separable phase ramps and the CTF as a polynomial phase give the rfft values at the half-plane pixels."""
    grid = fourier_grid(BOX, ReconstructionSettings())
    hp = tri.half_plane(grid)
    imgs = c1_data["with_ctf"][:6]
    ctf = {k: v[:6] for k, v in c1_data["ctf"].items()}
    sh = c1_data["origins"][:6]
    ctf_mode = "wiener" if mode.startswith("wiener") else mode
    ft, wt = projection_transforms(imgs, grid, shifts_px=sh, ctf=ctf, pixel_size_A=APIX, ctf_mode=ctf_mode,
                                   ctf_premultiplied=mode == "wiener-premultiplied")
    vals, vw = tri.half_plane_values(imgs, grid, shifts_px=sh, ctf=ctf, pixel_size_A=APIX, mode=mode)
    ref = ft.reshape(6, -1)[:, hp.flat]
    # float32 arithmetic on both sides: relative L2 of 1e-5 (the CTF phase reaches ~100 rad at Nyquist)
    assert np.linalg.norm(vals - ref) / np.linalg.norm(ref) < 1e-5
    if wt is None:
        assert vw is None
    else:
        np.testing.assert_allclose(vw, wt.reshape(6, -1)[:, hp.flat], atol=2e-5)


def test_trilinear_reconstruction_matches_phantom(c1_data):  # noqa: F811
    res = reconstruct(c1_data["clean"], c1_data["matrices"], shifts_px=c1_data["origins"], devices="cpu",
                      ctf_mode="none", interp="trilinear")
    freq, curve = shell_fsc(res.volume, c1_data["volume"])
    # the blob's thresholds (test_reconstruct): measured min 0.9968 to 0.45 cycles/px and 0.846 to Nyquist,
    # the blob 0.9961 and 0.838 on the same particles
    assert np.all(curve[freq <= 0.45] > 0.95), curve
    assert np.all(curve[freq <= 0.5] > 0.5), curve
    scale = float((res.volume * c1_data["volume"]).sum() / (c1_data["volume"] ** 2).sum())
    assert scale == pytest.approx(1.0, abs=0.03)          # the sinc² gridding correction keeps amplitudes
    # without the correction the map is attenuated away from the centre: the correction is the kernel's
    plain = reconstruct(c1_data["clean"], c1_data["matrices"], shifts_px=c1_data["origins"], devices="cpu",
                        ctf_mode="none", interp="trilinear", gridding_correction=False).volume
    assert float((plain * c1_data["volume"]).sum() / (c1_data["volume"] ** 2).sum()) < scale - 0.01


def test_trilinear_wiener_ctf(c1_data):  # noqa: F811
    res = reconstruct(c1_data["with_ctf"], c1_data["matrices"], shifts_px=c1_data["origins"], ctf=c1_data["ctf"],
                      pixel_size_A=APIX, devices="cpu", interp="trilinear")
    freq, curve = shell_fsc(res.volume, c1_data["volume"])
    assert np.all(curve[(freq > 0) & (freq <= 0.45)] > 0.95), curve   # measured 0.994 (the blob 0.993)


def test_trilinear_symmetry_modes_agree(d7_data):  # noqa: F811
    imgs, mats = d7_data["images"][:16], d7_data["matrices"][:16]
    vol = reconstruct(imgs, mats, devices="cpu", ctf_mode="none", sym="d7", interp="trilinear").volume
    exp = reconstruct(imgs, mats, devices="cpu", ctf_mode="none", sym="d7", sym_mode="expand",
                      interp="trilinear").volume
    assert np.corrcoef(vol.ravel(), exp.ravel())[0, 1] > 0.99
    for v in (vol, exp):
        assert np.corrcoef(v.ravel(), d7_data["volume"].ravel())[0, 1] > 0.97


def test_kernel_choice():
    assert resolve_interp("auto", gpu=False) == "trilinear"
    assert resolve_interp("auto", gpu=True) == "blob"
    assert resolve_interp("blob", gpu=False) == "blob"
    with pytest.raises(InputError, match="CPU only"):
        resolve_interp("trilinear", gpu=True)
    with pytest.raises(InputError, match="--interp"):
        ReconstructionSettings(interp="cubic").validated()


def test_output_mask_keeps_the_particle_and_clears_the_corners(c1_data):  # noqa: F811
    m = output_mask(32)
    assert m.shape == (32,) * 3 and m[16, 16, 16] == 1.0 and m[0, 0, 0] == 0.0 and m[16, 16, 0] == 0.0
    assert m[16, 16, 16 + 12] == 1.0                       # 1 to N/2 - 3.2 px
    plain = reconstruct(c1_data["clean"], c1_data["matrices"], shifts_px=c1_data["origins"], devices="cpu",
                        ctf_mode="none", interp="trilinear")
    masked = reconstruct(c1_data["clean"], c1_data["matrices"], shifts_px=c1_data["origins"], devices="cpu",
                         ctf_mode="none", interp="trilinear", mask=True)
    np.testing.assert_allclose(masked.volume, plain.volume * m, rtol=1e-5, atol=1e-6)


def test_cli_default_is_trilinear_on_the_cpu_and_blob_on_request(tmp_path, capsys):
    star, truth = write_dataset(str(tmp_path))
    for extra, interp in (([], "trilinear"), (["--interp", "blob", "--no-mask"], "blob")):
        out = tmp_path / f"{interp}.mrc"
        code, stdout, err = run_cli([star, "-o", out, "--device", "cpu", "--json", "-q"] + extra, capsys)
        assert code == 0, err
        summary = json.loads(stdout.strip().splitlines()[-1])
        assert summary["interp"] == interp and summary["mask"] == (not extra)


def test_images_path_equals_values_then_scatter(c1_data):  # noqa: F811
    """insert_images_trilinear (transform and scatter chunk by chunk, symmetry expanded) is the two steps."""
    grid = fourier_grid(BOX, ReconstructionSettings())
    imgs, mats = c1_data["with_ctf"][:12], c1_data["matrices"][:12]
    ctf = {k: v[:12] for k, v in c1_data["ctf"].items()}
    ops = fr_group("d2")
    vals, w = tri.half_plane_values(imgs, grid, shifts_px=c1_data["origins"][:12], ctf=ctf, pixel_size_A=APIX,
                                    mode="wiener")
    ref_d, ref_w = np.zeros(grid.shape, np.complex64), np.zeros(grid.shape, np.float32)
    ent = np.einsum("nij,gjk->ngik", mats, ops).reshape(-1, 3, 3)
    tri.insert_trilinear_numpy(ref_d, ref_w, vals, w, ent, np.repeat(np.arange(12), len(ops)), grid)
    d, wt = np.zeros(grid.shape, np.complex64), np.zeros(grid.shape, np.float32)
    tri.insert_images_trilinear(d, wt, imgs, mats, grid, shifts_px=c1_data["origins"][:12], ctf=ctf,
                                pixel_size_A=APIX, mode="wiener", operators=ops, chunk_points=5000)
    np.testing.assert_allclose(wt, ref_w, rtol=1e-5, atol=1e-5 * ref_w.max())
    np.testing.assert_allclose(d, ref_d, rtol=1e-5, atol=1e-5 * np.abs(ref_d).max())


def test_trilinear_half_maps_sum_to_the_full_map(c1_data):  # noqa: F811
    res = reconstruct(c1_data["clean"], c1_data["matrices"], shifts_px=c1_data["origins"], devices="cpu",
                      ctf_mode="none", interp="trilinear", halves=True, batch_size=70)
    full = reconstruct(c1_data["clean"], c1_data["matrices"], shifts_px=c1_data["origins"], devices="cpu",
                       ctf_mode="none", interp="trilinear").volume
    np.testing.assert_allclose(res.volume, full, atol=1e-4 * np.abs(full).max())
    for half in (res.half1, res.half2):
        assert np.corrcoef(half.ravel(), c1_data["volume"].ravel())[0, 1] > 0.98
