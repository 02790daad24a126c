"""Particle tables in Xmipp metadata (``.xmd``): the RELION <-> Xmipp label map, units and sign conventions.

:func:`xmipp_accel.io.particles.read_particles` and :func:`~xmipp_accel.io.particles.write_particles` hand a
path ending in ``.xmd`` to this module, so every command that reads or writes particles
(``xmipp-accel reconstruct``, ``assign-angles``) takes and gives Xmipp metadata as well as RELION STAR.
Inside the package particles always carry RELION labels; the conversion happens here, at the file.

Label map (one row per particle; Xmipp <-> RELION):

================================  ==================================  =============================================
Xmipp                             RELION                              conversion
================================  ==================================  =============================================
``image``                         ``rlnImageName``                    same text (``000001@stack.mrcs``)
``itemId``                        ``rlnImageId``                      same; 1..n when absent
``enabled``                       (none)                              rows with ``enabled <= 0`` are dropped on read
                                                                      (Xmipp's ``removeDisabled``); 1 on write
``angleRot/angleTilt/anglePsi``   ``rlnAngleRot/AngleTilt/AnglePsi``  same degrees (both ZYZ, same matrix)
``shiftX/shiftY`` (pixels)        ``rlnOriginXAngst/YAngst`` (Å)      ``shiftX = rlnOriginXAngst / pixel size``;
                                  (``rlnOriginX/Y``, pixels, 3.0)     same sign (see below)
``flip`` (1)                      (none)                              read as tilt + 180, -psi, -shiftX (see below)
``maxCC``                         ``rlnParticleFigureOfMerit``        same (our normalised correlation)
``ctfDefocusU/V`` (Å)             ``rlnDefocusU/V`` (Å)               same
``ctfDefocusAngle`` (deg)         ``rlnDefocusAngle`` (deg)           same
``ctfVoltage`` (kV)               ``rlnVoltage`` (kV)                 same (RELION 3.1: from data_optics)
``ctfSphericalAberration`` (mm)   ``rlnSphericalAberration`` (mm)     same (RELION 3.1: from data_optics)
``ctfQ0``                         ``rlnAmplitudeContrast``            same (positive, e.g. 0.1)
``ctfVPPphaseshift`` (deg)        ``rlnPhaseShift`` (deg)             same; written only when some value is not 0
``samplingRate`` (Å/px)           ``rlnImagePixelSize`` (Å/px)        same; without it, the stacks' MRC header
``micrograph``                    ``rlnMicrographName``               same text
================================  ==================================  =============================================

Other columns keep their names both ways (xmippLib reads RELION labels it knows, e.g. ``rlnRandomSubset``,
and keeps unknown ones); optics bookkeeping (``rlnOpticsGroup``, ``rlnOpticsGroupName``, ``rlnImageSize``,
``rlnImageDimensionality``) is not written to ``.xmd``; written back to STAR, RELION 3.0-style tables get
their optics groups rebuilt by :func:`~xmipp_accel.io.particles.write_particles`.

Shift sign, checked against the sources and against xmippLib itself (``tests/test_interop.py``):

* Xmipp: for 3-D projection alignment the programs read a particle with ``only_apply_shifts = true``
  (``reconstruct_fourier.cpp``, I2PC/xmipp, ``ApplyGeoParams``): the image is moved by ``+(shiftX, shiftY)``
  pixels and then compared with the projection at (rot, tilt, psi). ``xmippLib.Image.readApplyGeo`` on a
  row with ``shiftX = -5`` centres a blob drawn 5 px right of the centre (the test does this).
* RELION: moving the image by ``+rlnOriginXAngst / pixel size`` centres it (``docs/conventions.md``).
* Scipion: ``xmipp3.convert.alignmentToRow`` (scipion-em-xmipp) and ``relion.convert.convert31.
  _alignProjToRow`` (scipion-em-relion) derive both from the same matrix the same way
  (``shifts = -translation(inv(M))``, ``angles = -euler_zyz(inv(M))``), so ``shiftX = rlnOriginX`` and
  the angles are equal.

Mirrored rows (``flip = 1``; Xmipp mirrors x, then shifts): ``xmippLib.readApplyGeo`` mirrors the image
about the centre and then moves it by ``(shiftX, shiftY)``. The same particle without the flag is
(rot, tilt + 180, -psi) with origin (-shiftX, shiftY): Scipion's ``rowToAlignment`` does the same and the
test checks it with xmippLib's own projector and ``readApplyGeo``. Rows are written without ``flip``.

Images: Xmipp names them like RELION (``N@stack.mrcs``, N 1-based; a ``:mrcs`` format hint is
dropped). SPIDER stacks (``.stk``/``.spi``/``.xmp``) are refused with the ``xmipp_image_convert`` line that
makes MRC stacks of them.
"""
from __future__ import annotations

