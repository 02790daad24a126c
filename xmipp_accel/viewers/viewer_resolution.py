"""Scipion viewers for resolution: FSC curves (our protocols and any FSC or set of FSCs) and local
resolution (slices, histogram, ChimeraX). The figures are drawn by :mod:`xmipp_accel.plots`,
the same code that makes the command line's ``--plot`` files.
"""
from __future__ import annotations

import os
import shutil

import numpy as np
import pyworkflow.protocol.params as params
from pyworkflow.protocol.constants import LEVEL_ADVANCED
from pyworkflow.viewer import DESKTOP_TKINTER, WEB_DJANGO, CommandView, ProtocolViewer, Viewer

import pwem.objects as emobj
from pwem.viewers import LocalResolutionViewer

from .. import Plugin
from .. import constants as c
from ..protocols import (XmippAccelProtFSC, XmippAccelProtLocalResolution, XmippAccelProtReconstructFourier,
                         XmippAccelProtRefine3D)
from ..protocols import convert


def fsc_object_curves(fscs) -> list:
    """``[(label, frequency 1/Å, fsc), ...]`` from a pwem FSC, a SetOfFSCs or a list of FSCs."""
    if isinstance(fscs, emobj.FSC):
        fscs = [fscs]
    curves = []
    for i, fsc in enumerate(fscs):
        x, y = fsc.getData()
        label = fsc.getObjLabel() or f"FSC {i + 1}"
        curves.append((label, np.asarray(list(x), dtype=np.float64), np.asarray(list(y), dtype=np.float64)))
    return curves


def fsc_plotter(curves, *, thresholds=(0.143, 0.5), title="FSC", window_title="FSC"):
    """An EmPlotter (a Scipion view: ``show()``, ``savefig()``) with the FSC curves drawn by plots.draw_fsc."""
    from pwem.viewers.plotter import EmPlotter

    from ..plots import draw_fsc
    plotter = EmPlotter(x=1, y=1, windowTitle=window_title, figsize=(7, 4.8))
    ax = plotter.getFigure().add_subplot(111)
    draw_fsc(ax, curves, thresholds=thresholds, title=title)
    return plotter


