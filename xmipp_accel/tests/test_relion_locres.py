"""Our local resolution against ``relion_postprocess --locres`` (RELION 3.1) on the same half maps with
known regions of different resolution.

Half maps: a 64³ particle at 1.5 Å/px in solvent (``em.synthetic.two_resolution_half_maps``): side A
(x < 32) keeps its detail to 4.0 Å, side B (x >= 32) is low-passed to 7.5 Å (sharp cut-offs: the true
resolution of each side is its cut-off), spectral SNR 1 inside the particle, independent noise per
half. The medians are taken over the same voxels for both programs: the particle's core on each side,
at least 8 px (1/8 of the box) from the plane between them.

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


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    d = tmp_path_factory.mktemp("relion_locres")
    h1, h2, region = two_resolution_half_maps(BOX, pixel_size_A=PIXEL, resolutions_A=TRUTH_A, snr=1.0, seed=0)
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
