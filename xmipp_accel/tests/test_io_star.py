"""The STAR format (io/star.py): RELION and Xmipp syntax, round trips, emtable as an independent reader, bad files.

Particle sets built on it are tested in test_io_particles.py."""
from __future__ import annotations

import os

import numpy as np
import pytest

from xmipp_accel.errors import FileFormatError, InputError
from xmipp_accel.io.particles import read_particles, write_particles
from xmipp_accel.io.star import Table, parse_star_text, read_star, write_star

STAR_FILES = ["relion31.star", "relion31.6opticsgroups.star", "relion5.star", "sample_relion_data.star",
              "sample_particles_relion31.star", "empiar_10076_7.star"]


def _variant(shared_data, name):
    return os.path.join(shared_data, "star-variants", name)


# ---------------------------------------------------------------------------------------------------------------
# Table
# ---------------------------------------------------------------------------------------------------------------

def test_table_api():
    t = Table({"rlnAngleRot": [10.0, 20.0, 30.0], "rlnClassNumber": [1, 2, 3], "rlnImageName": ["1@a", "2@a", "3@a"]})
    assert t.nrows == len(t) == 3 and t.names == ["rlnAngleRot", "rlnClassNumber", "rlnImageName"]
    assert t["rlnClassNumber"].dtype == np.int64 and t.get("missing", 5) == 5 and "rlnAngleRot" in t
    t2 = t.with_columns(rlnAngleTilt=90.0, rlnAngleRot=[1.0, 2.0, 3.0])
    assert t2.names[-1] == "rlnAngleTilt" and t2["rlnAngleTilt"].tolist() == [90.0] * 3
    assert t["rlnAngleRot"].tolist() == [10.0, 20.0, 30.0]  # original unchanged
    s = t2.subset(np.array([True, False, True]))
    assert s.nrows == 2 and s["rlnImageName"].tolist() == ["1@a", "3@a"]
    assert t2.subset([2, 0])["rlnAngleRot"].tolist() == [3.0, 1.0]
    assert t.without_columns("rlnClassNumber").names == ["rlnAngleRot", "rlnImageName"]
    with pytest.raises(InputError, match="has 2 values but the table has 3 rows"):
        t.with_columns(rlnAnglePsi=[1.0, 2.0])
    with pytest.raises(KeyError, match="rlnNothing"):
        t["rlnNothing"]


def test_parser_handles_relion_and_star_syntax():
    text = """
# comment
data_general

_rlnFinalResolution   3.25
_rlnName 'with spaces'

data_things
loop_
_rlnA #1
_rlnB #2 [trailing description]
# a comment inside
_rlnMicrographName #3
1\t2.5  17
 2 -3e-4 'my file.mrc'

3 1e+06 ""
data_empty
loop_
data_
loop_
_x
1
"""
    blocks = parse_star_text(text, "t.star")
    assert list(blocks) == ["general", "things", "empty", ""]
    g = blocks["general"]
    assert not g.loop and g["rlnFinalResolution"].tolist() == [3.25] and g["rlnName"].tolist() == ["with spaces"]
    t = blocks["things"]
    assert t["rlnA"].dtype == np.int64 and t["rlnA"].tolist() == [1, 2, 3]
    assert t["rlnB"].dtype == np.float64 and t["rlnB"].tolist() == [2.5, -3e-4, 1e6]
    # a numeric-looking name column stays text
    assert t["rlnMicrographName"].tolist() == ["17", "my file.mrc", ""]
    assert blocks["empty"].nrows == 0 and blocks[""]["x"].tolist() == [1]


