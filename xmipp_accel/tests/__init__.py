"""Tests of xmipp_accel: unit tests on the NumPy path (CI), GPU tests marked ``gpu``
(compared with NumPy or float64 references, skipped without a GPU) and Scipion
protocol tests (scripted projects). Each test builds its own ground truth with
:mod:`xmipp_accel.em.synthetic` or reads the reference files in ``../shared/data``."""
