"""Fourier reconstruction protocol in a scripted Scipion project (CPU, 32 px, 400 particles)."""
from __future__ import annotations

import os

import numpy as np
import pytest

pytest.importorskip("pwem.protocols", reason="Scipion (pwem with tkinter) not importable here")

from pwem.protocols import ProtImportParticles  # noqa: E402
from pyworkflow.tests import BaseTest, setupTestProject  # noqa: E402

from xmipp_accel.em.synthetic import make_particles, phantom_volume  # noqa: E402
from xmipp_accel.io import particles  # noqa: E402
from xmipp_accel.io.mrc import read_mrc, write_mrc  # noqa: E402
from xmipp_accel.protocols import XmippAccelProtReconstructFourier, convert  # noqa: E402

pytestmark = pytest.mark.scipion

BOX, PIXEL, N = 32, 3.0, 400


def fsc_curve(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Independent float64 FSC in one-voxel shells, index = shell (0 .. box // 2)."""
    fa, fb = np.fft.fftn(a.astype(np.float64)), np.fft.fftn(b.astype(np.float64))
    freq = [np.fft.fftfreq(n) * n for n in a.shape]
    shell = np.rint(np.sqrt(sum(g ** 2 for g in np.meshgrid(*freq, indexing="ij")))).astype(int).ravel()
    n = a.shape[0] // 2 + 1
    num = np.bincount(shell, (fa * np.conj(fb)).real.ravel(), minlength=n)[:n]
    den = np.sqrt(np.bincount(shell, (np.abs(fa) ** 2).ravel(), minlength=n)[:n]
                  * np.bincount(shell, (np.abs(fb) ** 2).ravel(), minlength=n)[:n])
    return num / den


def import_synthetic_particles(test_cls, name: str, volume: np.ndarray, n: int, *, with_alignment: bool = True,
                               snr=None, max_shift_px: float = 2.0, seed: int = 1, pixel_size_A: float = PIXEL):
    """Project ``volume``, write stack + STAR, turn it into a Scipion set and import it into the project.

    Returns (import protocol, truth dict of make_particles).
    """
    data = os.path.abspath(test_cls.proj.getTmpPath(name))
    os.makedirs(data, exist_ok=True)
    images, truth = make_particles(volume, n, pixel_size_A=pixel_size_A, snr=snr, ctf=True,
                                   max_shift_px=max_shift_px, seed=seed)
    write_mrc(os.path.join(data, "particles.mrcs"), images, pixel_size_A)
    star_path = os.path.join(data, "particles.star")
    angles = np.column_stack([truth["rot"], truth["tilt"], truth["psi"]]) if with_alignment else None
    origins = np.column_stack([truth["origin_x_A"], truth["origin_y_A"]]) if with_alignment else None
    particles.write_particles_from_arrays(star_path, [f"{i + 1}@particles.mrcs" for i in range(n)], pixel_size_A,
                                     angles_deg=angles, origins_A=origins, ctf=truth,
                                     subset=truth.get("subset"), box_size=volume.shape[0])
    sqlite = os.path.join(data, "particles.sqlite")
    convert.star_to_particles(star_path, sqlite)
    prot = test_cls.newProtocol(ProtImportParticles, importFrom=ProtImportParticles.IMPORT_FROM_SCIPION,
                                sqliteFile=sqlite, samplingRate=pixel_size_A, voltage=truth["voltage_kV"],
                                sphericalAberration=truth["cs_mm"], amplitudeContrast=truth["amplitude_contrast"],
                                objLabel=f"import {name}")
    test_cls.launchProtocol(prot)
    return prot, truth


class TestXmippAccelReconstruct(BaseTest):
    @classmethod
    def setUpClass(cls):
        setupTestProject(cls)
        cls.volume = phantom_volume(BOX, seed=3)
        cls.protImport, cls.truth = import_synthetic_particles(cls, "aligned", cls.volume, N)

    def test_import_keeps_alignment_and_ctf(self):
        parts = self.protImport.outputParticles
        assert parts.getSize() == N and parts.hasAlignmentProj() and parts.hasCTF()
        first = parts.getFirstItem()
        rot, tilt, psi, sx, sy = convert.euler_from_transform(first.getTransform().getMatrix())
        from xmipp_accel.em.geometry import angular_distance_deg, euler_to_matrix
        truth = euler_to_matrix(self.truth["rot"][0], self.truth["tilt"][0], self.truth["psi"][0])
        assert angular_distance_deg(euler_to_matrix(rot, tilt, psi), truth) < 1e-3
        assert (sx, sy) == pytest.approx((self.truth["origin_x_A"][0] / PIXEL, self.truth["origin_y_A"][0] / PIXEL),
                                         abs=1e-4)

    def test_reconstruct_with_half_maps(self):
        prot = self.newProtocol(XmippAccelProtReconstructFourier, inputParticles=self.protImport.outputParticles,
                                symmetryGroup="c1", useGpu=False)
        self.launchProtocol(prot)
        vol = prot.outputVolume
        assert vol.getSamplingRate() == PIXEL
        assert tuple(vol.getDim()) == (BOX, BOX, BOX)
        assert vol.hasHalfMaps()
        halves = vol.getHalfMaps(asList=True)
        assert len(halves) == 2 and all(os.path.exists(h) for h in halves)
        data, voxel = read_mrc(vol.getFileName())
        assert voxel == pytest.approx(PIXEL)
        # the map is the phantom: FSC against the truth above 0.5 up to 2/3 of Nyquist (noise-free data)
        curve = fsc_curve(data, self.volume)
        assert curve[1:2 * BOX // 6].min() > 0.5, curve
        # the FSC output: frequencies in 1/Å up to Nyquist, resolution near Nyquist without noise
        freq, values = (np.asarray(list(v), dtype=float) for v in prot.outputFSC.getData())
        assert freq.max() == pytest.approx(1 / (2 * PIXEL), rel=0.05)
        assert values[1] > 0.9
        crossing = np.nonzero(values[1:] < 0.143)[0]
        resolution = 2 * PIXEL if crossing.size == 0 else 1 / freq[crossing[0] + 1]
        assert resolution < 3 * PIXEL
        summary = " ".join(prot.summary())
        assert "Resolution" in summary
        assert crossing.size or f"{2 * PIXEL:.2f} Å (FSC above 0.143 up to Nyquist)" in summary
        # the half maps hold the two subsets: each alone is the phantom too, less well
        half1 = read_mrc(halves[0])[0]
        assert fsc_curve(half1, self.volume)[1:BOX // 6].min() > 0.5
        assert "Fourier inversion" in prot.methods()[0] and prot._citations() == ["Strelak2019Reconstruction"]

        # numberOfMpi = 2: Scipion wraps the command in mpirun (hosts.conf PARALLEL_COMMAND); the ranks share
        # the particles and rank 0 writes the same maps
        mpi = self.newProtocol(XmippAccelProtReconstructFourier, inputParticles=self.protImport.outputParticles,
                               symmetryGroup="c1", useGpu=False, numberOfMpi=2, objLabel="2 MPI ranks")
        self.launchProtocol(mpi)
        assert "mpirun -np 2" in open(mpi.getLogPaths()[0]).read()
        assert mpi._readJson(mpi._getExtraPath("reconstruct.json"))["mpi_ranks"] == 2
        for ours, theirs in zip([vol.getFileName()] + halves,
                                [mpi.outputVolume.getFileName()] + mpi.outputVolume.getHalfMaps(asList=True)):
            a, b = read_mrc(ours)[0], read_mrc(theirs)[0]
            np.testing.assert_allclose(b, a, atol=1e-4 * np.abs(a).max())

    def test_validation(self):
        prot = self.newProtocol(XmippAccelProtReconstructFourier, inputParticles=self.protImport.outputParticles,
                                symmetryGroup="q3", pad=0.5, useGpu=False)
        errors = prot.validate()
        assert any("q3" in e for e in errors) and any("Padding" in e for e in errors)
