"""Scipion protocols: thin adapters that convert Scipion sets into STAR/MRC
files, run the ``xmipp-accel`` command through ``runJob`` (with ``%(GPU)s`` and
MPI) and turn its outputs into Scipion objects. No CuPy or torch imports here.
"""
