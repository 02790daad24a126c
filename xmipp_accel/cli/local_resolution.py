"""Local resolution map from two half maps (local FSC, on the GPU where there is one).

For every voxel, the FSC of the half maps inside a soft window is followed band by band; the window
of each band spans ``--periods`` wavelengths of it (8 × the resolution tested, in Å), and the local
resolution is where the FSC falls below the band's threshold: 0.143, or 3σ of the FSC of noise in
such a window where that is higher. Solvent (outside ``--mask``, or outside a soft mask made from
the average map) reports no resolution. Writes the resolution map in Å (0 outside the mask), and
optionally the slices + histogram plot and a ChimeraX script that colours the map surface by local
resolution. Design: :mod:`xmipp_accel.gpu.resolution.local`.

Example usage::

    xmipp-accel local-resolution half1.mrc half2.mrc -o locres.mrc --mask mask.mrc
    xmipp-accel local-resolution half1.mrc half2.mrc -o locres.mrc --plot locres.png \\
        --chimerax locres.cxc --json
    chimerax locres.cxc
"""
from __future__ import annotations

import argparse
import logging
import os

from ..errors import InputError
from .. import backend
from .common import add_common_args, emit_result, progress, resolve_devices, stopwatch
from .fsc import read_half_maps
from ..gpu.resolution.local import DEFAULT_PERIODS, DEFAULT_WINDOW_MIN_PX, FSC_THRESHOLD

logger = logging.getLogger("xmipp_accel")


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("half1", type=os.path.abspath, help="first half map (MRC), unmasked")
    parser.add_argument("half2", type=os.path.abspath, help="second half map (MRC), same box and voxel size")
    parser.add_argument("-o", "--output", type=os.path.abspath, required=True,
                        help="local resolution map to write (MRC, values in Å, 0 outside the mask)")
    g = parser.add_argument_group("local resolution options")
    g.add_argument("--mask", type=os.path.abspath, default=None,
                   help="mask (MRC): the resolution is reported where mask > 0.5 (default: a soft mask made from "
                        "the average of the half maps, see --no-auto-mask)")
    g.add_argument("--no-auto-mask", action="store_true",
                   help="without --mask, report the whole box instead of masking the solvent out")
    g.add_argument("--periods", type=float, default=DEFAULT_PERIODS,
                   help="window size in wavelengths of the resolution tested: at d Å the window is periods × d Å "
                        "(Gaussian footprint σ = window/4); larger is less noisy but less local "
                        "(default: %(default)s)")
    g.add_argument("--window-min", type=float, default=DEFAULT_WINDOW_MIN_PX,
                   help="smallest window, px (default: %(default)s)")
    g.add_argument("--window-max", type=float, default=None,
                   help="largest window, px; also sets the worst resolution measured, window-max / 2 px "
                        "(default: half the box)")
    g.add_argument("--threshold", type=float, default=FSC_THRESHOLD,
                   help="local FSC threshold; each band uses the larger of this and 3σ of the FSC of noise in its "
                        "window (default: %(default)s)")
    g.add_argument("--pixel-size", type=float, default=None,
                   help="voxel size in Å (default: from the MRC headers, which must agree)")
    o = parser.add_argument_group("outputs")
    o.add_argument("--plot", type=os.path.abspath, default=None,
                   help="PNG with orthogonal slices coloured by resolution and the histogram")
    o.add_argument("--chimerax", type=os.path.abspath, default=None,
                   help="ChimeraX script (.cxc) colouring the map surface by local resolution")
    o.add_argument("--map", type=os.path.abspath, default=None,
                   help="map whose surface the ChimeraX script colours (default: the average of the half maps, "
                        "written beside the output as <output>_halves_average.mrc)")
    add_common_args(parser)


def _average_map_name(output: str) -> str:
    """Where the average of the half maps goes when the ChimeraX script needs a surface map."""
    return os.path.splitext(output)[0] + "_halves_average.mrc"