def test_round_trip_exact(tmp_path):
    t = Table({"rlnImageName": ["1@a b.mrcs", "2@x.mrcs", ""], "rlnDefocusU": [12345.678901, 1e-5, -2.0],
               "rlnClassNumber": [1, 2, 3], "rlnBig": [1.23456789e9, 0.0, 5.0], "rlnFlag": [True, False, True],
               "rlnOddZernike": ["[1,2]", "_under", "data_x"]})
    kv = Table({"rlnFinalResolution": 3.5, "rlnModelName": "model one"}, loop=False)
    write_star(tmp_path / "t.star", {"general": kv, "particles": t})
    back = read_star(tmp_path / "t.star")
    assert back["general"]["rlnFinalResolution"].tolist() == [3.5]
    assert back["general"]["rlnModelName"].tolist() == ["model one"]
    b = back["particles"]
    assert b.names == t.names
    assert b["rlnImageName"].tolist() == ["1@a b.mrcs", "2@x.mrcs", ""]
    assert b["rlnOddZernike"].tolist() == ["[1,2]", "_under", "data_x"]
    np.testing.assert_allclose(b["rlnDefocusU"], t["rlnDefocusU"], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(b["rlnBig"], t["rlnBig"], rtol=1e-6)
    assert b["rlnClassNumber"].tolist() == [1, 2, 3] and b["rlnFlag"].tolist() == [1, 0, 1]


def test_untouched_columns_keep_their_text(shared_data, tmp_path):
    src = _variant(shared_data, "relion31.6opticsgroups.star")
    blocks = read_star(src)
    write_star(tmp_path / "copy.star", blocks)
    a, b = blocks["particles"], read_star(tmp_path / "copy.star")["particles"]
    for name in a.names:
        assert a._data[name].tokens == b._data[name].tokens, name
    assert a.nrows == 139
    zernike = read_star(tmp_path / "copy.star")["optics"]["rlnOddZernike"]
    assert zernike.dtype.kind == "U" and zernike[0].startswith("[1.70554063513,")


@pytest.mark.parametrize("name", STAR_FILES + ["../trpv1-real/trpv1_small_stack.star"])
def test_every_column_matches_emtable(shared_data, name):
    """An independent reader (emtable, from scipion-em) sees the same values in every block and column."""
    emtable = pytest.importorskip("emtable")
    path = _variant(shared_data, name)
    for block, table in read_star(path).items():
        if not table.loop or not table.names:
            continue
        ref = emtable.Table(fileName=path, tableName=block)
        assert ref.size() == table.nrows
        assert ref.getColumnNames() == table.names
        for col in table.names:
            ours, theirs = table[col], ref.getColumnValues(col)
            if ours.dtype.kind in "iuf":
                np.testing.assert_allclose(ours, np.asarray(theirs, dtype=np.float64), rtol=1e-12, err_msg=col)
            else:
                assert ours.tolist() == [str(v) for v in theirs], col


def test_emtable_reads_what_we_write(shared_data, tmp_path):
    emtable = pytest.importorskip("emtable")
    pset = read_particles(_variant(shared_data, "sample_relion_data.star"))
    write_particles(tmp_path / "out.star", pset)
    optics = emtable.Table(fileName=str(tmp_path / "out.star"), tableName="optics")
    particles = emtable.Table(fileName=str(tmp_path / "out.star"), tableName="particles")
    assert particles.size() == 17 and optics.size() == 1
    np.testing.assert_allclose(particles.getColumnValues("rlnAngleRot"), pset.angles_deg[:, 0], atol=1e-6)
    np.testing.assert_allclose(optics.getColumnValues("rlnImagePixelSize"), [5e4 / 37369.207031], rtol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# bad files
# ---------------------------------------------------------------------------------------------------------------

def test_missing_empty_and_binary(tmp_path):
    with pytest.raises(FileFormatError, match="not found.*none.star"):
        read_star(tmp_path / "none.star")
    (tmp_path / "empty.star").write_text("\n  \n")
    with pytest.raises(FileFormatError, match="empty.star is empty"):
        read_particles(tmp_path / "empty.star")
    (tmp_path / "bin.star").write_bytes(b"\x00\x01MAP " * 100)
    with pytest.raises(FileFormatError, match="bin.star is a binary file"):
        read_star(tmp_path / "bin.star")
    (tmp_path / "text.star").write_text("hello world\n")
    with pytest.raises(FileFormatError, match=r"text.star, line 1: 'hello world' before any data_ block"):
        read_star(tmp_path / "text.star")


def test_row_with_missing_value_gives_line(tmp_path):
    (tmp_path / "cut.star").write_text("data_particles\nloop_\n_rlnImageName\n_rlnAngleRot\n1@a.mrcs 10\n"
                                       "2@a.mrcs 20\n3@a.mrcs\n")
    with pytest.raises(FileFormatError, match=r"cut.star, line 7 \(block data_particles\): 1 values but the loop "
                                              r"declares 2 columns"):
        read_star(tmp_path / "cut.star")






