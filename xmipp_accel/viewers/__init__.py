"""Scipion viewers of the plugin's outputs (top layer: they import protocols, never the reverse).

The matplotlib figures they show live in :mod:`xmipp_accel.plots`, below both the command line and the
viewers, so that ``--plot`` works without Scipion.
"""
import sys as _sys

# The Scipion viewer classes are imported only inside a Scipion process (pyworkflow already loaded,
# as when Scipion discovers the plugin's viewers): the command line imports ``xmipp_accel.plots`` without
# paying for pyworkflow and pwem.
# Where pyworkflow is loaded but pwem cannot be (no tkinter, as on headless GPU nodes), the plots
# still work and Scipion itself reports why its protocols are unavailable.
if "pyworkflow" in _sys.modules:
    try:
        from .viewer_assign_angles import XmippAccelAssignAnglesViewer  # noqa: F401
        from .viewer_movie_alignment import XmippAccelMovieAlignViewer  # noqa: F401
        from .viewer_resolution import (XmippAccelFscSetViewer, XmippAccelFscViewer,  # noqa: F401
                                        XmippAccelLocalResolutionViewer)
    except ImportError as _exc:  # pragma: no cover - depends on the machine
        import logging as _logging
        _logging.getLogger(__name__).debug("Scipion viewers not loaded: %s", _exc)
