"""FlexAlign movie alignment (Střelák et al., Electronics 9(6):1040, 2020) on NumPy or CuPy arrays.

Public names, one per line; the stages live in their own modules:
:mod:`.preprocess`, :mod:`.global_align`, :mod:`.local_align`, :mod:`.bspline`, :mod:`.apply`,
:mod:`.dose`, :mod:`.polish`, and :mod:`.flexalign` which chains them.
"""
from ._fft import fast_shape
from .bspline import BSplineShiftModel, auto_control_points, fit_bspline_grid, fit_bspline_shifts
from .dose import dose_weighted_sum, exposure_filter
from .flexalign import AlignmentOptions, MovieAlignment, align_movie, auto_patches
from .global_align import GlobalAlignment, estimate_global_shifts
from .local_align import LocalAlignment, estimate_local_shifts
from .polish import polish_global_shifts

__all__ = [
    "AlignmentOptions",
    "MovieAlignment",
    "align_movie",
    "auto_patches",
    "BSplineShiftModel",
    "auto_control_points",
    "fit_bspline_shifts",
    "fit_bspline_grid",
    "dose_weighted_sum",
    "exposure_filter",
    "GlobalAlignment",
    "estimate_global_shifts",
    "LocalAlignment",
    "estimate_local_shifts",
    "polish_global_shifts",
    "fast_shape",
]
