"""3-D auto-refinement with gold-standard half sets (algorithms only; no files).

Public names (see :mod:`.autorefine`)::

    RefineSettings, RefineState, IterationRecord, auto_refine(...)
    soft_spherical_mask, lowpass_volume, fsc_weighted, half_reference, angular_step_for
    guinier_bfactor, sharpen, assign_subsets
"""
from .autorefine import (
    IterationRecord,
    RefineSettings,
    RefineState,
    angular_step_for,
    assign_subsets,
    auto_refine,
    combine_halves,
    fsc_weighted,
    guinier_bfactor,
    half_reference,
    lowpass_volume,
    sharpen,
    soft_spherical_mask,
)

__all__ = ["IterationRecord", "RefineSettings", "RefineState", "angular_step_for", "assign_subsets", "auto_refine",
           "combine_halves", "fsc_weighted", "guinier_bfactor", "half_reference", "lowpass_volume", "sharpen",
           "soft_spherical_mask"]
