"""Scipion objects <-> the files our commands read and write (RELION 3.1 STAR, MRC).

Pure functions, no project needed (tested in ``tests/test_convert.py``).

Conventions
-----------
Scipion stores a particle's projection alignment (``ALIGN_PROJ``) as a 4x4 matrix ``T``. With
``A = euler_to_matrix(rot, tilt, psi)`` (Xmipp/RELION ZYZ, :mod:`xmipp_accel.em.geometry`) and the
in-plane shift ``s = (sx, sy, 0)`` in pixels,

    T^-1 = [[A, -s], [0, 1]],   i.e.   T = [[A^T, A^T s], [0, 1]].

This is the convention of the RELION and Xmipp plugins (``matrixFromGeometry(shifts, angles,
inverseTransform=True)``) and ``(sx, sy)`` are RELION's origin in pixels:
``rlnOriginXAngst = sx * pixel_size``. CTF: ``defocusU/V`` in Å and the astigmatism angle in
degrees, as RELION's ``rlnDefocusU/V/Angle``.
"""
from __future__ import annotations

import os
from typing import Callable, Dict, Iterable, Optional, Tuple

import numpy as np

from ..em.ctf import CTF_DEFAULTS
from ..em.geometry import euler_to_matrix, matrix_to_euler
from ..io import images as io_images

MRC_EXTENSIONS = (".mrc", ".mrcs", ".st", ".map")

# RELION column names used here
IMAGE_NAME = "rlnImageName"
ANGLES = ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")
ORIGINS = ("rlnOriginXAngst", "rlnOriginYAngst")
SUBSET = "rlnRandomSubset"
SCORE_COLUMNS = ("rlnParticleFigureOfMerit", "rlnXmippAccelScore", "rlnMaxValueProbDistribution",
                 "rlnLogLikeliContribution", "rlnParticleScore", "rlnScore")
# per-particle columns of ``xmipp-accel assign-angles`` copied onto Scipion particles: column -> attribute
EXTRA_PARTICLE_COLUMNS = {"rlnXmippAccelConsensusDeg": "_xmippAccelConsensusDeg",
                          "rlnXmippAccelConsensusDisagree": "_xmippAccelDisagree"}


# ----------------------------------------------------------------------------------------------
# Alignment
# ----------------------------------------------------------------------------------------------
def transform_from_euler(rot: float, tilt: float, psi: float, shift_x_px: float = 0.0,
                         shift_y_px: float = 0.0, shift_z_px: float = 0.0) -> np.ndarray:
    """Scipion ``ALIGN_PROJ`` matrix ``(4, 4)`` float64 from Euler angles (degrees) and shifts (pixels).

    The shifts are RELION's origin in pixels (``rlnOriginXAngst / pixel_size``).
    """
    a = euler_to_matrix(rot, tilt, psi)
    s = np.array([shift_x_px, shift_y_px, shift_z_px], dtype=np.float64)
    t = np.eye(4)
    t[:3, :3] = a.T
    t[:3, 3] = a.T @ s
    return t


def euler_from_transform(matrix) -> Tuple[float, float, float, float, float]:
    """``(rot, tilt, psi, shift_x_px, shift_y_px)`` of a Scipion ``ALIGN_PROJ`` matrix ``(4, 4)``.

    Inverse of :func:`transform_from_euler` (angles in degrees, tilt in [0, 180]).
    """
    t = np.asarray(matrix, dtype=np.float64)
    inv = np.linalg.inv(t)
    rot, tilt, psi = matrix_to_euler(inv[:3, :3])
    shifts = -inv[:3, 3]
    return float(rot), float(tilt), float(psi), float(shifts[0]), float(shifts[1])


