"""Kaiser-Bessel blobs: value, look-up table and real-space transform (gridding correction).

A blob of radius ``a``, taper ``alpha`` and order ``m`` is (Lewitt 1990)

    b(r) = [sqrt(1 - (r/a)^2)]^m  I_m(alpha sqrt(1 - (r/a)^2)) / I_m(alpha)   for r <= a, else 0,

with ``I_m`` the modified Bessel function of the first kind. Fourier reconstruction
(Xmipp ``reconstruct_fourier``; Střelák et al., IJHPCA 2019, doi:10.1177/1094342019832958)
gathers the Fourier pixels of the projections around each voxel with this weight, in
units of voxels of the *padded* Fourier volume (defaults a = 1.9, alpha = 15, m = 0).
The normalised interpolation convolves the volume's transform with the blob, which
multiplies the real-space volume by the blob's 3-D transform; :meth:`KaiserBesselBlob.gridding_correction`
gives that factor so it can be divided out.

References
----------
R. M. Lewitt, "Multidimensional digital image representations using generalized
Kaiser-Bessel window functions", JOSA A 7 (1990) 1834, doi:10.1364/JOSAA.7.001834.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["KaiserBesselBlob", "bessel_i", "DEFAULT_TABLE_SIZE"]

#: Entries of the blob table indexed by squared distance (Xmipp's default).
DEFAULT_TABLE_SIZE = 10000


def bessel_i(order: int, x) -> np.ndarray:
    """Modified Bessel function of the first kind ``I_order(x)`` for integer ``order >= 0``.

    Parameters
    ----------
    order : int
        Non-negative integer order.
    x : array_like
        Arguments (real, ``|x| <= 50`` for full float64 accuracy of the series).

    Returns
    -------
    ndarray of float64, shape of ``x``.

    Notes
    -----
    ``order == 0`` uses :func:`numpy.i0`; other orders sum the power series
    ``sum_k (x/2)^(2k+m) / (k! (k+m)!)`` (60 terms).
    """
    x = np.asarray(x, dtype=np.float64)
    if order == 0:
        return np.i0(x)
    if order < 0 or int(order) != order:
        raise ValueError(f"blob order must be a non-negative integer, got {order}")
    half = x / 2.0
    term = half ** order / float(np.prod(np.arange(1, order + 1, dtype=np.float64)))
    total = term.copy()
    q = half * half
    for k in range(1, 60):
        term = term * q / (k * (k + order))
        total += term
    return total


@dataclass(frozen=True)
class KaiserBesselBlob:
    """A Kaiser-Bessel blob (generalised Kaiser-Bessel window).

    Attributes
    ----------
    radius : float
        Support radius ``a`` in voxels of the padded Fourier volume (Xmipp default 1.9).
    alpha : float
        Taper parameter (Xmipp default 15).
    order : int
        Order ``m`` of the Bessel function (Xmipp default 0).
    """

    radius: float = 1.9
    alpha: float = 15.0
    order: int = 0

    def __post_init__(self):
        if not self.radius > 0:
            raise ValueError(f"blob radius must be > 0 voxels, got {self.radius}")
        if not self.alpha >= 0:
            raise ValueError(f"blob alpha must be >= 0, got {self.alpha}")
        if self.order < 0 or int(self.order) != self.order:
            raise ValueError(f"blob order must be a non-negative integer, got {self.order}")

    @property
    def norm(self) -> float:
        """``I_m(alpha)``, the value that makes ``b(0) = 1`` (``1`` when ``alpha = 0``)."""
        if self.alpha == 0:
            return 1.0 if self.order == 0 else float(0.5 ** self.order / np.prod(np.arange(1, self.order + 1)))
        return float(bessel_i(self.order, self.alpha))

    def value_squared(self, distance2) -> np.ndarray:
        """Blob value at squared distance(s) ``distance2`` (voxels²); 0 beyond the radius.

        Returns float64 of the input's shape.
        """
        d2 = np.asarray(distance2, dtype=np.float64)
        u = np.clip(1.0 - d2 / (self.radius * self.radius), 0.0, None)
        s = np.sqrt(u)
        if self.alpha == 0:
            val = s ** self.order
        else:
            val = s ** self.order * bessel_i(self.order, self.alpha * s) / self.norm
        return np.where(d2 <= self.radius * self.radius, val, 0.0)

    def value(self, distance) -> np.ndarray:
        """Blob value at distance(s) ``distance`` (voxels); 0 beyond the radius. float64."""
        d = np.asarray(distance, dtype=np.float64)
        return self.value_squared(d * d)

    def table(self, size: int = DEFAULT_TABLE_SIZE) -> np.ndarray:
        """Blob values sampled uniformly in squared distance, ``table[i] = b(sqrt(i / (size-1)) * radius)``.

        Look-ups interpolate linearly at ``t = d² (size-1) / radius²`` (see
        :func:`table_lookup`). Returns float32 of shape ``(size,)``.
        """
        if size < 2:
            raise ValueError(f"blob table needs at least 2 entries, got {size}")
        d2 = np.linspace(0.0, self.radius * self.radius, int(size))
        return self.value_squared(d2).astype(np.float32)

    def table_scale(self, size: int = DEFAULT_TABLE_SIZE) -> float:
        """Factor turning a squared distance into a fractional table index: ``(size - 1) / radius²``."""
        return (int(size) - 1) / (self.radius * self.radius)

    def fourier_transform_3d(self, frequency) -> np.ndarray:
        """3-D Fourier transform of the blob at radial frequency ``frequency`` (cycles per voxel).

        ``B(w) = 4 pi integral_0^a b(r) r² sinc(2 w r) dr`` (``sinc(x) = sin(pi x)/(pi x)``), by
        128-point Gauss-Legendre quadrature (the integrand is smooth up to ``r = a``).
        Returns float64 of the input's shape.
        """
        w = np.asarray(frequency, dtype=np.float64)
        nodes, weights = np.polynomial.legendre.leggauss(128)
        r = 0.5 * self.radius * (nodes + 1.0)
        wr = 0.5 * self.radius * weights * self.value(r) * r * r
        flat = w.reshape(-1, 1)
        out = 4.0 * np.pi * (np.sinc(2.0 * flat * r[None, :]) @ wr)
        return out.reshape(w.shape)

    def gridding_correction(self, box: int, padded_box: int, xp=np):
        """Real-space factor that the blob interpolation multiplied the volume by.

        Parameters
        ----------
        box : int
            Output box ``N`` (voxels); the centre is at ``N // 2``.
        padded_box : int
            Size ``M`` of the padded Fourier grid the blob lives in; a voxel at distance
            ``r`` from the centre sees the blob transform at frequency ``r / M``.
        xp : module
            numpy or cupy: where the ``(N, N, N)`` array is built.

        Returns
        -------
        ndarray, float32, shape ``(N, N, N)``: ``B(r / M) / B(0)``; divide the volume by it.
        """
        rmax = math.sqrt(3.0) * (box // 2 + 1) + 1.0
        grid = np.linspace(0.0, rmax, int(4 * rmax) + 2)
        profile = self.fourier_transform_3d(grid / padded_box)
        profile /= profile[0]
        c = xp.arange(box, dtype=xp.float32) - box // 2
        r = xp.sqrt(c[:, None, None] ** 2 + c[None, :, None] ** 2 + c[None, None, :] ** 2)
        out = xp.interp(r.ravel(), xp.asarray(grid, dtype=xp.float32), xp.asarray(profile, dtype=xp.float32))
        return out.reshape(box, box, box).astype(xp.float32)
