"""Our FSC curves against ``relion_postprocess`` (RELION 3.1) on the same half maps and soft mask.

Half maps: a 64³ phantom (1.5 Å/px, low-passed to 6 Å so the FSC falls steeply) plus independent white
noise per half; mask: a sphere of radius 24 px with a 6 px raised-cosine edge (RELION's mask shape).
RELION writes the curves in ``postprocess.star`` (``data_fsc``) and the resolution in ``data_general``.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from xmipp_accel.cli.__main__ import main as cli
from xmipp_accel.em.synthetic import gaussian_lowpass, phantom_volume
from xmipp_accel.gpu.resolution.fsc import masked_fsc_corrected, resolution_at
from xmipp_accel.io.mrc import read_mrc, write_mrc
from xmipp_accel.io.star import read_star
from xmipp_accel.tests.relion_peer import run_relion

BOX, PIXEL, NOISE = 64, 1.5, 0.1


def soft_sphere(n: int, radius: float, edge: float) -> np.ndarray:
    """1 inside ``radius`` px, raised cosine to 0 over ``edge`` px (as relion_mask_create's soft edge)."""
    r = np.sqrt(sum(g ** 2 for g in np.meshgrid(*[np.arange(n) - n // 2] * 3, indexing="ij")))
    m = np.where(r < radius, 1.0, 0.5 + 0.5 * np.cos(np.pi * np.clip(r - radius, 0, edge) / edge))
    return m.astype(np.float32)


@pytest.fixture(scope="module")
def postprocess(tmp_path_factory):
    d = tmp_path_factory.mktemp("relion_fsc")
    signal = gaussian_lowpass(phantom_volume(BOX, seed=3), resolution_A=6.0, pixel_size_A=PIXEL)
    rng = np.random.default_rng(7)
    for h in (1, 2):
        write_mrc(d / f"half{h}.mrc", signal + NOISE * rng.standard_normal(signal.shape).astype(np.float32), PIXEL)
    write_mrc(d / "mask.mrc", soft_sphere(BOX, 24.0, 6.0), PIXEL)
    os.makedirs(d / "pp", exist_ok=True)
    run_relion(["relion_postprocess", "--i", "half1.mrc", "--i2", "half2.mrc", "--mask", "mask.mrc",
                "--angpix", PIXEL, "--o", "pp/postprocess"], cwd=d, threads=2)
    star = read_star(str(d / "pp" / "postprocess.star"))
    halves = [read_mrc(str(d / f"half{h}.mrc"))[0] for h in (1, 2)]
    ours = masked_fsc_corrected(halves[0], halves[1], read_mrc(str(d / "mask.mrc"))[0])
    return d, star, ours


def _col(star, name):
    return np.asarray(star["fsc"][name], dtype=np.float64)


def _general(star, name):
    v = star["general"][name]
    return float(v[0] if isinstance(v, (list, tuple, np.ndarray)) else v)


def sampling_sigma(n_voxels: np.ndarray) -> np.ndarray:
    """Standard deviation of the FSC of uncorrelated data over a shell of ``n`` voxels (``n/2``
    independent Friedel pairs): 1/sqrt(n/2), the σ of van Heel's 3σ criterion."""
    return 1.0 / np.sqrt(np.maximum(n_voxels, 2) / 2.0)


def weighting_tolerance(box: int, n_voxels: np.ndarray) -> np.ndarray:
    """Bound on |ours − RELION| from the one known difference in the shell sums.

    RELION's ``getFSC`` sums the half transform with weight 1, so the kx = 0 plane (``P`` voxels of a
    shell, both Friedel mates) weighs as much as the ``R`` other half-space voxels, while we weight
    those twice (the full sphere, ``n = 2R + P``). The two estimates differ by
    ``(f_P − f_R) P R / ((R + P)(2R + P))``; ``f_P − f_R`` is sampling noise of the plane's FSC, at
    most ~4 σ_P with σ_P = 1/sqrt(P/2). Plus 1e-4 for float32 maps and the 6 decimals of the STAR.
    """
    k = np.arange(box) - box // 2
    plane = np.rint(np.sqrt(k[:, None] ** 2 + k[None, :] ** 2)).astype(int).ravel()
    p = np.bincount(plane, minlength=box)[: n_voxels.size].astype(np.float64)
    r = np.maximum((n_voxels - p) / 2.0, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        bound = 4.0 * sampling_sigma(p) * p * r / ((r + p) * (2 * r + p))
    return np.nan_to_num(bound) + 1e-4


def test_unmasked_and_masked_fsc_equal_relion_shell_by_shell(postprocess):
    _, star, ours = postprocess
    n = len(star["fsc"]["rlnSpectralIndex"])
    assert n == ours.unmasked.fsc.size == BOX // 2 + 1
    tol = weighting_tolerance(BOX, ours.unmasked.n_voxels)
    for name, curve in (("rlnFourierShellCorrelationUnmaskedMaps", ours.unmasked),
                        ("rlnFourierShellCorrelationMaskedMaps", ours.masked)):
        rel = _col(star, name)
        diff = np.abs(curve.fsc - rel)
        assert np.all(diff <= tol), f"{name}: shells {np.nonzero(diff > tol)[0]} differ by {diff.max():.4f}"
        # the comparison can fail: a binning off by one shell (e.g. floor instead of round) misses it
        assert np.max(np.abs(curve.fsc[1:] - rel[:-1]) - tol[1:]) > 0.05
    # the same spectral index and frequency (RELION writes 1/Å with 6 decimals, the DC shell as 0.001)
    np.testing.assert_allclose(_col(star, "rlnResolution")[1:], ours.unmasked.frequency_A(PIXEL)[1:], atol=5e-7)


def test_phase_randomisation_starts_where_relion_starts(postprocess):
    _, star, ours = postprocess
    # RELION: first shell (> 0) with unmasked FSC < 0.8, written as a resolution in Å
    assert ours.randomise_from_A(PIXEL) == pytest.approx(_general(star, "rlnRandomiseFrom"), rel=1e-4)


def test_randomised_and_corrected_fsc_agree_within_sampling_noise(postprocess):
    """The random phases differ (RELION's generator vs ours), so the phase-randomised curves are two
    independent draws: each has σ_k = 1/sqrt(n_k/2) beyond the randomisation shell, their difference
    sqrt(2) σ_k; 4 sqrt(2) σ_k is exceeded by chance in 1 of ~16 000 shells. The correction
    (FSC_m − FSC_r)/(1 − FSC_r) has slope −(1 − FSC_m)/(1 − FSC_r)² ≈ −1 in FSC_r, so the corrected
    curves get the same bound. Below the randomisation shell both are the masked FSC (weighting bound)."""
    _, star, ours = postprocess
    shell = ours.randomise_from_shell
    k = np.arange(ours.masked.fsc.size)
    rand_tol = 4.0 * np.sqrt(2.0) * sampling_sigma(ours.masked.n_voxels)
    tol = np.where(k >= shell, rand_tol, weighting_tolerance(BOX, ours.masked.n_voxels))
    for name, curve in (("rlnCorrectedFourierShellCorrelationPhaseRandomizedMaskedMaps", ours.phase_randomised),
                        ("rlnFourierShellCorrelationCorrected", ours.corrected)):
        diff = np.abs(curve.fsc - _col(star, name))
        assert np.all(diff <= tol), f"{name}: shells {np.nonzero(diff > tol)[0]} differ by {diff.max():.4f}"
    # randomisation removed the signal beyond shell + 1 in both (not a trivial agreement of two 1s)
    assert np.all(np.abs(_col(star, "rlnCorrectedFourierShellCorrelationPhaseRandomizedMaskedMaps")[shell + 2:])
                  < 4 * sampling_sigma(ours.masked.n_voxels[shell + 2:]))


def test_resolution_at_0143_agrees_with_relion(postprocess, capsys):
    d, star, ours = postprocess
    relion_A = _general(star, "rlnFinalResolution")
    # RELION reports the last shell with corrected FSC >= 0.143 (no interpolation): same rule, 1%
    assert resolution_at(ours.corrected, 0.143, PIXEL, interpolate=False) == pytest.approx(relion_A, rel=0.01)
    # our default interpolates between that shell and the next: finer by less than one shell
    interp = resolution_at(ours.corrected, 0.143, PIXEL)
    shell = round(BOX * PIXEL / relion_A)
    assert BOX * PIXEL / (shell + 1) <= interp <= relion_A
    # the CLI (fsc --mask) reports the same curve and both resolutions
    rc = cli(["fsc", str(d / "half1.mrc"), str(d / "half2.mrc"), "--mask", str(d / "mask.mrc"),
              "-o", str(d / "ours.star"), "--json", "--device", "cpu"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["resolution_A_relion_rule"] == pytest.approx(relion_A, rel=0.01)
    assert summary["resolution_A"] == pytest.approx(interp, rel=1e-6)
    written = read_star(str(d / "ours.star"))["fsc"]
    np.testing.assert_allclose(np.asarray(written["rlnFourierShellCorrelationCorrected"], float),
                               ours.corrected.fsc, atol=1e-5)
    np.testing.assert_allclose(np.asarray(written["rlnFourierShellCorrelationUnmaskedMaps"], float),
                               _col(star, "rlnFourierShellCorrelationUnmaskedMaps"),
                               atol=weighting_tolerance(BOX, ours.unmasked.n_voxels).max())
