"""Real-space masks of volumes (NumPy or CuPy).

Array conventions: ``(N, N, N)`` float32, axes (z, y, x), centre at ``N // 2``.
"""
from __future__ import annotations

import numpy as np

__all__ = ["soft_spherical_mask"]


def soft_spherical_mask(box: int, radius_px: float, edge_px: float = 3.0, xp=np):
    """Mask (box, box, box) float32: 1 inside ``radius_px``, raised-cosine edge of ``edge_px``, 0 beyond."""
    c = np.arange(box, dtype=np.float32) - box // 2
    r = np.sqrt(c[:, None, None] ** 2 + c[None, :, None] ** 2 + c[None, None, :] ** 2)
    edge = max(float(edge_px), 1e-6)
    t = np.clip((r - radius_px) / edge, 0.0, 1.0)
    return xp.asarray((0.5 * (1.0 + np.cos(np.pi * t))).astype(np.float32))
