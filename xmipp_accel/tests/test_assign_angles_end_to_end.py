"""End to end: known map -> particles (CTF, shifts, SNR 1/3) -> projection matching -> reconstruction -> FSC vs the map.

The chain a user runs (assign-angles, then reconstruct), on the NumPy path with ground truth we construct:
the assigned poses must be close to the true ones (modulo symmetry) and the map reconstructed from them
must reach nearly the resolution (FSC = 0.5 against the true map) of the map reconstructed from the true
poses. A control with scrambled poses shows the FSC criterion can fail.
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest

from xmipp_accel.em.geometry import angular_distance_deg
from xmipp_accel.em.sampling import random_rotations
from xmipp_accel.em.symmetry import symmetry_matrices
from xmipp_accel.em.synthetic import make_particles, phantom_volume
from xmipp_accel.gpu.align.projmatch import ProjectionMatcher
from xmipp_accel.gpu.reconstruct import reconstruct
from xmipp_accel.gpu.resolution.fsc import fsc, resolution_at

BOX = 48
PX = 2.0  # Å per pixel
N = 120
CTF_KEYS = ("defocus_u_A", "defocus_v_A", "defocus_angle_deg", "voltage_kV", "cs_mm", "amplitude_contrast")


@pytest.fixture(scope="module")
def chain():
    """Phantom, particles at SNR 1/3 with CTF and shifts, and projection matching at a 3 deg step."""
    vol = phantom_volume(BOX, seed=0)
    imgs, truth = make_particles(vol, N, pixel_size_A=PX, snr=1 / 3, max_shift_px=0.05 * BOX, seed=1)
    ctf = {k: np.broadcast_to(np.asarray(truth[k], float), (N,)).copy() for k in CTF_KEYS}
    matcher = ProjectionMatcher(vol, pixel_size_A=PX, step_deg=3.0, max_shift_px=0.06 * BOX)
    res = matcher.align(imgs, ctf)
    origins = np.stack([truth["origin_x_A"], truth["origin_y_A"]], 1) / PX
    return vol, imgs, truth, ctf, origins, res


def _fsc05_vs_map(vol, imgs, matrices, origins_px, ctf) -> float:
    rec = reconstruct(imgs, matrices, shifts_px=origins_px, ctf=ctf, pixel_size_A=PX, devices="cpu")
    assert rec.volume.shape == vol.shape and np.all(np.isfinite(rec.volume))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return resolution_at(fsc(rec.volume, vol), 0.5, PX)


def test_projection_matching_recovers_poses(chain):
    _, _, truth, _, origins, res = chain
    err = angular_distance_deg(res.matrices, truth["matrices"], symmetry_matrices("c1"))
    shift_err = np.hypot(*(res.origins_px - origins).T)
    assert np.median(err) < 3.0, np.percentile(err, [50, 90])
    assert np.median(shift_err) < 0.5, np.median(shift_err)


def test_reconstruction_from_assigned_poses_matches_true_poses(chain):
    """FSC=0.5 resolution vs the true map within 20 % (Å) of the reconstruction from the true poses."""
    vol, imgs, truth, ctf, origins, res = chain
    res_true = _fsc05_vs_map(vol, imgs, truth["matrices"], origins, ctf)
    res_assigned = _fsc05_vs_map(vol, imgs, res.matrices, res.origins_px, ctf)
    assert np.isfinite(res_true) and res_true < 8 * PX, res_true  # the data hold real signal
    assert abs(res_assigned / res_true - 1.0) < 0.2, (res_assigned, res_true)
    # control: the same images at random poses give a far worse map, so the criterion can fail
    scrambled = random_rotations(N, np.random.default_rng(7))
    res_random = _fsc05_vs_map(vol, imgs, scrambled, origins, ctf)
    assert res_random > 1.5 * res_true, (res_random, res_true)
