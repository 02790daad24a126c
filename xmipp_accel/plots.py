"""Resolution plots shared by the command line (``--plot``) and the Scipion viewers.

- :func:`draw_fsc` / :func:`plot_fsc`: FSC curves against spatial frequency (1/Å) with Å on a
  secondary axis, threshold lines and the resolution of each curve annotated; several curves
  overlaid for comparison.
- :func:`draw_local_resolution` / :func:`plot_local_resolution`: three orthogonal central
  slices coloured by local resolution with a colour bar, and the histogram inside the mask.
- :func:`chimerax_local_resolution_script`: a ChimeraX ``.cxc`` that colours the map's surface
  by the local resolution with the same colour scale.

The ``draw_*`` functions draw on a matplotlib Figure/Axes that a Scipion viewer embeds; the
``plot_*`` functions create a Figure on the Agg canvas (no pyplot, no display, thread-safe) and
write it atomically.
"""
from __future__ import annotations

import os
import warnings
from typing import List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from . import backend
from .gpu.resolution.fsc import FSCResult, crossing_frequency, threshold_curve
from .io.atomic import atomic_write

__all__ = ["draw_fsc", "plot_fsc", "draw_local_resolution", "plot_local_resolution",
           "chimerax_local_resolution_script", "resolution_colormap_stops"]

#: Colour map of resolution (low Å = best = blue, high Å = red), as ResMap and ChimeraX users expect.
DEFAULT_CMAP = "turbo"
_ANGSTROM_TICKS = (100, 50, 30, 20, 15, 12, 10, 8, 7, 6, 5, 4.5, 4, 3.5, 3, 2.7, 2.5, 2.3, 2.1, 2, 1.8, 1.6,
                   1.5, 1.4, 1.3, 1.2, 1.1, 1.0)

Curve = Tuple[str, np.ndarray, np.ndarray, Optional[np.ndarray]]


# ------------------------------------------------------------------------------------------------ FSC
def _normalise_curves(curves, pixel_size_A: Optional[float]) -> List[Curve]:
    """Turn the accepted curve forms into (label, frequency 1/Å, fsc, n_voxels or None)."""
    if isinstance(curves, (FSCResult, tuple)):
        curves = [curves]
    items: list = []
    if isinstance(curves, Mapping):
        items = [(str(k), v) for k, v in curves.items()]
    else:
        for i, c in enumerate(curves):
            if isinstance(c, FSCResult):
                items.append((f"FSC {i + 1}" if len(curves) > 1 else "FSC", c))
            elif isinstance(c, tuple) and len(c) in (3, 4) and isinstance(c[0], str):
                items.append((c[0], c[1:]))
            elif isinstance(c, tuple) and len(c) == 2 and isinstance(c[0], str):
                items.append((c[0], c[1]))
            else:
                raise ValueError("each FSC curve must be an FSCResult, (label, FSCResult) or "
                                 "(label, frequency_1_per_A, fsc[, n_voxels])")
    out: List[Curve] = []
    for label, v in items:
        if isinstance(v, FSCResult):
            if not pixel_size_A:
                raise ValueError("plot_fsc needs pixel_size_A to put an FSCResult on a 1/Å axis")
            out.append((label, v.frequency_A(pixel_size_A), np.asarray(v.fsc, float), np.asarray(v.n_voxels, float)))
        else:
            freq, values = np.asarray(v[0], float), np.asarray(v[1], float)
            nvox = np.asarray(v[2], float) if len(v) > 2 and v[2] is not None else None
            if freq.shape != values.shape:
                raise ValueError(f"curve {label!r}: frequency and FSC have different lengths "
                                 f"({freq.size} and {values.size})")
            out.append((label, freq, values, nvox))
    if not out:
        raise ValueError("no FSC curve to plot")
    return out


def _threshold_values(threshold, freq, nvox) -> Tuple[Optional[np.ndarray], str]:
    """Per-shell threshold values and a label; None when a size-dependent one lacks voxel counts."""
    if isinstance(threshold, str) and threshold.strip().lower() not in ("0.143", "0.5"):
        if nvox is None:
            return None, threshold
        dummy = FSCResult(freq, np.zeros_like(freq), nvox, int(2 * (freq.size - 1)))
        return threshold_curve(dummy, threshold), threshold
    value = float(threshold)
    return np.full(freq.shape, value), f"{value:g}"