import logging
import os
from typing import Dict, List

import numpy as np

from ..errors import FileFormatError
from .images import parse_image_ref
from .star import Table
from .xmd import read_xmd, write_xmd

__all__ = ["XMIPP_TO_RELION", "RELION_TO_XMIPP", "XMIPP_BLOCK", "is_xmipp_metadata", "xmipp_to_relion_table",
           "relion_to_xmipp_table", "read_xmipp_particle_table", "write_xmipp_particles"]

logger = logging.getLogger("xmipp_accel.io")

#: Block name of the particle table we write (Xmipp's name for a file's single unnamed block).
XMIPP_BLOCK = "noname"

#: Xmipp label -> RELION label for columns copied unchanged (units equal; see the module docstring).
XMIPP_TO_RELION: Dict[str, str] = {
    "image": "rlnImageName",
    "itemId": "rlnImageId",
    "angleRot": "rlnAngleRot",
    "angleTilt": "rlnAngleTilt",
    "anglePsi": "rlnAnglePsi",
    "maxCC": "rlnParticleFigureOfMerit",
    "ctfDefocusU": "rlnDefocusU",
    "ctfDefocusV": "rlnDefocusV",
    "ctfDefocusAngle": "rlnDefocusAngle",
    "ctfVoltage": "rlnVoltage",
    "ctfSphericalAberration": "rlnSphericalAberration",
    "ctfQ0": "rlnAmplitudeContrast",
    "ctfVPPphaseshift": "rlnPhaseShift",
    "samplingRate": "rlnImagePixelSize",
    "micrograph": "rlnMicrographName",
}
#: RELION label -> Xmipp label (the inverse of :data:`XMIPP_TO_RELION`).
RELION_TO_XMIPP: Dict[str, str] = {v: k for k, v in XMIPP_TO_RELION.items()}

# RELION columns turned into others (shifts, pixel size) or meaningless in a flat Xmipp table.
_RELION_NOT_COPIED = ("rlnOriginX", "rlnOriginY", "rlnOriginXAngst", "rlnOriginYAngst", "rlnImagePixelSize",
                      "rlnPixelSize", "rlnDetectorPixelSize", "rlnMagnification", "rlnOpticsGroup",
                      "rlnOpticsGroupName", "rlnImageSize", "rlnImageDimensionality")
_CTF_REQUIRED = ("ctfVoltage", "ctfSphericalAberration", "ctfQ0")
_NOT_MRC = (".stk", ".spi", ".xmp", ".vol", ".img", ".hed", ".em", ".dm3", ".dm4", ".spe", ".ser")


def is_xmipp_metadata(path) -> bool:
    """True when ``path`` names Xmipp metadata (``.xmd``, any case); the readers and writers dispatch on it."""
    return os.fspath(path).lower().endswith(".xmd")


# ----------------------------------------------------------------------------------------------------------------
# Xmipp -> RELION
# ----------------------------------------------------------------------------------------------------------------

def _find_particle_block(blocks: Dict[str, Table], path: str) -> Table:
    for table in blocks.values():
        if table.loop and "image" in table:
            return table
    for table in blocks.values():
        if "image" in table:
            return table
    found = ", ".join(f"data_{n} ({t.nrows} rows: {', '.join(t.names[:6]) or 'no columns'})"
                      for n, t in blocks.items())
    raise FileFormatError(f"{path} has no particle table: expected a data_ block with an _image column "
                          f"(Xmipp particle metadata); found {found}")


def _flags(column) -> np.ndarray:
    """A 0/1 (or true/false) column as bool (n,)."""
    arr = np.asarray(column)
    if arr.dtype.kind in "biuf":
        return arr.astype(np.float64) != 0
    return np.isin(np.char.lower(arr.astype(str)), ("1", "true", "yes"))


