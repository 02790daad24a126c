"""Movie alignment viewer: shift trajectory of a movie and drift over a session, from the project database.

The figures themselves (:func:`xmipp_accel.plots.plot_movie_shifts`, also written by the streaming
protocol for every movie) live in :mod:`xmipp_accel.plots`, below the protocols and the viewers.
"""
from __future__ import annotations

from ..plots import draw_movie_shifts, total_drift


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