def draw_fsc(ax, curves, *, thresholds: Sequence[Union[float, str]] = (0.143,), pixel_size_A: Optional[float] = None,
             title: str = "", annotate: bool = True) -> List[dict]:
    """Draw FSC curves on a matplotlib Axes; returns the resolution of each curve per threshold.

    Parameters
    ----------
    ax : matplotlib Axes
    curves : FSCResult, (label, FSCResult), (label, frequency_1_per_A, fsc[, n_voxels]), a list of
        those, or a mapping label -> FSCResult or (frequency_1_per_A, fsc[, n_voxels])
        Frequencies in 1/Å (an FSCResult is converted with ``pixel_size_A``).
    thresholds : sequence of float or str
        Horizontal lines (numbers) or size-dependent curves (``"half-bit"``, ``"3sigma"``; drawn
        per curve when voxel counts are known). The first threshold is annotated.
    pixel_size_A : float, optional
        Needed for FSCResult inputs.
    title : str
    annotate : bool
        Mark each curve's crossing of the first threshold with its resolution in Å.

    Returns
    -------
    list of dict
        ``{"label", "threshold", "resolution_A", "status"}`` per curve and threshold.
    """
    data = _normalise_curves(curves, pixel_size_A)
    colors = [c["color"] for c in _prop_cycle()]
    results = []
    fmax = max(float(np.nanmax(f)) for _, f, _, _ in data) or 0.5
    const_drawn = set()
    for i, (label, freq, values, nvox) in enumerate(data):
        color = colors[i % len(colors)]
        summary = []
        for j, thr in enumerate(thresholds):
            tv, tlabel = _threshold_values(thr, freq, nvox)
            if tv is None:
                warnings.warn(f"threshold {thr!r} needs voxel counts per shell: not drawn for {label!r}")
                continue
            if np.all(tv == tv[0]):
                if tlabel not in const_drawn:
                    ax.axhline(tv[0], color="0.35", ls="--", lw=0.9, zorder=1)
                    ax.annotate(f"FSC = {tlabel}", (fmax, tv[0]), xytext=(-4, 3), textcoords="offset points",
                                ha="right", va="bottom", fontsize=8, color="0.35")
                    const_drawn.add(tlabel)
            else:
                ax.plot(freq[1:], tv[1:], ls=":", lw=1.0, color=color, alpha=0.8,
                        label=None if tlabel in const_drawn else f"{tlabel} threshold (dotted)")
                const_drawn.add(tlabel)
            f_cross, status = crossing_frequency(freq, values, tv)
            res = float("inf") if status == "never_above" else (1.0 / f_cross if f_cross > 0 else float("inf"))
            results.append({"label": label, "threshold": tlabel, "resolution_A": res, "status": status})
            shown = "n/a" if status == "never_above" else f"{res:.2f} Å"
            summary.append(f"{tlabel}: {shown}" + (" (Nyquist)" if status == "above_to_nyquist" else ""))
            if annotate and j == 0 and status != "never_above":
                y = float(np.interp(f_cross, freq, tv))
                ax.plot([f_cross], [y], "o", color=color, ms=5, zorder=4)
                ax.annotate(f"{res:.2f} Å", (f_cross, y), xytext=(5, 8 + 11 * i), textcoords="offset points",
                            fontsize=8, color=color, fontweight="bold")
        text = f"{label}" + (f" ({', '.join(summary)})" if summary else "")
        ax.plot(freq, values, "-", lw=1.6, color=color, label=text, zorder=3)
    ax.set_xlim(0.0, fmax)
    ymin = min(-0.05, max(-0.3, min(float(np.nanmin(v)) for _, _, v, _ in data)))
    ax.set_ylim(ymin, 1.05)
    ax.axhline(0.0, color="0.75", lw=0.6, zorder=0)
    ax.set_xlabel("spatial frequency (1/Å)")
    ax.set_ylabel("Fourier shell correlation")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize=7.5, framealpha=0.85)
    _angstrom_axis(ax, fmax)
    if title:
        ax.set_title(title, pad=22)
    return results


def _prop_cycle():
    import matplotlib as mpl
    return list(mpl.rcParams["axes.prop_cycle"])


def _angstrom_axis(ax, fmax: float) -> None:
    """A secondary x axis on top labelled in Å at 1/Å positions of nice resolutions."""
    top = ax.twiny()
    top.set_xlim(ax.get_xlim())
    ticks = [a for a in _ANGSTROM_TICKS if 1.0 / a <= fmax * 1.0001]
    # keep ticks at least 4% of the axis apart
    kept: list = []
    for a in ticks:
        if all(abs(1.0 / a - 1.0 / b) > 0.04 * fmax for b in kept):
            kept.append(a)
    top.set_xticks([1.0 / a for a in kept])
    top.set_xticklabels([f"{a:g}" for a in kept], fontsize=8)
    top.set_xlabel("resolution (Å)", fontsize=9)


