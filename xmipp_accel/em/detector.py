"""Detector geometry shared by the readers and the movie alignment: gain/dark reference shapes and
defect masks (pure NumPy; arrays (y, x), pixels).
"""
from __future__ import annotations

from typing import Iterable, Optional, Sequence, Tuple

import numpy as np

from ..errors import InputError


def check_reference_shape(ref_shape: Sequence[int], frame_shape: Sequence[int], *, what: str = "gain",
                          path: Optional[str] = None, movie: Optional[str] = None) -> None:
    """Raise InputError when a gain/dark reference does not match the frames.

    The message names both shapes (width x height) and, when the reference fits after a 90° rotation,
    suggests ``--gain-rot 1`` or ``3``.
    """
    ry, rx = (int(s) for s in ref_shape[-2:])
    fy, fx = (int(s) for s in frame_shape[-2:])
    if (ry, rx) == (fy, fx):
        return
    name = f"{what} {path}" if path else what
    target = f"the frames of {movie}" if movie else "the movie frames"
    hint = ""
    if (ry, rx) == (fx, fy):
        hint = "; it is rotated by 90°: add --gain-rot 1 or --gain-rot 3 (then check --gain-flip)"
    raise InputError(f"{name} is {rx} x {ry} pixels (width x height) but {target} are {fx} x {fy}{hint}")


def defect_mask_from_rectangles(shape: Sequence[int], rectangles: Iterable[Tuple[int, int, int, int]], xp=np):
    """Boolean defect mask (y, x) from MotionCor2-style rectangles ``(x, y, width, height)`` in pixels.

    Rectangles are clipped to the frame; ``x, y`` is the top-left corner (0-based).
    """
    ny, nx = (int(s) for s in shape)
    mask = np.zeros((ny, nx), dtype=bool)
    for x, y, w, h in rectangles:
        x0, y0 = max(int(x), 0), max(int(y), 0)
        x1, y1 = min(int(x) + int(w), nx), min(int(y) + int(h), ny)
        if x1 > x0 and y1 > y0:
            mask[y0:y1, x0:x1] = True
    return xp.asarray(mask)
