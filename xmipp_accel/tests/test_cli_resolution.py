"""``xmipp-accel fsc`` and ``xmipp-accel local-resolution`` as a user runs them: MRC in, STAR/XML/PNG/
MRC/CXC out, the printed resolution lines, the JSON summary and clear errors for bad input."""
from __future__ import annotations

import json
import math
import os
import xml.etree.ElementTree as ET

import numpy as np
import pytest

from xmipp_accel.cli.__main__ import main as cli
from xmipp_accel.gpu.resolution.fsc import fsc, resolution_at
from xmipp_accel.gpu.resolution.local import synthetic_two_region_halves
from xmipp_accel.io.mrc import mrc_info, read_mrc, write_mrc
from xmipp_accel.io.star import read_star

PIXEL = 1.2


@pytest.fixture(scope="module")
def maps(tmp_path_factory):
    d = tmp_path_factory.mktemp("maps")
    h1, h2, _ = synthetic_two_region_halves(48, pixel_size_A=PIXEL, resolutions_A=(4.0, 7.0), snr=1.0, seed=3)
    mask = np.zeros(h1.shape, np.float32)
    mask[6:42, 6:42, 6:42] = 1
    paths = {k: str(d / f"{k}.mrc") for k in ("h1", "h2", "mask", "h2_other_pixel", "small", "empty", "nopix1",
                                                "nopix2")}
    write_mrc(paths["h1"], h1, PIXEL)
    write_mrc(paths["h2"], h2, PIXEL)
    write_mrc(paths["mask"], mask, PIXEL)
    write_mrc(paths["h2_other_pixel"], h2, 1.5)
    write_mrc(paths["small"], h2[:32, :32, :32], PIXEL)
    write_mrc(paths["empty"], np.zeros_like(mask), PIXEL)
    write_mrc(paths["nopix1"], h1, None)
    write_mrc(paths["nopix2"], h2, None)
    paths["dir"] = str(d)
    return paths, h1, h2, mask


