"""Scipion viewers rendered to PNG without a display (no Tk windows), on outputs built in a project
without running the protocols (the protocol tests render them again on real runs)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

pytest.importorskip("pwem.protocols", reason="Scipion (pwem with tkinter) not importable here")

import pwem.objects as emobj  # noqa: E402
import pyworkflow.object as pwobj  # noqa: E402
from pyworkflow.tests import BaseTest, setupTestProject  # noqa: E402
from pyworkflow.viewer import MessageView  # noqa: E402

from xmipp_accel.io import star  # noqa: E402
from xmipp_accel.io.mrc import write_mrc  # noqa: E402
from xmipp_accel.protocols import (XmippAccelProtAssignAngles, XmippAccelProtFSC,  # noqa: E402
                                   XmippAccelProtLocalResolution, XmippAccelProtMovieAlign, XmippAccelProtRefine3D,
                                   convert)
from xmipp_accel.protocols.protocol_assign_angles import SCORE_ATTR  # noqa: E402
from xmipp_accel.viewers import (XmippAccelAssignAnglesViewer, XmippAccelFscSetViewer,  # noqa: E402
                                 XmippAccelFscViewer, XmippAccelLocalResolutionViewer, XmippAccelMovieAlignViewer)
from xmipp_accel.plots import plot_movie_shifts  # noqa: E402

pytestmark = pytest.mark.scipion

BOX, PIXEL = 32, 2.0


def assert_png_not_blank(path: str, min_ink: float = 0.01) -> None:
    """The PNG exists and a fair share of its pixels differ from the background colour."""
    import matplotlib.image as mpimg
    assert os.path.exists(path) and os.path.getsize(path) > 1000, path
    img = mpimg.imread(path)[..., :3]
    background = np.median(img.reshape(-1, 3), axis=0)
    ink = np.mean(np.abs(img - background).sum(axis=-1) > 0.1)
    assert ink > min_ink, f"{path} looks blank ({ink:.4f} of the pixels drawn)"


def save(views, path: str) -> str:
    assert len(views) == 1 and not isinstance(views[0], MessageView), views
    views[0].savefig(path)
    assert_png_not_blank(path)
    return path


def fsc_curve_like(freq: np.ndarray, f_half: float) -> np.ndarray:
    """A smooth FSC-like curve crossing 0.5 at f_half."""
    return 1.0 / (1.0 + np.exp((freq - f_half) / (0.08 * freq.max())))


class TestXmippAccelViewers(BaseTest):
    @classmethod
    def setUpClass(cls):
        setupTestProject(cls)
        cls.out = os.path.abspath(cls.proj.getTmpPath("png"))
        os.makedirs(cls.out, exist_ok=True)

    def _saved(self, prot_class, **kwargs):
        prot = self.proj.newProtocol(prot_class, **kwargs)
        self.proj.saveProtocol(prot)
        os.makedirs(prot._getExtraPath(), exist_ok=True)
        return prot

    def _fsc(self, label, f_half):
        freq = np.arange(BOX // 2 + 1) / (BOX * PIXEL)
        fsc = emobj.FSC(objLabel=label)
        fsc.setData(freq.tolist(), fsc_curve_like(freq, f_half).tolist())
        return fsc

    def test_fsc_viewers(self):
        prot = self._saved(XmippAccelProtFSC)
        freq = np.arange(BOX // 2 + 1) / (BOX * PIXEL)
        star.write_star(prot._getExtraPath("fsc.star"), {"fsc": {
            "rlnSpectralIndex": np.arange(freq.size), "rlnResolution": freq,
            "rlnFourierShellCorrelation": fsc_curve_like(freq, 0.15),
            "rlnFourierShellCorrelationUnmaskedMaps": fsc_curve_like(freq, 0.11),
            "rlnFourierShellCorrelationMaskedMaps": fsc_curve_like(freq, 0.17)}})
        prot.outputFSC = self._fsc("masked", 0.15)
        viewer = XmippAccelFscViewer(project=self.proj, protocol=prot)
        viewer.setProtocol(prot)
        # all three curves of the table are overlaid
        assert [c[0] for c in viewer._curves()] == ["corrected", "unmasked", "masked"]
        save(viewer._showFsc(), os.path.join(self.out, "fsc_protocol.png"))
        pwem_viewer = viewer._scipionFscViewer()
        pwem_viewer.plotter.savefig(os.path.join(self.out, "fsc_pwem.png"))
        assert_png_not_blank(os.path.join(self.out, "fsc_pwem.png"))
        # any set of FSCs in a project: overlay with resolutions
        fscs = emobj.SetOfFSCs(filename=os.path.join(self.out, "fscs.sqlite"))
        for label, f in (("run A", 0.12), ("run B", 0.16)):
            fscs.append(self._fsc(label, f))
        fscs.write()
        set_viewer = XmippAccelFscSetViewer(project=self.proj)
        save(set_viewer._visualize(fscs), os.path.join(self.out, "fsc_set.png"))

    def test_local_resolution_viewer(self):
        half_paths = []
        rng = np.random.default_rng(0)
        for i in (1, 2):
            path = os.path.join(self.out, f"half{i}.mrc")
            write_mrc(path, rng.normal(size=(BOX,) * 3).astype(np.float32), PIXEL)
            half_paths.append(path)
        h1, h2 = (emobj.Volume(location=p) for p in half_paths)
        for v in (h1, h2):
            v.setSamplingRate(PIXEL)
        prot = self._saved(XmippAccelProtLocalResolution, inputType=1)
        prot.half1.set(h1)
        prot.half2.set(h2)
        z, y, x = np.mgrid[:BOX, :BOX, :BOX] - BOX // 2
        locres = np.where(x > 0, 4.5, 8.0).astype(np.float32) + 0.1 * np.abs(z) / BOX
        write_mrc(prot.getResolutionMapFn(), locres, PIXEL)
        write_mrc(prot.getMapFn(), 0.5 * (rng.normal(size=locres.shape)).astype(np.float32), PIXEL)
        out = emobj.Volume(location=prot.getResolutionMapFn())
        out.setSamplingRate(PIXEL)
        prot.outputResolutionVolume = out
        viewer = XmippAccelLocalResolutionViewer(project=self.proj, protocol=prot)
        viewer.setProtocol(prot)
        save(viewer._showSlices(), os.path.join(self.out, "local_resolution.png"))
        # the colour range chosen in the form makes a new ChimeraX script with that range
        viewer.lowest.set(4.0)
        viewer.highest.set(9.0)
        script = viewer.chimeraScript()
        text = open(script).read()
        assert prot.getResolutionMapFn().split("/")[-1] in text and prot.getMapFn() in text
        assert "4" in text and "9" in text
        views = viewer._showChimera()
        assert len(views) == 1  # ChimeraX launched, or a message telling where the script is
        if isinstance(views[0], MessageView):
            assert script in views[0]._msg

    def test_movie_alignment_viewer(self):
        prot = self._saved(XmippAccelProtMovieAlign)
        movies = emobj.SetOfMovies(filename=os.path.join(self.out, "movies.sqlite"))
        movies.setSamplingRate(1.3)
        rng = np.random.default_rng(2)
        for i in range(5):
            movie = emobj.Movie(location=os.path.join(self.out, f"movie_{i}.mrcs"))
            xs = np.cumsum(rng.normal(0.5, 0.3, 12))
            ys = np.cumsum(rng.normal(-0.3, 0.3, 12))
            movie.setAlignment(emobj.MovieAlignment(first=1, last=12, xshifts=xs.tolist(), yshifts=ys.tolist()))
            movies.append(movie)
        movies.write()
        prot.outputMovies = movies
        viewer = XmippAccelMovieAlignViewer(project=self.proj, protocol=prot)
        viewer.setProtocol(prot)
        save(viewer._showShifts(), os.path.join(self.out, "movie_shifts.png"))
        viewer.movieId.set(3)
        save(viewer._showShifts(), os.path.join(self.out, "movie_shifts_3.png"))
        save(viewer._showDrift(), os.path.join(self.out, "movie_drift.png"))
        viewer.movieId.set(99)
        assert isinstance(viewer._showShifts()[0], MessageView)
        # the per-movie PNG the protocol writes (no pyplot)
        path = plot_movie_shifts(xs, ys, os.path.join(self.out, "plot_global.png"), pixel_size_A=1.3, title="m")
        assert_png_not_blank(path)

    def test_assign_angles_viewer(self):
        prot = self._saved(XmippAccelProtAssignAngles)
        parts = emobj.SetOfParticles(filename=os.path.join(self.out, "particles.sqlite"))
        parts.setSamplingRate(PIXEL)
        parts.setAlignmentProj()
        rng = np.random.default_rng(4)
        for i in range(300):
            p = emobj.Particle(location=(i + 1, os.path.join(self.out, "p.mrcs")))
            rot, tilt, psi = rng.uniform(-180, 180), np.degrees(np.arccos(rng.uniform(-1, 1))), rng.uniform(-180, 180)
            p.setTransform(emobj.Transform(convert.transform_from_euler(rot, tilt, psi, 0.5, -0.5)))
            setattr(p, SCORE_ATTR, pwobj.Float(rng.normal(0.4, 0.1)))
            parts.append(p)
        parts.write()
        prot.outputParticles = parts
        viewer = XmippAccelAssignAnglesViewer(project=self.proj, protocol=prot)
        viewer.setProtocol(prot)
        assert viewer._scores().size == 300
        save(viewer._showAngularDistribution(), os.path.join(self.out, "angular_distribution.png"))
        save(viewer._showScores(), os.path.join(self.out, "scores.png"))


    def test_refine_viewers(self):
        """The FSC viewer reads the refinement's run_fsc.star; both viewers show the refined particles."""
        prot = self._saved(XmippAccelProtRefine3D)
        os.makedirs(prot._getRefineFn(), exist_ok=True)
        freq = np.arange(BOX // 2 + 1) / (BOX * PIXEL)
        star.write_star(prot._getRefineFn("run_fsc.star"), {"fsc": {
            "rlnSpectralIndex": np.arange(freq.size), "rlnResolution": freq,
            "rlnFourierShellCorrelation": fsc_curve_like(freq, 0.13)}})
        prot.outputFSC = self._fsc("refine", 0.13)
        parts = emobj.SetOfParticles(filename=os.path.join(self.out, "refined.sqlite"))
        parts.setSamplingRate(PIXEL)
        parts.setAlignmentProj()
        rng = np.random.default_rng(5)
        for i in range(200):
            p = emobj.Particle(location=(i + 1, os.path.join(self.out, "r.mrcs")))
            rot, tilt, psi = rng.uniform(-180, 180), np.degrees(np.arccos(rng.uniform(-1, 1))), rng.uniform(-180, 180)
            p.setTransform(emobj.Transform(convert.transform_from_euler(rot, tilt, psi, 0.0, 0.0)))
            setattr(p, SCORE_ATTR, pwobj.Float(rng.normal(0.3, 0.05)))
            parts.append(p)
        parts.write()
        prot.outputParticles = parts
        viewer = XmippAccelFscViewer(project=self.proj, protocol=prot)
        viewer.setProtocol(prot)
        assert [c[0] for c in viewer._curves()] == ["FSC"]
        np.testing.assert_allclose(viewer._curves()[0][2], fsc_curve_like(freq, 0.13), atol=1e-5)  # STAR text
        save(viewer._showFsc(), os.path.join(self.out, "refine_fsc.png"))
        save(viewer._showAngularDistribution(), os.path.join(self.out, "refine_fsc_angdist.png"))
        angles = XmippAccelAssignAnglesViewer(project=self.proj, protocol=prot)
        angles.setProtocol(prot)
        assert angles._scores().size == 200
        save(angles._showAngularDistribution(), os.path.join(self.out, "refine_angdist.png"))


# ------------------------------------------------------------------------------------------------------
# The Tk GUI under Xvfb, as a person would use it (skipped where Xvfb is not installed)
# ------------------------------------------------------------------------------------------------------
GUI_SCRIPT = r'''
import os, sys, time, traceback
project_name, out_dir, display, volume_id = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
import pyworkflow.gui.project  # noqa: F401  (import order: before pyworkflow.gui.form)
from pyworkflow.gui.form import FormWindow
from pyworkflow.gui.project import ProjectWindow
from pyworkflow.project import Manager
from pyworkflow.protocol import getProtocolFromDb
from PIL import ImageGrab
from xmipp_accel.protocols import (XmippAccelProtAssignAngles, XmippAccelProtFSC, XmippAccelProtLocalResolution,
                                   XmippAccelProtMovieAlign, XmippAccelProtReconstructFourier, XmippAccelProtRefine3D)
from xmipp_accel.viewers import XmippAccelFscViewer

path = Manager().getProjectPath(project_name)
win = ProjectWindow(path)
root = win.root
view = win.getViewWidget()  # the "Protocols" tab
project = win.project
steps = []

def snap(tkroot, name):
    tkroot.update()
    x, y = tkroot.winfo_rootx(), tkroot.winfo_rooty()
    w, h = tkroot.winfo_width(), tkroot.winfo_height()
    ImageGrab.grab(bbox=(x, y, x + w, y + h), xdisplay=display).save(os.path.join(out_dir, name))
    print("saved", name, w, h, flush=True)

def run_next():
    try:
        steps.pop(0)()
    except Exception:
        traceback.print_exc()
        os._exit(3)

def later(ms=1500):
    root.after(ms, run_next)

def project_window():
    snap(root, "gui_project.png")
    later(10)

def open_form(cls, name, **kw):
    def step():
        prot = project.newProtocol(cls, **kw)
        form = FormWindow("Protocol Run: " + cls.__name__, prot, view._executeSaveProtocol, win)
        form.root.deiconify()
        def shot():
            snap(form.root, name)
            form.close()
            later(10)
        root.after(1200, shot)
    return step

state = {}

def run_from_gui():
    volume = project.getProtocol(volume_id).outputVolume
    prot = project.newProtocol(XmippAccelProtFSC, inputVolume=volume, useGpu=False)
    form = FormWindow("Protocol Run: XmippAccelProtFSC", prot, view._executeSaveProtocol, win)
    form.root.deiconify()
    def press_execute():
        snap(form.root, "gui_form_fsc_filled.png")
        form.execute()  # the Execute button: validate, then ProtocolsView._executeSaveProtocol -> launch
        state["prot"] = prot
        state["t0"] = time.time()
        root.after(1000, wait_finished)
    root.after(1200, press_execute)

def wait_finished():
    prot = state["prot"]
    loaded = getProtocolFromDb(project.path, prot.getDbPath(), prot.getObjId())
    status = loaded.getStatus()
    if status in ("finished", "failed", "aborted") or time.time() - state["t0"] > 60:
        print("run status", status, flush=True)
        state["loaded"] = loaded
        view.refreshRuns()
        root.after(2500, lambda: (snap(root, "gui_project_after_run.png"), later(10)))
        if status != "finished":
            os._exit(4)
    else:
        root.after(1000, wait_finished)

def open_viewer():
    prot = project.getProtocol(state["prot"].getObjId())
    viewer = XmippAccelFscViewer(project=project, protocol=prot, parent=win)
    state["viewer"] = viewer
    later(1500)  # the next step runs inside the viewer form's own loop
    viewer.visualize(prot, windows=win)

def viewer_form_and_plot():
    viewer = state["viewer"]
    snap(viewer.formWindow.root, "gui_viewer_form.png")
    viewer._visualizeParam("displayFsc")  # the eye button of "FSC curve(s)": a matplotlib window
    root.after(2500, lambda: (ImageGrab.grab(xdisplay=display).save(os.path.join(out_dir, "gui_viewer_fsc.png")),
                              print("saved gui_viewer_fsc.png", flush=True), os._exit(0)))

steps += [project_window]
for cls in (XmippAccelProtMovieAlign, XmippAccelProtAssignAngles, XmippAccelProtReconstructFourier,
            XmippAccelProtFSC, XmippAccelProtLocalResolution, XmippAccelProtRefine3D):
    steps.append(open_form(cls, f"gui_form_{cls.__name__}.png"))
steps += [run_from_gui, open_viewer, viewer_form_and_plot]
root.after(3000, run_next)
root.after(150000, lambda: os._exit(5))  # watchdog
win.show()
'''


def _free_display() -> str:
    for n in range(90, 140):
        if not os.path.exists(f"/tmp/.X{n}-lock") and not os.path.exists(f"/tmp/.X11-unix/X{n}"):
            return f":{n}"
    raise RuntimeError("no free X display number")


@pytest.mark.skipif(shutil.which("Xvfb") is None, reason="Xvfb is not installed (apt-get install xvfb)")
class TestXmippAccelGui(BaseTest):
    """Project window, our six protocol forms, a protocol run launched with the form's Execute button,
    and our FSC viewer (form and plot window), screenshotted under Xvfb (copies kept in
    $XMIPP_ACCEL_SCREENSHOTS when set)."""

    @classmethod
    def setUpClass(cls):
        from pwem.protocols import ProtImportVolumes
        setupTestProject(cls)
        data = os.path.abspath(cls.proj.getTmpPath("maps"))
        os.makedirs(data)
        rng = np.random.default_rng(1)
        z, y, x = np.mgrid[:BOX, :BOX, :BOX] - BOX // 2
        signal = np.exp(-(x ** 2 + y ** 2 + z ** 2) / 40.0).astype(np.float32)
        for name in ("half1", "half2", "map"):
            write_mrc(os.path.join(data, f"{name}.mrc"), signal + 0.2 * rng.normal(size=signal.shape).astype(
                np.float32), PIXEL)
        cls.protVol = cls.newProtocol(ProtImportVolumes, filesPath=os.path.join(data, "map.mrc"), samplingRate=PIXEL,
                                      setHalfMaps=True, half1map=os.path.join(data, "half1.mrc"),
                                      half2map=os.path.join(data, "half2.mrc"))
        cls.launchProtocol(cls.protVol)

    def test_gui(self):
        out = os.path.abspath(self.proj.getTmpPath("screenshots"))
        os.makedirs(out)
        script = os.path.join(out, "gui_script.py")
        with open(script, "w") as f:
            f.write(GUI_SCRIPT)
        display = _free_display()
        xvfb = subprocess.Popen(["Xvfb", display, "-screen", "0", "1600x1000x24", "-nolisten", "tcp"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            time.sleep(1.0)
            env = dict(os.environ, DISPLAY=display, MPLBACKEND="TkAgg")
            result = subprocess.run([sys.executable, script, self.proj.getShortName(), out, display,
                                     str(self.protVol.getObjId())],
                                    env=env, capture_output=True, text=True, timeout=170)
        finally:
            xvfb.terminate()
            xvfb.wait(10)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        assert "run status finished" in result.stdout
        names = ["gui_project.png", "gui_form_fsc_filled.png", "gui_project_after_run.png", "gui_viewer_form.png",
                 "gui_viewer_fsc.png"] + [f"gui_form_{c}.png" for c in (
                     "XmippAccelProtMovieAlign", "XmippAccelProtAssignAngles", "XmippAccelProtReconstructFourier",
                     "XmippAccelProtFSC", "XmippAccelProtLocalResolution", "XmippAccelProtRefine3D")]
        for name in names:
            assert_png_not_blank(os.path.join(out, name))
        keep = os.environ.get("XMIPP_ACCEL_SCREENSHOTS")  # e.g. docs/screenshots: keep a copy
        if keep:
            os.makedirs(keep, exist_ok=True)
            for name in names:
                shutil.copy(os.path.join(out, name), keep)
        # the run launched from the form is in the project, finished, with its FSC
        runs = [r for r in self.proj.getRuns() if r.getClassName() == "XmippAccelProtFSC"]
        assert len(runs) == 1 and runs[0].isFinished() and runs[0].hasAttribute("outputFSC")
