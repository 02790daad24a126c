"""FlexAlign movie alignment protocol in a scripted Scipion project (CPU, 256 px movies), in batch and
in streaming through the facility template."""
from __future__ import annotations

import json
import os
import shutil
import time

import numpy as np
import pytest

pytest.importorskip("pwem")

from pwem.protocols import ProtImportMovies  # noqa: E402
from pyworkflow.object import Set  # noqa: E402
from pyworkflow.tests import BaseTest, setupTestProject  # noqa: E402

import xmipp_accel  # noqa: E402
from xmipp_accel.em.synthetic_movies import make_movie  # noqa: E402
from xmipp_accel.io.mrc import read_mrc, write_mrc  # noqa: E402
from xmipp_accel.protocols import XmippAccelProtMovieAlign  # noqa: E402

pytestmark = pytest.mark.scipion

# Protocol runs inherit these: check streaming state every second instead of 5 s, new files every 2 s
os.environ.setdefault("SCIPION_STEPS_CHECK_SEC", "1")
os.environ.setdefault("SCIPION_EM_NEW_FILE_CHECK_SEC", "2")

SHAPE, FRAMES, PIXEL, DOSE = (256, 256), 10, 1.0, 2.0


def write_movies(folder: str, n: int, seed0: int = 0) -> list:
    """n synthetic movies (MRC stacks) with known drift; returns their truths (global shifts)."""
    os.makedirs(folder, exist_ok=True)
    truths = []
    for i in range(n):
        frames, truth = make_movie(SHAPE, FRAMES, dose_per_pixel=DOSE, seed=seed0 + i)
        write_mrc(os.path.join(folder, f"movie_{seed0 + i:02d}.mrcs"), frames, PIXEL)
        truths.append(np.asarray(truth["global_shifts_px"], dtype=np.float64))
    return truths


def centred(shifts) -> np.ndarray:
    s = np.asarray(shifts, dtype=np.float64)
    return s - s.mean(axis=0)


