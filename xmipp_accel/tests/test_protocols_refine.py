"""3D refinement protocol in a scripted Scipion project (CPU, 32 px, 200 particles with CTF): imported particles
and initial model in, refined particles, half maps, map and FSC out and registered; the FSC and angular
distribution viewers render on the run; a second run continues the first; the form refuses bad input."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

pytest.importorskip("pwem.protocols", reason="Scipion (pwem with tkinter) not importable here")

from pwem.protocols import ProtImportVolumes  # noqa: E402
from pyworkflow.tests import BaseTest, setupTestProject  # noqa: E402

from xmipp_accel.em.geometry import angular_distance_deg, euler_to_matrix  # noqa: E402
from xmipp_accel.em.synthetic import phantom_volume  # noqa: E402
from xmipp_accel.gpu.refine import lowpass_volume, soft_spherical_mask  # noqa: E402
from xmipp_accel.gpu.resolution.fsc import fsc  # noqa: E402
from xmipp_accel.io.mrc import read_mrc, write_mrc  # noqa: E402
from xmipp_accel.protocols import XmippAccelProtRefine3D, convert  # noqa: E402
from xmipp_accel.protocols.protocol_assign_angles import SCORE_ATTR  # noqa: E402
from xmipp_accel.viewers import XmippAccelAssignAnglesViewer, XmippAccelFscViewer  # noqa: E402

from .test_protocols_reconstruct import import_synthetic_particles  # noqa: E402
from .test_viewers_scipion import save  # noqa: E402

pytestmark = pytest.mark.scipion

BOX, PIXEL, N = 32, 4.0, 200
DIAMETER = 0.85 * BOX * PIXEL       # Å: the phantom lies within 0.8 of the box


def _records(prot):
    with open(prot._getRefineFn("iterations.jsonl")) as fh:
        return [json.loads(line) for line in fh if line.strip()]


class TestXmippAccelRefine3D(BaseTest):
    @classmethod
    def setUpClass(cls):
        setupTestProject(cls)
        cls.volume = phantom_volume(BOX, seed=3)
        init = os.path.abspath(os.path.join(cls.proj.getTmpPath(), "initial.mrc"))
        write_mrc(init, lowpass_volume(cls.volume, 30.0, PIXEL, edge_shells=1.0), PIXEL)
        cls.protVol = cls.newProtocol(ProtImportVolumes, filesPath=init, samplingRate=PIXEL)
        cls.launchProtocol(cls.protVol)
        cls.protImport, cls.truth = import_synthetic_particles(cls, "unaligned", cls.volume, N, with_alignment=False,
                                                               snr=1.0, max_shift_px=1.5, seed=7, pixel_size_A=PIXEL)

    def _refine(self, **kwargs):
        args = dict(inputParticles=self.protImport.outputParticles, inputVolume=self.protVol.outputVolume,
                    symmetryGroup="c1", diameter=DIAMETER, maxIterations=2, useGpu=False)
        args.update(kwargs)
        prot = self.newProtocol(XmippAccelProtRefine3D, **args)
        self.launchProtocol(prot)
        return prot

    def test_refine_continue_and_viewers(self):
        prot = self._refine(objLabel="refine 2 iterations")
        parts = prot.outputParticles
        self.assertSetSize(parts, N)
        assert parts.hasAlignmentProj() and parts.hasCTF() and parts.getSamplingRate() == PIXEL
        ids = [p.getObjId() for p in self.protImport.outputParticles.iterItems(orderBy="id")]
        errors, subsets = [], []
        for particle in parts.iterItems(orderBy="id"):
            i = ids.index(particle.getObjId())
            rot, tilt, psi, _, _ = convert.euler_from_transform(particle.getTransform().getMatrix())
            truth = euler_to_matrix(self.truth["rot"][i], self.truth["tilt"][i], self.truth["psi"][i])
            errors.append(angular_distance_deg(euler_to_matrix(rot, tilt, psi), truth))
            subsets.append(particle.getAttributeValue("_rlnRandomSubset"))
            assert particle.getCTF().getDefocusU() > 0 and particle.getAttributeValue(SCORE_ATTR) is not None
        # the imported subsets (1, 2, 1, 2, ...) are kept as the half sets
        assert subsets == [int(self.truth["subset"][ids.index(p.getObjId())]) for p in parts.iterItems(orderBy="id")]
        # SNR 1 at 32 px, 2 iterations (global at ~14 deg, then local at the step of the resolution): the poses are
        # found up to a few degrees; a failed search (wrong basin) gives tens of degrees
        step = _records(prot)[-1]["angular_step_deg"]
        assert np.median(errors) < 1.5 * step, (np.median(errors), step)

        vol = prot.outputVolume
        assert vol.getSamplingRate() == PIXEL and tuple(vol.getDim()) == (BOX, BOX, BOX) and vol.hasHalfMaps()
        halves = vol.getHalfMaps(asList=True)
        assert len(halves) == 2 and all(os.path.exists(h) for h in halves)
        data, voxel = read_mrc(vol.getFileName())
        assert voxel == pytest.approx(PIXEL)
        mask = soft_spherical_mask(BOX, DIAMETER / 2 / PIXEL, 3.0)
        # the refined map is closer to the truth than the 30 Å initial model, shell by shell beyond 30 Å
        init = read_mrc(self.protVol.outputVolume.getFileName())[0]
        ours, theirs = fsc(data, self.volume, mask=mask).fsc, fsc(init, self.volume, mask=mask).fsc
        beyond = slice(int(BOX * PIXEL / 30.0) + 2, BOX // 3)
        assert np.all(ours[beyond] > theirs[beyond] + 0.1), (ours, theirs)
        freq, values = (np.asarray(list(v), dtype=float) for v in prot.outputFSC.getData())
        assert freq.max() == pytest.approx(1 / (2 * PIXEL), rel=0.05) and values[1] > 0.9
        summary = " ".join(prot.summary())
        assert "Resolution" in summary and f"{N} particles refined in 2 iterations" in summary
        assert "auto-refinement" in prot.methods()[0]

        # viewers on the finished run
        out = os.path.abspath(self.proj.getTmpPath("png_refine"))
        os.makedirs(out, exist_ok=True)
        viewer = XmippAccelFscViewer(project=self.proj, protocol=prot)
        viewer.setProtocol(prot)
        assert [c[0] for c in viewer._curves()] == ["FSC"]
        save(viewer._showFsc(), os.path.join(out, "refine_fsc.png"))
        save(viewer._showAngularDistribution(), os.path.join(out, "refine_fsc_angdist.png"))
        angles = XmippAccelAssignAnglesViewer(project=self.proj, protocol=prot)
        angles.setProtocol(prot)
        assert angles._scores().size == N
        save(angles._showAngularDistribution(), os.path.join(out, "refine_angdist.png"))
        save(angles._showScores(), os.path.join(out, "refine_scores.png"))

        # a second run continues the first: its two iterations are copied, one more is run
        more = self._refine(doContinue=True, continueRun=prot, maxIterations=3, objLabel="continue to 3")
        first, second = _records(prot), _records(more)
        assert [r["iteration"] for r in second] == [1, 2, 3] and second[:2] == first
        assert second[2]["search"] == "local"
        self.assertSetSize(more.outputParticles, N)
        assert "3 iterations" in " ".join(more.summary())

    def test_validation(self):
        parts, vol = self.protImport.outputParticles, self.protVol.outputVolume
        prot = self.newProtocol(XmippAccelProtRefine3D, inputParticles=parts, inputVolume=vol, symmetryGroup="q3",
                                diameter=BOX * PIXEL + 10, maxIterations=0, doContinue=True, useGpu=False)
        errors = " ".join(prot.validate())
        for message in ("q3", "larger than the box", "Maximum iterations", "refinement to continue"):
            assert message in errors, (message, errors)
        ok = self.newProtocol(XmippAccelProtRefine3D, inputParticles=parts, inputVolume=vol, useGpu=False)
        assert ok.validate() == [] and ok._warnings() == []
        # particles without CTF: refused while CTF correction is on, accepted without it
        import pwem.objects as emobj
        bare = emobj.SetOfParticles(filename=os.path.abspath(self.proj.getTmpPath("bare.sqlite")))
        bare.setSamplingRate(PIXEL)
        bare.setHasCTF(False)
        for i in range(4):
            bare.append(emobj.Particle(location=(i + 1, "bare.mrcs")))
        bare.write()
        noctf = self.newProtocol(XmippAccelProtRefine3D, inputVolume=vol, useGpu=False)
        noctf.inputParticles.set(bare)
        assert any("no CTF" in e for e in noctf.validate())
        noctf.doCTF.set(False)
        assert not any("CTF" in e for e in noctf.validate())
