"""FlexAlign movie alignment protocol in a scripted Scipion project (CPU, 256 px movies), in batch and
in streaming through the facility template."""
from __future__ import annotations

import json
import os
import shutil
import time

import numpy as np
import pytest

pytest.importorskip("pwem.protocols", reason="Scipion (pwem with tkinter) not importable here")

from pwem.protocols import ProtImportMovies  # noqa: E402
from pwem.objects import SetOfMovies  # noqa: E402
from pyworkflow.object import Set  # noqa: E402
from pyworkflow.protocol import getProtocolFromDb  # noqa: E402
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
        # the same movies with a gain reference of 2 (the command multiplies the frames by it)
        gain = os.path.join(cls.folder, "gain.mrc")
        write_mrc(gain, np.full(SHAPE, 2.0, np.float32), PIXEL)
        cls.protImportGain = cls.newProtocol(ProtImportMovies, filesPath=cls.folder, filesPattern="movie_*.mrcs",
                                             samplingRate=PIXEL, dosePerFrame=DOSE, voltage=300,
                                             sphericalAberration=2.7, gainFile=gain, objLabel="with gain")
        cls.launchProtocol(cls.protImportGain)

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
        from xmipp_accel.viewers import XmippAccelMovieAlignViewer
        viewer = XmippAccelMovieAlignViewer(project=self.proj, protocol=prot)
        viewer.setProtocol(prot)
        for name, views in (("shifts", viewer._showShifts()), ("drift", viewer._showDrift())):
            png = os.path.abspath(prot._getExtraPath(f"viewer_{name}.png"))
            views[0].savefig(png)
            assert os.path.getsize(png) > 10000
        assert prot._citations() == ["Strelak2020FlexAlign"]

    def test_align_resident_worker(self):
        """The same movies through one resident 'align-movies --watch' process: same outputs, same shifts."""
        prot = self.newProtocol(XmippAccelProtMovieAlign, inputMovies=self.protImport.outputMovies, useGpu=False,
                                doLocal=False, residentWorker=True, numberOfThreads=2)
        self.launchProtocol(prot)
        self.assertSetSize(prot.outputMicrographs, 3)
        self.assertSetSize(prot.outputMicrographsDoseWeighted, 3)
        extra = os.listdir(prot._getExtraPath())
        assert not [f for f in extra if f.startswith("align_")]          # no per-batch command call
        assert len([f for f in extra if f.startswith("watch_") and f.endswith(".json")]) == 1   # one worker
        for movie in prot.outputMovies.iterItems(orderBy="id"):
            i = int(os.path.basename(movie.getFileName()).split("_")[1].split(".")[0])
            xs, ys = movie.getAlignment().getShifts()
            err = centred(np.column_stack([xs, ys])) - centred(self.truths[i])
            assert np.sqrt(np.mean(np.sum(err ** 2, axis=1))) < 0.5, (xs, ys, self.truths[i])   # as in batch mode
        for mic in prot.outputMicrographs:
            assert read_mrc(mic.getFileName())[0].shape == SHAPE
        log = open(prot._getExtraPath("watch_worker.log")).read()
        assert "SIGTERM" in log                    # ended by the protocol's last step, not left idling

    def test_frame_range_binning_and_gain(self):
        prot = self.newProtocol(XmippAccelProtMovieAlign, inputMovies=self.protImportGain.outputMovies, useGpu=False,
                                doLocal=False, alignFrame0=2, alignFrameN=9, binFactor=2.0, doApplyDoseFilter=False,
                                numberOfThreads=3)
        self.launchProtocol(prot)
        self.assertSetSize(prot.outputMicrographs, 3)
        assert not hasattr(prot, "outputMicrographsDoseWeighted")
        assert prot.outputMicrographs.getSamplingRate() == pytest.approx(2 * PIXEL)
        mic = prot.outputMicrographs.getFirstItem()
        data = read_mrc(mic.getFileName())[0]
        assert data.shape == (SHAPE[0] // 2, SHAPE[1] // 2)
        # frames 2..9 of the movie multiplied by the gain (2); Fourier binning keeps the mean value
        movie = next(m for m in prot.outputMovies if m.getObjId() == mic.getObjId())
        frames = read_mrc(movie.getFileName())[0]
        assert data.mean() == pytest.approx(2.0 * frames[1:9].sum(axis=0).mean(), rel=1e-3)
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
        for name in ("movie_11.mrcs", "movie_12.mrcs"):
            time.sleep(4)
            shutil.copy(os.path.join(staging, name), folder)
        deadline = time.time() + 120
        states = []
        while time.time() < deadline:
            time.sleep(1)
            current = getProtocolFromDb(self.proj.path, align.getDbPath(), align.getObjId())
            mics = getattr(current, "outputMicrographs", None)
            if mics is not None:
                states.append((mics.getSize(), mics.getStreamState()))
            status = current.getStatus()
            current.getProject().closeMapper()
            current.closeMappers()
            if current.isFailed():
                raise AssertionError(current.getErrorMessage())
            if status == "finished":
                break
        assert status == "finished", (states, status)
        sizes = [n for n, _ in states]
        # the set grew while movies arrived, and was closed with all 3 at the end
        assert sizes == sorted(sizes) and sizes[0] < 3 and sizes[-1] == 3, states
        assert states[-1][1] == Set.STREAM_CLOSED and states[0][1] == Set.STREAM_OPEN, states
        aligned = SetOfMovies(filename=os.path.join(self.proj.path, align._getPath("movies.sqlite")))
        for movie in aligned:
            i = int(os.path.basename(movie.getFileName()).split("_")[1].split(".")[0]) - 10
            err = centred(np.column_stack(movie.getAlignment().getShifts())) - centred(truths[i])
            assert np.sqrt(np.mean(np.sum(err ** 2, axis=1))) < 1.0
        aligned.close()
