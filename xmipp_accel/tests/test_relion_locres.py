"""Our local resolution against ``relion_postprocess --locres`` (RELION 3.1) on the same half maps with
known regions of different resolution.

Half maps: a 64³ particle at 1.5 Å/px in solvent (``em.synthetic.two_resolution_half_maps``): side A
(x < 32) keeps its detail to 4.0 Å, side B (x >= 32) is low-passed to 7.5 Å (sharp cut-offs: the true
resolution of each side is its cut-off), spectral SNR 1 inside the particle, independent noise per
half. The medians are taken over the same voxels for both programs: the particle's core on each side,
at least 8 px (1/8 of the box) from the plane between them. At spectral SNR 1 both sides are compared;
at SNR 20 (where the old method leaked the sharp side into the blurred one) the blurred side.

RELION runs with ``--locres_sampling 15`` (Å): its default of 25 Å puts only 12 sampling points in
this 96 Å box, 15 Å gives 82 (its window: a sphere of 7.5 Å radius with a 15 Å soft edge).
"""
from __future__ import annotations

import os
import time

import numpy as np
import pytest

from xmipp_accel.em.synthetic import two_resolution_half_maps
from xmipp_accel.gpu.resolution.local import local_resolution
from xmipp_accel.io.mrc import read_mrc, write_mrc
from xmipp_accel.tests.relion_peer import run_relion

BOX, PIXEL, TRUTH_A = 64, 1.5, (4.0, 7.5)


def _run_both(d, snr: float):
    h1, h2, region = two_resolution_half_maps(BOX, pixel_size_A=PIXEL, resolutions_A=TRUTH_A, snr=snr, seed=0)
    write_mrc(d / "half1.mrc", h1, PIXEL)
    write_mrc(d / "half2.mrc", h2, PIXEL)
    os.makedirs(d / "pp", exist_ok=True)
    t0 = time.perf_counter()
    run_relion(["relion_postprocess", "--i", "half1.mrc", "--i2", "half2.mrc", "--angpix", PIXEL, "--locres",
                "--locres_sampling", 15, "--o", "pp/postprocess"], cwd=d, threads=2)
    relion_s = time.perf_counter() - t0
    relion = read_mrc(str(d / "pp" / "postprocess_locres.mrc"))[0]
    t0 = time.perf_counter()
    ours = local_resolution(read_mrc(str(d / "half1.mrc"))[0], read_mrc(str(d / "half2.mrc"))[0],
                            pixel_size_A=PIXEL)
    ours_s = time.perf_counter() - t0
    return region, ours, relion, ours_s, relion_s


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    return _run_both(tmp_path_factory.mktemp("relion_locres"), 1.0)


@pytest.fixture(scope="module")
def both_high_snr(tmp_path_factory):
    return _run_both(tmp_path_factory.mktemp("relion_locres_snr20"), 20.0)


def _medians(res: np.ndarray, region: np.ndarray):
    return float(np.median(res[region == 1])), float(np.median(res[region == 2]))


def test_both_read_the_known_resolutions_ours_at_least_as_closely(both):
    region, ours, relion, _, _ = both
    ours_med = _medians(ours.resolution_A, region)
    relion_med = _medians(relion, region)
    for side, truth, o, r in zip("AB", TRUTH_A, ours_med, relion_med):
        # RELION's window (radius 7.5 Å + 15 Å edge) reaches across the 8 px margin: each side is pulled
        # towards the other by up to ~20 % (measured 4.70 | 6.77 Å); ours, whose window follows the
        # resolution tested, reads within 8 % (the band's width, module notes; measured 4.08 | 7.00 Å)
        assert r == pytest.approx(truth, rel=0.25), f"RELION side {side}: {r:.2f} Å for {truth} Å"
        assert o == pytest.approx(truth, rel=0.08), f"ours side {side}: {o:.2f} Å for {truth} Å"
        assert abs(o - truth) <= abs(r - truth), f"side {side}: ours {o:.2f}, RELION {r:.2f}, truth {truth}"
    assert ours_med[0] < np.sqrt(TRUTH_A[0] * TRUTH_A[1]) < ours_med[1]


def test_solvent_reports_no_resolution_in_ours(both):
    region, ours, relion, _, _ = both
    assert np.all(ours.resolution_A[region > 0] > 0)
    assert np.mean(ours.resolution_A[region == 0] == 0) > 0.85   # all but ~2 px of soft edge
    assert np.mean(relion[region == 0] > 0) > 0.5                 # RELION gives the solvent a value


def test_ours_is_faster_than_relion_on_the_same_cores(both):
    *_, ours_s, relion_s = both
    # measured on the 2-core development box: ours ~0.3 s, RELION ~2 s
    assert ours_s < relion_s, f"ours {ours_s:.2f} s, RELION {relion_s:.2f} s"


def test_high_snr_the_blurred_side_keeps_its_resolution(both_high_snr):
    """Spectral SNR 20 (issue 14's regime: the sharp side's strong high frequencies are what can leak).
    Measured: ours 3.52 | 5.93 Å, RELION 3.70 | 5.33 Å. Both err fine at a sharp cut-off with an FSC
    plateau of 0.95; on the blurred side, where leakage shows, ours must be at least as close as RELION
    and within 25 % (the old method read 3.89 Å); on the sharp side both within 15 %."""
    region, ours, relion, _, _ = both_high_snr
    (oa, ob), (ra, rb) = _medians(ours.resolution_A, region), _medians(relion, region)
    assert ob > 0.75 * TRUTH_A[1] and abs(ob - TRUTH_A[1]) <= abs(rb - TRUTH_A[1]), (ob, rb)
    assert oa == pytest.approx(TRUTH_A[0], rel=0.15) and ra == pytest.approx(TRUTH_A[0], rel=0.15), (oa, ra)
