"""Scipion protocols: thin adapters that convert Scipion sets into STAR/MRC
files, run the ``xmipp-accel`` command through ``runJob`` (with ``%(GPU)s`` and
MPI) and turn its outputs into Scipion objects. No CuPy or torch imports here.
"""
from .protocol_align_movies import XmippAccelProtMovieAlign  # noqa: F401
from .protocol_assign_angles import XmippAccelProtAssignAngles  # noqa: F401
from .protocol_reconstruct import XmippAccelProtReconstructFourier  # noqa: F401
from .protocol_refine import XmippAccelProtRefine3D  # noqa: F401
from .protocol_resolution import XmippAccelProtFSC, XmippAccelProtLocalResolution  # noqa: F401
