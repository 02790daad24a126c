"""Particle sets: the particles of a RELION STAR file (3.0 without optics, 3.1+ with data_optics) or of
Xmipp metadata, with optics merged per particle, and their writers.

The STAR format itself (tables, parsing, writing) is :mod:`xmipp_accel.io.star`; Xmipp labels and
units are converted in :mod:`xmipp_accel.io.xmipp_particles`; :func:`read_particles` and
:func:`write_particles` dispatch on a name ending in ``.xmd``. Units follow RELION: defocus in Å,
angles in degrees, ``rlnOriginXAngst`` in Å, ``rlnOriginX`` (RELION 3.0) in pixels, voltage in kV,
Cs in mm.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from ..em.ctf import CTF_DEFAULTS
from ..errors import FileFormatError, InputError
from .images import parse_image_ref, read_images
from .mrc import mrc_info, mrc_voxel_size
from .paths import locate, resolve_name, rewrite_image_refs
from .star import Table, read_star, write_star
from .xmipp_particles import is_xmipp_metadata, read_xmipp_particle_table, write_xmipp_particles

__all__ = ["ParticleSet", "read_particles", "write_particles", "write_particles_from_arrays", "merge_optics",
           "OPTICS_LABELS_30"]

# Per-particle columns that RELION 3.1 keeps in data_optics (3.0 files have them per particle).
OPTICS_LABELS_30 = ("rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast", "rlnMagnification",
                    "rlnDetectorPixelSize", "rlnImagePixelSize", "rlnPixelSize", "rlnCtfDataArePhaseFlipped",
                    "rlnCtfDataAreCtfPremultiplied", "rlnImageSize", "rlnImageDimensionality", "rlnBeamTiltX",
                    "rlnBeamTiltY", "rlnOpticsGroupName")



def _find_particles_block(blocks: Dict[str, Table], path: str) -> Tuple[str, Table]:
    if "particles" in blocks and "rlnImageName" in blocks["particles"]:
        return "particles", blocks["particles"]
    for name, table in blocks.items():
        if "rlnImageName" in table and table.loop:
            return name, table
    found = ", ".join(f"data_{n} ({t.nrows} rows)" for n, t in blocks.items())
    raise FileFormatError(f"{path} has no particles table: expected data_particles (RELION 3.1+) or a data_ block "
                          f"with an rlnImageName column (RELION 3.0); found {found}")


def merge_optics(particles: Table, optics: Table, path: str) -> Tuple[Table, Tuple[str, ...]]:
    """Copy each optics group's columns onto its particles (particle values win). Returns (table, merged names)."""
    n = particles.nrows
    if optics.nrows == 0:
        raise FileFormatError(f"{path}: data_optics is empty; it needs one row per optics group")
    if "rlnOpticsGroup" in particles and "rlnOpticsGroup" in optics:
        group_ids = optics["rlnOpticsGroup"]
        lookup = {g: k for k, g in enumerate(group_ids.tolist())}
        if len(lookup) != optics.nrows:
            raise FileFormatError(f"{path}: data_optics lists an rlnOpticsGroup number twice")
        pgroups = particles["rlnOpticsGroup"]
        uniq, inverse = np.unique(pgroups, return_inverse=True)
        missing = [g for g in uniq.tolist() if g not in lookup]
        if missing:
            raise FileFormatError(f"{path}: particles use optics group(s) {missing} that data_optics does not define "
                                  f"(it has {sorted(lookup)})")
        rows = np.array([lookup[g] for g in uniq.tolist()], dtype=np.int64)[inverse.reshape(-1)]
    elif optics.nrows == 1:
        rows = np.zeros(n, dtype=np.int64)
    else:
        raise FileFormatError(f"{path}: data_optics has {optics.nrows} groups but the particles have no "
                              "rlnOpticsGroup column to say which group each belongs to")
    merged = {}
    for name in optics.names:
        if name not in particles:
            merged[name] = optics[name][rows]
    return particles.with_columns(**merged), tuple(merged)