def _json_last_line(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def test_fsc_command_prints_resolution_and_writes_outputs(maps, tmp_path, capsys):
    paths, h1, h2, _ = maps
    star, xml, png = (str(tmp_path / f) for f in ("fsc.star", "fsc.xml", "fsc.png"))
    rc = cli(["fsc", paths["h1"], paths["h2"], "-o", star, "--xml", xml, "--plot", png, "--device", "cpu", "--json"])
    out = capsys.readouterr().out
    assert rc == 0
    expected = resolution_at(fsc(h1, h2), 0.143, PIXEL)
    assert f"resolution (FSC=0.143): {expected:.2f} Å" in out
    assert "resolution (FSC=0.5):" in out and "resolution (half-bit):" in out and "resolution (3sigma):" in out
    summary = _json_last_line(out)
    assert summary["resolution_A"] == pytest.approx(expected)
    assert summary["pixel_size_A"] == pytest.approx(PIXEL) and summary["masked"] is False
    assert set(summary["outputs"]) == {"star", "xml", "plot"}
    blocks = read_star(star)
    table = blocks["fsc"]
    assert table.nrows == 25
    for col in ("rlnSpectralIndex", "rlnResolution", "rlnAngstromResolution", "rlnFourierShellCorrelation"):
        assert col in table
    np.testing.assert_allclose(table["rlnResolution"][1:] * table["rlnAngstromResolution"][1:], 1.0, rtol=1e-4)
    np.testing.assert_allclose(table["rlnFourierShellCorrelation"], fsc(h1, h2).fsc, atol=2e-6)
    assert blocks["general"]["rlnFinalResolution"][0] == pytest.approx(expected, abs=1e-5)
    root = ET.parse(xml).getroot()
    assert root.tag == "fsc" and root.get("xaxis") == "Resolution (A-1)"
    coords = root.findall("coordinate")
    assert len(coords) == 25 and float(coords[1].find("x").text) == pytest.approx(1 / (48 * PIXEL), abs=1e-6)
    assert os.path.getsize(png) > 10_000


def test_fsc_command_with_mask_reports_corrected_curve(maps, tmp_path, capsys):
    paths = maps[0]
    star = str(tmp_path / "m.star")
    rc = cli(["fsc", paths["h1"], paths["h2"], "--mask", paths["mask"], "-o", star, "--json", "--device", "cpu"])
    out = capsys.readouterr().out
    assert rc == 0 and "[corrected FSC]" in out
    summary = _json_last_line(out)
    assert summary["masked"] is True and summary["randomise_from_A"] > 0
    cols = read_star(star)["fsc"]
    for col in ("rlnFourierShellCorrelationCorrected", "rlnFourierShellCorrelationUnmaskedMaps",
                "rlnFourierShellCorrelationMaskedMaps", "rlnCorrectedFourierShellCorrelationPhaseRandomizedMaskedMaps"):
        assert col in cols
    assert read_star(star)["general"]["rlnMaskName"][0] == paths["mask"]


def test_fsc_command_pixel_size_option(maps, capsys):
    paths, h1, h2, _ = maps
    assert cli(["fsc", paths["nopix1"], paths["nopix2"], "--json"]) == 2
    assert "--pixel-size" in capsys.readouterr().err
    assert cli(["fsc", paths["nopix1"], paths["nopix2"], "--pixel-size", "2.0", "--json", "--device", "cpu"]) == 0
    summary = _json_last_line(capsys.readouterr().out)
    assert summary["resolution_A"] == pytest.approx(resolution_at(fsc(h1, h2), 0.143, 2.0))


def test_fsc_command_identical_maps(maps, capsys):
    paths = maps[0]
    assert cli(["fsc", paths["h1"], paths["h1"], "--json", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "identical" in out and f"{2 * PIXEL:.2f} Å" in out
    summary = _json_last_line(out)
    assert summary["identical_halves"] is True and summary["resolution_A"] == pytest.approx(2 * PIXEL)


@pytest.mark.parametrize("case, message", [
    (("h1", "small"), "different boxes"),
    (("h1", "h2_other_pixel"), "different voxel sizes"),
    (("h1", "h2", "--mask", "small"), "mask"),
    (("h1", "h2", "--mask", "empty"), "empty"),
    (("h1", "missing"), "missing"),
])
def test_fsc_command_bad_input(maps, capsys, case, message):
    paths = maps[0]
    argv = ["fsc"] + [a if a.startswith("--") else paths.get(a, os.path.join(paths["dir"], "nowhere.mrc"))
                      for a in case]
    assert cli(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and (message in err or "nowhere.mrc" in err)


def test_local_resolution_command(maps, tmp_path, capsys):
    paths, h1, _, mask = maps
    out_map, png, cxc = (str(tmp_path / f) for f in ("locres.mrc", "locres.png", "locres.cxc"))
    rc = cli(["local-resolution", paths["h1"], paths["h2"], "-o", out_map, "--mask", paths["mask"],
              "--plot", png, "--chimerax", cxc, "--json", "--device", "cpu", "--quiet"])
    out = capsys.readouterr().out
    assert rc == 0 and "local resolution: median" in out
    summary = _json_last_line(out)
    locres, voxel = read_mrc(out_map)
    assert voxel == pytest.approx(PIXEL, rel=1e-4) and locres.shape == h1.shape
    assert np.all(locres[mask == 0] == 0) and np.all(locres[mask > 0] >= 2 * PIXEL - 1e-3)
    assert summary["median_A"] == pytest.approx(float(np.median(locres[mask > 0])), rel=1e-5)
    assert 3.4 < summary["median_A"] < 7.5 and not math.isnan(summary["p95_A"])
    assert np.median(locres[12:36, 12:36, 10:18]) < 5.0 < np.median(locres[12:36, 12:36, 30:38])  # 4 Å | 7 Å
    assert os.path.getsize(png) > 10_000
    text = open(cxc).read()
    assert f"open {out_map}" in text and "color sample #1 map #2" in text
    assert os.path.exists(summary["outputs"]["average"])


def test_local_resolution_map_keeps_the_half_maps_origin(maps, tmp_path, capsys):
    """Maps placed off zero (e.g. boxed out of a larger map) keep their placement, so ChimeraX overlays
    the local resolution on the map it colours."""
    paths, h1, h2, _ = maps
    origin = (12.5, -30.0, 7.25)
    for key, data in (("h1", h1), ("h2", h2)):
        write_mrc(str(tmp_path / f"{key}.mrc"), data, PIXEL, origin_A=origin)
    out_map = str(tmp_path / "locres.mrc")
    rc = cli(["local-resolution", str(tmp_path / "h1.mrc"), str(tmp_path / "h2.mrc"), "-o", out_map,
              "--periods", "8", "--chimerax", str(tmp_path / "l.cxc"), "--json", "--device", "cpu", "--quiet"])
    summary = _json_last_line(capsys.readouterr().out)
    assert rc == 0
    for path in (out_map, summary["outputs"]["average"]):
        assert mrc_info(path).origin_A == pytest.approx(origin)
    assert mrc_info(paths["h1"]).origin_A == (0.0, 0.0, 0.0)


def test_local_resolution_command_errors(maps, tmp_path, capsys):
    paths = maps[0]
    assert cli(["local-resolution", paths["h1"], paths["small"], "-o", str(tmp_path / "x.mrc")]) == 2
    assert "different boxes" in capsys.readouterr().err
    assert cli(["local-resolution", paths["h1"], paths["h2"], "-o", str(tmp_path / "x.mrc"),
                "--window-max", "100"]) == 2
    assert "--window-max" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "x.mrc")


def test_local_resolution_command_masks_the_solvent_itself(tmp_path, capsys):
    """No --mask: the solvent of a particle map gets 0 and stays out of the summary and the histogram."""
    from xmipp_accel.em.synthetic import two_resolution_half_maps
    h1, h2, region = two_resolution_half_maps(48, pixel_size_A=1.5, resolutions_A=(4.0, 7.5), seed=2)
    for name, data in (("a.mrc", h1), ("b.mrc", h2)):
        write_mrc(str(tmp_path / name), data, 1.5)
    out_map, png = str(tmp_path / "l.mrc"), str(tmp_path / "l.png")
    assert cli(["local-resolution", str(tmp_path / "a.mrc"), str(tmp_path / "b.mrc"), "-o", out_map, "--plot", png,
                "--json", "--device", "cpu", "--quiet"]) == 0
    summary = _json_last_line(capsys.readouterr().out)
    locres, _ = read_mrc(out_map)
    assert summary["auto_mask"] and not summary["masked"]
    # Otsu / solvent-level masking of a phantom with faint parts: ~99.5 % of the particle core is kept,
    # and the soft edge adds ~2 px of solvent around it (~10 % of the solvent of a 48³ box)
    assert np.mean(locres[region > 0] > 0) > 0.98 and np.mean(locres[region == 0] == 0) > 0.85
    assert summary["n_voxels"] == int(np.count_nonzero(locres))
    assert summary["median_A"] == pytest.approx(float(np.median(locres[locres > 0])), rel=1e-5)
