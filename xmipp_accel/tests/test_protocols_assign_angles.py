"""Angular assignment protocol in a scripted Scipion project (CPU, 32 px): assigned transforms equal the
truth within tolerance, and the reconstruction from them is the phantom."""
from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest

pytest.importorskip("pwem.protocols", reason="Scipion (pwem with tkinter) not importable here")

from pwem.protocols import ProtImportVolumes  # noqa: E402
from pyworkflow.tests import BaseTest, setupTestProject  # noqa: E402

from xmipp_accel.em.geometry import angular_distance_deg, euler_to_matrix  # noqa: E402
from xmipp_accel.em.synthetic import phantom_volume  # noqa: E402
from xmipp_accel.io.mrc import write_mrc  # noqa: E402
from xmipp_accel.protocols import XmippAccelProtAssignAngles, convert  # noqa: E402
from xmipp_accel.protocols.protocol_assign_angles import SCORE_ATTR  # noqa: E402

from .test_protocols_reconstruct import import_synthetic_particles  # noqa: E402

pytestmark = [pytest.mark.scipion,
              pytest.mark.skipif(importlib.util.find_spec("xmipp_accel.cli.assign_angles") is None,
                                 reason="the 'xmipp-accel assign-angles' command (xmipp_accel/cli/assign_angles.py) "
                                        "does not exist yet")]

BOX, PIXEL, N = 32, 4.0, 120


class TestXmippAccelAssignAngles(BaseTest):
    @classmethod
    def setUpClass(cls):
        setupTestProject(cls)
        cls.volume = phantom_volume(BOX, seed=5)
        ref = os.path.abspath(os.path.join(cls.proj.getTmpPath(), "reference.mrc"))
        write_mrc(ref, cls.volume, PIXEL)
        cls.protVol = cls.newProtocol(ProtImportVolumes, filesPath=ref, samplingRate=PIXEL)
        cls.launchProtocol(cls.protVol)
        cls.protImport, cls.truth = import_synthetic_particles(cls, "unaligned", cls.volume, N, with_alignment=False,
                                                               snr=3.0, max_shift_px=2.0, seed=11, pixel_size_A=PIXEL)

    def test_projection_matching(self):
        parts = self.protImport.outputParticles
        assert not parts.hasAlignmentProj()
        prot = self.newProtocol(XmippAccelProtAssignAngles, inputParticles=parts,
                                inputVolume=self.protVol.outputVolume, method=0, angularStep=10.0, maxShift=4.0,
                                useGpu=False)
        self.launchProtocol(prot)
        out = prot.outputParticles
        self.assertSetSize(out, N)
        assert out.hasAlignmentProj() and out.hasCTF() and out.getSamplingRate() == PIXEL
        ids = [p.getObjId() for p in parts.iterItems(orderBy="id")]
        errors, shift_errors, scores = [], [], []
        for particle in out.iterItems(orderBy="id"):
            i = ids.index(particle.getObjId())
            rot, tilt, psi, sx, sy = convert.euler_from_transform(particle.getTransform().getMatrix())
            truth = euler_to_matrix(self.truth["rot"][i], self.truth["tilt"][i], self.truth["psi"][i])
            errors.append(angular_distance_deg(euler_to_matrix(rot, tilt, psi), truth))
            shift_errors.append(np.hypot(sx - self.truth["origin_x_A"][i] / PIXEL,
                                         sy - self.truth["origin_y_A"][i] / PIXEL))
            scores.append(particle.getAttributeValue(SCORE_ATTR, None))
            # CTF and image location are carried over from the input
            assert particle.getCTF().getDefocusU() > 0
        errors = np.array(errors)
        # a 10 degree gallery refined locally: well below the step (SNR 3, CTF, shifts up to 2 px)
        assert np.median(errors) < 4.0 and np.percentile(errors, 90) < 8.0, np.percentile(errors, [50, 90])
        assert np.median(shift_errors) < 0.5, np.percentile(shift_errors, [50, 90])
        assert all(s is not None for s in scores)
        assert str(N) in " ".join(prot.summary())