def plot_fsc(curves, path: str, thresholds: Sequence[Union[float, str]] = (0.143,), *,
             pixel_size_A: Optional[float] = None, title: str = "", dpi: int = 100,
             figsize: Tuple[float, float] = (7.0, 4.8)) -> List[dict]:
    """Write an FSC plot (PNG, SVG or PDF by the extension of ``path``) atomically.

    Parameters and returns as :func:`draw_fsc`.
    """
    fig = _figure(figsize)
    results = draw_fsc(fig.add_subplot(111), curves, thresholds=thresholds, pixel_size_A=pixel_size_A, title=title)
    fig.tight_layout()
    _save(fig, path, dpi)
    return results


# --------------------------------------------------------------------------------------- local resolution
def _local_values(locres: np.ndarray, mask: Optional[np.ndarray]) -> Tuple[np.ndarray, np.ndarray]:
    inside = (mask > 0.5) if mask is not None else (locres > 0)
    if mask is not None and inside.shape != locres.shape:
        raise ValueError(f"mask shape {inside.shape} differs from the local resolution map {locres.shape}")
    inside = inside & np.isfinite(locres) & (locres > 0)
    return inside, locres[inside]


def _slice_centre(inside: np.ndarray) -> Tuple[int, int, int]:
    if not inside.any():
        return tuple(s // 2 for s in inside.shape)
    idx = np.nonzero(inside)
    return tuple(int(round(float(np.mean(i)))) for i in idx)


def draw_local_resolution(fig, locres, *, mask=None, background=None, vmin: Optional[float] = None,
                          vmax: Optional[float] = None, cmap: str = DEFAULT_CMAP, bins: int = 40,
                          title: str = "") -> dict:
    """Draw three orthogonal slices coloured by resolution, a colour bar and the histogram on a Figure.

    Parameters
    ----------
    fig : matplotlib Figure
    locres : (z, y, x) array (NumPy or CuPy)
        Local resolution in Å (0 or NaN where not measured).
    mask : (z, y, x) array, optional
        Voxels > 0.5 are shown; default: voxels with resolution > 0.
    background : (z, y, x) array, optional
        A map drawn in grey under the colours (e.g. the average of the half maps).
    vmin, vmax : float, optional
        Colour range in Å; default the 2nd and 98th percentiles inside the mask.
    cmap : str
        Matplotlib colour map (low Å first).
    bins : int
        Histogram bins.
    title : str

    Returns
    -------
    dict
        ``median_A``, ``vmin_A``, ``vmax_A``, ``n_voxels`` and the slice centre (z, y, x).
    """
    import matplotlib as mpl

    vol = backend.to_host(locres).astype(np.float32, copy=False)
    if vol.ndim != 3:
        raise ValueError(f"the local resolution map must be 3-D, got shape {vol.shape}")
    m = backend.to_host(mask) if mask is not None else None
    inside, values = _local_values(vol, m)
    if values.size == 0:
        raise ValueError("no voxel with a local resolution inside the mask: nothing to plot")
    lo, hi = np.percentile(values, [2, 98])
    vmin = float(lo) if vmin is None else float(vmin)
    vmax = float(hi) if vmax is None else float(vmax)
    if vmax <= vmin:
        vmax = vmin + max(0.1, 0.05 * vmin)
    centre = _slice_centre(inside)
    colormap = mpl.colormaps[cmap] if hasattr(mpl, "colormaps") else mpl.cm.get_cmap(cmap)
    norm = mpl.colors.Normalize(vmin=vmin, vmax=vmax)
    bg = backend.to_host(background).astype(np.float32, copy=False) if background is not None else None

    grid = fig.add_gridspec(2, 3, height_ratios=(1.0, 0.8))
    planes = (("z", lambda a: a[centre[0]], "x", "y"), ("y", lambda a: a[:, centre[1]], "x", "z"),
              ("x", lambda a: a[:, :, centre[2]], "y", "z"))
    image = None
    for col, (axis_name, cut, xlab, ylab) in enumerate(planes):
        ax = fig.add_subplot(grid[0, col])
        if bg is not None:
            b = cut(bg)
            ax.imshow(b, cmap="gray", origin="lower", interpolation="nearest")
        shown = np.ma.masked_where(~cut(inside), cut(vol))
        image = ax.imshow(shown, cmap=colormap, norm=norm, origin="lower", interpolation="nearest",
                          alpha=0.85 if bg is not None else 1.0)
        ax.set_title(f"{axis_name} = {centre['zyx'.index(axis_name)]}", fontsize=9)
        ax.set_xlabel(xlab, fontsize=8)
        ax.set_ylabel(ylab, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.set_facecolor("0.85")
    fig.colorbar(image, ax=[fig.axes[-3], fig.axes[-2], fig.axes[-1]], label="resolution (Å)", shrink=0.9)

    hax = fig.add_subplot(grid[1, :])
    edges = np.linspace(min(vmin, float(values.min())), max(vmax, float(values.max())), bins + 1)
    counts, edges = np.histogram(values, bins=edges)
    centres = 0.5 * (edges[:-1] + edges[1:])
    hax.bar(centres, counts, width=np.diff(edges), color=colormap(norm(centres)), edgecolor="0.3", linewidth=0.3)
    median = float(np.median(values))
    hax.axvline(median, color="k", ls="--", lw=1)
    hax.annotate(f"median {median:.2f} Å", (median, counts.max() if counts.size else 1), xytext=(5, -12),
                 textcoords="offset points", fontsize=8)
    hax.set_xlabel("local resolution (Å)")
    hax.set_ylabel("voxels")
    hax.grid(True, alpha=0.3)
    if title:
        fig.suptitle(title)
    return {"median_A": median, "vmin_A": vmin, "vmax_A": vmax, "n_voxels": int(values.size),
            "slice_centre_zyx": centre}


def plot_local_resolution(locres, path: str, mask=None, *, background=None, vmin: Optional[float] = None,
                          vmax: Optional[float] = None, cmap: str = DEFAULT_CMAP, title: str = "", dpi: int = 100,
                          figsize: Tuple[float, float] = (10.0, 6.5)) -> dict:
    """Write the local-resolution figure (slices, colour bar, histogram) atomically.

    Parameters and returns as :func:`draw_local_resolution`; ``path`` is a PNG (or SVG/PDF) file.
    """
    fig = _figure(figsize)
    info = draw_local_resolution(fig, locres, mask=mask, background=background, vmin=vmin, vmax=vmax, cmap=cmap,
                                 title=title)
    _save(fig, path, dpi)
    return info


# ---------------------------------------------------------------------------------------------- ChimeraX
def resolution_colormap_stops(vmin: float, vmax: float, n: int = 6, cmap: str = DEFAULT_CMAP
                              ) -> List[Tuple[float, str]]:
    """``n`` (resolution Å, "#rrggbb") stops from vmin to vmax of a matplotlib colour map."""
    import matplotlib as mpl
    colormap = mpl.colormaps[cmap] if hasattr(mpl, "colormaps") else mpl.cm.get_cmap(cmap)
    stops = []
    for t in np.linspace(0.0, 1.0, max(2, n)):
        r, g, b, _ = colormap(float(t))
        stops.append((float(vmin + t * (vmax - vmin)), f"#{int(r * 255):02x}{int(g * 255):02x}{int(b * 255):02x}"))
    return stops


def chimerax_local_resolution_script(map_path: str, locres_path: str, cxc_path: str, *,
                                     vmin: Optional[float] = None, vmax: Optional[float] = None,
                                     level: Optional[float] = None, voxel_size_A: Optional[float] = None,
                                     n_colors: int = 6, cmap: str = DEFAULT_CMAP) -> str:
    """Write a ChimeraX script that shows ``map_path`` as a surface coloured by ``locres_path``.

    Parameters
    ----------
    map_path : str
        Map whose surface is coloured (e.g. the sharpened or averaged map), same grid as the locres map.
    locres_path : str
        Local-resolution map (Å).
    cxc_path : str
        Script to write (atomically); paths inside are absolute.
    vmin, vmax : float, optional
        Colour range in Å; default the 2nd/98th percentiles of the positive voxels of ``locres_path``.
    level : float, optional
        Surface threshold of the map (ChimeraX's default when None).
    voxel_size_A : float, optional
        Set on both maps when given (for files whose header lacks it).
    n_colors : int
        Colour stops of the palette (same colour map as :func:`plot_local_resolution`).
    cmap : str
        Matplotlib colour map.

    Returns
    -------
    str
        ``cxc_path``. Open it with ``chimerax locres.cxc``.
    """
    if vmin is None or vmax is None:
        from .io.mrc import read_mrc
        data, _ = read_mrc(locres_path, mmap=True)
        values = np.asarray(data[data > 0], dtype=np.float32)
        if values.size == 0:
            raise ValueError(f"{locres_path} holds no positive resolution value")
        lo, hi = np.percentile(values, [2, 98])
        vmin = float(lo) if vmin is None else vmin
        vmax = float(hi) if vmax is None else vmax
    if vmax <= vmin:
        vmax = vmin + 0.1
    stops = resolution_colormap_stops(vmin, vmax, n_colors, cmap)
    palette = ":".join(f"{v:.2f},{c}" for v, c in stops)
    key = " ".join(f"{c}:{v:.1f}" for v, c in stops)
    lines = [
        "# ChimeraX script written by xmipp_accel: map surface coloured by local resolution (Å)",
        f"open {_quote(os.path.abspath(map_path))}",
        f"open {_quote(os.path.abspath(locres_path))}",
    ]
    if voxel_size_A:
        lines.append(f"volume #1,2 voxelSize {float(voxel_size_A):.4f}")
    lines.append("volume #2 hide")
    lines.append("volume #1 style surface" + (f" level {float(level):.6g}" if level is not None else ""))
    lines.append(f"color sample #1 map #2 palette {palette}")
    lines.append(f"key {key} pos 0.1,0.06 size 0.8,0.04")
    lines.append("view")
    with atomic_write(cxc_path) as tmp:
        with open(tmp, "w") as fh:
            fh.write("\n".join(lines) + "\n")
    return cxc_path


def _quote(path: str) -> str:
    return f'"{path}"' if any(ch.isspace() for ch in path) else path


# ------------------------------------------------------------------------------------------------ helpers
def _figure(figsize):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str, dpi: int) -> None:
    ext = os.path.splitext(path)[1].lstrip(".").lower() or "png"
    with atomic_write(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format=ext)


# --- movie alignment ---------------------------------------------------------------------------

def draw_movie_shifts(ax, xs: Sequence[float], ys: Sequence[float], *, pixel_size_A: Optional[float] = None,
                      title: str = "") -> None:
    """Draw a frame-shift trajectory on a matplotlib axis.

    Parameters
    ----------
    ax : matplotlib Axes
    xs, ys : per-frame global shifts in pixels of the movie (MotionCor2 sign), length n_frames.
    pixel_size_A : when given, the axes are in Å (shifts × pixel size).
    title : axis title.
    """
    scale = float(pixel_size_A) if pixel_size_A else 1.0
    unit = "Å" if pixel_size_A else "px"
    x = np.asarray(xs, dtype=np.float64) * scale
    y = np.asarray(ys, dtype=np.float64) * scale
    ax.plot(x, y, "-", color="0.6", lw=1, zorder=1)
    points = ax.scatter(x, y, c=np.arange(1, x.size + 1), cmap="viridis", s=18, zorder=2)
    if x.size:
        ax.annotate("1", (x[0], y[0]), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.annotate(str(x.size), (x[-1], y[-1]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.figure.colorbar(points, ax=ax, label="frame")
    total = float(np.sum(np.hypot(np.diff(x), np.diff(y)))) if x.size > 1 else 0.0
    ax.set_title(f"{title}  (total drift {total:.1f} {unit})".strip())
    ax.set_xlabel(f"shift x ({unit})")
    ax.set_ylabel(f"shift y ({unit})")
    ax.set_aspect("equal", adjustable="datalim")
    ax.grid(True, alpha=0.3)


def plot_movie_shifts(xs: Sequence[float], ys: Sequence[float], path: str, *, title: str = "",
                      pixel_size_A: Optional[float] = None, dpi: int = 90) -> str:
    """Write the shift trajectory of one movie to ``path`` (PNG) with the Agg canvas; returns ``path``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 4.2))
    FigureCanvasAgg(fig)
    draw_movie_shifts(fig.add_subplot(111), xs, ys, pixel_size_A=pixel_size_A, title=title)
    fig.subplots_adjust(left=0.16, right=0.96, bottom=0.13, top=0.9)   # fixed margins: tight_layout costs
    fig.savefig(path, dpi=dpi)                                           # ~0.1 s per movie in streaming
    return path


def total_drift(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Path length of a shift trajectory, in the units of the shifts."""
    x, y = np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64)
    return float(np.sum(np.hypot(np.diff(x), np.diff(y)))) if x.size > 1 else 0.0
