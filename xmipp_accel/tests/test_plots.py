"""Resolution plots render to non-blank images; their annotations agree with resolution_at;
the ChimeraX script opens both maps and colours by the local resolution."""
from __future__ import annotations

import os
import warnings

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from xmipp_accel.gpu.resolution.fsc import FSCResult, fsc, masked_fsc_corrected, resolution_at  # noqa: E402
from xmipp_accel.gpu.resolution.local import local_resolution, synthetic_two_region_halves  # noqa: E402
from xmipp_accel.plots import (  # noqa: E402
    chimerax_local_resolution_script,
    draw_fsc,
    plot_fsc,
    plot_local_resolution,
    resolution_colormap_stops,
)


def _image_stats(path):
    from matplotlib.image import imread
    img = imread(path)
    rgb = img[..., :3].reshape(-1, 3)
    colours = np.unique((rgb * 255).astype(np.uint8), axis=0)
    return float(rgb.std()), len(colours), img.shape


@pytest.fixture(scope="module")
def halves():
    return synthetic_two_region_halves(48, pixel_size_A=1.0, resolutions_A=(3.5, 6.6), snr=1.0, seed=5)


def test_plot_fsc_overlays_curves_and_is_not_blank(tmp_path, halves):
    h1, h2, _ = halves
    mask = np.zeros(h1.shape, np.float32)
    mask[6:42, 6:42, 6:42] = 1
    r = masked_fsc_corrected(h1, h2, mask)
    path = str(tmp_path / "fsc.png")
    results = plot_fsc({"corrected": r.corrected, "unmasked": r.unmasked, "masked": r.masked}, path,
                       thresholds=(0.143, 0.5, "half-bit"), pixel_size_A=1.0, title="test")
    assert os.path.getsize(path) > 10_000
    std, n_colours, shape = _image_stats(path)
    assert std > 0.05 and n_colours > 20 and shape[0] > 300
    assert {d["label"] for d in results} == {"corrected", "unmasked", "masked"}
    got = next(d for d in results if d["label"] == "corrected" and d["threshold"] == "0.143")["resolution_A"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert got == pytest.approx(resolution_at(r.corrected, 0.143, 1.0), rel=1e-9)
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]  # no temporary left behind


def test_draw_fsc_accepts_tuples_in_inverse_angstrom(tmp_path):
    """Curves given as (label, 1/Å, fsc) as a Scipion FSC object provides them."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    freq = np.linspace(0, 0.25, 41)
    curve_a = 1 / (1 + np.exp((freq - 0.2) / 0.01))
    curve_b = 1 / (1 + np.exp((freq - 0.1) / 0.01))
    fig = Figure()
    FigureCanvasAgg(fig)
    out = draw_fsc(fig.add_subplot(111), [("A", freq, curve_a), ("B", freq, curve_b)], thresholds=(0.5,))
    res = {d["label"]: d["resolution_A"] for d in out}
    assert res["A"] == pytest.approx(5.0, rel=0.01) and res["B"] == pytest.approx(10.0, rel=0.01)
    top = [ax for ax in fig.axes if ax.get_xlabel().startswith("resolution")]
    assert top and len(top[0].get_xticks()) >= 3  # Å axis
    path = str(tmp_path / "b.png")
    fig.savefig(path)
    assert _image_stats(path)[1] > 10


def test_plot_fsc_of_identical_maps_still_renders(tmp_path):
    a = np.random.default_rng(1).standard_normal((16, 16, 16))
    r = fsc(a, a)
    path = str(tmp_path / "same.png")
    out = plot_fsc([r], path, pixel_size_A=2.0)
    assert out[0]["status"] == "above_to_nyquist" and out[0]["resolution_A"] == pytest.approx(4.0)
    assert _image_stats(path)[0] > 0.05


def test_plot_fsc_needs_pixel_size_for_results():
    r = FSCResult(np.arange(5) / 8, np.ones(5), np.ones(5), 8)
    with pytest.raises(ValueError, match="pixel_size_A"):
        plot_fsc([r], "/tmp/never.png")


def test_plot_local_resolution_slices_histogram(tmp_path, halves):
    h1, h2, _ = halves
    mask = np.zeros(h1.shape, np.float32)
    mask[8:40, 8:40, 8:40] = 1
    lr = local_resolution(h1, h2, pixel_size_A=1.0, mask=mask)
    path = str(tmp_path / "locres.png")
    info = plot_local_resolution(lr.resolution_A, path, mask=mask, background=0.5 * (h1 + h2), title="t")
    std, n_colours, _ = _image_stats(path)
    assert std > 0.05 and n_colours > 50
    assert info["n_voxels"] == int(mask.sum())
    assert info["vmin_A"] < 4.5 < 5.5 < info["vmax_A"]  # both regions in the colour range
    # without mask or background: voxels with resolution > 0
    path2 = str(tmp_path / "locres2.png")
    plot_local_resolution(lr.resolution_A, path2)
    assert _image_stats(path2)[1] > 20


def test_plot_local_resolution_leaves_the_solvent_out_of_the_histogram(tmp_path):
    """An automatically masked map (0 in the solvent): the histogram and colour range hold the particle only."""
    from xmipp_accel.em.synthetic import two_resolution_half_maps
    h1, h2, region = two_resolution_half_maps(48, pixel_size_A=1.5, resolutions_A=(4.0, 7.5), seed=0)
    lr = local_resolution(h1, h2, pixel_size_A=1.5)
    info = plot_local_resolution(lr.resolution_A, str(tmp_path / "auto.png"))
    assert info["n_voxels"] == int(lr.mask.sum()) == int(np.count_nonzero(lr.resolution_A))
    assert info["median_A"] == pytest.approx(lr.summary()["median_A"], rel=1e-5)
    assert info["vmin_A"] >= 2 * 1.5 - 1e-6


def test_plot_local_resolution_rejects_empty(tmp_path):
    with pytest.raises(ValueError, match="no voxel"):
        plot_local_resolution(np.zeros((8, 8, 8)), str(tmp_path / "x.png"))


def test_chimerax_script(tmp_path):
    from xmipp_accel.io.mrc import write_mrc
    locres = np.full((16, 16, 16), 4.0, np.float32)
    locres[:, :, 8:] = 7.0
    lpath, mpath = str(tmp_path / "loc res.mrc"), str(tmp_path / "map.mrc")
    write_mrc(lpath, locres, 1.1)
    write_mrc(mpath, np.ones((16, 16, 16), np.float32), 1.1)
    cxc = str(tmp_path / "locres.cxc")
    chimerax_local_resolution_script(mpath, lpath, cxc, level=0.5, voxel_size_A=1.1)
    text = open(cxc).read().splitlines()
    assert text[1] == f"open {mpath}" and text[2] == f'open "{lpath}"'
    assert "volume #2 hide" in text and "volume #1 style surface level 0.5" in text
    sample = next(line for line in text if line.startswith("color sample #1 map #2 palette "))
    stops = [float(s.split(",")[0]) for s in sample.split("palette ")[1].split(":")]
    assert stops[0] == pytest.approx(4.0) and stops[-1] == pytest.approx(7.0) and np.all(np.diff(stops) > 0)
    assert any(line.startswith("key ") for line in text)
    assert resolution_colormap_stops(3, 6, 4)[0][1].startswith("#")
