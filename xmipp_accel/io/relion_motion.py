"""RELION's motion-correction STAR files: the per-movie motion STAR and ``corrected_micrographs.star``.

The per-movie STAR is laid out as RELION 3.1's ``Micrograph::write`` writes it (what
``relion_run_motioncorr`` leaves beside each sum, and what Bayesian polishing reads through
``rlnMicrographMetadata``):

* ``data_general`` (key/value): rlnImageSizeX/Y (px of the movie), rlnImageSizeZ (frames in the movie
  file), rlnMicrographMovieName, rlnMicrographGainName and rlnMicrographDefectFile when known,
  rlnMicrographBinning, rlnMicrographOriginalPixelSize (Å), rlnMicrographDoseRate (e/Å² per frame;
  absent = unknown), rlnMicrographPreExposure (e/Å²), rlnVoltage (kV), rlnMicrographStartFrame (1-based)
  and rlnMotionModelVersion (0: no polynomial model to read);
* ``data_global_shift``: rlnMicrographFrameNumber (1-based frame of the movie file),
  rlnMicrographShiftX/Y in pixels of the input (unbinned) movie, MotionCor2/RELION sign (moving frame
  n's content by +shift lays it on the reference); frames that were not aligned are absent, which
  RELION reads as not observed;
* ``data_local_shift``: rlnMicrographFrameNumber, rlnCoordinateX/Y (patch centre, input px) and
  rlnMicrographShiftX/Y (patch shift left after the global one, input px).

Our B-spline model follows in ``data_xmipp_accel_bspline_general`` and ``data_xmipp_accel_bspline``
(blocks RELION ignores). ``corrected_micrographs.star`` (data_optics + data_micrographs) lists the sums
and their motion STAR files with RELION's accumulated-motion statistics.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..em.ctf import CTF_DEFAULTS
from .paths import written_name
from .star import Table, write_star

__all__ = ["RELION_EARLY_DOSE", "MotionAcquisition", "BSplineMotion", "MicrographEntry", "motion_star_blocks",
           "write_motion_star", "accumulated_motion", "write_corrected_micrographs", "relion_defect_file",
           "read_global_shifts"]

#: Dose (e/Å²) up to which RELION counts motion as "early" in rlnAccumMotionEarly (--dose_motionstats_cutoff).
RELION_EARLY_DOSE = 4.0
#: Defect files RELION's polishing can read (MotionCor2 text, or a defect map).
_RELION_DEFECT_EXTENSIONS = (".txt", ".mrc", ".tif", ".tiff")


@dataclass(frozen=True)
class MotionAcquisition:
    """What the movies' motion STAR files say about the acquisition (the same for a whole batch).

    Attributes
    ----------
    pixel_size_A : float
        Pixel size of the input movies (Å), rlnMicrographOriginalPixelSize.
    voltage_kV : float
    dose_per_frame : float or None
        e/Å² per frame; None = unknown (rlnMicrographDoseRate left out, RELION reads -1).
    pre_exposure : float
        e/Å² before the first frame of the movie file.
    gain_name : str or None
        Gain reference as applied (RELION applies rlnMicrographGainName as it is).
    defect_file : str or None
        Defect file RELION can read (see :func:`relion_defect_file`).
    cs_mm, amplitude_contrast : float
        Spherical aberration (mm) and amplitude contrast, for the optics of corrected_micrographs.star
        (RELION's CTF estimation reads them there).
    absolute_paths : bool
        Name files absolutely; otherwise relative to the working directory (:func:`xmipp_accel.io.paths.written_name`).
    """
    pixel_size_A: float
    voltage_kV: float
    dose_per_frame: Optional[float] = None
    pre_exposure: float = 0.0
    gain_name: Optional[str] = None
    defect_file: Optional[str] = None
    cs_mm: float = CTF_DEFAULTS["cs_mm"]
    amplitude_contrast: float = CTF_DEFAULTS["amplitude_contrast"]
    absolute_paths: bool = False

    def name(self, path: str) -> str:
        """How ``path`` is written in the STAR files (RELION's rule, docs/conventions.md)."""
        return written_name(path, absolute=self.absolute_paths)


@dataclass(frozen=True)
class BSplineMotion:
    """Our local-motion model, written in the xmipp_accel blocks.

    Attributes
    ----------
    coefficients_px : float array (Lt, Ly, Lx, 2)
        B-spline control-point values (x, y), input pixels.
    extent_px : (float, float)
        Extent (x, y) of the model, input pixels.
    reference_frame : int
        1-based frame of the movie file whose shift is zero.
    """
    coefficients_px: np.ndarray
    extent_px: Tuple[float, float]
    reference_frame: int


def relion_defect_file(path: Optional[str]) -> Optional[str]:
    """``path`` (absolute) when RELION can read it (text or MRC/TIFF map), else None; the STAR files name
    it by :meth:`MotionAcquisition.name`."""
    if path and path.lower().endswith(_RELION_DEFECT_EXTENSIONS):
        return os.path.abspath(path)
    return None


def motion_star_blocks(movie_path: str, frame_shape: Sequence[int], movie_frames: int, first_frame: int,
                       shifts_px, acquisition: MotionAcquisition, *, binning: float = 1.0,
                       patch_centres_px=None, patch_shifts_px=None,
                       bspline: Optional[BSplineMotion] = None,
                       eer: Optional[Tuple[int, int]] = None) -> Dict[str, Table]:
    """Blocks of one movie's motion STAR (see the module docstring for the layout and units).

    Parameters
    ----------
    movie_path : str
        The movie file (written as an absolute name).
    frame_shape : (ny, nx)
        Frame size of the movie (px).
    movie_frames : int
        Frames in the movie file (rlnImageSizeZ).
    first_frame : int
        0-based frame of the movie file of the first aligned frame.
    shifts_px : float array (N, 2)
        Global shifts (x, y) of the N aligned frames, input px, MotionCor2 sign.
    acquisition : MotionAcquisition
    binning : float
        Input pixels per pixel of the sums (rlnMicrographBinning).
    patch_centres_px : float array (P, 2), optional
        Patch centres (x, y), input px.
    patch_shifts_px : float array (P, N, 2), optional
        Per-patch shifts left after the global ones, input px.
    bspline : BSplineMotion, optional

    eer : (int, int), optional
        For EER movies: raw frames per fraction and upsampling (rlnEERGrouping, rlnEERUpsampling).
    Returns
    -------
    dict of block name -> Table
    """
    ny, nx = (int(v) for v in frame_shape)
    shifts = np.asarray(shifts_px, dtype=np.float64).reshape(-1, 2)
    n_frames = shifts.shape[0]
    frames_1 = np.arange(first_frame + 1, first_frame + n_frames + 1)
    acq = acquisition
    general = {"rlnImageSizeX": nx, "rlnImageSizeY": ny, "rlnImageSizeZ": int(movie_frames),
               "rlnMicrographMovieName": acq.name(movie_path)}
    if acq.gain_name:
        general["rlnMicrographGainName"] = acq.name(acq.gain_name)
    if acq.defect_file:
        general["rlnMicrographDefectFile"] = acq.name(acq.defect_file)
    general["rlnMicrographBinning"] = float(binning)
    general["rlnMicrographOriginalPixelSize"] = float(acq.pixel_size_A)
    if acq.dose_per_frame:  # absent = unknown to RELION (-1); 0 would be a wrong dose
        general["rlnMicrographDoseRate"] = float(acq.dose_per_frame)
    general["rlnMicrographPreExposure"] = float(acq.pre_exposure)
    general["rlnVoltage"] = float(acq.voltage_kV)
    general["rlnMicrographStartFrame"] = first_frame + 1
    if eer is not None:   # RELION's polishing re-reads EER movies with the same grouping and upsampling
        general["rlnEERGrouping"] = int(eer[0])
        general["rlnEERUpsampling"] = int(eer[1])
    general["rlnMotionModelVersion"] = 0
    blocks = {
        "general": Table(general, loop=False),
        "global_shift": Table({"rlnMicrographFrameNumber": frames_1,
                               "rlnMicrographShiftX": shifts[:, 0], "rlnMicrographShiftY": shifts[:, 1]}),
    }
    if patch_centres_px is not None and patch_shifts_px is not None:
        centres = np.asarray(patch_centres_px, dtype=np.float64)
        local = np.asarray(patch_shifts_px, dtype=np.float64)          # (P, N, 2)
        p, n = local.shape[:2]
        blocks["local_shift"] = Table({
            "rlnMicrographFrameNumber": np.tile(frames_1, p),
            "rlnCoordinateX": np.repeat(centres[:, 0], n), "rlnCoordinateY": np.repeat(centres[:, 1], n),
            "rlnMicrographShiftX": local[:, :, 0].ravel(), "rlnMicrographShiftY": local[:, :, 1].ravel()})
    if bspline is not None:
        blocks.update(_bspline_blocks(bspline, n_frames))
    return blocks


def _bspline_blocks(model: BSplineMotion, n_frames: int) -> Dict[str, Table]:
    coef = np.asarray(model.coefficients_px, dtype=np.float64)      # (Lt, Ly, Lx, 2)
    lt, ly, lx = coef.shape[:3]
    it, iy, ix = np.meshgrid(np.arange(lt), np.arange(ly), np.arange(lx), indexing="ij")
    ext = model.extent_px
    return {
        "xmipp_accel_bspline_general": Table({
            "xaControlPointsX": lx, "xaControlPointsY": ly, "xaControlPointsT": lt,
            "xaExtentX": float(ext[0]), "xaExtentY": float(ext[1]), "xaNumberOfFrames": int(n_frames),
            "xaReferenceFrame": int(model.reference_frame)}, loop=False),
        "xmipp_accel_bspline": Table({
            "xaIndexT": it.ravel(), "xaIndexY": iy.ravel(), "xaIndexX": ix.ravel(),
            "xaCoefficientX": coef[..., 0].ravel(), "xaCoefficientY": coef[..., 1].ravel()}),
    }


def write_motion_star(path: str, blocks: Dict[str, Table]) -> str:
    """Write a motion STAR (atomically); returns ``path``."""
    write_star(path, blocks)
    return path


def read_global_shifts(blocks: Dict[str, Table]) -> Tuple[np.ndarray, np.ndarray]:
    """(1-based frame numbers (N,), shifts (N, 2) x, y in input px) of a motion STAR read by ``read_star``."""
    g = blocks["global_shift"]
    frames = np.asarray(g["rlnMicrographFrameNumber"], dtype=np.int64)
    shifts = np.stack([np.asarray(g["rlnMicrographShiftX"], dtype=np.float64),
                       np.asarray(g["rlnMicrographShiftY"], dtype=np.float64)], axis=1)
    return frames, shifts


def accumulated_motion(shifts_px, first_frame: int, *, dose_per_frame: Optional[float],
                       pre_exposure: float) -> Dict[str, float]:
    """RELION's rlnAccumMotionTotal/Early/Late: summed frame-to-frame global motion (movie px, as RELION's
    motion correction computes them); "early" = frames up to 4 e/Å² (needs the dose per frame).

    ``first_frame`` is the 0-based frame of the movie file of the first row of ``shifts_px`` (N, 2);
    ``pre_exposure`` (e/Å²) is the exposure before frame 1 of the file."""
    s = np.asarray(shifts_px, dtype=np.float64).reshape(-1, 2)
    step = np.hypot(*np.diff(s, axis=0).T) if len(s) > 1 else np.zeros(0)
    out = {"rlnAccumMotionTotal": float(step.sum())}
    if dose_per_frame:
        frame = first_frame + 2 + np.arange(step.size)        # 1-based frame at the end of each step
        early = frame <= (RELION_EARLY_DOSE - pre_exposure) / dose_per_frame
        out["rlnAccumMotionEarly"] = float(step[early].sum())
        out["rlnAccumMotionLate"] = float(step[~early].sum())
    return out


@dataclass(frozen=True)
class MicrographEntry:
    """One aligned movie in ``corrected_micrographs.star``.

    Attributes
    ----------
    sum : str
        Aligned sum (rlnMicrographName, or rlnMicrographNameNoDW when there is a dose-weighted one).
    motion_star : str
        The movie's motion STAR (rlnMicrographMetadata).
    shifts_px : float array (N, 2)
        Global shifts, input px.
    sum_dw : str or None
        Dose-weighted sum.
    """
    sum: str
    motion_star: str
    shifts_px: np.ndarray
    sum_dw: Optional[str] = None


def write_corrected_micrographs(path: str, entries: List[MicrographEntry], acquisition: MotionAcquisition, *,
                                micrograph_pixel_size_A: float, first_frame: int) -> Optional[str]:
    """RELION's ``corrected_micrographs.star`` of the aligned movies (data_optics + data_micrographs).

    rlnMicrographName is the dose-weighted sum when there is one (rlnMicrographNameNoDW the plain sum),
    rlnMicrographMetadata the movie's motion STAR: what Bayesian polishing (``--corr_mic``) reads.
    ``micrograph_pixel_size_A`` is the pixel size of the sums (Å). Returns ``path``, or None without entries.
    """
    if not entries:
        return None
    acq = acquisition
    motion = [accumulated_motion(e.shifts_px, first_frame, dose_per_frame=acq.dose_per_frame,
                                 pre_exposure=float(acq.pre_exposure)) for e in entries]
    optics = Table({"rlnOpticsGroupName": np.array(["opticsGroup1"]), "rlnOpticsGroup": np.array([1]),
                    "rlnMicrographOriginalPixelSize": np.array([float(acq.pixel_size_A)]),
                    "rlnVoltage": np.array([float(acq.voltage_kV)]),
                    "rlnSphericalAberration": np.array([float(acq.cs_mm)]),
                    "rlnAmplitudeContrast": np.array([float(acq.amplitude_contrast)]),
                    "rlnMicrographPixelSize": np.array([float(micrograph_pixel_size_A)])})
    cols = {"rlnMicrographName": np.array([acq.name(e.sum_dw or e.sum) for e in entries])}
    if any(e.sum_dw for e in entries):
        cols["rlnMicrographNameNoDW"] = np.array([acq.name(e.sum) for e in entries])
    cols["rlnMicrographMetadata"] = np.array([acq.name(e.motion_star) for e in entries])
    cols["rlnOpticsGroup"] = np.ones(len(entries), dtype=np.int64)
    for key in motion[0]:
        cols[key] = np.array([mo[key] for mo in motion])
    write_star(path, {"optics": optics, "micrographs": Table(cols)})
    return path
