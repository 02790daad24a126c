"""Fourier reconstruction (gpu/reconstruct) on the CPU: blob, gather twin, symmetry, CTF, halves, ground truth.

Ground truth: phantoms made of Gaussian blobs whose projections are computed analytically (a
Gaussian projects to a Gaussian), so the particles carry no interpolation error of ours; shifts
and CTF are applied to them as a microscope would (RELION's origin sign, em.ctf's CTF).
"""
from __future__ import annotations

import logging

import numpy as np
import pytest

from xmipp_accel.em.ctf import ctf_2d
from xmipp_accel.em.geometry import euler_to_matrix
from xmipp_accel.em.symmetry import symmetry_matrices
from xmipp_accel.errors import InputError
from xmipp_accel.gpu.reconstruct import batches as rb
from xmipp_accel.gpu.reconstruct.batches import reconstruct
from xmipp_accel.gpu.reconstruct.blob import KaiserBesselBlob, bessel_i
from xmipp_accel.gpu.reconstruct.fourier import FourierAccumulator, FourierReconstructor, ReconstructionSettings
from xmipp_accel.gpu.reconstruct.insert import FourierGrid, insert_gather_numpy
from xmipp_accel.gpu.reconstruct.symmetrize import symmetrize_fourier_volume_numpy
from xmipp_accel.gpu.resolution.fsc import fsc


# ---------------------------------------------------------------------------------------------- ground truth

def gaussian_blobs(box: int, n_blobs: int = 20, seed: int = 0, sigma=(0.8, 1.4)):
    """Positions (x, y, z) px, widths px and amplitudes of a phantom of Gaussian blobs."""
    rng = np.random.default_rng(seed)
    return (rng.uniform(-box / 4, box / 4, (n_blobs, 3)), rng.uniform(*sigma, n_blobs),
            rng.uniform(0.5, 1.0, n_blobs))


def blob_volume(box: int, blobs, group=None) -> np.ndarray:
    """The phantom sampled on the (z, y, x) grid, centre box//2; averaged over a point group if given."""
    pos, sig, amp = blobs
    ops = np.eye(3)[None] if group is None else group
    c = np.arange(box) - box // 2
    v = np.zeros((box,) * 3)
    for g in ops:  # V_sym(x) = mean_g V(g x): blob p moves to g^T p
        for p, s, a in zip(pos @ g, sig, amp):
            v += a * np.exp(-((c[None, None, :] - p[0]) ** 2 + (c[None, :, None] - p[1]) ** 2
                              + (c[:, None, None] - p[2]) ** 2) / (2 * s * s))
    return (v / len(ops)).astype(np.float32)


def blob_projections(box: int, blobs, matrices, offsets_px=None, group=None) -> np.ndarray:
    """Exact projections P(x, y) = sum_z V(A^T (x, y, z)); blob content displaced by ``offsets_px`` (x, y)."""
    pos, sig, amp = blobs
    ops = np.eye(3)[None] if group is None else group
    c = np.arange(box) - box // 2
    out = np.zeros((len(matrices), box, box))
    for g in ops:
        q = np.einsum("nij,bj->nbi", matrices, pos @ g)
        if offsets_px is not None:
            q[:, :, :2] += offsets_px[:, None, :]
        for b in range(len(sig)):
            s = sig[b]
            gx = np.exp(-(c[None, :] - q[:, b, 0:1]) ** 2 / (2 * s * s))
            gy = np.exp(-(c[None, :] - q[:, b, 1:2]) ** 2 / (2 * s * s))
            out += amp[b] * np.sqrt(2 * np.pi) * s * gy[:, :, None] * gx[:, None, :]
    return (out / len(ops)).astype(np.float32)


def apply_ctf(images: np.ndarray, ctf: dict, pixel_size_A: float) -> np.ndarray:
    """Images convolved with their CTF (em.ctf), centre box//2."""
    n, box, _ = images.shape
    c = ctf_2d(box, pixel_size_A, ctf["defocus_u_A"], ctf["defocus_v_A"], ctf["defocus_angle_deg"])
    f = np.fft.rfft2(np.fft.ifftshift(images, axes=(1, 2)))
    return np.fft.fftshift(np.fft.irfft2(f * c, s=(box, box)), axes=(1, 2)).astype(np.float32)


