"""Angular assignment results: distribution of projection directions and of the matching score."""
from __future__ import annotations

import numpy as np
import pyworkflow.protocol.params as params
from pyworkflow.viewer import DESKTOP_TKINTER, WEB_DJANGO, ProtocolViewer

from ..protocols import XmippAccelProtAssignAngles, XmippAccelProtRefine3D
from ..protocols.protocol_assign_angles import SCORE_ATTR


class XmippAccelAssignAnglesViewer(ProtocolViewer):
    """Angular distribution and score histogram of the particles aligned by 'assign angles (GPU)' or refined
    by 'refine 3D (GPU)'."""
    _label = "viewer angular assignment (xmipp_accel)"
    _targets = [XmippAccelProtAssignAngles, XmippAccelProtRefine3D]
    _environments = [DESKTOP_TKINTER, WEB_DJANGO]

    def _defineParams(self, form):
        form.addSection(label="Visualization")
        form.addParam("displayAngDist", params.LabelParam,
                      label="Angular distribution",
                      help="Projection directions of the particles on the sphere (2D polar plot).")
        form.addParam("displayScores", params.LabelParam,
                      label="Score histogram",
                      help="Histogram of the matching score of every particle: a long low tail means "
                           "particles that match the reference poorly.")

    def _getVisualizeDict(self):
        return {"displayAngDist": self._showAngularDistribution, "displayScores": self._showScores}

    def _particles(self):
        return getattr(self.protocol, "outputParticles", None)

    def _showAngularDistribution(self, paramName=None):
        from pwem.viewers.plotter import EmPlotter
        particles = self._particles()
        if particles is None:
            return [self.errorMessage("No output particles yet.", title="Angular distribution")]
        plotter = EmPlotter(x=1, y=1, windowTitle="Angular distribution")
        plotter.plotAngularDistributionFromSet(particles, "Angular distribution")
        return [plotter]

    def _scores(self) -> np.ndarray:
        particles = self._particles()
        if particles is None:
            return np.zeros(0)
        values = [p.getAttributeValue(SCORE_ATTR, None) for p in particles.iterItems()]
        return np.array([v for v in values if v is not None], dtype=np.float64)

    def _showScores(self, paramName=None):
        from pwem.viewers.plotter import EmPlotter
        scores = self._scores()
        if scores.size == 0:
            return [self.errorMessage("The particles carry no matching score.", title="Scores")]
        plotter = EmPlotter(x=1, y=1, windowTitle="Matching scores", figsize=(6, 4))
        ax = plotter.createSubPlot(f"Matching score ({scores.size} particles, median {np.median(scores):.3g})",
                                   "score", "particles")
        ax.hist(scores, bins=min(50, max(10, scores.size // 20)), color="tab:blue", alpha=0.8)
        ax.axvline(np.median(scores), color="k", ls="--", lw=1)
        return [plotter]
