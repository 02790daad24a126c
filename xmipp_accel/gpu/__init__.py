"""Algorithms on arrays: movie alignment, reconstruction, angular assignment,
resolution, and the acceleration machinery (tuning, runtime). Each works on
NumPy or CuPy arrays chosen by :mod:`xmipp_accel.backend`; nothing here
imports Scipion or touches files. CUDA kernels are ``.cu`` files beside their
Python wrappers, each with a NumPy twin used on the CPU and as the test oracle.
"""
