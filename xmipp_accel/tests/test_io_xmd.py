"""Xmipp metadata: Xmipp's own sampling files, round trips, and xmippLib reading what we write."""
from __future__ import annotations

import os

import numpy as np
import pytest

from xmipp_accel.errors import FileFormatError
from xmipp_accel.io.star import Table
from xmipp_accel.io.xmd import read_xmd, write_xmd


def _directions_match_angles(table: Table) -> None:
    """Xmipp stores each direction twice: (rot, tilt) and the unit vector (X, Y, Z); they must agree."""
    rot, tilt = np.radians(table["angleRot"]), np.radians(table["angleTilt"])
    np.testing.assert_allclose(table["X"], np.cos(rot) * np.sin(tilt), atol=2e-6)
    np.testing.assert_allclose(table["Y"], np.sin(rot) * np.sin(tilt), atol=2e-6)
    np.testing.assert_allclose(table["Z"], np.cos(tilt), atol=2e-6)


def test_c1_sampling(shared_data):
    blocks = read_xmd(os.path.join(shared_data, "xmipp-sampling", "ref_c1_sampling.xmd"))
    assert list(blocks) == ["extra", "neighbors", "projectionDirections"]
    extra = blocks["extra"]
    assert not extra.loop and extra.nrows == 1
    assert extra["sampling_rate"][0] == pytest.approx(np.radians(3.0), rel=1e-5)  # 3 degree sampling
    assert extra["neighborhoodRadius"][0] == -1.01
    assert blocks["neighbors"].nrows == 0 and blocks["neighbors"].names == []
    d = blocks["projectionDirections"]
    assert d.nrows == 4412 and d["neighbor"].dtype == np.int64
    assert d["neighbor"].tolist() == list(range(4412))
    np.testing.assert_allclose([d["angleRot"][2], d["angleTilt"][2], d["X"][2]], [-36.0, 3.020713, 0.042633])
    _directions_match_angles(d)


def test_i3h_sampling(shared_data):
    blocks = read_xmd(os.path.join(shared_data, "xmipp-sampling", "ref_i3h_sampling.xmd"))
    assert blocks["extra"]["pointsAsymmetricUnit"].tolist() == [30]
    assert blocks["projectionDirections"].nrows == 30
    _directions_match_angles(blocks["projectionDirections"])
    _directions_match_angles(blocks["projectionDirectionsSphere"])


def test_round_trip(tmp_path):
    single = Table({"image": "3@stack.stk", "shiftX": 1.5, "enabled": 1}, loop=False)
    loop = Table({"image": ["1@a.stk", "2@a.stk"], "angleRot": [10.0, -20.5], "ref": [3, 4]})
    write_xmd(tmp_path / "m.xmd", {"noname": single, "images": loop})
    text = (tmp_path / "m.xmd").read_text()
    assert text.startswith("# XMIPP_STAR_1 *")
    back = read_xmd(tmp_path / "m.xmd")
    assert back["noname"]["image"].tolist() == ["3@stack.stk"] and back["noname"]["shiftX"].tolist() == [1.5]
    assert back["images"] == loop


def test_xmipplib_reads_what_we_write(tmp_path):
    xmippLib = pytest.importorskip("xmippLib")
    rot = np.array([0.0, 12.5, -170.25])
    tilt = np.array([90.0, 45.0, 3.0])
    table = Table({"image": [f"{i}@s.stk" for i in (1, 2, 3)], "angleRot": rot, "angleTilt": tilt,
                   "ref": [7, 8, 9]})
    path = str(tmp_path / "angles.xmd")
    write_xmd(path, {"noname": table})
    md = xmippLib.MetaData(path)
    assert md.size() == 3
    np.testing.assert_allclose(md.getColumnValues(xmippLib.MDL_ANGLE_ROT), rot)
    np.testing.assert_allclose(md.getColumnValues(xmippLib.MDL_ANGLE_TILT), tilt)
    assert md.getColumnValues(xmippLib.MDL_IMAGE) == ["1@s.stk", "2@s.stk", "3@s.stk"]
    assert md.getColumnValues(xmippLib.MDL_REF) == [7, 8, 9]


def test_bad_files(tmp_path):
    with pytest.raises(FileFormatError, match="not found.*nothing.xmd"):
        read_xmd(tmp_path / "nothing.xmd")
    (tmp_path / "empty.xmd").write_text("")
    with pytest.raises(FileFormatError, match="empty.xmd is empty"):
        read_xmd(tmp_path / "empty.xmd")
    (tmp_path / "cut.xmd").write_text("# XMIPP_STAR_1 *\ndata_noname\nloop_\n _image\n _angleRot\n1@a.stk 3\n2@a.stk\n")
    with pytest.raises(FileFormatError, match=r"cut.xmd, line 7"):
        read_xmd(tmp_path / "cut.xmd")