def xmipp_to_relion_table(table: Table, *, source: str = "<xmd>") -> Table:
    """Turn an Xmipp particle table into one with RELION labels (RELION 3.0 style, one row per particle).

    Parameters
    ----------
    table : Table
        Xmipp columns (``image``, ``angleRot``, ``shiftX`` in pixels, ``ctfDefocusU``, ...).
    source : str
        File name for messages.

    Returns
    -------
    Table
        Enabled rows only (``enabled > 0``, all when the column is absent); mapped columns renamed
        (:data:`XMIPP_TO_RELION`), ``shiftX/shiftY`` as ``rlnOriginX/rlnOriginY`` (pixels, same sign),
        mirrored rows (``flip``) rewritten without the mirror; other columns kept under their names.

    Raises
    ------
    FileFormatError
        No ``image`` column, or defocus without ``ctfVoltage``/``ctfSphericalAberration``/``ctfQ0``.
    """
    if "image" not in table:
        raise FileFormatError(f"{source}: the particle table has no _image column")
    if "enabled" in table:
        keep = np.asarray(table["enabled"]).astype(np.float64) > 0
        if not keep.all():
            logger.info("%s: %d disabled particle(s) (enabled <= 0) left out", source, int((~keep).sum()))
            table = table.subset(keep)
    if "ctfDefocusU" in table:
        missing = [c for c in _CTF_REQUIRED if c not in table]
        if missing:
            raise FileFormatError(f"{source} has ctfDefocusU but no {', '.join(missing)}; add the acquisition "
                                  "labels (ctfVoltage in kV, ctfSphericalAberration in mm, ctfQ0 = amplitude "
                                  "contrast) to every particle")
    n = table.nrows
    cols: Dict[str, object] = {}
    mapped = set(XMIPP_TO_RELION) | {"shiftX", "shiftY", "enabled", "flip"}
    for name in table.names:
        if name in XMIPP_TO_RELION:
            cols[XMIPP_TO_RELION[name]] = table[name]
        elif name in ("shiftX", "shiftY"):
            cols["rlnOrigin" + name[-1]] = np.asarray(table[name], dtype=np.float64)
        elif name not in mapped and name not in cols:
            cols[name] = table[name]
    if "rlnOriginX" in cols or "rlnOriginY" in cols:
        cols.setdefault("rlnOriginX", np.zeros(n))
        cols.setdefault("rlnOriginY", np.zeros(n))
        for stale in ("rlnOriginXAngst", "rlnOriginYAngst"):  # Xmipp's shift is the one Xmipp programs used
            cols.pop(stale, None)
    if "flip" in table:
        flip = _flags(table["flip"])
        if flip.any():
            for label in ("rlnAngleTilt", "rlnAnglePsi", "rlnOriginX"):
                cols.setdefault(label, np.zeros(n))
            tilt = np.asarray(cols["rlnAngleTilt"], dtype=np.float64).copy()
            psi = np.asarray(cols["rlnAnglePsi"], dtype=np.float64).copy()
            sx = np.asarray(cols["rlnOriginX"], dtype=np.float64).copy()
            tilt[flip] += 180.0
            psi[flip] = -psi[flip]
            sx[flip] = -sx[flip]
            cols.update(rlnAngleTilt=tilt, rlnAnglePsi=psi, rlnOriginX=sx)
            cols.setdefault("rlnOriginY", np.zeros(n))
    return Table(cols)


def _check_image_formats(refs: List[str], path: str) -> None:
    seen = set()
    for ref in refs:
        name = ref.partition("@")[2] or ref
        if name in seen:
            continue
        seen.add(name)
        _, file = parse_image_ref(ref)
        ext = os.path.splitext(file)[1].lower()
        if ext in _NOT_MRC:
            root = os.path.splitext(os.path.abspath(path))[0]
            raise FileFormatError(
                f"{path}: particle images are in {ext} files (e.g. {ref}); xmipp-accel reads MRC stacks. Convert "
                f"them with Xmipp: xmipp_image_convert -i {path} -o {root}_mrc.mrcs --save_metadata_stack "
                f"{root}_mrc.xmd, then give {root}_mrc.xmd")