def transforms_from_euler(angles_deg: np.ndarray, shifts_px: np.ndarray) -> np.ndarray:
    """Vectorised :func:`transform_from_euler`: ``(n, 3)`` angles and ``(n, 2)`` shifts -> ``(n, 4, 4)``."""
    angles_deg = np.asarray(angles_deg, dtype=np.float64).reshape(-1, 3)
    shifts = np.zeros((angles_deg.shape[0], 3))
    shifts[:, :2] = np.asarray(shifts_px, dtype=np.float64).reshape(-1, 2)
    a = euler_to_matrix(angles_deg[:, 0], angles_deg[:, 1], angles_deg[:, 2])
    at = np.transpose(a, (0, 2, 1))
    t = np.zeros((angles_deg.shape[0], 4, 4))
    t[:, :3, :3] = at
    t[:, :3, 3] = np.einsum("nij,nj->ni", at, shifts)
    t[:, 3, 3] = 1.0
    return t


# ----------------------------------------------------------------------------------------------
# Image locations
# ----------------------------------------------------------------------------------------------
def clean_image_path(filename: str) -> str:
    """Strip Scipion's format hints (``file.mrc:mrcs``, ``file.mrc:mrc``) from a file name."""
    for suffix in (":mrcs", ":mrc", ":ems", ":tif", ":eer"):
        if filename.endswith(suffix):
            return filename[: -len(suffix)]
    return filename


def image_ref(index: int, filename: str) -> str:
    """RELION image reference ``"N@path"`` (1-based) or ``path`` for a single image (index 0/None)."""
    filename = clean_image_path(filename)
    if index is None or int(index) <= 0:
        return filename
    return f"{int(index)}@{filename}"


def parse_image_ref(ref: str) -> Tuple[int, str]:
    """Scipion's (1-based index, path): ``"12@stack.mrcs"`` -> ``(12, "stack.mrcs")``; ``"img.mrc"`` -> ``(0, ...)``.

    A thin adapter over :func:`xmipp_accel.io.images.parse_image_ref` (0-based, None for a whole file).
    """
    index0, path = io_images.parse_image_ref(ref)
    return (0 if index0 is None else index0 + 1), path


def ensure_mrc_stack(filename: str, out_dir: str, converted: Dict[str, str],
                     convert: Optional[Callable[[str, str], None]] = None) -> str:
    """Path of an MRC version of the stack ``filename`` (converted once into ``out_dir`` if needed).

    MRC stacks are used where they are (absolute path). Other formats (Spider ``.stk``, ``.hdf``,
    ...) are converted with ``convert(src, dst)`` (default: pwem's ImageHandler, i.e. xmippLib).
    """
    filename = clean_image_path(filename)
    absolute = os.path.abspath(filename)
    if absolute.lower().endswith(MRC_EXTENSIONS):
        return absolute
    if absolute not in converted:
        base = os.path.splitext(os.path.basename(filename))[0]
        dst = os.path.abspath(os.path.join(out_dir, f"{base}_{len(converted):03d}.mrcs"))
        if convert is None:
            from pwem.emlib.image import ImageHandler
            ImageHandler().convertStack(absolute, dst)
        else:
            convert(absolute, dst)
        converted[absolute] = dst
    return converted[absolute]


