"""FSC and local-resolution protocols in a scripted Scipion project (CPU, 32^3 maps)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("pwem.protocols", reason="Scipion (pwem with tkinter) not importable here")

from pwem.protocols import ProtImportMask, ProtImportVolumes  # noqa: E402
from pyworkflow.tests import BaseTest, setupTestProject  # noqa: E402

from xmipp_accel.io.mrc import read_mrc, write_mrc  # noqa: E402
from xmipp_accel.protocols import XmippAccelProtFSC, XmippAccelProtLocalResolution  # noqa: E402

pytestmark = pytest.mark.scipion

BOX, PIXEL = 32, 2.0


def _phantom(box: int, seed: int = 0) -> np.ndarray:
    """Sum of Gaussian blobs of several sizes inside a sphere (float32)."""
    rng = np.random.default_rng(seed)
    z, y, x = np.mgrid[:box, :box, :box] - box // 2
    vol = np.zeros((box, box, box))
    for _ in range(30):
        c = rng.uniform(-box / 4, box / 4, 3)
        s = rng.uniform(0.8, 3.0)
        vol += np.exp(-((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2) / (2 * s * s))
    return vol.astype(np.float32)


def _soft_sphere(box: int, radius: float, width: float = 3.0) -> np.ndarray:
    z, y, x = np.mgrid[:box, :box, :box] - box // 2
    r = np.sqrt(x * x + y * y + z * z)
    return np.clip((radius + width - r) / width, 0, 1).astype(np.float32)


def shell_fsc(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Reference float64 FSC in one-voxel shells (index = shell, up to box // 2)."""
    fa, fb = np.fft.fftn(a.astype(np.float64)), np.fft.fftn(b.astype(np.float64))
    freq = [np.fft.fftfreq(n) * n for n in a.shape]
    r = np.sqrt(sum(g ** 2 for g in np.meshgrid(*freq, indexing="ij")))
    shell = np.rint(r).astype(int).ravel()
    n = a.shape[0] // 2 + 1
    num = np.bincount(shell, (fa * np.conj(fb)).real.ravel(), minlength=n)[:n]
    da = np.bincount(shell, (np.abs(fa) ** 2).ravel(), minlength=n)[:n]
    db = np.bincount(shell, (np.abs(fb) ** 2).ravel(), minlength=n)[:n]
    return num / np.sqrt(da * db)


def resolution_from_curve(freq_per_A: np.ndarray, fsc: np.ndarray, threshold: float = 0.143) -> float:
    """Å where the curve first drops below the threshold (linear interpolation)."""
    below = np.nonzero(fsc[1:] < threshold)[0]
    i = below[0] + 1
    f = freq_per_A[i - 1] + (threshold - fsc[i - 1]) / (fsc[i] - fsc[i - 1]) * (freq_per_A[i] - freq_per_A[i - 1])
    return 1.0 / f


