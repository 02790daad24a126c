"""Movie files: MRC/TIFF frames and ranges, truncated/corrupt files, gain references, defect files."""
import os

import numpy as np
import pytest

from xmipp_accel.errors import FileFormatError, InputError
from xmipp_accel import backend
from xmipp_accel.io.movie import (movie_info, parse_defect_rectangles, read_defects, read_movie, read_movie_raw,
                                  read_reference)
from xmipp_accel.io.mrc import write_mrc

tifffile = pytest.importorskip("tifffile")


@pytest.fixture
def frames():
    return np.random.default_rng(0).integers(0, 7, (5, 24, 32)).astype(np.float32)


def test_mrc_movie_frames_and_ranges(tmp_path, frames):
    path = str(tmp_path / "m.mrcs")
    write_mrc(path, frames, 1.1)
    info = movie_info(path)
    assert (info.n_frames, info.ny, info.nx, info.pixel_size_A) == (5, 24, 32, 1.1)
    np.testing.assert_array_equal(read_movie(path), frames)
    np.testing.assert_array_equal(read_movie(path, (1, 4)), frames[1:4])
    buf = backend.pinned_empty((2, 24, 32), np.float32)
    out = read_movie_raw(path, (3, 5), out=buf, workers=3)
    assert out is buf
    np.testing.assert_array_equal(buf, frames[3:5])
    with pytest.raises(InputError, match=r"5 frames.*4:7"):
        read_movie(path, (3, 7))


def test_integer_mrc_movie_keeps_its_dtype_raw(tmp_path, frames):
    path = str(tmp_path / "m8.mrc")
    write_mrc(path, frames.astype(np.int8), 1.0, is_stack=True)
    raw = read_movie_raw(path)
    assert raw.dtype == np.int8
    assert read_movie(path).dtype == np.float32
    np.testing.assert_array_equal(read_movie(path), frames)


def test_truncated_mrc_is_a_format_error_naming_the_file(tmp_path, frames):
    path = str(tmp_path / "cut.mrcs")
    write_mrc(path, frames, 1.0)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 100)
    with pytest.raises(FileFormatError, match="cut.mrcs is truncated"):
        read_movie(path)


def test_tiff_movie(tmp_path, frames):
    path = str(tmp_path / "m.tif")
    tifffile.imwrite(path, frames.astype(np.uint8))
    info = movie_info(path)
    assert (info.format, info.n_frames, info.dtype) == ("tiff", 5, np.uint8)
    # read upside down, as RELION, IMOD and MotionCor2 read TIFF (TIFF_ROW_ORDER; test_movie_formats)
    np.testing.assert_array_equal(read_movie(path, (2, 5)), frames[2:5, ::-1])


def test_lzw_tiff_movie(tmp_path, frames):
    pytest.importorskip("imagecodecs")
    path = str(tmp_path / "lzw.tiff")
    tifffile.imwrite(path, frames.astype(np.uint8), compression="lzw")
    with tifffile.TiffFile(path) as t:
        assert t.pages[0].compression == 5            # really LZW
    np.testing.assert_array_equal(read_movie(path), frames[:, ::-1])


def test_corrupt_tiff_and_unsupported_formats(tmp_path, frames):
    path = str(tmp_path / "bad.tif")
    tifffile.imwrite(path, frames.astype(np.uint8))
    with open(path, "r+b") as f:
        f.truncate(200)
    with pytest.raises(FileFormatError, match="bad.tif"):
        read_movie(path)
    tifffile.imwrite(str(tmp_path / "x.eer"), frames.astype(np.uint8))   # a plain TIFF named .eer
    with pytest.raises(FileFormatError, match="x.eer: TIFF compression 1 is not EER"):
        movie_info(str(tmp_path / "x.eer"))
    with pytest.raises(FileFormatError, match="not found"):
        movie_info(str(tmp_path / "missing.mrc"))


def test_gain_references(tmp_path):
    g = np.random.default_rng(1).uniform(0.9, 1.1, (24, 32)).astype(np.float32)
    write_mrc(str(tmp_path / "g.mrc"), g, 1.0)
    tifffile.imwrite(str(tmp_path / "g.tif"), g)
    np.testing.assert_array_equal(read_reference(str(tmp_path / "g.mrc")), g)
    np.testing.assert_array_equal(read_reference(str(tmp_path / "g.tif")), g[::-1])   # TIFF_ROW_ORDER
    with pytest.raises(FileFormatError, match="DM4"):
        read_reference(str(tmp_path / "g.dm4"))


def test_defect_files(tmp_path):
    txt = tmp_path / "defects.txt"
    txt.write_text("# x y w h\n0 2 3 1\n10 0 1 24\n")
    m = read_defects(str(txt), (24, 32))
    assert m.sum() == 3 + 24 and m[2, 0:3].all() and m[:, 10].all()
    with pytest.raises(FileFormatError, match="line 1"):
        parse_defect_rectangles("1 2 3\n", "d.txt")
    img = np.zeros((24, 32), np.float32)
    img[5, 6] = 1
    write_mrc(str(tmp_path / "map.mrc"), img, 1.0)
    assert read_defects(str(tmp_path / "map.mrc"), (24, 32)).sum() == 1
    with pytest.raises(InputError, match="32 x 24"):
        read_defects(str(tmp_path / "map.mrc"), (32, 24))