# ----------------------------------------------------------------------------------------------
# SetOfParticles -> columns -> STAR
# ----------------------------------------------------------------------------------------------
def balanced_random_subsets(n: int, seed: int = 0) -> np.ndarray:
    """``(n,)`` int array of 1 and 2, half each (n odd: one more 1), in random order."""
    subsets = np.ones(n, dtype=np.int64)
    order = np.random.default_rng(seed).permutation(n)
    subsets[order[n - n // 2:]] = 2
    return subsets


def particles_to_columns(part_set, *, stack_dir: Optional[str] = None, with_alignment: bool = True,
                         with_ctf: bool = True, subset_seed: int = 0,
                         convert: Optional[Callable[[str, str], None]] = None) -> Tuple[dict, dict]:
    """Collect the RELION 3.1 optics and particle columns of an (enabled items of a) SetOfParticles.

    Parameters
    ----------
    part_set : pwem.objects.SetOfParticles (or any iterable of Particle with the set's methods).
    stack_dir : folder for converted stacks when images are not MRC (default: current folder).
    with_alignment : write angles and origins (the set must have projection alignment).
    with_ctf : write the defocus columns when the particles have a CTF.
    subset_seed : seed of the random half-set split when the particles carry no ``_rlnRandomSubset``.

    Returns
    -------
    optics : dict column -> array of length 1 (one optics group).
    particles : dict column -> array of length n (``rlnImageName`` first), plus ``"_ids"``: the
        Scipion object ids (int64), removed by the writer.
    """
    pixel = float(part_set.getSamplingRate())
    acq = part_set.getAcquisition()
    box = int(part_set.getXDim() or 0)
    optics = {
        "rlnOpticsGroup": np.array([1]),
        "rlnOpticsGroupName": np.array(["opticsGroup1"]),
        "rlnImagePixelSize": np.array([pixel]),
        "rlnImageSize": np.array([box]),
        "rlnImageDimensionality": np.array([2]),
        "rlnVoltage": np.array([float(acq.getVoltage() or CTF_DEFAULTS["voltage_kV"])]),
        "rlnSphericalAberration": np.array([float(acq.getSphericalAberration() or CTF_DEFAULTS["cs_mm"])]),
        "rlnAmplitudeContrast": np.array([float(acq.getAmplitudeContrast() or CTF_DEFAULTS["amplitude_contrast"])]),
    }
    if part_set.isPhaseFlipped():
        optics["rlnCtfDataArePhaseFlipped"] = np.array([1])
    has_ctf = with_ctf and part_set.hasCTF()
    converted: Dict[str, str] = {}
    names, ids, subsets = [], [], []
    angles, shifts, ctf = [], [], []
    for particle in part_set.iterItems(orderBy="id"):
        if not particle.isEnabled():
            continue
        index, filename = particle.getLocation()
        path = ensure_mrc_stack(filename, stack_dir or os.getcwd(), converted, convert)
        names.append(image_ref(index, path))
        ids.append(particle.getObjId())
        subset = particle.getAttributeValue("_rlnRandomSubset", None)
        subsets.append(int(subset) if subset else 0)
        if with_alignment:
            rot, tilt, psi, sx, sy = euler_from_transform(particle.getTransform().getMatrix())
            angles.append((rot, tilt, psi))
            shifts.append((sx, sy))
        if has_ctf:
            model = particle.getCTF()
            phase = model.getPhaseShift() if model.hasPhaseShift() else 0.0
            ctf.append((model.getDefocusU(), model.getDefocusV(), model.getDefocusAngle(), phase or 0.0))
    n = len(names)
    columns = {IMAGE_NAME: np.array(names, dtype=str), "rlnOpticsGroup": np.ones(n, dtype=np.int64)}
    if with_alignment and n:
        ang = np.asarray(angles, dtype=np.float64)
        sh = np.asarray(shifts, dtype=np.float64) * pixel
        for i, name in enumerate(ANGLES):
            columns[name] = ang[:, i]
        columns[ORIGINS[0]], columns[ORIGINS[1]] = sh[:, 0], sh[:, 1]
    if has_ctf and n:
        c = np.asarray(ctf, dtype=np.float64)
        columns["rlnDefocusU"], columns["rlnDefocusV"] = c[:, 0], c[:, 1]
        columns["rlnDefocusAngle"], columns["rlnPhaseShift"] = c[:, 2], c[:, 3]
    subsets_arr = np.asarray(subsets, dtype=np.int64)
    if n and not np.all(np.isin(subsets_arr, (1, 2))):
        subsets_arr = balanced_random_subsets(n, subset_seed)
    columns[SUBSET] = subsets_arr
    columns["_ids"] = np.asarray(ids, dtype=np.int64)
    return optics, columns


def write_particles_star(part_set, path: str, **kwargs) -> np.ndarray:
    """Write a SetOfParticles as a RELION 3.1 STAR file (optics + particles); returns the ids written.

    Keyword arguments are those of :func:`particles_to_columns`. Image paths are absolute.
    """
    optics, columns = particles_to_columns(part_set, **kwargs)
    ids = columns.pop("_ids")
    if len(ids) == 0:
        raise ValueError("the input set has no enabled particles")
    write_star_tables(path, {"optics": optics, "particles": columns})
    return ids


def write_star_tables(path: str, blocks: Dict[str, dict]) -> None:
    """Write ``{block: {column: array}}`` to a STAR file with :mod:`xmipp_accel.io.star` (atomic)."""
    from ..io import star
    star.write_star(path, {name: star.Table(cols) for name, cols in blocks.items()})


def read_star_tables(path: str) -> Dict[str, dict]:
    """Read a STAR file into ``{block: {column: array}}`` with :mod:`xmipp_accel.io.star`."""
    from ..io import star
    return {name: table_columns(table) for name, table in star.read_star(path).items()}


def table_columns(table) -> dict:
    """Columns ``{name: array}`` of an :class:`xmipp_accel.io.star.Table` (or a dict)."""
    if isinstance(table, dict):
        return dict(table)
    cols = getattr(table, "columns", None)
    if isinstance(cols, dict):
        return dict(cols)
    return {name: table[name] for name in cols}


# ----------------------------------------------------------------------------------------------
# STAR -> Scipion objects
# ----------------------------------------------------------------------------------------------
def read_alignment_rows(path: str) -> Dict[str, dict]:
    """Per-image alignment read back from a particles STAR (e.g. ``xmipp-accel assign-angles`` output).

    Returns ``{rlnImageName: {"rot", "tilt", "psi", "shift_x_px", "shift_y_px", "score", "extra"}}``
    with the image path made absolute the same way :func:`particles_to_columns` wrote it (relative
    names found by the rule of :mod:`xmipp_accel.io.paths`, as the command read them); ``score`` is
    the first of :data:`SCORE_COLUMNS` present (else None), ``extra`` maps the Scipion attribute names
    of :data:`EXTRA_PARTICLE_COLUMNS` present to their values.
    """
    from ..io.particles import read_particles
    pset = read_particles(path)
    if pset.angles_deg is None:
        raise ValueError(f"{path} has no rlnAngleRot/Tilt/Psi columns")
    n = len(pset.image_refs)
    pixel = np.broadcast_to(np.asarray(pset.pixel_size_A, dtype=np.float64), (n,))
    origins = np.zeros((n, 2)) if pset.origins_A is None else np.asarray(pset.origins_A, dtype=np.float64)
    shifts_px = origins / pixel[:, None]
    cols = table_columns(pset.table)
    score = None
    for name in SCORE_COLUMNS:
        if name in cols:
            score = np.asarray(cols[name], dtype=np.float64)
            break
    extra = {attr: np.asarray(cols[name], dtype=np.float64) for name, attr in EXTRA_PARTICLE_COLUMNS.items()
             if name in cols}
    rows = {}
    star_dir = os.path.dirname(os.path.abspath(path))
    for i, ref in enumerate(pset.absolute_image_refs()):
        rows[normalize_ref(ref, star_dir)] = {
            "rot": float(pset.angles_deg[i, 0]), "tilt": float(pset.angles_deg[i, 1]),
            "psi": float(pset.angles_deg[i, 2]),
            "shift_x_px": float(shifts_px[i, 0]), "shift_y_px": float(shifts_px[i, 1]),
            "score": None if score is None else float(score[i]),
            "extra": {attr: float(values[i]) for attr, values in extra.items()}}
    return rows


def star_to_particles(star_path: str, sqlite_path: str):
    """Create a Scipion SetOfParticles (sqlite) from a RELION particles STAR file.

    Angles and origins become ``ALIGN_PROJ`` transforms, defocus columns a CTFModel per particle,
    ``rlnRandomSubset`` the ``_rlnRandomSubset`` attribute. Image paths are made absolute. The set
    can be imported into a project with pwem's ``ProtImportParticles`` (import from Scipion).

    Returns the written (closed) :class:`pwem.objects.SetOfParticles`.
    """
    import pwem.objects as emobj
    import pyworkflow.object as pwobj

    from ..io.particles import read_particles

    pset = read_particles(star_path)
    n = len(pset)
    pixel = np.broadcast_to(np.asarray(pset.pixel_size_A, dtype=np.float64), (n,))
    cols = table_columns(pset.table)

    def first(name, default):
        return float(np.asarray(cols[name])[0]) if name in cols else default

    acq = emobj.Acquisition(voltage=first("rlnVoltage", CTF_DEFAULTS["voltage_kV"]),
                            sphericalAberration=first("rlnSphericalAberration", CTF_DEFAULTS["cs_mm"]),
                            amplitudeContrast=first("rlnAmplitudeContrast", CTF_DEFAULTS["amplitude_contrast"]),
                            magnification=50000)
    parts = emobj.SetOfParticles(filename=sqlite_path)
    parts.setSamplingRate(float(pixel[0]) if n else 1.0)
    parts.setAcquisition(acq)
    angles = pset.angles_deg
    origins = pset.origins_A
    ctf = pset.ctf()
    subsets = pset.subset
    transforms = None
    if angles is not None:
        parts.setAlignmentProj()
        shifts_px = np.zeros((n, 2)) if origins is None else origins / pixel[:, None]
        transforms = transforms_from_euler(angles, shifts_px)
    parts.setHasCTF(ctf is not None)
    star_dir = os.path.dirname(os.path.abspath(star_path))
    for i, ref in enumerate(pset.absolute_image_refs()):
        index, path = parse_image_ref(normalize_ref(ref, star_dir))
        particle = emobj.Particle(location=(index, path))
        particle.setAcquisition(acq.clone())
        if transforms is not None:
            particle.setTransform(emobj.Transform(transforms[i]))
        if ctf is not None:
            model = emobj.CTFModel()
            model.setStandardDefocus(float(ctf["defocus_u_A"][i]), float(ctf["defocus_v_A"][i]),
                                     float(ctf["defocus_angle_deg"][i]))
            if ctf["phase_shift_deg"][i]:
                model.setPhaseShift(float(ctf["phase_shift_deg"][i]))
            particle.setCTF(model)
        if subsets is not None:
            particle._rlnRandomSubset = pwobj.Integer(int(subsets[i]))
        parts.append(particle)
    parts.write()
    parts.close()
    return parts


def normalize_ref(ref: str, base_dir: str) -> str:
    """``N@path`` with ``path`` made absolute (relative paths are taken from ``base_dir``)."""
    index, path = parse_image_ref(str(ref))
    if not os.path.isabs(path):
        path = os.path.join(base_dir, path)
    return image_ref(index, os.path.normpath(path))


def particle_ref(particle, stack_map: Optional[Dict[str, str]] = None) -> str:
    """The normalised ``N@/abs/path`` of a Particle, through ``stack_map`` for converted stacks."""
    index, filename = particle.getLocation()
    path = os.path.abspath(clean_image_path(filename))
    if stack_map:
        path = stack_map.get(path, path)
    return image_ref(index, os.path.normpath(path))


def stack_map(part_set, star_path: str) -> Dict[str, str]:
    """Stacks converted by :func:`write_particles_star` (original absolute path -> MRC copy), read from the STAR
    it wrote for the enabled particles of ``part_set``, so that :func:`particle_ref` finds them again."""
    mapping = {}
    refs = read_star_tables(star_path)["particles"][IMAGE_NAME]
    for particle, ref in zip((p for p in part_set.iterItems(orderBy="id") if p.isEnabled()), refs):
        original = os.path.abspath(clean_image_path(particle.getLocation()[1]))
        _, written = parse_image_ref(str(ref))
        if os.path.normpath(written) != os.path.normpath(original):
            mapping[original] = os.path.normpath(written)
    return mapping


def fsc_from_star(path: str) -> Tuple[np.ndarray, np.ndarray]:
    """``(frequency in 1/Å, FSC)`` from an FSC STAR written by our commands (or RELION's postprocess).

    Accepts ``rlnResolution`` (1/Å) or ``rlnAngstromResolution`` (Å) for the abscissa and
    ``rlnFourierShellCorrelationCorrected`` / ``rlnFourierShellCorrelation`` /
    ``rlnFourierShellCorrelationUnmaskedMaps`` for the curve (the first present, in that order).
    """
    blocks = read_star_tables(path)
    for cols in blocks.values():
        freq = None
        if "rlnResolution" in cols:
            freq = np.asarray(cols["rlnResolution"], dtype=np.float64)
        elif "rlnAngstromResolution" in cols:
            res = np.asarray(cols["rlnAngstromResolution"], dtype=np.float64)
            with np.errstate(divide="ignore"):
                freq = np.where(res > 0, 1.0 / res, 0.0)
        if freq is None:
            continue
        for name in ("rlnFourierShellCorrelationCorrected", "rlnFourierShellCorrelation",
                     "rlnFourierShellCorrelationUnmaskedMaps", "rlnFourierShellCorrelationMaskedMaps"):
            if name in cols:
                return freq, np.asarray(cols[name], dtype=np.float64)
    raise ValueError(f"{path}: no FSC table (rlnResolution + rlnFourierShellCorrelation) found")


def fsc_curves_from_star(path: str) -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
    """Every distinct FSC curve of an FSC STAR: ``{column name: (frequency 1/Å, values)}``, in file order."""
    blocks = read_star_tables(path)
    curves = {}
    for cols in blocks.values():
        if "rlnResolution" not in cols:
            continue
        freq = np.asarray(cols["rlnResolution"], dtype=np.float64)
        for name, values in cols.items():
            if "FourierShellCorrelation" not in name:
                continue
            values = np.asarray(values, dtype=np.float64)
            if any(np.array_equal(values, v) for _, v in curves.values()):
                continue  # e.g. the corrected curve equals the plain one without a mask
            curves[name] = (freq, values)
    return curves


def movie_shifts_from_star(path: str) -> Tuple[list, list]:
    """Global per-frame shifts ``(xs, ys)`` in pixels of the input movie from a motion STAR.

    Reads the ``global_shift`` block (RELION motion-correction STAR: ``rlnMicrographFrameNumber``,
    ``rlnMicrographShiftX/Y``), or the first block that has those columns, ordered by frame.
    """
    blocks = read_star_tables(path)
    candidates = [blocks[k] for k in blocks if "global" in k] + list(blocks.values())
    for cols in candidates:
        if "rlnMicrographShiftX" in cols and "rlnMicrographShiftY" in cols:
            xs = np.asarray(cols["rlnMicrographShiftX"], dtype=np.float64)
            ys = np.asarray(cols["rlnMicrographShiftY"], dtype=np.float64)
            if "rlnMicrographFrameNumber" in cols:
                order = np.argsort(np.asarray(cols["rlnMicrographFrameNumber"], dtype=np.int64), kind="stable")
                xs, ys = xs[order], ys[order]
            return xs.tolist(), ys.tolist()
    raise ValueError(f"{path}: no rlnMicrographShiftX/Y columns found")


def iter_chunks(items: Iterable, n: int):
    """Split ``items`` into lists of at most ``n`` (n >= 1)."""
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) >= max(1, n):
            yield chunk
            chunk = []
    if chunk:
        yield chunk
