"""Conventions of cryo-EM, written once: Euler angles and rotation matrices,
projection geometry, symmetry groups, the CTF, angular sampling and synthetic
data with known ground truth. Everything here is array-module agnostic
(NumPy or CuPy through an ``xp`` argument) and knows nothing of files or Scipion.
"""