def random_rotations(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return euler_to_matrix(rng.uniform(0, 360, n), np.degrees(np.arccos(rng.uniform(-1, 1, n))),
                           rng.uniform(0, 360, n))


def shell_fsc(a: np.ndarray, b: np.ndarray):
    res = fsc(a, b)
    return np.asarray(res.frequency), np.asarray(res.fsc)


BOX = 32
APIX = 3.0


@pytest.fixture(scope="module")
def c1_data():
    """300 particles of a 32-px Gaussian phantom with shifts (and CTF-modulated copies)."""
    n = 300
    rng = np.random.default_rng(1)
    blobs = gaussian_blobs(BOX)
    mats = random_rotations(n, 1)
    origins = rng.uniform(-3, 3, (n, 2))            # RELION: shifting by +origin centres the particle
    clean = blob_projections(BOX, blobs, mats, -origins)
    du = rng.uniform(3000, 6000, n)
    ctf = {"defocus_u_A": du, "defocus_v_A": du - 200, "defocus_angle_deg": rng.uniform(0, 180, n)}
    return {"volume": blob_volume(BOX, blobs), "matrices": mats, "origins": origins, "clean": clean,
            "ctf": ctf, "with_ctf": apply_ctf(clean, ctf, APIX)}


# ---------------------------------------------------------------------------------------------- blob

def test_bessel_i_matches_scipy():
    special = pytest.importorskip("scipy.special")
    x = np.linspace(0, 20, 41)
    for m in range(4):
        np.testing.assert_allclose(bessel_i(m, x), special.iv(m, x), rtol=1e-12, atol=1e-300)


def test_blob_value_and_table():
    blob = KaiserBesselBlob()
    assert blob.value(0.0) == pytest.approx(1.0)
    assert blob.value(1.9) == pytest.approx(1.0 / np.i0(15.0))
    assert blob.value(2.0) == 0.0
    # the table, linearly interpolated in squared distance, follows the exact values
    tab = blob.table()
    d2 = np.random.default_rng(0).uniform(0, 1.9 ** 2, 1000)
    t = d2 * blob.table_scale()
    i = t.astype(int)
    approx = tab[i] + (t - i) * (tab[np.minimum(i + 1, tab.size - 1)] - tab[i])
    np.testing.assert_allclose(approx, blob.value_squared(d2), atol=2e-6)


def test_blob_fourier_transform_matches_closed_form():
    """Order 0 in 3-D: B(w) ∝ I_{3/2}(s)/s^{3/2}, s = sqrt(alpha² - (2 pi a w)²) (J_{3/2} past alpha)."""
    a, alpha = 1.9, 15.0
    blob = KaiserBesselBlob(a, alpha, 0)

    def closed(w):
        z = 2 * np.pi * a * w
        if z < alpha:
            s = np.sqrt(alpha ** 2 - z ** 2)
            return np.sqrt(2 / (np.pi * s)) * (np.cosh(s) - np.sinh(s) / s) / s ** 1.5
        t = np.sqrt(z ** 2 - alpha ** 2)
        return np.sqrt(2 / (np.pi * t)) * (np.sin(t) / t - np.cos(t)) / t ** 1.5

    w = np.array([0.0, 0.1, 0.25, 0.43, 0.8, 1.5])
    ours = blob.fourier_transform_3d(w)
    ref = np.array([closed(x) for x in w])
    np.testing.assert_allclose(ours / ours[0], ref / ref[0], rtol=1e-6, atol=1e-9)
    # absolute scale: B(0) is the blob's integral
    r = np.linspace(0, a, 20001)
    integral = np.trapz(4 * np.pi * r * r * blob.value(r), r)
    assert ours[0] == pytest.approx(integral, rel=1e-6)


def test_gridding_correction_shape_and_centre():
    corr = KaiserBesselBlob().gridding_correction(9, 18)
    assert corr.shape == (9, 9, 9) and corr.dtype == np.float32
    assert corr[4, 4, 4] == pytest.approx(1.0)
    assert corr[0, 0, 0] < corr[4, 4, 0] < 1.0


# ---------------------------------------------------------------------------------------------- gather twin

def test_gather_of_constant_image_gives_data_equal_weight():
    """With F = 1 everywhere, each voxel's data equals its weight; voxels lie within the blob of the plane."""
    g = FourierGrid(32, 16)
    proj = np.ones((1, 32, 17), np.complex64)
    A = euler_to_matrix(30.0, 50.0, 70.0)[None]
    d = np.zeros(g.shape, np.complex64)
    w = np.zeros(g.shape, np.float32)
    insert_gather_numpy(d, w, proj, None, A, [0], g)
    np.testing.assert_allclose(d.real, w, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(d.imag, 0, atol=1e-6)
    # every touched voxel is within the blob radius of the plane n . k = 0, and inside kmax
    f = np.fft.fftfreq(32, 1 / 32)
    kz, ky, kx = np.meshgrid(f, f, np.arange(17), indexing="ij")
    dist = kx * A[0, 2, 0] + ky * A[0, 2, 1] + kz * A[0, 2, 2]
    touched = w > 0
    assert touched.sum() > 1000
    assert np.abs(dist[touched]).max() <= 1.9 + 1e-9
    assert (kx ** 2 + ky ** 2 + kz ** 2)[touched].max() <= 256
    # voxels well inside the slab and the sphere are all touched
    inner = (np.abs(dist) < 1.0) & (kx ** 2 + ky ** 2 + kz ** 2 < 12 ** 2)
    assert touched[inner].all()


def test_gather_is_the_blob_weighted_sum_of_pixels():
    """A direct (loop) evaluation of the gather formula at a few voxels, Hermitian mates included."""
    rng = np.random.default_rng(3)
    M, K = 24, 12
    g = FourierGrid(M, K)
    proj = (rng.normal(size=(2, M, M // 2 + 1)) + 1j * rng.normal(size=(2, M, M // 2 + 1))).astype(np.complex64)
    pw = rng.uniform(0.2, 1.0, (2, M, M // 2 + 1)).astype(np.float32)
    A = random_rotations(2, 5)
    blob = KaiserBesselBlob()
    d = np.zeros(g.shape, np.complex64)
    w = np.zeros(g.shape, np.float32)
    insert_gather_numpy(d, w, proj, pw, A, [0, 1], g, blob, blob_mode="onthefly")

    def pixel(img, px, py):
        if px < 0:
            return np.conj(proj[img, (-py) % M, -px]), pw[img, (-py) % M, -px]
        return proj[img, py % M, px], pw[img, py % M, px]

    checked = 0
    for iz, iy, ix in zip(*np.nonzero(w > 0)):
        if checked >= 40:
            break
        kz = iz if iz < M // 2 else iz - M
        ky = iy if iy < M // 2 else iy - M
        k = np.array([ix, ky, kz], float)
        sd, sw = 0j, 0.0
        for img in (0, 1):
            q = A[img] @ k
            for py in range(int(np.floor(q[1] - 2)), int(np.ceil(q[1] + 2)) + 1):
                for px in range(int(np.floor(q[0] - 2)), int(np.ceil(q[0] + 2)) + 1):
                    d2 = (px - q[0]) ** 2 + (py - q[1]) ** 2 + q[2] ** 2
                    if d2 > 1.9 ** 2 or px * px + py * py > K * K or abs(px) > M // 2 - 1 or abs(py) > M // 2 - 1:
                        continue
                    b = blob.value_squared(d2)
                    f, fw = pixel(img, px, py)
                    sd += b * f
                    sw += b * fw
        np.testing.assert_allclose(d[iz, iy, ix], sd, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(w[iz, iy, ix], sw, rtol=1e-5, atol=1e-6)
        checked += 1
    assert checked == 40


def test_gather_threads_and_chunks_give_the_same_bits():
    """The blob gather on threads adds its chunks' sums in the chunks' order: bit for bit the one-thread sum."""
    rng = np.random.default_rng(11)
    M = 32
    g = FourierGrid(M, 15)
    proj = (rng.normal(size=(6, M, M // 2 + 1)) + 1j * rng.normal(size=(6, M, M // 2 + 1))).astype(np.complex64)
    pw = rng.uniform(0.2, 1.0, (6, M, M // 2 + 1)).astype(np.float32)
    A = random_rotations(12, 4)
    idx = np.arange(12) % 6
    out = []
    for threads in (1, 2, 4):
        d = np.zeros(g.shape, np.complex64)
        w = np.zeros(g.shape, np.float32)
        insert_gather_numpy(d, w, proj, pw, A, idx, g, chunk_elements=1 << 12, threads=threads)
        out.append((d, w))
    assert out[0][1].sum() > 0
    for d, w in out[1:]:
        assert np.array_equal(d, out[0][0]) and np.array_equal(w, out[0][1])


def test_gather_at_the_rim_leaves_out_the_pixels_beyond_kmax():
    """Voxels near kmax (where the candidate squares reach past it and the pixel bounds are tested): the weight
    is the blob-weighted sum of the pixels with |p|² <= kmax² only, as a direct loop gives it."""
    M, kmax = 24, 6.5
    g = FourierGrid(M, kmax)
    A = random_rotations(1, 9)
    pw = np.random.default_rng(2).uniform(0.2, 1.0, (1, M, M // 2 + 1)).astype(np.float32)
    pw = 0.5 * (pw + pw[:, (-np.arange(M)) % M])              # W(0, -py) = W(0, py): the kx = 0 mates agree
    d = np.zeros(g.shape, np.complex64)
    w = np.zeros(g.shape, np.float32)
    blob = KaiserBesselBlob()
    insert_gather_numpy(d, w, np.ones((1, M, M // 2 + 1), np.complex64), pw, A, [0], g, blob, blob_mode="onthefly")
    checked = 0
    for iz, iy, ix in zip(*np.nonzero(w > 0)):
        k = np.array([ix, iy if iy < M // 2 else iy - M, iz if iz < M // 2 else iz - M], float)
        if k @ k < (kmax - 2) ** 2:
            continue
        q = A[0] @ k
        ref = 0.0
        for py in range(int(np.floor(q[1] - 2)), int(np.ceil(q[1] + 2)) + 1):
            for px in range(int(np.floor(q[0] - 2)), int(np.ceil(q[0] + 2)) + 1):
                d2 = (px - q[0]) ** 2 + (py - q[1]) ** 2 + q[2] ** 2
                if d2 <= 1.9 ** 2 and px * px + py * py <= g.kmax2 and max(abs(px), abs(py)) <= g.K:
                    ref += blob.value_squared(d2) * pw[0, (py if px >= 0 else -py) % M, abs(px)]
        np.testing.assert_allclose(w[iz, iy, ix], ref, rtol=1e-5, atol=1e-6)
        checked += 1
    assert checked > 50


def test_packed_layout_holds_pixels_and_hermitian_mates():
    from xmipp_accel.gpu.reconstruct.insert import pack_projections_numpy, packed_width
    rng = np.random.default_rng(8)
    g = FourierGrid(16, 7.5)
    proj = (rng.normal(size=(2, 16, 9)) + 1j * rng.normal(size=(2, 16, 9))).astype(np.complex64)
    pw = rng.uniform(size=(2, 16, 9)).astype(np.float32)
    packed = pack_projections_numpy(proj, pw, g)
    W = packed_width(g, KaiserBesselBlob())
    Kp = (W - 1) // 2
    assert packed.shape == (2, W, W, 4) and Kp == 7 + 3
    at = lambda px, py: packed[1, py + Kp, px + Kp]  # noqa: E731
    assert at(3, -2)[0] == proj[1, -2 % 16, 3].real and at(3, -2)[2] == pw[1, -2 % 16, 3]
    assert at(-3, 2)[1] == -proj[1, -2 % 16, 3].imag          # conj F(-p)
    assert np.all(at(6, 6) == 0) and np.all(at(-9, 0) == 0)   # beyond kmax / K: zeros, weight too
    assert np.all(packed[..., 3] == 0)


def test_table_and_on_the_fly_blob_agree():
    rng = np.random.default_rng(4)
    g = FourierGrid(32, 14.5)
    proj = (rng.normal(size=(3, 32, 17)) + 1j * rng.normal(size=(3, 32, 17))).astype(np.complex64)
    A = random_rotations(3, 6)
    out = []
    for mode in ("table", "onthefly"):
        d = np.zeros(g.shape, np.complex64)
        w = np.zeros(g.shape, np.float32)
        insert_gather_numpy(d, w, proj, None, A, [0, 1, 2], g, blob_mode=mode)
        out.append((d, w))
    assert np.linalg.norm(out[0][0] - out[1][0]) / np.linalg.norm(out[1][0]) < 1e-5
    assert np.linalg.norm(out[0][1] - out[1][1]) / np.linalg.norm(out[1][1]) < 1e-5


def test_symmetrize_identity_is_exact_and_rotation_moves_data():
    rng = np.random.default_rng(5)
    g = FourierGrid(24, 12)
    d = np.zeros(g.shape, np.complex64)
    w = np.zeros(g.shape, np.float32)
    insert_gather_numpy(d, w, (rng.normal(size=(1, 24, 13)) + 0j).astype(np.complex64), None,
                        random_rotations(1, 7), [0], g)
    d1, w1 = symmetrize_fourier_volume_numpy(d, w, np.eye(3)[None], g)
    np.testing.assert_allclose(d1, d, atol=1e-7)
    np.testing.assert_allclose(w1, w, atol=1e-7)
    # a rotation by 90 degrees about z maps grid points onto grid points: out(k) = in(g k) exactly
    rz = np.array([[0.0, -1, 0], [1, 0, 0], [0, 0, 1]])
    d2, w2 = symmetrize_fourier_volume_numpy(d, w, rz[None], g)
    f = np.fft.fftfreq(24, 1 / 24).astype(int)
    for iz, iy, ix in list(zip(*np.nonzero(w2 > 0)))[:50]:
        k = np.array([ix, f[iy], f[iz]])
        p = (rz @ k).round().astype(int)
        conj = p[0] < 0
        if conj:
            p = -p
        expect = d[p[2] % 24, p[1] % 24, p[0]]
        assert d2[iz, iy, ix] == pytest.approx(np.conj(expect) if conj else expect, abs=1e-6)


# ---------------------------------------------------------------------------------------------- reconstructions

def test_c1_reconstruction_matches_phantom_to_nyquist(c1_data):
    res = reconstruct(c1_data["clean"], c1_data["matrices"], shifts_px=c1_data["origins"], devices="cpu",
                      ctf_mode="none")
    vol = res.volume
    assert vol.shape == (BOX,) * 3 and vol.dtype == np.float32
    assert res.n_particles == 300
    freq, curve = shell_fsc(vol, c1_data["volume"])
    assert np.all(curve[freq <= 0.45] > 0.95), curve
    assert np.all(curve[freq <= 0.5] > 0.5), curve
    # amplitudes right (gridding correction and weights), centre at box // 2
    scale = float((vol * c1_data["volume"]).sum() / (c1_data["volume"] ** 2).sum())
    assert scale == pytest.approx(1.0, abs=0.02)
    assert np.unravel_index(np.argmax(vol), vol.shape) == np.unravel_index(np.argmax(c1_data["volume"]), vol.shape)


def test_projection_of_reconstruction_matches_input(c1_data):
    from xmipp_accel.em.projection import FourierProjector, project_volume
    vol = reconstruct(c1_data["clean"], c1_data["matrices"], shifts_px=c1_data["origins"], devices="cpu",
                      ctf_mode="none").volume
    mats = c1_data["matrices"][:8]
    centred = blob_projections(BOX, gaussian_blobs(BOX), mats)
    for proj in (project_volume(vol, mats), FourierProjector(vol).project(mats)):
        for p, t in zip(np.asarray(proj), centred):
            assert np.corrcoef(p.ravel(), t.ravel())[0, 1] > 0.995
            assert float((p * t).sum() / (t * t).sum()) == pytest.approx(1.0, abs=0.03)


@pytest.mark.parametrize("mode,min_fsc,scale", [("wiener", 0.95, (0.95, 1.02)), ("phase-flip", 0.9, (0.3, 0.8))])
def test_ctf_corrected_reconstruction(c1_data, mode, min_fsc, scale):
    res = reconstruct(c1_data["with_ctf"], c1_data["matrices"], shifts_px=c1_data["origins"], ctf=c1_data["ctf"],
                      pixel_size_A=APIX, devices="cpu", ctf_mode=mode)
    freq, curve = shell_fsc(res.volume, c1_data["volume"])
    assert np.all(curve[(freq > 0) & (freq <= 0.45)] > min_fsc), curve
    s = float((res.volume * c1_data["volume"]).sum() / (c1_data["volume"] ** 2).sum())
    assert scale[0] < s < scale[1]   # phase flipping keeps the CTF's amplitude attenuation


def test_wiener_on_premultiplied_images(c1_data):
    premult = apply_ctf(c1_data["with_ctf"], c1_data["ctf"], APIX)
    res = reconstruct(premult[:150], c1_data["matrices"][:150], shifts_px=c1_data["origins"][:150],
                      ctf={k: v[:150] for k, v in c1_data["ctf"].items()}, pixel_size_A=APIX, devices="cpu",
                      ctf_mode="wiener", ctf_premultiplied=True)
    assert np.corrcoef(res.volume.ravel(), c1_data["volume"].ravel())[0, 1] > 0.99


def test_ignoring_the_ctf_is_worse(c1_data):
    """The CTF treatment matters: reconstructing CTF-modulated images without it loses the map."""
    res = reconstruct(c1_data["with_ctf"], c1_data["matrices"], shifts_px=c1_data["origins"], devices="cpu",
                      ctf_mode="none")
    assert np.corrcoef(res.volume.ravel(), c1_data["volume"].ravel())[0, 1] < 0.9


def test_wrong_shift_sign_is_worse(c1_data):
    good = reconstruct(c1_data["clean"][:100], c1_data["matrices"][:100], shifts_px=c1_data["origins"][:100],
                       devices="cpu", ctf_mode="none").volume
    bad = reconstruct(c1_data["clean"][:100], c1_data["matrices"][:100], shifts_px=-c1_data["origins"][:100],
                      devices="cpu", ctf_mode="none").volume
    cc = [np.corrcoef(v.ravel(), c1_data["volume"].ravel())[0, 1] for v in (good, bad)]
    assert cc[0] > 0.99 and cc[1] < 0.9


@pytest.fixture(scope="module")
def d7_data():
    box, n = 24, 40
    group = symmetry_matrices("d7")
    blobs = gaussian_blobs(box, 6, seed=3)
    mats = random_rotations(n, 9)
    return {"box": box, "volume": blob_volume(box, blobs, group), "matrices": mats,
            "images": blob_projections(box, blobs, mats, group=group)}


def test_symmetric_reconstruction_d7_volume_mode(d7_data):
    """12 particles of a D7 phantom: with the symmetry they fill Fourier space, without it they do not."""
    imgs, mats = d7_data["images"][:12], d7_data["matrices"][:12]
    sym = reconstruct(imgs, mats, devices="cpu", ctf_mode="none", sym="d7").volume
    c1 = reconstruct(imgs, mats, devices="cpu", ctf_mode="none").volume
    freq, curve = shell_fsc(sym, d7_data["volume"])
    _, curve_c1 = shell_fsc(c1, d7_data["volume"])
    assert np.all(curve[freq <= 0.45] > 0.9), curve
    assert np.all(curve[freq <= 0.5] > 0.5), curve
    assert curve[freq <= 0.45].mean() > curve_c1[freq <= 0.45].mean() + 0.05


def test_symmetry_modes_agree(d7_data):
    imgs, mats = d7_data["images"][:16], d7_data["matrices"][:16]
    vol = reconstruct(imgs, mats, devices="cpu", ctf_mode="none", sym="d7", sym_mode="volume").volume
    exp = reconstruct(imgs, mats, devices="cpu", ctf_mode="none", sym="d7", sym_mode="expand").volume
    assert np.corrcoef(vol.ravel(), exp.ravel())[0, 1] > 0.995
    assert np.linalg.norm(vol - exp) / np.linalg.norm(exp) < 0.08
    for v in (vol, exp):
        assert np.corrcoef(v.ravel(), d7_data["volume"].ravel())[0, 1] > 0.98


def test_icosahedral_volume_mode():
    box, n = 24, 6
    group = symmetry_matrices("i")
    blobs = gaussian_blobs(box, 3, seed=4)
    mats = random_rotations(n, 10)
    truth = blob_volume(box, blobs, group)
    vol = reconstruct(blob_projections(box, blobs, mats, group=group), mats, devices="cpu", ctf_mode="none",
                      sym="i").volume
    freq, curve = shell_fsc(vol, truth)
    assert np.all(curve[freq <= 0.4] > 0.9), curve


def test_half_maps(c1_data):
    res = reconstruct(c1_data["clean"], c1_data["matrices"], shifts_px=c1_data["origins"], devices="cpu",
                      ctf_mode="none", halves=True)
    assert res.half1 is not None and res.half2 is not None
    for h in (res.half1, res.half2):
        assert np.corrcoef(h.ravel(), c1_data["volume"].ravel())[0, 1] > 0.99
    assert not np.allclose(res.half1, res.half2)
    # the full map is the reconstruction of all particles (accumulators summed before dividing)
    full = reconstruct(c1_data["clean"], c1_data["matrices"], shifts_px=c1_data["origins"], devices="cpu",
                       ctf_mode="none").volume
    np.testing.assert_allclose(res.volume, full, atol=1e-4 * np.abs(full).max())
    freq, curve = shell_fsc(res.half1, res.half2)
    assert np.all(curve[freq <= 0.4] > 0.9)


def test_batches_and_accumulator_sums_do_not_change_the_result(c1_data):
    imgs, mats, sh = c1_data["clean"][:60], c1_data["matrices"][:60], c1_data["origins"][:60]
    one = reconstruct(imgs, mats, shifts_px=sh, devices="cpu", ctf_mode="none", batch_size=60).volume
    many = reconstruct(imgs, mats, shifts_px=sh, devices="cpu", ctf_mode="none", batch_size=7).volume
    np.testing.assert_allclose(many, one, atol=1e-5 * np.abs(one).max())
    # partial accumulators (two workers, or two MPI ranks) add up to the whole
    s = ReconstructionSettings(ctf_mode="none")
    a, b = FourierReconstructor(BOX, settings=s), FourierReconstructor(BOX, settings=s)
    a.insert(imgs[:25], mats[:25], shifts_px=sh[:25])
    b.insert(imgs[25:], mats[25:], shifts_px=sh[25:])
    a.accumulators[0].add(b.accumulators[0])
    assert a.accumulators[0].count == 60
    np.testing.assert_allclose(a.volume(), one, atol=1e-5 * np.abs(one).max())


def test_reduce_accumulators_across_ranks():
    class FakeMPI:
        enabled, is_root = True, True

        def reduce_sum(self, a):
            return a * 3            # three ranks holding the same partial sums

        def gather(self, obj):
            return [obj] * 3
    g = FourierGrid(8, 4)
    acc = FourierAccumulator(np.ones(g.shape, np.complex64), np.ones(g.shape, np.float32), 5)
    out = rb.reduce_accumulators([acc], FakeMPI())
    assert out[0].count == 15 and float(out[0].weight.max()) == 3.0
    assert rb.reduce_accumulators([acc], None)[0] is acc


def test_out_of_memory_retries_with_smaller_batches(c1_data, monkeypatch, caplog):
    imgs, mats, sh = c1_data["clean"][:40], c1_data["matrices"][:40], c1_data["origins"][:40]
    ref = reconstruct(imgs, mats, shifts_px=sh, devices="cpu", ctf_mode="none", batch_size=40).volume
    real_insert = FourierReconstructor.insert
    sizes = []

    def insert_small_only(self, images, *a, **k):
        sizes.append(len(images))
        if len(images) > 10:
            raise MemoryError("simulated out of memory")
        return real_insert(self, images, *a, **k)

    monkeypatch.setattr(FourierReconstructor, "insert", insert_small_only)
    with caplog.at_level(logging.WARNING):
        vol = reconstruct(imgs, mats, shifts_px=sh, devices="cpu", ctf_mode="none", batch_size=40).volume
    assert "retrying with" in caplog.text
    assert sizes[0] == 40 and max(sizes[-3:]) <= 10
    np.testing.assert_allclose(vol, ref, atol=1e-5 * np.abs(ref).max())


def test_worker_threads_feed_every_batch_and_report_errors():
    """Batches go through the task runtime to the device's worker, in order; worker and validation errors
    are re-raised (the runtime's own tests cover several workers)."""
    from xmipp_accel import backend

    class State:
        device = backend.Device("cpu")

        def __init__(self, fail_at=None):
            self.seen, self.fail_at = [], fail_at

        def process(self, batch):
            if batch.first_index == self.fail_at:
                raise RuntimeError("boom")
            self.seen.append(batch.first_index)

    def batches(n):
        return (rb.ParticleBatch(np.zeros((1, 4, 4), np.float32), np.eye(3)[None], first_index=i) for i in range(n))

    state = State()
    rb._run_pipeline([state], batches(20), lambda b: None, None)
    assert state.seen == list(range(20))
    with pytest.raises(RuntimeError, match="boom"):
        rb._run_pipeline([State(fail_at=3)], batches(50), lambda b: None, None)

    def validate(b):
        if b.first_index == 7:
            raise InputError("particle batch 7 is bad")
    with pytest.raises(InputError, match="batch 7"):
        rb._run_pipeline([State()], batches(50), validate, None)


def test_nan_particles_are_rejected(c1_data):
    imgs = c1_data["clean"][:10].copy()
    imgs[4, 3, 3] = np.nan
    with pytest.raises(InputError, match="particle 5 has NaN"):
        reconstruct(imgs, c1_data["matrices"][:10], devices="cpu", ctf_mode="none")


@pytest.mark.parametrize("kwargs,match", [
    ({"pad": 0.5}, "--pad"), ({"max_res_digital": 0.7}, "Nyquist"), ({"sym_mode": "both"}, "--sym-mode"),
    ({"ctf_mode": "flip"}, "--ctf"), ({"blob_mode": "lut"}, "--blob-mode"), ({"wiener_constant": -1}, "wiener"),
    ({"sym": "x5"}, "symmetry|x5")])
def test_bad_settings_are_reported(kwargs, match):
    with pytest.raises(InputError, match=match):
        FourierReconstructor(16, settings=ReconstructionSettings(**kwargs))


def test_max_resolution_limits_the_map(c1_data):
    res = reconstruct(c1_data["clean"][:100], c1_data["matrices"][:100], shifts_px=c1_data["origins"][:100],
                      devices="cpu", ctf_mode="none", max_res_digital=0.25)
    spec = np.abs(np.fft.fftshift(np.fft.fftn(res.volume)))
    c = np.arange(BOX) - BOX // 2
    r = np.sqrt(c[:, None, None] ** 2 + c[None, :, None] ** 2 + c[None, None, :] ** 2) / BOX
    assert spec[r > 0.3].max() < 0.05 * spec[r < 0.2].max()
    assert np.corrcoef(res.volume.ravel(), c1_data["volume"].ravel())[0, 1] > 0.9
