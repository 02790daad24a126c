"""Fourier shell correlation of two half maps: resolution at 0.143, 0.5, half-bit and 3σ.

With ``--mask`` the FSC of the masked halves is corrected for the mask by phase randomisation
(RELION post-processing); the unmasked, masked, phase-randomised and corrected curves are all
written to the STAR file and the plot. Writes a RELION-style STAR table (``-o``), the EMDB FSC
XML (``--xml``) and a PNG plot (``--plot``).

Example usage::

    xmipp-accel fsc run_half1_class001_unfil.mrc run_half2_class001_unfil.mrc
    xmipp-accel fsc half1.mrc half2.mrc --mask mask.mrc -o fsc.star --xml fsc.xml --plot fsc.png
    xmipp-accel fsc half1.mrc half2.mrc --pixel-size 1.06 --sym d7 --json
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import warnings
from typing import Dict, Optional, Tuple

import numpy as np

from ..errors import InputError
from .. import backend
from .common import add_common_args, emit_result, resolve_devices, stopwatch

logger = logging.getLogger("xmipp_accel")

#: Criteria reported, in order (name used in JSON keys, threshold spec).
REPORTED = (("0.143", 0.143), ("0.5", 0.5), ("half-bit", "half-bit"), ("3sigma", "3sigma"))
#: Relative difference of voxel sizes tolerated between half maps (and mask).
VOXEL_SIZE_TOLERANCE = 1e-3


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("half1", type=os.path.abspath, help="first half map (MRC)")
    parser.add_argument("half2", type=os.path.abspath, help="second half map (MRC), same box and voxel size")
    g = parser.add_argument_group("FSC options")
    g.add_argument("--mask", type=os.path.abspath, default=None,
                   help="soft mask (MRC, values in [0, 1]); the masked FSC is corrected by phase randomisation")
    g.add_argument("--pixel-size", type=float, default=None,
                   help="voxel size in Å (default: from the MRC headers, which must agree)")
    g.add_argument("--sym", default="c1",
                   help="point-group symmetry (c1, cN, dN, t, o, i): divides the voxel counts of the "
                        "half-bit and 3σ criteria (default: %(default)s)")
    g.add_argument("--randomise-below", type=float, default=0.8,
                   help="with --mask: randomise phases beyond the shell where the unmasked FSC drops below "
                        "this (RELION: %(default)s)")
    g.add_argument("--seed", type=int, default=0, help="seed of the random phases (default: %(default)s)")
    o = parser.add_argument_group("outputs")
    o.add_argument("-o", "--output", type=os.path.abspath, default=None,
                   help="STAR file with the FSC table (RELION post-processing columns)")
    o.add_argument("--xml", type=os.path.abspath, default=None, help="FSC curve as EMDB FSC XML")
    o.add_argument("--plot", type=os.path.abspath, default=None, help="FSC plot (PNG; .svg/.pdf also work)")
    add_common_args(parser)


# ------------------------------------------------------------------------------------------ inputs
def read_half_maps(half1: str, half2: str, mask: Optional[str], pixel_size_A: Optional[float]
                   ) -> Tuple[np.ndarray, np.ndarray, Optional[np.ndarray], float]:
    """Read two half maps (and a mask), check sizes and voxel sizes, and settle the pixel size.

    Returns
    -------
    half1, half2 : (z, y, x) float32
    mask : (z, y, x) float32 or None
    pixel_size_A : float
        ``pixel_size_A`` when given, else the headers' common voxel size.

    Raises
    ------
    InputError
        Different boxes or voxel sizes, a 2-D file, no voxel size anywhere, a mask of another box.
    """
    from ..io.mrc import read_mrc

    h1, v1 = read_mrc(half1)
    h2, v2 = read_mrc(half2)
    for path, data in ((half1, h1), (half2, h2)):
        if data.ndim != 3:
            raise InputError(f"{path} is not a 3-D map (shape {data.shape}): give half maps (volumes)")
    if h1.shape != h2.shape:
        raise InputError(f"the half maps have different boxes: {half1} is {_box(h1)} and {half2} is {_box(h2)}; "
                         "resample one (e.g. relion_image_handler --rescale_angpix --new_box) so they match")
    if v1 and v2 and abs(v1 - v2) > VOXEL_SIZE_TOLERANCE * max(v1, v2):
        raise InputError(f"the half maps have different voxel sizes: {half1} has {v1:.4f} Å and {half2} has "
                         f"{v2:.4f} Å; they must come from the same reconstruction")
    header = v1 or v2
    if pixel_size_A is not None:
        if pixel_size_A <= 0 or not math.isfinite(pixel_size_A):
            raise InputError(f"--pixel-size must be a positive number of Å, got {pixel_size_A}")
        if header and abs(header - pixel_size_A) > 0.01 * header:
            logger.warning("--pixel-size %.4f Å differs from the header voxel size %.4f Å: using %.4f Å",
                           pixel_size_A, header, pixel_size_A)
        pixel = float(pixel_size_A)
    elif header:
        pixel = float(header)
    else:
        raise InputError(f"neither {half1} nor {half2} records a voxel size in its header: give --pixel-size")
    m = None
    if mask is not None:
        m, vm = read_mrc(mask)
        if m.shape != h1.shape:
            raise InputError(f"the mask {mask} has box {_box(m)} but the half maps {_box(h1)}: "
                             "give a mask made on the same box")
        if vm and abs(vm - pixel) > 0.01 * pixel:
            raise InputError(f"the mask {mask} has voxel size {vm:.4f} Å but the half maps {pixel:.4f} Å: "
                             "give a mask made for these maps")
        if not float(m.max()) > 0:
            raise InputError(f"the mask {mask} is empty (no voxel > 0): check the file or the threshold used")
    return h1, h2, m, pixel


def _box(a: np.ndarray) -> str:
    return "×".join(str(s) for s in a.shape[::-1])


def symmetry_order(sym: str) -> int:
    """Order of a point group name (c1, cN, dN, t, o, i...)."""
    try:
        from ..em.symmetry import symmetry_order as order
    except ImportError:  # pragma: no cover - em.symmetry is part of the package
        order = None
    if order is not None:
        return int(order(sym))
    s = sym.strip().lower()
    if s[:1] == "c" and s[1:].isdigit():
        return int(s[1:])
    if s[:1] == "d" and s[1:].isdigit():
        return 2 * int(s[1:])
    table = {"t": 12, "o": 24, "i": 60}
    if s[:1] in table:
        return table[s[:1]]
    raise InputError(f"unknown symmetry {sym!r}: use c1, cN, dN, t, o or i")


# ------------------------------------------------------------------------------------------ outputs
def _finite_or_none(x: float) -> Optional[float]:
    return float(x) if x is not None and math.isfinite(x) else None


def write_fsc_star(path: str, result, pixel_size_A: float, *, half1: str = "", half2: str = "",
                   mask: Optional[str] = None, resolutions: Optional[Dict[str, float]] = None) -> None:
    """Write an FSC as a RELION post-processing-like STAR file (atomic).

    Parameters
    ----------
    path : str
        Output ``.star``.
    result : FSCResult or MaskedFSC
        The curve(s); a MaskedFSC adds the unmasked, masked and phase-randomised columns.
    pixel_size_A : float
        Voxel size (Å).
    half1, half2, mask : str
        Input names recorded in ``data_general``.
    resolutions : dict, optional
        Criterion name -> resolution (Å) recorded in ``data_general`` (0.143 as rlnFinalResolution).

    Notes
    -----
    ``data_fsc`` columns: rlnSpectralIndex, rlnResolution (1/Å), rlnAngstromResolution (Å; 999 at
    DC as RELION writes), rlnFourierShellCorrelation (the reported curve: corrected when masked),
    rlnFourierShellCorrelationCorrected, rlnFourierShellCorrelationUnmaskedMaps and, with a mask,
    rlnFourierShellCorrelationMaskedMaps and rlnCorrectedFourierShellCorrelationPhaseRandomizedMaskedMaps.
    """
    from ..gpu.resolution.fsc import MaskedFSC
    from ..io.star import Table, write_star

    masked = isinstance(result, MaskedFSC)
    main = result.corrected if masked else result
    freq = main.frequency_A(pixel_size_A)
    with np.errstate(divide="ignore"):
        angstrom = np.where(freq > 0, 1.0 / np.where(freq > 0, freq, 1.0), 999.0)
    cols = {"rlnSpectralIndex": main.shell.astype(np.int64), "rlnResolution": freq, "rlnAngstromResolution": angstrom,
            "rlnFourierShellCorrelation": main.fsc, "rlnFourierShellCorrelationCorrected": main.fsc,
            "rlnFourierShellCorrelationUnmaskedMaps": (result.unmasked if masked else result).fsc}
    if masked:
        cols["rlnFourierShellCorrelationMaskedMaps"] = result.masked.fsc
        cols["rlnCorrectedFourierShellCorrelationPhaseRandomizedMaskedMaps"] = result.phase_randomised.fsc
    resolutions = resolutions or {}
    general = {"rlnFinalResolution": _finite_or_none(resolutions.get("0.143")) or 999.0,
               "rlnUnfilteredMapHalf1": half1 or "None", "rlnUnfilteredMapHalf2": half2 or "None"}
    if masked:
        general["rlnMaskName"] = mask or "None"
        ran = result.randomise_from_A(pixel_size_A)
        general["rlnRandomiseFrom"] = ran if ran is not None else 999.0
    write_star(path, {"general": Table(general, loop=False), "fsc": Table(cols)})


def write_fsc_xml(path: str, frequency_1_per_A: np.ndarray, fsc_values: np.ndarray, *, title: str = "FSC") -> None:
    """Write an FSC curve in the EMDB FSC XML format (atomic).

    ``<fsc title=.. xaxis="Resolution (A-1)" yaxis="Correlation Coefficient">`` with one
    ``<coordinate><x>1/Å</x><y>FSC</y></coordinate>`` per shell.
    """
    from xml.sax.saxutils import quoteattr  # local: pulls in urllib.request (~15 ms of start-up)

    from ..io.atomic import atomic_write

    lines = [f'<fsc title={quoteattr(title)} xaxis="Resolution (A-1)" yaxis="Correlation Coefficient">']
    for x, y in zip(np.asarray(frequency_1_per_A, float), np.asarray(fsc_values, float)):
        lines += ["  <coordinate>", f"    <x>{x:.6f}</x>", f"    <y>{y:.6f}</y>", "  </coordinate>"]
    lines.append("</fsc>")
    with atomic_write(path) as tmp:
        with open(tmp, "w") as fh:
            fh.write("\n".join(lines) + "\n")


# ---------------------------------------------------------------------------------------------- main
def resolutions_of(result, pixel_size_A: float, sym_order: int = 1) -> Tuple[Dict[str, float], Dict[str, str]]:
    """Resolution (Å) per reported criterion and the warnings raised, by criterion."""
    from ..gpu.resolution.fsc import resolution_at

    out, notes = {}, {}
    for name, spec in REPORTED:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out[name] = resolution_at(result, spec, pixel_size_A, symmetry_order=sym_order)
        if caught:
            notes[name] = str(caught[-1].message)
    return out, notes


def main(args: argparse.Namespace) -> int:
    from ..gpu.resolution.fsc import fsc, masked_fsc_corrected, resolution_at
    from ..io.atomic import check_outputs

    sym_order = symmetry_order(args.sym)
    check_outputs([p for p in (args.output, args.xml, args.plot) if p])   # before any work
    h1, h2, m, pixel = read_half_maps(args.half1, args.half2, args.mask, args.pixel_size)
    device = resolve_devices(args)[0]
    logger.info("FSC of %s and %s (%s, %.4f Å/px) on %s", os.path.basename(args.half1), os.path.basename(args.half2),
                _box(h1), pixel, device.describe())
    with backend.on_device(device), stopwatch() as timer:
        xp = device.xp
        g1, g2 = xp.asarray(h1), xp.asarray(h2)
        if m is None:
            result = fsc(g1, g2)
            curve = result
        else:
            result = masked_fsc_corrected(g1, g2, xp.asarray(m), seed=args.seed,
                                          randomise_below=args.randomise_below)
            curve = result.corrected
        backend.synchronize(xp)
    res, notes = resolutions_of(curve, pixel, sym_order)
    identical = curve.is_identical or (m is not None and result.unmasked.is_identical)

    lines = []
    if identical:
        lines.append("warning: the half maps are identical (FSC = 1 at all frequencies): they are not independent "
                     "halves, so the FSC says nothing about the resolution; reported at Nyquist")
    label = "corrected FSC" if m is not None else "FSC"
    for name, _ in REPORTED:
        value = res[name]
        shown = f"{value:.2f} Å" if math.isfinite(value) else "undefined (never above the threshold)"
        extra = " (Nyquist: the FSC stays above the threshold)" if name in notes and "Nyquist" in notes[name] else ""
        crit = "FSC=0.143" if name == "0.143" else ("FSC=0.5" if name == "0.5" else name)
        lines.append(f"resolution ({crit}): {shown}{extra}" + (f" [{label}]" if name == "0.143" and m is not None
                                                                else ""))
    outputs = {}
    if args.output:
        write_fsc_star(args.output, result, pixel, half1=args.half1, half2=args.half2, mask=args.mask,
                       resolutions=res)
        outputs["star"] = args.output
    if args.xml:
        write_fsc_xml(args.xml, curve.frequency_A(pixel), curve.fsc,
                      title=f"FSC of {os.path.basename(args.half1)} and {os.path.basename(args.half2)}")
        outputs["xml"] = args.xml
    if args.plot:
        from ..plots import plot_fsc
        curves = ({"corrected": result.corrected, "unmasked": result.unmasked, "masked": result.masked,
                   "phase randomised": result.phase_randomised} if m is not None else {"FSC": result})
        plot_fsc(curves, args.plot, thresholds=(0.143, 0.5), pixel_size_A=pixel,
                 title=f"{os.path.basename(args.half1)} vs {os.path.basename(args.half2)}")
        outputs["plot"] = args.plot
    for kind, path in outputs.items():
        lines.append(f"{kind}: {path}")
    lines.append(f"computed in {timer['seconds']:.3f} s on {device.kind}")
    summary = {"resolution_A": _finite_or_none(res["0.143"]),
               **{f"resolution_A_{k}": _finite_or_none(v) for k, v in res.items()},
               "pixel_size_A": pixel, "box": int(h1.shape[-1]), "symmetry": args.sym, "masked": m is not None,
               "identical_halves": bool(identical), "device": device.kind, "seconds": round(timer["seconds"], 4),
               "curve": {"frequency_1_per_A": curve.frequency_A(pixel).round(6).tolist(),
                         "fsc": curve.fsc.round(6).tolist(), "n_voxels": curve.n_voxels.astype(int).tolist()},
               "outputs": outputs, "notes": notes}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # RELION's rule (last shell above 0.143, no interpolation): relion_postprocess's rlnFinalResolution
        summary["resolution_A_relion_rule"] = _finite_or_none(
            resolution_at(curve, 0.143, pixel, interpolate=False))
    if m is not None:
        summary["randomise_from_A"] = result.randomise_from_A(pixel)
        unmasked_res = resolutions_of(result.unmasked, pixel, sym_order)[0]["0.143"]
        summary["resolution_A_unmasked"] = _finite_or_none(unmasked_res)
    emit_result(args, summary, lines)
    return 0