@dataclass
class ParticleSet:
    """Particles of a STAR file, with optics merged per particle.

    Attributes
    ----------
    table : Table
        One row per particle; optics-group columns (pixel size, voltage, ...)
        copied onto each particle.
    optics : Table or None
        The data_optics table (RELION 3.1+), None for RELION 3.0 files.
    image_refs : list of str
        ``"N@stack.mrcs"`` references, as in rlnImageName.
    star_dir : str
        Folder of the STAR file; relative image names are looked up in the working directory, then
        here (the rule of :mod:`xmipp_accel.io.paths`).
    path : str or None
        The STAR file read.
    optics_columns : tuple of str
        Names of the columns copied from optics (dropped again when writing).
    datadir : str or None
        ``--datadir``: a folder image names are looked up in first.
    """

    table: Table
    optics: Optional[Table]
    image_refs: List[str]
    star_dir: str
    path: Optional[str] = None
    optics_columns: Tuple[str, ...] = field(default_factory=tuple)
    datadir: Optional[str] = None

    def __len__(self) -> int:
        return self.table.nrows

    @property
    def n(self) -> int:
        """Number of particles."""
        return self.table.nrows

    def _where(self) -> str:
        return self.path or "the particle set"

    @property
    def pixel_size_A(self) -> np.ndarray:
        """Pixel size of each particle image in Å, shape (n,), float64.

        From rlnImagePixelSize (RELION 3.1+), rlnPixelSize, or
        rlnDetectorPixelSize (µm) x 10^4 / rlnMagnification (RELION 3.0), else
        the voxel size in the first stack's MRC header.
        """
        t = self.table
        for label in ("rlnImagePixelSize", "rlnPixelSize"):
            if label in t:
                return np.asarray(t[label], dtype=np.float64)
        if "rlnDetectorPixelSize" in t and "rlnMagnification" in t:
            return np.asarray(t["rlnDetectorPixelSize"], np.float64) * 1e4 / np.asarray(t["rlnMagnification"],
                                                                                        np.float64)
        voxel = self._header_voxel_size()
        if voxel is not None:
            return np.full(self.n, voxel, dtype=np.float64)
        raise FileFormatError(f"{self._where()} gives no pixel size: add rlnImagePixelSize to data_optics (or "
                              "rlnDetectorPixelSize and rlnMagnification for RELION 3.0), or set it in the stacks' "
                              "MRC headers")

    def _header_voxel_size(self) -> Optional[float]:
        if not self.image_refs:
            return None
        try:
            _, p = parse_image_ref(self.image_refs[0])
            found = resolve_name(p, self.star_dir, datadir=self.datadir)
            return None if found is None else mrc_voxel_size(found)
        except InputError:
            return None

    @property
    def angles_deg(self) -> Optional[np.ndarray]:
        """(rot, tilt, psi) Euler angles in degrees (Xmipp/RELION ZYZ), shape (n, 3), or None if absent."""
        t = self.table
        if not all(label in t for label in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")):
            return None
        return np.stack([np.asarray(t[c], np.float64) for c in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")], 1)

    @property
    def origins_A(self) -> Optional[np.ndarray]:
        """(x, y) origin offsets in Å, shape (n, 2), or None if absent.

        RELION convention: shifting the stored image by +origin / pixel size
        centres the particle. From rlnOriginXAngst/YAngst (3.1+) or rlnOriginX/Y
        in pixels x pixel size (3.0).
        """
        t = self.table
        if "rlnOriginXAngst" in t and "rlnOriginYAngst" in t:
            return np.stack([np.asarray(t["rlnOriginXAngst"], np.float64),
                             np.asarray(t["rlnOriginYAngst"], np.float64)], 1)
        if "rlnOriginX" in t and "rlnOriginY" in t:
            px = self.pixel_size_A
            return np.stack([np.asarray(t["rlnOriginX"], np.float64) * px,
                             np.asarray(t["rlnOriginY"], np.float64) * px], 1)
        return None

    @property
    def origins_px(self) -> Optional[np.ndarray]:
        """Origins in pixels of each particle's own image, shape (n, 2), or None."""
        o = self.origins_A
        return None if o is None else o / self.pixel_size_A[:, None]

    def ctf(self) -> Optional[Dict[str, np.ndarray]]:
        """CTF parameters per particle, or None when the file has no rlnDefocusU.

        Returns
        -------
        dict of str to numpy.ndarray (n,), float64, or None
            ``defocus_u_A``, ``defocus_v_A`` (= U when absent), ``defocus_angle_deg``
            (0 when absent), ``voltage_kV``, ``cs_mm``, ``amplitude_contrast``,
            ``phase_shift_deg`` (0 when absent).

        Raises
        ------
        FileFormatError
            Defocus given but voltage, Cs or amplitude contrast missing.
        """
        t = self.table
        if "rlnDefocusU" not in t:
            return None

        def col(label, default=None):
            if label in t:
                return np.asarray(t[label], dtype=np.float64)
            if default is None:
                raise FileFormatError(f"{self._where()} has defocus values but no {label} (in data_optics for "
                                      "RELION 3.1+, per particle for 3.0); add it to use the CTF")
            return np.full(self.n, default, dtype=np.float64)

        u = col("rlnDefocusU")
        return {"defocus_u_A": u, "defocus_v_A": col("rlnDefocusV", 0.0) if "rlnDefocusV" in t else u.copy(),
                "defocus_angle_deg": col("rlnDefocusAngle", 0.0), "voltage_kV": col("rlnVoltage"),
                "cs_mm": col("rlnSphericalAberration"), "amplitude_contrast": col("rlnAmplitudeContrast"),
                "phase_shift_deg": col("rlnPhaseShift", 0.0)}

    @property
    def ctf_premultiplied(self) -> bool:
        """True when rlnCtfDataAreCtfPremultiplied is set for any particle."""
        v = self.table.get("rlnCtfDataAreCtfPremultiplied")
        return bool(v is not None and np.any(np.asarray(v).astype(np.int64) != 0))

    @property
    def subset(self) -> Optional[np.ndarray]:
        """Half-set of each particle (rlnRandomSubset, 1 or 2), shape (n,), int64, or None."""
        v = self.table.get("rlnRandomSubset")
        return None if v is None else np.asarray(v).astype(np.int64)

    @property
    def box_size(self) -> int:
        """Image side in pixels: rlnImageSize, else the first stack's MRC header."""
        v = self.table.get("rlnImageSize")
        if v is not None and len(v):
            return int(np.asarray(v)[0])
        if not self.image_refs:
            raise FileFormatError(f"{self._where()} has no particles, so no box size")
        _, p = parse_image_ref(self.image_refs[0])
        return int(mrc_info(locate(p, self.star_dir, datadir=self.datadir, source=self.path)).nx)

    def read_images(self, indices=None) -> np.ndarray:
        """Read the particle images, shape (n, y, x) float32 (see :func:`xmipp_accel.io.images.read_images`)."""
        return read_images(self.image_refs, self.star_dir, indices=indices, source=self.path, datadir=self.datadir)

    def absolute_image_refs(self) -> List[str]:
        """``image_refs`` with each file found by the path rule and named absolute (unfound names kept)."""
        return rewrite_image_refs(self.image_refs, self.star_dir, datadir=self.datadir, absolute=True)

    def select(self, rows) -> ParticleSet:
        """New set with the particles selected by an index array or boolean mask."""
        table = self.table.subset(rows)
        return ParticleSet(table=table, optics=self.optics, image_refs=list(table["rlnImageName"]),
                           star_dir=self.star_dir, path=self.path, optics_columns=self.optics_columns,
                           datadir=self.datadir)


def read_particles(path: str | os.PathLike, *, datadir: Optional[str] = None) -> ParticleSet:
    """Read a RELION particle STAR file (3.0 without optics, 3.1+ with data_optics), or Xmipp metadata.

    Parameters
    ----------
    path : str or os.PathLike
        STAR file with a particles table (data_particles, or for RELION 3.0
        the block holding rlnImageName); a name ending in ``.xmd`` is read as
        Xmipp metadata and converted to RELION labels
        (:func:`xmipp_accel.io.xmipp_particles.read_xmipp_particle_table`).

    datadir : str, optional
        ``--datadir``: a folder image names are looked up in first (:mod:`xmipp_accel.io.paths`).

    Returns
    -------
    ParticleSet
        Particles with optics columns merged per row.

    Raises
    ------
    FileFormatError
        Missing/malformed file, no particles table, particles in an optics
        group data_optics does not define.
    """
    path = os.fspath(path)
    if is_xmipp_metadata(path):  # Xmipp metadata: labels, units and signs converted there
        table = read_xmipp_particle_table(path)
        return ParticleSet(table=table, optics=None, image_refs=[str(r) for r in table["rlnImageName"].tolist()],
                           star_dir=os.path.dirname(os.path.abspath(path)), path=path, datadir=datadir)
    blocks = read_star(path)
    _, particles = _find_particles_block(blocks, path)
    optics = blocks.get("optics")
    merged_names: Tuple[str, ...] = ()
    if optics is not None and optics.names:
        particles, merged_names = merge_optics(particles, optics, path)
    else:
        optics = None
    refs = list(particles["rlnImageName"].tolist())
    return ParticleSet(table=particles, optics=optics, image_refs=refs,
                       star_dir=os.path.dirname(os.path.abspath(path)), path=path, optics_columns=merged_names,
                       datadir=datadir)


def _group_rows(keys: Sequence[np.ndarray], n: int) -> Tuple[np.ndarray, np.ndarray]:
    """Number rows by unique combination of key columns: (group index per row (n,), first row of each group)."""
    if not keys:
        return np.zeros(n, dtype=np.int64), np.zeros(1, dtype=np.int64)
    codes = np.zeros(n, dtype=np.int64)
    for k in keys:
        _, inv = np.unique(k, return_inverse=True)
        codes = codes * (int(inv.max()) + 1 if inv.size else 1) + inv.reshape(-1)
    _, first, inverse = np.unique(codes, return_index=True, return_inverse=True)
    # number groups in order of first appearance
    order = np.argsort(first, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    return rank[inverse.reshape(-1)], first[order]


def _optics_from_30(pset: ParticleSet) -> Tuple[Table, Table]:
    """Split a RELION 3.0 particle table into (optics, particles) the RELION 3.1 way."""
    t = pset.table
    n = t.nrows
    pixel = pset.pixel_size_A
    present = [c for c in OPTICS_LABELS_30 if c in t and c not in ("rlnImagePixelSize", "rlnPixelSize",
                                                                     "rlnMagnification", "rlnDetectorPixelSize",
                                                                     "rlnOpticsGroupName")]
    keys = [np.round(pixel, 6)] + [t[c] for c in present]
    group, first = _group_rows(keys, n)
    cols = {"rlnOpticsGroup": np.arange(1, first.size + 1, dtype=np.int64),
            "rlnOpticsGroupName": np.array([f"opticsGroup{k}" for k in range(1, first.size + 1)])}
    for c in present:
        cols[c] = t[c][first]
    cols["rlnImagePixelSize"] = pixel[first]
    if "rlnImageSize" not in cols and n:
        cols["rlnImageSize"] = np.full(first.size, pset.box_size, dtype=np.int64)
    if "rlnImageDimensionality" not in cols:
        cols["rlnImageDimensionality"] = np.full(first.size, 2, dtype=np.int64)
    drop = [c for c in OPTICS_LABELS_30 if c in t]
    particles = t.without_columns(*drop).with_columns(rlnOpticsGroup=group + 1)
    return Table(cols), particles


def write_particles(path: str | os.PathLike, pset: ParticleSet, *, angles_deg=None, origins_A=None,
                    extra: Optional[Mapping[str, object]] = None, absolute_paths: bool = False) -> None:
    """Write particles as RELION 3.1 STAR (data_optics + data_particles), atomically.

    Parameters
    ----------
    path : str or os.PathLike
        Output STAR file; a name ending in ``.xmd`` gets Xmipp metadata instead
        (:func:`xmipp_accel.io.xmipp_particles.write_xmipp_particles`: Xmipp labels, shifts in pixels).
    pset : ParticleSet
        Particles to write; every original column is kept, optics groups are
        preserved (RELION 3.0 input gets optics groups built from its
        per-particle voltage, Cs, amplitude contrast and pixel size).
    angles_deg : array_like (n, 3), optional
        New (rot, tilt, psi) in degrees.
    origins_A : array_like (n, 2), optional
        New (x, y) origins in Å (RELION convention). Pixel origins (rlnOriginX/Y)
        of the input are converted to rlnOriginXAngst/YAngst in any case.
    extra : mapping of str to array_like, optional
        Further particle columns to add or replace (``{"rlnMaxValueProbDistribution": cc}``).
    absolute_paths : bool, optional
        ``--absolute-paths``: write absolute image names.

    Notes
    -----
    Image names follow :mod:`xmipp_accel.io.paths`: each stack is found as it was read and
    named relative to the working directory (RELION's project folder), or absolute.
    """
    path = os.fspath(path)
    n = pset.n
    if pset.optics is None:
        optics, table = _optics_from_30(pset)
    else:
        optics = pset.optics
        table = pset.table.without_columns(*pset.optics_columns)
    new: Dict[str, object] = {}
    if angles_deg is not None:
        a = np.asarray(angles_deg, dtype=np.float64)
        if a.shape != (n, 3):
            raise InputError(f"angles_deg must have shape ({n}, 3) for {n} particles, got {a.shape}")
        new.update(rlnAngleRot=a[:, 0], rlnAngleTilt=a[:, 1], rlnAnglePsi=a[:, 2])
    if origins_A is None and "rlnOriginXAngst" not in table and "rlnOriginX" in table:
        origins_A = pset.origins_A
    if origins_A is not None:
        o = np.asarray(origins_A, dtype=np.float64)
        if o.shape != (n, 2):
            raise InputError(f"origins_A must have shape ({n}, 2) for {n} particles, got {o.shape}")
        new.update(rlnOriginXAngst=o[:, 0], rlnOriginYAngst=o[:, 1])
    if "rlnOpticsGroup" not in table:
        if optics.nrows != 1 or "rlnOpticsGroup" not in optics:
            raise InputError(f"cannot write {path}: particles have no rlnOpticsGroup and data_optics has "
                             f"{optics.nrows} groups")
        new["rlnOpticsGroup"] = np.full(n, int(optics["rlnOpticsGroup"][0]), dtype=np.int64)
    if "rlnOriginXAngst" in table or "rlnOriginXAngst" in new:
        table = table.without_columns("rlnOriginX", "rlnOriginY")
    for name, values in (extra or {}).items():
        new[str(name).lstrip("_")] = values
    refs = rewrite_image_refs(pset.image_refs, pset.star_dir, datadir=pset.datadir, absolute=absolute_paths)
    if refs != list(pset.image_refs):
        new["rlnImageName"] = np.array(refs)
    table = table.with_columns(**new)
    if is_xmipp_metadata(path):  # Xmipp metadata (see io/xmipp_particles.py)
        _write_xmd(path, optics, table)
        return
    write_star(path, {"optics": optics, "particles": table})


def _write_xmd(path: str, optics: Table, particles: Table) -> None:
    """Particles given as RELION 3.1 tables, written as Xmipp metadata (pixel shifts, optics per row)."""
    if particles.nrows == 0:
        raise InputError(f"cannot write {path}: no particles")
    merged = merge_optics(particles, optics, path)[0] if optics.names else particles
    pset = ParticleSet(table=merged, optics=None, image_refs=[str(r) for r in merged["rlnImageName"].tolist()],
                       star_dir=os.path.dirname(os.path.abspath(path)), path=path)
    write_xmipp_particles(path, merged, pixel_size_A=pset.pixel_size_A, origins_A=pset.origins_A)


def write_particles_from_arrays(path: str | os.PathLike, image_refs: Sequence[str], pixel_size_A, *,
                                angles_deg=None, origins_A=None, ctf: Optional[Mapping[str, object]] = None,
                                subset=None, voltage_kV: float = CTF_DEFAULTS["voltage_kV"],
                                cs_mm: float = CTF_DEFAULTS["cs_mm"],
                                amplitude_contrast: float = CTF_DEFAULTS["amplitude_contrast"],
                                box_size: Optional[int] = None,
                                extra: Optional[Mapping[str, object]] = None, absolute_paths: bool = False) -> None:
    """Write a RELION 3.1 particle STAR file from arrays (synthetic data, demos).

    Parameters
    ----------
    path : str or os.PathLike
        Output STAR file.
    image_refs : sequence of str, length n
        ``"N@stack.mrcs"`` references: absolute, relative to the working directory or to the STAR
        file's folder (looked up in that order); written by the rule of :mod:`xmipp_accel.io.paths`
        (relative to the working directory, or absolute).
    pixel_size_A : float or array_like (n,)
        Pixel size in Å; particles sharing pixel size, voltage, Cs and amplitude
        contrast share an optics group.
    angles_deg : array_like (n, 3), optional
        (rot, tilt, psi) in degrees.
    origins_A : array_like (n, 2), optional
        (x, y) origins in Å (shifting the image by +origin / pixel size centres it).
    ctf : mapping, optional
        ``defocus_u_A``, ``defocus_v_A``, ``defocus_angle_deg`` (arrays or scalars)
        and optionally ``phase_shift_deg``, ``voltage_kV``, ``cs_mm``,
        ``amplitude_contrast`` (these override the keyword defaults); the
        truth dict of :func:`xmipp_accel.em.synthetic.make_particles` works as is.
    subset : array_like (n,) of {1, 2}, optional
        rlnRandomSubset (half-set).
    voltage_kV, cs_mm, amplitude_contrast : float, optional
        Optics values when ``ctf`` does not give them (default :data:`xmipp_accel.em.ctf.CTF_DEFAULTS`).
    box_size : int, optional
        Image side in pixels (rlnImageSize); read from the first stack when omitted.
    extra : mapping of str to array_like, optional
        Further particle columns.
    absolute_paths : bool, optional
        ``--absolute-paths``: write absolute image names.
    """
    path = os.fspath(path)
    out_dir = os.path.dirname(os.path.abspath(path))
    refs = rewrite_image_refs([str(r) for r in image_refs], out_dir, absolute=absolute_paths)
    n = len(refs)
    if n == 0:
        raise InputError(f"cannot write {path}: no particles")
    pixel = np.broadcast_to(np.asarray(pixel_size_A, dtype=np.float64), (n,)).copy()
    ctf = dict(ctf or {})
    optics_values = {
        "rlnVoltage": np.broadcast_to(np.asarray(ctf.get("voltage_kV", voltage_kV), np.float64), (n,)),
        "rlnSphericalAberration": np.broadcast_to(np.asarray(ctf.get("cs_mm", cs_mm), np.float64), (n,)),
        "rlnAmplitudeContrast": np.broadcast_to(np.asarray(ctf.get("amplitude_contrast", amplitude_contrast),
                                                           np.float64), (n,)),
    }
    if box_size is None:
        _, p = parse_image_ref(refs[0])
        found = resolve_name(p, out_dir)
        if found is None:
            raise InputError(f"cannot write {path}: give box_size, or write the stack {p} first "
                             "so the box size can be read from it")
        box_size = mrc_info(found).nx
    group, first = _group_rows([pixel] + list(optics_values.values()), n)
    ngroups = first.size
    optics = {"rlnOpticsGroup": np.arange(1, ngroups + 1, dtype=np.int64),
              "rlnOpticsGroupName": np.array([f"opticsGroup{k}" for k in range(1, ngroups + 1)])}
    for label, values in optics_values.items():
        optics[label] = np.asarray(values)[first]
    optics["rlnImagePixelSize"] = pixel[first]
    optics["rlnImageSize"] = np.full(ngroups, int(box_size), dtype=np.int64)
    optics["rlnImageDimensionality"] = np.full(ngroups, 2, dtype=np.int64)
    cols: Dict[str, object] = {"rlnImageName": np.array(refs)}
    if angles_deg is not None:
        a = np.asarray(angles_deg, dtype=np.float64).reshape(n, 3)
        cols.update(rlnAngleRot=a[:, 0], rlnAngleTilt=a[:, 1], rlnAnglePsi=a[:, 2])
    if origins_A is not None:
        o = np.asarray(origins_A, dtype=np.float64).reshape(n, 2)
        cols.update(rlnOriginXAngst=o[:, 0], rlnOriginYAngst=o[:, 1])
    if ctf.get("defocus_u_A") is not None:
        u = np.broadcast_to(np.asarray(ctf["defocus_u_A"], np.float64), (n,))
        cols["rlnDefocusU"] = u
        cols["rlnDefocusV"] = np.broadcast_to(np.asarray(ctf.get("defocus_v_A", u), np.float64), (n,))
        cols["rlnDefocusAngle"] = np.broadcast_to(np.asarray(ctf.get("defocus_angle_deg", 0.0), np.float64), (n,))
        cols["rlnPhaseShift"] = np.broadcast_to(np.asarray(ctf.get("phase_shift_deg", 0.0), np.float64), (n,))
    if subset is not None:
        s = np.asarray(subset).astype(np.int64).reshape(-1)
        if s.shape != (n,) or not np.isin(s, (1, 2)).all():
            raise InputError(f"subset must hold 1 or 2 for each of the {n} particles")
        cols["rlnRandomSubset"] = s
    cols["rlnOpticsGroup"] = group + 1
    for name, values in (extra or {}).items():
        cols[str(name).lstrip("_")] = values
    for name, values in list(cols.items()):
        if np.ndim(values) == 1 and len(values) != n:
            raise InputError(f"column {name} has {len(values)} values for {n} particles")
        if isinstance(values, np.ndarray) and not values.flags.writeable:
            cols[name] = values.copy()
    if not all(math.isfinite(float(v)) and v > 0 for v in optics["rlnImagePixelSize"].tolist()):
        raise InputError(f"cannot write {path}: pixel sizes must be positive numbers of Å")
    write_star(path, {"optics": Table(optics), "particles": Table(cols)})