class TestXmippAccelResolution(BaseTest):
    @classmethod
    def setUpClass(cls):
        setupTestProject(cls)
        data = cls.proj.getTmpPath("data")
        os.makedirs(data, exist_ok=True)
        signal = _phantom(BOX)
        rng = np.random.default_rng(7)
        noise = 0.6 * signal.std()
        cls.half1 = signal + rng.normal(0, noise, signal.shape).astype(np.float32)
        cls.half2 = signal + rng.normal(0, noise, signal.shape).astype(np.float32)
        cls.paths = {}
        for name, arr in (("half1", cls.half1), ("half2", cls.half2), ("map", 0.5 * (cls.half1 + cls.half2)),
                          ("mask", _soft_sphere(BOX, BOX / 2 - 5))):
            cls.paths[name] = os.path.abspath(os.path.join(data, f"{name}.mrc"))
            write_mrc(cls.paths[name], arr, PIXEL)
        cls.protVol = cls.newProtocol(ProtImportVolumes, filesPath=cls.paths["map"], samplingRate=PIXEL,
                                      setHalfMaps=True, half1map=cls.paths["half1"], half2map=cls.paths["half2"])
        cls.launchProtocol(cls.protVol)
        cls.protHalf1 = cls.newProtocol(ProtImportVolumes, filesPath=cls.paths["half1"], samplingRate=PIXEL,
                                        objLabel="half 1")
        cls.launchProtocol(cls.protHalf1)
        cls.protHalf2 = cls.newProtocol(ProtImportVolumes, filesPath=cls.paths["half2"], samplingRate=PIXEL,
                                        objLabel="half 2")
        cls.launchProtocol(cls.protHalf2)
        cls.protMask = cls.newProtocol(ProtImportMask, maskPath=cls.paths["mask"], samplingRate=PIXEL)
        cls.launchProtocol(cls.protMask)

    def test_fsc_of_volume_with_half_maps(self):
        prot = self.newProtocol(XmippAccelProtFSC, inputVolume=self.protVol.outputVolume, useGpu=False)
        self.launchProtocol(prot)
        fsc = prot.outputFSC
        freq, values = (np.asarray(list(v), dtype=float) for v in fsc.getData())
        # against an independent float64 shell FSC of the same maps
        reference = shell_fsc(self.half1, self.half2)
        n = min(values.size, reference.size)
        np.testing.assert_allclose(values[1:n], reference[1:n], atol=1e-4)
        np.testing.assert_allclose(freq[:n], np.arange(n) / (BOX * PIXEL), atol=1e-6)
        expected = resolution_from_curve(np.arange(reference.size) / (BOX * PIXEL), reference)
        assert float(fsc.calculateResolution(0.143)) == pytest.approx(expected, rel=0.02)
        assert 2 * PIXEL <= float(fsc.calculateResolution(0.143)) < 40
        assert os.path.exists(prot._getExtraPath("fsc.png")) and os.path.exists(prot._getExtraPath("fsc.xml"))
        assert any("Resolution" in line for line in prot.summary())
        # the viewer of the run draws the curve (PNG, no display)
        from xmipp_accel.viewers import XmippAccelFscViewer
        viewer = XmippAccelFscViewer(project=self.proj, protocol=prot)
        viewer.setProtocol(prot)
        png = os.path.abspath(prot._getExtraPath("viewer_fsc.png"))
        viewer._showFsc()[0].savefig(png)
        assert os.path.getsize(png) > 10000

    def test_fsc_of_two_volumes_with_mask(self):
        masked = self.newProtocol(XmippAccelProtFSC, inputType=1, half1=self.protHalf1.outputVolume,
                                  half2=self.protHalf2.outputVolume, mask=self.protMask.outputMask, useGpu=False)
        self.launchProtocol(masked)
        reference = shell_fsc(self.half1, self.half2)
        res_unmasked = resolution_from_curve(np.arange(reference.size) / (BOX * PIXEL), reference)
        res_masked = float(masked.outputFSC.calculateResolution(0.143))
        # the solvent noise is masked out: the corrected masked FSC is at least as good
        assert res_masked <= res_unmasked * 1.02
        info = json.load(open(masked._getExtraPath("fsc.json")))
        assert info["resolution_A"] == pytest.approx(res_masked, rel=0.02)

    def test_local_resolution(self):
        prot = self.newProtocol(XmippAccelProtLocalResolution, inputVolume=self.protVol.outputVolume,
                                mask=self.protMask.outputMask, periods=6, useGpu=False)
        self.launchProtocol(prot)
        out = prot.outputResolutionVolume
        assert out.getSamplingRate() == PIXEL
        assert tuple(out.getDim()) == (BOX, BOX, BOX)
        locres, voxel = read_mrc(out.getFileName())
        assert voxel == pytest.approx(PIXEL)
        inside = read_mrc(self.paths["mask"])[0] > 0.5
        assert np.all(np.isfinite(locres)) and np.all(locres[inside] >= 2 * PIXEL - 1e-3)
        assert os.path.exists(prot.getChimeraScriptFn())
        assert prot.getMapFn() in open(prot.getChimeraScriptFn()).read()  # the imported map, coloured
        # the protocol passed its parameters through: the same map as the command run by hand
        direct = os.path.join(self.proj.getTmpPath(), "direct_locres.mrc")
        subprocess.run([sys.executable, "-m", "xmipp_accel", "local-resolution", self.paths["half1"],
                        self.paths["half2"], "-o", direct, "--mask", self.paths["mask"], "--periods", "6",
                        "--device", "cpu", "--quiet"], check=True)
        np.testing.assert_allclose(locres, read_mrc(direct)[0], rtol=1e-5, atol=1e-4)
        assert "Median" in " ".join(prot.summary())
        from xmipp_accel.viewers import XmippAccelLocalResolutionViewer
        viewer = XmippAccelLocalResolutionViewer(project=self.proj, protocol=prot)
        viewer.setProtocol(prot)
        png = os.path.abspath(prot._getExtraPath("viewer_slices.png"))
        viewer._showSlices()[0].savefig(png)
        assert os.path.getsize(png) > 10000

    def test_validation(self):
        prot = self.newProtocol(XmippAccelProtFSC, inputVolume=self.protHalf1.outputVolume, useGpu=False)
        errors = prot.validate()
        assert any("no half maps" in e for e in errors)
        prot = self.newProtocol(XmippAccelProtLocalResolution, inputVolume=self.protVol.outputVolume, windowMax=64,
                                useGpu=False)
        assert any("larger than the box" in e for e in prot.validate())
