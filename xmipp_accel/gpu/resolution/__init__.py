"""Resolution of maps from their half maps: Fourier shell correlation and local resolution.

Public names (arrays in, arrays or small dataclasses out; NumPy or CuPy):

- ``fsc.fsc`` (import it from :mod:`.fsc`: the package attribute ``fsc`` is the module),
  :class:`FSCResult`, :func:`resolution_at`, :func:`threshold_curve`
- :func:`masked_fsc_corrected`, :class:`MaskedFSC` (RELION phase-randomisation correction)
- :func:`directional_fsc`, :class:`DirectionalFSC`, :func:`hemisphere_directions`
- :func:`local_resolution`, :class:`LocalResolutionResult`
"""
from __future__ import annotations

from .fsc import (
    CRITERIA,
    DirectionalFSC,
    FSCResult,
    MaskedFSC,
    crossing_frequency,
    directional_fsc,
    hemisphere_directions,
    masked_fsc_corrected,
    resolution_at,
    threshold_curve,
)
from .local import LocalResolutionResult, local_resolution

__all__ = [
    "CRITERIA",
    "DirectionalFSC",
    "FSCResult",
    "LocalResolutionResult",
    "MaskedFSC",
    "crossing_frequency",
    "directional_fsc",
    "hemisphere_directions",
    "local_resolution",
    "masked_fsc_corrected",
    "resolution_at",
    "threshold_curve",
]