class XmippAccelFscViewer(ProtocolViewer):
    """FSC of the half maps of our reconstruction, refinement or FSC protocol."""
    _label = "viewer FSC (xmipp_accel)"
    _targets = [XmippAccelProtReconstructFourier, XmippAccelProtRefine3D, XmippAccelProtFSC]
    _environments = [DESKTOP_TKINTER, WEB_DJANGO]

    def _defineParams(self, form):
        form.addSection(label="Visualization")
        form.addParam("threshold", params.FloatParam, default=0.143,
                      label="FSC threshold",
                      help="The resolution is read where the FSC falls below this value (0.143 for half maps; "
                           "the 0.5 line is drawn too).")
        form.addParam("displayFsc", params.LabelParam,
                      label="FSC curve(s)",
                      help="FSC against spatial frequency with Å on the top axis, threshold lines and the "
                           "resolution marked; with a mask, the unmasked, masked and corrected curves.")
        form.addParam("displayFscScipion", params.LabelParam, expertLevel=LEVEL_ADVANCED,
                      label="FSC in Scipion's FSC viewer",
                      help="The same FSC object in pwem's standard viewer (lets you create an FSC object "
                           "to compare with other protocols).")
        if isinstance(self.protocol, (XmippAccelProtReconstructFourier, XmippAccelProtRefine3D)):
            form.addParam("displayAngDist", params.LabelParam,
                          label="Angular distribution of the particles",
                          help="Projection directions of the particles used in the reconstruction (refined ones "
                               "for a refinement).")

    def _getVisualizeDict(self):
        return {"displayFsc": self._showFsc, "displayFscScipion": self._showFscScipion,
                "displayAngDist": self._showAngularDistribution}

    def _fscStar(self):
        if isinstance(self.protocol, XmippAccelProtReconstructFourier):
            return self.protocol._getVolumeFn("_fsc", ".star")
        if isinstance(self.protocol, XmippAccelProtRefine3D):
            return self.protocol._getRefineFn("run_fsc.star")
        return self.protocol._getExtraPath("fsc.star")

    def _curves(self) -> list:
        """All curves of the protocol's FSC table (one per FSC column), else its FSC object."""
        path = self._fscStar()
        if os.path.exists(path):
            curves = convert.fsc_curves_from_star(path)
            labels = {"rlnFourierShellCorrelation": "corrected" if len(curves) > 1 else "FSC",
                      "rlnFourierShellCorrelationCorrected": "corrected",
                      "rlnFourierShellCorrelationUnmaskedMaps": "unmasked",
                      "rlnFourierShellCorrelationMaskedMaps": "masked",
                      "rlnCorrectedFourierShellCorrelationPhaseRandomizedMaskedMaps": "phase-randomised masked"}
            if curves:
                return [(labels.get(name, name), f, v) for name, (f, v) in curves.items()]
        fsc = getattr(self.protocol, "outputFSC", None)
        return fsc_object_curves(fsc) if fsc is not None else []

    def _showFsc(self, paramName=None):
        curves = self._curves()
        if not curves:
            return [self.errorMessage("This run has no FSC yet.", title="FSC")]
        return [fsc_plotter(curves, thresholds=(self.threshold.get(), 0.5),
                            title=f"{self.protocol.getRunName()}")]

    def _scipionFscViewer(self):
        from pwem.viewers import FscViewer
        fsc = getattr(self.protocol, "outputFSC", None)
        if fsc is None:
            return None
        viewer = FscViewer(project=self.getProject(), protocol=self.protocol, threshold=self.threshold.get(),
                           figure=None)
        viewer.visualize(fsc)
        return viewer

    def _showFscScipion(self, paramName=None):
        if self._scipionFscViewer() is None:
            return [self.errorMessage("This run has no FSC yet.", title="FSC")]
        return []

    def _showAngularDistribution(self, paramName=None):
        from pwem.viewers.plotter import EmPlotter
        particles = getattr(self.protocol, "outputParticles", None)  # refined poses (refinement)
        if particles is None and hasattr(self.protocol, "inputParticles"):
            particles = self.protocol.inputParticles.get()
        if particles is None:
            return [self.errorMessage("No particles.", title="Angular distribution")]
        plotter = EmPlotter(x=1, y=1, windowTitle="Angular distribution")
        plotter.plotAngularDistributionFromSet(particles, "Angular distribution")
        return [plotter]


class XmippAccelFscSetViewer(Viewer):
    """Overlay of FSC curves (any FSC or set of FSCs in the project) with resolutions marked."""
    _label = "FSC curves (xmipp_accel)"
    _targets = [emobj.FSC, emobj.SetOfFSCs]
    _environments = [DESKTOP_TKINTER, WEB_DJANGO]

    def _visualize(self, obj, **kwargs):
        curves = fsc_object_curves(obj)
        if not curves:
            return [self.errorMessage("The FSC set is empty.", title="FSC")]
        return [fsc_plotter(curves, thresholds=(kwargs.get("threshold", 0.143), 0.5), title="FSC")]