class TestXmippAccelMovieAlign(BaseTest):
    @classmethod
    def setUpClass(cls):
        setupTestProject(cls)
        cls.folder = os.path.abspath(cls.proj.getTmpPath("movies"))
        cls.truths = write_movies(cls.folder, 3)
        cls.protImport = cls.newProtocol(ProtImportMovies, filesPath=cls.folder, filesPattern="movie_*.mrcs",
                                         samplingRate=PIXEL, dosePerFrame=DOSE, voltage=300,
                                         sphericalAberration=2.7)
        cls.launchProtocol(cls.protImport)

    def test_align_batch(self):
        prot = self.newProtocol(XmippAccelProtMovieAlign, inputMovies=self.protImport.outputMovies, useGpu=False,
                                doLocal=False, splitEvenOdd=True, numberOfThreads=2)
        self.launchProtocol(prot)
        self.assertSetSize(prot.outputMicrographs, 3)
        self.assertSetSize(prot.outputMicrographsDoseWeighted, 3)
        self.assertSetSize(prot.outputMicrographsOdd, 3)
        self.assertSetSize(prot.outputMovies, 3)
        assert prot.outputMicrographs.getSamplingRate() == PIXEL
        # the 3 movies arrived together: one batch, one command call
        assert len([f for f in os.listdir(prot._getExtraPath()) if f.startswith("align_")]) == 1
        for mic in prot.outputMicrographs:
            data, voxel = read_mrc(mic.getFileName())
            assert data.shape == SHAPE and voxel == pytest.approx(PIXEL)
            assert os.path.exists(mic.plotGlobal.getFileName())
        for movie in prot.outputMovies.iterItems(orderBy="id"):
            i = int(os.path.basename(movie.getFileName()).split("_")[1].split(".")[0])
            xs, ys = movie.getAlignment().getShifts()
            assert len(xs) == FRAMES
            assert movie.getAlignment().getRange() == (1, FRAMES)
            # recovered global shifts (pixels, MotionCor2 sign) against the truth, after removing the mean
            err = centred(np.column_stack([xs, ys])) - centred(self.truths[i])
            assert np.sqrt(np.mean(np.sum(err ** 2, axis=1))) < 0.5, (xs, ys, self.truths[i])
        summary = " ".join(prot.summary())
        assert "3 movies aligned" in summary
        assert prot._citations() == ["Strelak2020FlexAlign"]

    def test_frame_range_and_binning(self):
        prot = self.newProtocol(XmippAccelProtMovieAlign, inputMovies=self.protImport.outputMovies, useGpu=False,
                                doLocal=False, alignFrame0=2, alignFrameN=9, binFactor=2.0, doApplyDoseFilter=False,
                                numberOfThreads=3)
        self.launchProtocol(prot)
        self.assertSetSize(prot.outputMicrographs, 3)
        assert not hasattr(prot, "outputMicrographsDoseWeighted")
        assert prot.outputMicrographs.getSamplingRate() == pytest.approx(2 * PIXEL)
        mic = prot.outputMicrographs.getFirstItem()
        assert read_mrc(mic.getFileName())[0].shape == (SHAPE[0] // 2, SHAPE[1] // 2)
        movie = prot.outputMovies.getFirstItem()
        xs, _ = movie.getAlignment().getShifts()
        assert movie.getAlignment().getRange() == (2, 9) and len(xs) == 8
        # 3 movies over 2 workers: batches of 2 and 1
        assert len([f for f in os.listdir(prot._getExtraPath()) if f.startswith("align_")]) == 2

    def test_validation(self):
        prot = self.newProtocol(XmippAccelProtMovieAlign, inputMovies=self.protImport.outputMovies, useGpu=False,
                                alignFrame0=5, alignFrameN=3, patchX=3, patchY=0)
        errors = " ".join(prot.validate())
        assert "ALIGN" in errors and "patch" in errors


class TestXmippAccelStreamingTemplate(BaseTest):
    """The facility template: movies written into a folder while the import streams; the micrograph set
    grows and is closed when the import stops."""

    @classmethod
    def setUpClass(cls):
        setupTestProject(cls)

    def test_streaming_template(self):
        from pyworkflow.template import LocalTemplate
        folder = os.path.abspath(self.proj.getTmpPath("incoming"))
        staging = os.path.abspath(self.proj.getTmpPath("staging"))
        os.makedirs(folder)
        truths = write_movies(staging, 3, seed0=10)
        template = LocalTemplate("xmipp_accel", os.path.join(os.path.dirname(xmipp_accel.__file__), "templates",
                                                             "xmipp_accel_streaming.json.template"))
        template.replaceEnvVariables()
        template.parseContent()
        for alias, value in {"moviesPath": folder, "pattern": "movie_*.mrcs", "apix": str(PIXEL),
                             "dose": str(DOSE), "timeout": "12", "fileTimeout": "1", "batch": "2"}.items():
            template.setParamValue(alias, value)
        workflow = json.load(open(template.createTemplateFile()))
        workflow[1].update(useGpu=False, doLocal=False)  # CPU in CI
        wf_path = os.path.abspath(self.proj.getTmpPath("workflow.json"))
        with open(wf_path, "w") as f:
            json.dump(workflow, f)
        protocols = self.proj.loadProtocols(wf_path)
        imp, align = (protocols[k] for k in sorted(protocols, key=int))
        assert imp.dataStreaming.get() and align.getClassName() == "XmippAccelProtMovieAlign"

        shutil.copy(os.path.join(staging, "movie_10.mrcs"), folder)
        self.proj.launchProtocol(imp, wait=False)
        self._waitOutput(imp, "outputMovies", sleepTime=1, timeOut=60)
        self.proj.scheduleProtocol(align)
        sizes = []
        for name in ("movie_11.mrcs", "movie_12.mrcs"):
            time.sleep(4)
            shutil.copy(os.path.join(staging, name), folder)
        deadline = time.time() + 150
        while time.time() < deadline:
            time.sleep(2)
            align = self.proj.getProtocol(align.getObjId())
            mics = getattr(align, "outputMicrographs", None)
            if mics is not None:
                mics.loadAllProperties()
                sizes.append(mics.getSize())
                if mics.getSize() == 3 and mics.getStreamState() == Set.STREAM_CLOSED and align.isFinished():
                    break
            if align.isFailed():
                raise AssertionError(align.getErrorMessage())
        assert sizes and sizes[-1] == 3, (sizes, align.getStatus())
        assert mics.getStreamState() == Set.STREAM_CLOSED
        assert align.isFinished()
        assert len(truths) == 3
