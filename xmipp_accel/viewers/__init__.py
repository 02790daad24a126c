"""Viewers: matplotlib plots shared by the command line (``--plot``) and the
Scipion viewers (FSC curves, local-resolution slices and histogram, ChimeraX
scripts, movie-alignment shift plots).
"""
