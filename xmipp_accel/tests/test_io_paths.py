"""The file-name rule of io/paths.py: read RELION's way (working directory) then beside the STAR file,
--datadir first; write relative to the working directory, absolute with the option or outside it."""
from __future__ import annotations

import os

import numpy as np
import pytest

from xmipp_accel.errors import FileFormatError
from xmipp_accel.io.images import read_images, write_stack
from xmipp_accel.io.particles import read_particles, write_particles, write_particles_from_arrays
from xmipp_accel.io.paths import (PATH_RULE, locate, name_candidates, resolve_name, rewrite_image_refs, split_ref,
                                  written_name)
from xmipp_accel.io.star import read_star

PX = 2.0


def _stack(path, value: float, n: int = 3):
    """A stack of n 8x8 images, image k filled with value + k (which file was read is visible)."""
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    write_stack(str(path), value + np.arange(n, dtype=np.float32)[:, None, None] * np.ones((1, 8, 8), np.float32), PX)


def test_working_directory_comes_before_the_star_folder(tmp_path, monkeypatch):
    # the same name beside the STAR file and in the working directory: RELION reads the latter
    _stack(tmp_path / "proj" / "parts.mrcs", 100.0)
    _stack(tmp_path / "proj" / "sub" / "parts.mrcs", 200.0)
    monkeypatch.chdir(tmp_path / "proj")
    star_dir = str(tmp_path / "proj" / "sub")
    assert resolve_name("parts.mrcs", star_dir) == "parts.mrcs"
    assert read_images(["2@parts.mrcs"], star_dir)[0, 0, 0] == 101.0
    # a name that is only beside the STAR file is still found there
    _stack(tmp_path / "proj" / "sub" / "only_here.mrcs", 300.0)
    assert read_images(["1@only_here.mrcs"], star_dir)[0, 0, 0] == 300.0


def test_datadir_first_with_the_name_then_the_file_name_alone(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _stack(tmp_path / "moved" / "Extract" / "job007" / "a.mrcs", 10.0)
    _stack(tmp_path / "flat" / "a.mrcs", 20.0)
    name = "Extract/job007/a.mrcs"
    assert name_candidates(name, "/x", str(tmp_path / "flat"))[:2] == [str(tmp_path / "flat" / name),
                                                                       str(tmp_path / "flat" / "a.mrcs")]
    assert read_images([f"1@{name}"], "/nowhere", datadir=str(tmp_path / "moved"))[0, 0, 0] == 10.0
    assert read_images([f"1@{name}"], "/nowhere", datadir=str(tmp_path / "flat"))[0, 0, 0] == 20.0
    assert name_candidates("/abs/a.mrcs", "/x", "/d") == ["/abs/a.mrcs"]


def test_missing_file_message_lists_the_places_and_the_fix(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileFormatError) as err:
        locate("gone.mrcs", str(tmp_path / "sub"), datadir=str(tmp_path / "d"), source="sub/p.star")
    msg = str(err.value)
    for place in (tmp_path / "d" / "gone.mrcs", tmp_path / "gone.mrcs", tmp_path / "sub" / "gone.mrcs"):
        assert str(place) in msg
    assert "sub/p.star" in msg and "--datadir" in msg and "project folder" in msg


def test_written_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert written_name(str(tmp_path / "Extract" / "a.mrcs")) == os.path.join("Extract", "a.mrcs")
    assert written_name("Extract/../Extract/a.mrcs") == os.path.join("Extract", "a.mrcs")
    assert written_name("a.mrcs", absolute=True) == str(tmp_path / "a.mrcs")
    outside = os.path.join(os.path.dirname(str(tmp_path)), "elsewhere.mrcs")
    assert written_name(outside) == outside           # no ../ names: absolute outside the working directory


def test_rewrite_keeps_numbers_and_format_hints(tmp_path, monkeypatch):
    _stack(tmp_path / "sub" / "s.mrcs", 0.0)
    monkeypatch.chdir(tmp_path)
    assert split_ref("000012@s.mrcs:mrcs") == ("000012@", "s.mrcs", ":mrcs")
    refs = ["000001@s.mrcs", "2@s.mrcs:mrcs", "1@missing.mrcs"]
    assert rewrite_image_refs(refs, str(tmp_path / "sub")) == [
        "000001@sub/s.mrcs", "2@sub/s.mrcs:mrcs", "1@missing.mrcs"]
    assert rewrite_image_refs(refs[:1], str(tmp_path / "sub"), absolute=True) == [f"000001@{tmp_path}/sub/s.mrcs"]


def test_issue_layout_beside_star_to_sub_folder(tmp_path, monkeypatch):
    """The report of issue 14: parts.star naming parts.mrcs beside it, output to sub/aligned.star, run from the
    project folder. The output must name parts.mrcs (RELION reads it from the project folder), not ../parts.mrcs."""
    _stack(tmp_path / "parts.mrcs", 0.0, n=4)
    monkeypatch.chdir(tmp_path)
    write_particles_from_arrays("parts.star", [f"{i + 1:06d}@parts.mrcs" for i in range(4)], PX, box_size=8)
    pset = read_particles("parts.star")
    write_particles("sub/aligned.star", pset, angles_deg=np.zeros((4, 3)))
    names = read_star("sub/aligned.star")["particles"]["rlnImageName"].tolist()
    assert names == [f"{i + 1:06d}@parts.mrcs" for i in range(4)]
    np.testing.assert_array_equal(read_particles("sub/aligned.star").read_images()[:, 0, 0], [0, 1, 2, 3])
    write_particles("sub/abs.star", pset, absolute_paths=True)
    assert read_star("sub/abs.star")["particles"]["rlnImageName"][0] == f"000001@{tmp_path}/parts.mrcs"


def test_star_beside_its_stacks_read_from_another_folder(tmp_path, monkeypatch):
    """Scipion/Xmipp layout: names relative to the STAR's folder; read from elsewhere, written for the cwd."""
    _stack(tmp_path / "data" / "s.mrcs", 5.0)
    write_particles_from_arrays(str(tmp_path / "data" / "p.star"), ["1@s.mrcs", "3@s.mrcs"], PX, box_size=8)
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    pset = read_particles(str(tmp_path / "data" / "p.star"))
    np.testing.assert_array_equal(pset.read_images()[:, 0, 0], [5.0, 7.0])
    write_particles("out.star", pset)                 # the stack is outside the working directory: absolute
    assert read_star("out.star")["particles"]["rlnImageName"].tolist() == [
        f"1@{tmp_path}/data/s.mrcs", f"3@{tmp_path}/data/s.mrcs"]
    assert pset.absolute_image_refs() == [f"1@{tmp_path}/data/s.mrcs", f"3@{tmp_path}/data/s.mrcs"]


def test_rule_text_names_both_options():
    assert "--datadir" in PATH_RULE and "--absolute-paths" in PATH_RULE and "working directory" in PATH_RULE
