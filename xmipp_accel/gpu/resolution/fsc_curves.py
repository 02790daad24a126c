"""FSC curves and what is read off them: the result types, the criteria (0.143, 0.5, half-bit, 3σ) and
the resolution where a curve crosses a threshold, interpolated between shells (:func:`resolution_at`).

The curves themselves are computed in :mod:`.fsc` (global, masked with phase randomisation, directional);
shell ``k`` is labelled by its centre frequency ``k / N`` (1/pixel), resolutions are in Å.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import List, Optional, Tuple, Union

import numpy as np

from ...errors import InputError

__all__ = ["CRITERIA", "Threshold", "FSCResult", "MaskedFSC", "DirectionalFSC", "threshold_curve",
           "crossing_frequency", "resolution_at"]

#: Names accepted by :func:`threshold_curve` (aliases map to these).
CRITERIA = ("0.143", "0.5", "half-bit", "3sigma")
_ALIASES = {"0.143": "0.143", "gold": "0.143", "0.5": "0.5", "half-bit": "half-bit", "halfbit": "half-bit",
            "half_bit": "half-bit", "1/2-bit": "half-bit", "3sigma": "3sigma", "3-sigma": "3sigma",
            "three-sigma": "3sigma", "3σ": "3sigma"}

Threshold = Union[float, str]


# --------------------------------------------------------------------------------------------- results
@dataclass(frozen=True)
class FSCResult:
    """An FSC curve over one-voxel shells.

    Attributes
    ----------
    frequency : (n_shells,) float64
        Shell centres in cycles/pixel (k / box, k = 0 .. box // 2).
    fsc : (n_shells,) float64
        Correlation per shell, in [-1, 1]; 0 where a shell holds no power.
    n_voxels : (n_shells,) float64
        Fourier voxels per shell counted over the full sphere (both Friedel mates).
    box : int
        Box size N defining the shells (largest dimension of the maps).
    """

    frequency: np.ndarray
    fsc: np.ndarray
    n_voxels: np.ndarray
    box: int

    @property
    def shell(self) -> np.ndarray:
        """Shell indices 0 .. n_shells - 1 (RELION's spectral index)."""
        return np.arange(self.fsc.size)

    def frequency_A(self, pixel_size_A: float) -> np.ndarray:
        """Shell centres in 1/Å."""
        return self.frequency / float(pixel_size_A)

    def resolution_A(self, pixel_size_A: float) -> np.ndarray:
        """Shell centres as resolutions in Å (inf for the DC shell)."""
        with np.errstate(divide="ignore"):
            return float(pixel_size_A) / self.frequency

    def threshold(self, criterion: Threshold, *, symmetry_order: int = 1) -> np.ndarray:
        """Threshold per shell for a criterion (see :func:`threshold_curve`)."""
        return threshold_curve(self, criterion, symmetry_order=symmetry_order)

    def resolution(self, criterion: Threshold = 0.143, *, pixel_size_A: float = 1.0, symmetry_order: int = 1) -> float:
        """Resolution in Å at a criterion (see :func:`resolution_at`)."""
        return resolution_at(self, criterion, pixel_size_A, symmetry_order=symmetry_order)

    @property
    def is_identical(self) -> bool:
        """True when FSC > 0.99999 in every shell beyond DC (the halves are the same map)."""
        return bool(self.fsc.size > 1 and np.all(self.fsc[1:] > 1.0 - 1e-5))


@dataclass(frozen=True)
class MaskedFSC:
    """FSCs of RELION's masked post-processing (see :func:`masked_fsc_corrected`).

    Attributes
    ----------
    unmasked, masked, phase_randomised, corrected : FSCResult
        FSC of the unmasked halves, of the masked halves, of the masked halves whose phases were
        randomised beyond ``randomise_from_shell``, and the corrected ("true") FSC.
    randomise_from_shell : int or None
        First shell of the unmasked FSC below 0.8; phases are randomised where ``|k| >= shell``
        (RELION's rule, which takes in the outer half of this shell too).
        None when the unmasked FSC never drops below 0.8 (no correction; ``corrected`` = ``masked``).
    """

    unmasked: FSCResult
    masked: FSCResult
    phase_randomised: FSCResult
    corrected: FSCResult
    randomise_from_shell: Optional[int]

    def randomise_from_A(self, pixel_size_A: float) -> Optional[float]:
        """Resolution (Å) beyond which phases were randomised, or None."""
        if self.randomise_from_shell is None:
            return None
        return float(pixel_size_A) / float(self.unmasked.frequency[self.randomise_from_shell])


@dataclass(frozen=True)
class DirectionalFSC:
    """Cone-restricted FSCs (see :func:`directional_fsc`).

    Attributes
    ----------
    directions : (m, 3) float64
        Unit cone axes, (x, y, z) order.
    cone_half_angle_deg : float
        Half angle of each (double) cone, degrees.
    curves : list of FSCResult
        One FSC per direction.
    """

    directions: np.ndarray
    cone_half_angle_deg: float
    curves: List[FSCResult] = field(default_factory=list)

    def resolutions(self, criterion: Threshold = 0.143, *, pixel_size_A: float = 1.0) -> np.ndarray:
        """(m,) resolution in Å per direction."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return np.array([resolution_at(c, criterion, pixel_size_A) for c in self.curves])


# ----------------------------------------------------------------------------------------- thresholds
def _criterion_name(criterion: Threshold) -> Optional[str]:
    if isinstance(criterion, str):
        key = criterion.strip().lower()
        if key in _ALIASES:
            return _ALIASES[key]
        try:
            float(key)
        except ValueError:
            raise InputError(f"unknown FSC criterion {criterion!r}: use a number or one of "
                             f"{', '.join(CRITERIA)}") from None
        return None
    return None


def threshold_curve(result: FSCResult, criterion: Threshold, *, symmetry_order: int = 1) -> np.ndarray:
    """Threshold per shell for an FSC criterion.

    Parameters
    ----------
    result : FSCResult
        The curve (its ``n_voxels`` sets the size-dependent criteria).
    criterion : float or str
        A number (constant threshold), ``"0.143"``, ``"0.5"``, ``"half-bit"`` or ``"3sigma"``.
    symmetry_order : int
        Point-group order; the size-dependent criteria use n = n_voxels / symmetry_order.

    Returns
    -------
    (n_shells,) float64
        Half-bit: T = (0.2071 + 1.9102/√n) / (1.2071 + 0.9102/√n); 3σ: T = 3/√(n/2)
        (van Heel & Schatz 2005); constants are broadcast.
    """
    if symmetry_order < 1:
        raise InputError(f"symmetry order must be >= 1, got {symmetry_order}")
    name = _criterion_name(criterion)
    n = np.maximum(np.asarray(result.n_voxels, dtype=np.float64) / symmetry_order, 1.0)
    if name == "half-bit":
        s = np.sqrt(n)
        return (0.2071 + 1.9102 / s) / (1.2071 + 0.9102 / s)
    if name == "3sigma":
        return 3.0 / np.sqrt(n / 2.0)
    value = float(criterion) if name is None else float(name)
    return np.full(result.fsc.shape, value)


def crossing_frequency(frequency: np.ndarray, curve: np.ndarray, threshold: Union[float, np.ndarray],
                       *, interpolate: bool = True) -> Tuple[float, str]:
    """Frequency where an FSC curve falls below a threshold, interpolated between shells.

    The search starts after the first shell (DC excluded) where the curve exceeds the threshold,
    so size-dependent thresholds that lie above the FSC in the first shells are handled; the
    crossing is the first later shell below the threshold, linearly interpolated with the shell
    before it.

    Parameters
    ----------
    frequency : (n,) array
        Shell frequencies (any unit: the answer is in the same unit), increasing.
    curve : (n,) array
        FSC values.
    threshold : float or (n,) array
        Threshold per shell.

    Returns
    -------
    frequency : float
        Crossing frequency; the last frequency when the curve never falls below the threshold;
        NaN when it never exceeds it.
    status : str
        ``"crossed"``, ``"above_to_nyquist"`` or ``"never_above"``.

    With ``interpolate=False`` the crossing is the last shell at or above the threshold before the
    first drop (no interpolation): RELION's rule for ``rlnFinalResolution`` in ``relion_postprocess``.
    """
    f = np.asarray(frequency, dtype=np.float64)
    d = np.asarray(curve, dtype=np.float64) - np.broadcast_to(np.asarray(threshold, dtype=np.float64), f.shape)
    above = np.nonzero(d[1:] > 0)[0]
    if above.size == 0:
        return float("nan"), "never_above"
    start = int(above[0]) + 1
    below = np.nonzero(d[start:] < 0)[0]
    if below.size == 0:
        return float(f[-1]), "above_to_nyquist"
    j = start + int(below[0])
    if not interpolate:
        return float(f[j - 1]), "crossed"
    t = d[j - 1] / (d[j - 1] - d[j])
    return float(f[j - 1] + t * (f[j] - f[j - 1])), "crossed"


def resolution_at(result: FSCResult, threshold: Threshold, pixel_size_A: float, *, symmetry_order: int = 1,
                  interpolate: bool = True) -> float:
    """Resolution (Å) where the FSC falls below a criterion.

    Parameters
    ----------
    result : FSCResult
        The FSC curve.
    threshold : float or str
        0.143 (half maps), 0.5, ``"half-bit"`` or ``"3sigma"`` (see :func:`threshold_curve`).
    pixel_size_A : float
        Voxel size in Å.
    symmetry_order : int
        Point-group order for the size-dependent criteria.
    interpolate : bool
        True (default): interpolate linearly between the last shell above and the first below.
        False: RELION's rule, the last shell above (``relion_postprocess``'s ``rlnFinalResolution``),
        up to one shell coarser.

    Returns
    -------
    float
        Resolution in Å, interpolated between shells (:func:`crossing_frequency`). When the FSC
        stays above the threshold up to Nyquist (e.g. identical half maps) the Nyquist resolution
        is returned with a warning; when it never exceeds it, ``inf`` with a warning.
    """
    if not pixel_size_A or pixel_size_A <= 0:
        raise InputError(f"pixel size must be > 0 Å, got {pixel_size_A}")
    thr = threshold_curve(result, threshold, symmetry_order=symmetry_order)
    filled = result.n_voxels > 0  # cones can leave low shells empty: skip them
    freq, status = crossing_frequency(result.frequency[filled], result.fsc[filled], thr[filled],
                                      interpolate=interpolate)
    label = _criterion_name(threshold) or f"{float(threshold):g}"
    if status == "never_above":
        warnings.warn(f"the FSC never exceeds the {label} threshold: resolution undefined (reported as inf)",
                      stacklevel=2)
        return float("inf")
    if status == "above_to_nyquist":
        why = " (the half maps are identical)" if result.is_identical else ""
        warnings.warn(f"the FSC stays above the {label} threshold up to Nyquist{why}: "
                      f"the resolution is limited by the pixel size and reported at Nyquist", stacklevel=2)
    return float(pixel_size_A) / freq