def main(args: argparse.Namespace) -> int:
    from ..gpu.resolution.local import local_resolution
    from ..io.atomic import check_outputs
    from ..io.mrc import mrc_info, write_mrc

    if not args.output.lower().endswith((".mrc", ".map")):
        raise InputError(f"-o {args.output}: the local resolution map is written as MRC; give a .mrc name")
    check_outputs([p for p in (args.output, args.plot, args.chimerax,
                               args.chimerax and not args.map and _average_map_name(args.output)) if p])
    h1, h2, m, pixel = read_half_maps(args.half1, args.half2, args.mask, args.pixel_size)
    device = resolve_devices(args)[0]
    logger.info("local resolution of %s and %s (%s px, %.4f Å/px, window %g periods) on %s",
                os.path.basename(args.half1), os.path.basename(args.half2), h1.shape[-1], pixel, args.periods,
                device.describe())
    bar = {"bar": None}

    def on_band(done: int, total: int) -> None:
        if bar["bar"] is None:
            bar["bar"] = progress(total=total, desc="frequency bands", args=args, unit="band")
        bar["bar"].update(1)

    try:
        with backend.on_device(device), stopwatch() as timer:
            xp = device.xp
            mask = xp.asarray(m) if m is not None else None
            result = local_resolution(xp.asarray(h1), xp.asarray(h2), pixel_size_A=pixel, mask=mask,
                                      auto_mask=not args.no_auto_mask, periods=args.periods,
                                      window_min_px=args.window_min, window_max_px=args.window_max,
                                      threshold=args.threshold, progress=on_band)
            locres = backend.to_host(result.resolution_A)
            shown = backend.to_host(result.mask) if result.mask is not None else None
    finally:
        if bar["bar"] is not None:
            bar["bar"].close()
    origin = mrc_info(args.half1).origin_A   # keep the half maps' placement: ChimeraX overlays the maps
    write_mrc(args.output, locres, pixel, origin_A=origin)
    stats = result.summary()
    outputs = {"locres": args.output}
    if args.plot:
        from ..plots import plot_local_resolution
        plot_local_resolution(locres, args.plot, mask=shown, background=0.5 * (h1 + h2),
                              title=f"local resolution (window {args.periods:g} periods)")
        outputs["plot"] = args.plot
    if args.chimerax:
        from ..plots import chimerax_local_resolution_script
        surface_map = args.map
        if surface_map is None:
            surface_map = _average_map_name(args.output)
            write_mrc(surface_map, 0.5 * (h1 + h2), pixel, origin_A=origin)
            outputs["average"] = surface_map
        chimerax_local_resolution_script(surface_map, args.output, args.chimerax,
                                         vmin=stats.get("p5_A"), vmax=stats.get("p95_A"))
        outputs["chimerax"] = args.chimerax
    lines = [f"local resolution: median {stats['median_A']:.2f} Å, 25-75% {stats['p25_A']:.2f}-{stats['p75_A']:.2f} Å, "
             f"5-95% {stats['p5_A']:.2f}-{stats['p95_A']:.2f} Å over {stats['n_voxels']} voxels",
             f"measurable range: {result.best_measurable_A:.2f}-{result.worst_measurable_A:.2f} Å "
             f"({result.band_frequencies.size} bands, windows {result.window_px.min():.0f}-"
             f"{result.window_px.max():.0f} px, thresholds {result.thresholds.min():.3f}-"
             f"{result.thresholds.max():.3f})",
             "mask: " + ("given" if m is not None else "made from the average map (solvent excluded)"
                         if result.auto_mask else "none (the whole box)")]
    lines += [f"{kind}: {path}" for kind, path in outputs.items()]
    lines.append(f"computed in {timer['seconds']:.2f} s on {device.kind}")
    summary = {**stats, "pixel_size_A": pixel, "box": int(h1.shape[-1]), "periods": args.periods,
               "window_px_range": [float(result.window_px.min()), float(result.window_px.max())],
               "threshold": args.threshold, "band_thresholds_range": [float(result.thresholds.min()),
                                                                      float(result.thresholds.max())],
               "masked": m is not None, "auto_mask": result.auto_mask,
               "n_bands": int(result.band_frequencies.size),
               "device": device.kind, "seconds": round(timer["seconds"], 3), "outputs": outputs}
    emit_result(args, summary, lines)
    return 0
