"""Jobs: a batch of inputs read with :mod:`xmipp_accel.io`, processed with :mod:`xmipp_accel.gpu` and written back.

The layer between the algorithms and the command line: a job checks its inputs and options before any
work, runs the :class:`~xmipp_accel.gpu.runtime.pipeline.Pipeline` and writes the outputs; the
``cli`` modules only parse arguments into a job, call it and print its report. Jobs import ``io``,
``gpu`` and ``em``, never ``cli`` (so a script or a persistent worker can run them without argparse).
"""
