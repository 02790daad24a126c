"""Movie alignment: shift trajectory of a movie and drift over a session (Scipion viewer + PNG).

:func:`plot_movie_shifts` writes a PNG without pyplot (thread-safe, no display), as the streaming
protocol does for every movie; :class:`XmippAccelMovieAlignViewer` shows the same plots from the
project database (the shifts stored on the output movies).
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np


def draw_movie_shifts(ax, xs: Sequence[float], ys: Sequence[float], *, pixel_size_A: Optional[float] = None,
                      title: str = "") -> None:
    """Draw a frame-shift trajectory on a matplotlib axis.

    Parameters
    ----------
    ax : matplotlib Axes
    xs, ys : per-frame global shifts in pixels of the movie (MotionCor2 sign), length n_frames.
    pixel_size_A : when given, the axes are in Å (shifts × pixel size).
    title : axis title.
    """
    scale = float(pixel_size_A) if pixel_size_A else 1.0
    unit = "Å" if pixel_size_A else "px"
    x = np.asarray(xs, dtype=np.float64) * scale
    y = np.asarray(ys, dtype=np.float64) * scale
    ax.plot(x, y, "-", color="0.6", lw=1, zorder=1)
    points = ax.scatter(x, y, c=np.arange(1, x.size + 1), cmap="viridis", s=18, zorder=2)
    if x.size:
        ax.annotate("1", (x[0], y[0]), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.annotate(str(x.size), (x[-1], y[-1]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.figure.colorbar(points, ax=ax, label="frame")
    total = float(np.sum(np.hypot(np.diff(x), np.diff(y)))) if x.size > 1 else 0.0
    ax.set_title(f"{title}  (total drift {total:.1f} {unit})".strip())
    ax.set_xlabel(f"shift x ({unit})")
    ax.set_ylabel(f"shift y ({unit})")
    ax.set_aspect("equal", adjustable="datalim")
    ax.grid(True, alpha=0.3)


def plot_movie_shifts(xs: Sequence[float], ys: Sequence[float], path: str, *, title: str = "",
                      pixel_size_A: Optional[float] = None, dpi: int = 90) -> str:
    """Write the shift trajectory of one movie to ``path`` (PNG) with the Agg canvas; returns ``path``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 4.2))
    FigureCanvasAgg(fig)
    draw_movie_shifts(fig.add_subplot(111), xs, ys, pixel_size_A=pixel_size_A, title=title)
    fig.subplots_adjust(left=0.16, right=0.96, bottom=0.13, top=0.9)   # fixed margins: tight_layout costs
    fig.savefig(path, dpi=dpi)                                           # ~0.1 s per movie in streaming
    return path


def total_drift(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Path length of a shift trajectory, in the units of the shifts."""
    x, y = np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64)
    return float(np.sum(np.hypot(np.diff(x), np.diff(y)))) if x.size > 1 else 0.0


try:  # the Scipion viewer (the plotting functions above work without Scipion)
    import pyworkflow.protocol.params as params
    from pyworkflow.viewer import DESKTOP_TKINTER, WEB_DJANGO, ProtocolViewer
except ImportError:  # pragma: no cover
    ProtocolViewer = None

if ProtocolViewer is not None:
    from ..protocols import XmippAccelProtMovieAlign

    class XmippAccelMovieAlignViewer(ProtocolViewer):
        """Shift trajectories and drift of the movies aligned by FlexAlign."""
        _label = "viewer movie alignment (xmipp_accel)"
        _targets = [XmippAccelProtMovieAlign]
        _environments = [DESKTOP_TKINTER, WEB_DJANGO]

        def _defineParams(self, form):
            form.addSection(label="Visualization")
            form.addParam("movieId", params.IntParam, default=0,
                          label="Movie id",
                          help="Id of the movie whose trajectory is shown (0: the first aligned movie).")
            form.addParam("displayShifts", params.LabelParam,
                          label="Shift trajectory of the movie",
                          help="Global shift of every frame (Å), coloured by frame number.")
            form.addParam("displayDrift", params.LabelParam,
                          label="Total drift of all movies",
                          help="Total drift per movie in acquisition order: spot bad movies in a session.")

        def _getVisualizeDict(self):
            return {"displayShifts": self._showShifts, "displayDrift": self._showDrift}

        def _alignedMovies(self):
            movies = getattr(self.protocol, "outputMovies", None)
            if movies is None:
                return []
            return [m.clone() for m in movies.iterItems(orderBy="id")]

        def _showShifts(self, paramName=None):
            from pwem.viewers.plotter import EmPlotter
            movies = self._alignedMovies()
            if not movies:
                return [self.errorMessage("No aligned movies yet.", title="Movie alignment")]
            wanted = self.movieId.get() if self.movieId.get() else movies[0].getObjId()
            movie = next((m for m in movies if m.getObjId() == wanted), None)
            if movie is None:
                return [self.errorMessage(f"No aligned movie with id {wanted}.", title="Movie alignment")]
            xs, ys = movie.getAlignment().getShifts()
            plotter = EmPlotter(x=1, y=1, windowTitle="Movie shifts", figsize=(6, 5))
            ax = plotter.createSubPlot("", "", "")
            draw_movie_shifts(ax, xs, ys, pixel_size_A=movies[0].getSamplingRate(),
                              title=f"movie {movie.getObjId()}")
            return [plotter]

        def _showDrift(self, paramName=None):
            from pwem.viewers.plotter import EmPlotter
            movies = self._alignedMovies()
            if not movies:
                return [self.errorMessage("No aligned movies yet.", title="Movie alignment")]
            pixel = movies[0].getSamplingRate()
            ids = [m.getObjId() for m in movies]
            drift = [total_drift(*m.getAlignment().getShifts()) * pixel for m in movies]
            plotter = EmPlotter(x=1, y=1, windowTitle="Drift per movie", figsize=(7, 4))
            ax = plotter.createSubPlot("Total drift per movie", "movie id", "total drift (Å)")
            ax.plot(ids, drift, "o-", ms=4)
            ax.grid(True, alpha=0.3)
            return [plotter]