class XmippAccelLocalResolutionViewer(LocalResolutionViewer):
    """Local resolution: coloured orthogonal slices with histogram, and the map coloured in ChimeraX."""
    _label = "viewer local resolution (xmipp_accel)"
    _targets = [XmippAccelProtLocalResolution]
    _environments = [DESKTOP_TKINTER, WEB_DJANGO]

    def _defineParams(self, form):
        form.addSection(label="Visualization")
        form.addParam("displaySlices", params.LabelParam,
                      label="Slices and histogram",
                      help="Three central orthogonal slices of the map coloured by local resolution (Å) with "
                           "a colour bar, and the histogram of the resolution inside the mask.")
        line = form.addLine("Colour range (Å)",
                            help="Resolution range of the colour scale; -1 uses the 2nd and 98th percentiles.")
        line.addParam("lowest", params.FloatParam, default=-1, label="best")
        line.addParam("highest", params.FloatParam, default=-1, label="worst")
        form.addParam("displayChimera", params.LabelParam,
                      label="Map coloured by local resolution in ChimeraX",
                      help=f"Opens ChimeraX (the program in {c.XMIPP_ACCEL_CHIMERAX}, 'ChimeraX' by default) "
                           "with a script that colours the map surface by local resolution.")

    def _getVisualizeDict(self):
        return {"displaySlices": self._showSlices, "displayChimera": self._showChimera}

    def _range(self):
        lo, hi = self.lowest.get(), self.highest.get()
        return (lo if lo and lo > 0 else None), (hi if hi and hi > 0 else None)

    def _readVolumes(self):
        from ..io.mrc import read_mrc
        locres, _ = read_mrc(self.protocol.getResolutionMapFn())
        mask = None
        if self.protocol.mask.get() is not None:
            mask, _ = read_mrc(convert.clean_image_path(self.protocol.mask.get().getFileName()))
        background = None
        halves = self.protocol._getHalfMaps()
        if len(halves) == 2 and all(os.path.exists(h) for h in halves):
            background = 0.5 * (read_mrc(halves[0])[0] + read_mrc(halves[1])[0])
        return locres, mask, background

    def _slicesPlotter(self):
        from pwem.viewers.plotter import EmPlotter

        from ..plots import draw_local_resolution
        locres, mask, background = self._readVolumes()
        vmin, vmax = self._range()
        plotter = EmPlotter(x=1, y=1, windowTitle="Local resolution", figsize=(10, 6.5))
        plotter.tightLayoutOn = False  # plots.draw_local_resolution lays out its axes and colour bar itself
        info = draw_local_resolution(plotter.getFigure(), locres, mask=mask, background=background,
                                     vmin=vmin, vmax=vmax, title=self.protocol.getRunName())
        return plotter, info

    def _showSlices(self, paramName=None):
        if not os.path.exists(self.protocol.getResolutionMapFn()):
            return [self.errorMessage("No local resolution map yet.", title="Local resolution")]
        return [self._slicesPlotter()[0]]

    def chimeraScript(self) -> str:
        """The ChimeraX script of the run (written now with the chosen colour range when needed)."""
        from ..plots import chimerax_local_resolution_script
        script = self.protocol.getChimeraScriptFn()
        vmin, vmax = self._range()
        if os.path.exists(script) and vmin is None and vmax is None:
            return os.path.abspath(script)
        script = os.path.abspath(self.protocol._getExtraPath("local_resolution_viewer.cxc"))
        chimerax_local_resolution_script(self.protocol.getMapFn(), os.path.abspath(self.protocol.getResolutionMapFn()),
                                         script, vmin=vmin, vmax=vmax,
                                         voxel_size_A=self.protocol.outputResolutionVolume.getSamplingRate())
        return script

    def _showChimera(self, paramName=None):
        if not os.path.exists(self.protocol.getResolutionMapFn()):
            return [self.errorMessage("No local resolution map yet.", title="Local resolution")]
        script = self.chimeraScript()
        program = Plugin.getVar(c.XMIPP_ACCEL_CHIMERAX) or "ChimeraX"
        executable = shutil.which(program)
        if executable is None:
            return [self.errorMessage(f"ChimeraX was not found ('{program}'): set {c.XMIPP_ACCEL_CHIMERAX} to the "
                                      f"ChimeraX program, or open this script in ChimeraX yourself:\n{script}",
                                      title="ChimeraX")]
        return [CommandView(f'"{executable}" "{script}" &')]