def read_xmipp_particle_table(path) -> Table:
    """Read the particle table of Xmipp metadata with RELION labels (RELION 3.0 style, one row per particle).

    Parameters
    ----------
    path : str or os.PathLike
        ``.xmd`` file with a particle table (the first ``data_`` block holding ``_image``).

    Returns
    -------
    Table
        As :func:`xmipp_to_relion_table` gives: rlnAngleRot/Tilt/Psi, rlnOriginX/Y (pixels) from
        shiftX/Y, rlnImagePixelSize from ``samplingRate``, CTF columns from the ctf* labels. Disabled rows
        are left out. :func:`xmipp_accel.io.particles.read_particles` makes a particle set of it.

    Raises
    ------
    FileFormatError
        Missing/malformed file, no particle table, images in SPIDER files, incomplete CTF labels.
    """
    path = os.fspath(path)
    table = xmipp_to_relion_table(_find_particle_block(read_xmd(path), path), source=path)
    _check_image_formats([str(r) for r in table["rlnImageName"].tolist()], path)
    return table


# ----------------------------------------------------------------------------------------------------------------
# RELION -> Xmipp
# ----------------------------------------------------------------------------------------------------------------

def relion_to_xmipp_table(table: Table, *, pixel_size_A, origins_A) -> Table:
    """Turn particles with RELION labels into an Xmipp particle table.

    Parameters
    ----------
    table : Table
        Particle rows with optics merged per row (as :class:`~xmipp_accel.io.particles.ParticleSet`
        holds them), with rlnImageName.
    pixel_size_A : array_like (n,)
        Pixel size of each particle in Å.
    origins_A : array_like (n, 2) or None
        (x, y) origins in Å (RELION convention), or None when the particles have none.

    Returns
    -------
    Table
        ``image``, ``itemId``, ``enabled`` (1), angles, ``shiftX/shiftY`` in pixels
        (origin in Å / pixel size), ``maxCC``, ctf* labels, ``samplingRate``, then the other columns
        under their RELION names.
    """
    t = table
    n = t.nrows
    px = np.broadcast_to(np.asarray(pixel_size_A, dtype=np.float64), (n,))
    cols: Dict[str, object] = {"image": np.asarray(t["rlnImageName"]).astype(str)}
    cols["itemId"] = (np.asarray(t["rlnImageId"]).astype(np.int64) if "rlnImageId" in t
                      else np.arange(1, n + 1, dtype=np.int64))
    cols["enabled"] = np.ones(n, dtype=np.int64)
    for label in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"):
        if label in t:
            cols[RELION_TO_XMIPP[label]] = np.asarray(t[label], dtype=np.float64)
    if origins_A is not None:
        shifts = np.asarray(origins_A, dtype=np.float64).reshape(n, 2) / px[:, None]
        cols["shiftX"] = shifts[:, 0]
        cols["shiftY"] = shifts[:, 1]
    for label in ("rlnParticleFigureOfMerit", "rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle", "rlnVoltage",
                  "rlnSphericalAberration", "rlnAmplitudeContrast"):
        if label in t:
            cols[RELION_TO_XMIPP[label]] = np.asarray(t[label], dtype=np.float64)
    if "rlnPhaseShift" in t and np.any(np.asarray(t["rlnPhaseShift"], dtype=np.float64) != 0):
        cols["ctfVPPphaseshift"] = np.asarray(t["rlnPhaseShift"], dtype=np.float64)
    cols["samplingRate"] = px.copy()
    if "rlnMicrographName" in t:
        cols["micrograph"] = t["rlnMicrographName"]
    done = set(RELION_TO_XMIPP) | set(_RELION_NOT_COPIED)
    for name in t.names:
        if name not in done and name not in cols:
            cols[name] = t[name]
    return Table(cols)


def write_xmipp_particles(path, table: Table, *, pixel_size_A, origins_A) -> None:
    """Write particle rows with RELION labels (optics merged per row) as Xmipp metadata, atomically.

    Parameters
    ----------
    path : str or os.PathLike
        Output ``.xmd``.
    table, pixel_size_A, origins_A
        As for :func:`relion_to_xmipp_table`; ``rlnImageName`` relative to ``path``'s folder or absolute.
    """
    write_xmd(os.fspath(path), {XMIPP_BLOCK: relion_to_xmipp_table(table, pixel_size_A=pixel_size_A,
                                                                   origins_A=origins_A)})
