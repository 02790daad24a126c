"""MRC reading/writing: round trips, headers, memory maps, atomic writes and bad files."""
from __future__ import annotations

import logging
import os

import mrcfile
import numpy as np
import pytest

from xmipp_accel.errors import FileFormatError, InputError
from xmipp_accel.io import mrc as mrc_module
from xmipp_accel.io.atomic import atomic_write
from xmipp_accel.io.mrc import check_finite, mrc_info, mrc_shape, mrc_voxel_size, open_stack, read_mrc, write_mrc


@pytest.fixture
def rng():
    return np.random.default_rng(7)


def _leftovers(folder) -> list:
    return [f for f in os.listdir(folder) if ".tmp-" in f]


def test_volume_round_trip_keeps_values_voxel_size_and_space_group(tmp_path, rng):
    vol = rng.standard_normal((12, 10, 8))  # float64 in, float32 out
    path = tmp_path / "vol.mrc"
    write_mrc(path, vol, 1.37)
    data, voxel = read_mrc(path)
    assert data.dtype == np.float32 and data.shape == (12, 10, 8)
    np.testing.assert_array_equal(data, vol.astype(np.float32))
    assert voxel == pytest.approx(1.37, abs=1e-6)
    with mrcfile.open(path) as m:  # independent reader: a volume, x = 8 fastest
        assert m.is_volume() and (m.header.nx, m.header.ny, m.header.nz) == (8, 10, 12)
        assert float(m.voxel_size.x) == pytest.approx(1.37, rel=1e-6)


def test_mrcs_is_written_as_image_stack(tmp_path, rng):
    stack = rng.standard_normal((5, 6, 7)).astype(np.float32)
    write_mrc(tmp_path / "s.mrcs", stack, 2.0)
    write_mrc(tmp_path / "s_forced.mrc", stack, 2.0, is_stack=True)
    write_mrc(tmp_path / "v_forced.mrcs", stack, 2.0, is_stack=False)
    for name, is_stack in (("s.mrcs", True), ("s_forced.mrc", True), ("v_forced.mrcs", False)):
        with mrcfile.open(tmp_path / name) as m:
            assert m.is_image_stack() == is_stack, name
            assert int(m.header.ispg) == (0 if is_stack else 1)
    data, voxel = read_mrc(tmp_path / "s.mrcs")
    np.testing.assert_array_equal(data, stack)
    assert voxel == 2.0


def test_single_image_and_header_only_queries(tmp_path, rng):
    img = rng.standard_normal((9, 11)).astype(np.float32)
    write_mrc(tmp_path / "img.mrc", img, 0.85)
    assert mrc_shape(tmp_path / "img.mrc") == (9, 11)
    assert mrc_voxel_size(tmp_path / "img.mrc") == pytest.approx(0.85)
    data, _ = read_mrc(tmp_path / "img.mrc")
    np.testing.assert_array_equal(data, img)
    assert open_stack(tmp_path / "img.mrc").shape == (1, 9, 11)


def test_unset_voxel_size_reads_as_none(tmp_path):
    write_mrc(tmp_path / "novox.mrc", np.zeros((4, 4, 4), np.float32), None)
    assert read_mrc(tmp_path / "novox.mrc")[1] is None
    assert mrc_voxel_size(tmp_path / "novox.mrc") is None


def test_mmap_returns_native_dtype_without_copy(tmp_path, rng):
    stack = rng.integers(-300, 300, size=(4, 5, 6)).astype(np.int16)
    write_mrc(tmp_path / "i16.mrcs", stack, 1.0)  # int16 is an MRC mode: kept
    mm, voxel = read_mrc(tmp_path / "i16.mrcs", mmap=True)
    assert isinstance(mm, np.memmap) and mm.dtype == np.int16 and not mm.flags.writeable
    np.testing.assert_array_equal(mm[2], stack[2])
    copy, _ = read_mrc(tmp_path / "i16.mrcs")
    assert copy.dtype == np.float32
    np.testing.assert_array_equal(copy, stack.astype(np.float32))


def test_float16_is_kept(tmp_path, rng):
    img = rng.standard_normal((3, 8, 8)).astype(np.float16)
    write_mrc(tmp_path / "h.mrcs", img, 1.0)
    assert mrc_info(tmp_path / "h.mrcs").dtype == np.float16
    np.testing.assert_array_equal(read_mrc(tmp_path / "h.mrcs")[0], img.astype(np.float32))


def test_real_file_header(shared_data):
    path = os.path.join(shared_data, "trpv1-real", "trpv1_volume.mrc")
    data, voxel = read_mrc(path)
    assert data.shape == (48, 48, 48) and data.dtype == np.float32
    assert voxel == pytest.approx(4.88)
    with mrcfile.open(path) as m:
        np.testing.assert_array_equal(data, m.data)


def test_old_file_without_map_id_is_read_with_warning(shared_data, caplog):
    # relion31.mrcs from cryoDRGN's test data has no 'MAP ' identifier but a consistent header
    path = os.path.join(shared_data, "star-variants", "relion31.mrcs")
    with pytest.raises(ValueError):
        mrcfile.open(path, permissive=False)
    with caplog.at_level(logging.WARNING, logger="xmipp_accel.io.mrc"):
        data, _ = read_mrc(path)
    assert data.shape == (5, 256, 256)
    assert "MAP" in caplog.text and "relion31.mrcs" in caplog.text
    with pytest.warns(RuntimeWarning), mrcfile.open(path, permissive=True) as m:  # the reference reader warns
        np.testing.assert_array_equal(data, m.data)


# ---------------------------------------------------------------------------------------------------------------
# bad files: a FileFormatError naming the file, never an mrcfile traceback
# ---------------------------------------------------------------------------------------------------------------

def test_missing_file(tmp_path):
    with pytest.raises(FileFormatError, match="not found.*nothing.mrc"):
        read_mrc(tmp_path / "nothing.mrc")


def test_empty_file(tmp_path):
    (tmp_path / "empty.mrc").write_bytes(b"")
    with pytest.raises(FileFormatError, match=r"empty.mrc is empty"):
        read_mrc(tmp_path / "empty.mrc")


def test_text_file_named_mrc(tmp_path):
    (tmp_path / "notes.mrc").write_text("these are my notes, not a map\n" * 100)
    with pytest.raises(FileFormatError, match=r"notes.mrc is not an MRC file") as info:
        read_mrc(tmp_path / "notes.mrc")
    assert "these are" in str(info.value)  # shows how the file starts
    (tmp_path / "short.mrc").write_text("tiny")
    with pytest.raises(FileFormatError, match=r"short.mrc is not an MRC file: it has 4 bytes"):
        mrc_shape(tmp_path / "short.mrc")


def test_truncated_file_reports_expected_and_actual_bytes(tmp_path):
    path = tmp_path / "cut.mrcs"
    write_mrc(path, np.ones((10, 16, 16), np.float32), 1.0)
    full = path.read_bytes()
    path.write_bytes(full[:1024 + 3 * 16 * 16 * 4 + 100])  # 3 images and a bit
    for call in (lambda: read_mrc(path), lambda: read_mrc(path, mmap=True), lambda: mrc_shape(path),
                 lambda: open_stack(path)):
        with pytest.raises(FileFormatError) as info:
            call()
        msg = str(info.value)
        assert "cut.mrcs is truncated" in msg
        assert f"{10 * 16 * 16 * 4} bytes" in msg and f"{3 * 16 * 16 * 4 + 100} bytes" in msg


def test_unsupported_mode(tmp_path):
    path = tmp_path / "mode.mrc"
    write_mrc(path, np.ones((2, 4, 4), np.float32), 1.0)
    raw = bytearray(path.read_bytes())
    raw[12:16] = np.array([16], dtype="<i4").tobytes()  # mode 16: RGB, not supported (101 is: test_movie_formats)
    path.write_bytes(bytes(raw))
    with pytest.raises(FileFormatError, match=r"mode.mrc has an unsupported MRC data mode 16"):
        read_mrc(path)


def test_folder_given_as_file(tmp_path):
    with pytest.raises(FileFormatError, match="is a folder"):
        read_mrc(tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# atomic writes
# ---------------------------------------------------------------------------------------------------------------

def test_failed_write_leaves_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "keep.mrc"
    write_mrc(path, np.full((3, 3, 3), 5.0, np.float32), 1.0)
    before = path.read_bytes()

    class Boom(RuntimeError):
        pass

    real_new = mrcfile.new

    def failing_new(name, *args, **kwargs):
        handle = real_new(name, *args, **kwargs)  # the temporary file exists at this point
        handle.close()
        raise Boom("disk full")

    monkeypatch.setattr(mrcfile, "new", failing_new)
    with pytest.raises(Boom):
        write_mrc(path, np.zeros((3, 3, 3), np.float32), 1.0)
    assert path.read_bytes() == before
    assert _leftovers(tmp_path) == []


def test_atomic_write_creates_folder_and_renames(tmp_path):
    target = tmp_path / "new" / "sub" / "out.txt"
    with atomic_write(target) as tmp:
        assert os.path.dirname(tmp) == str(target.parent) and tmp.endswith(".txt")
        assert not target.exists()
        with open(tmp, "w") as f:
            f.write("done")
    assert target.read_text() == "done" and _leftovers(target.parent) == []
    with pytest.raises(InputError, match="is a folder"):
        with atomic_write(tmp_path):
            pass


def test_write_rejects_bad_input(tmp_path):
    with pytest.raises(InputError, match="2D"):
        write_mrc(tmp_path / "x.mrc", np.zeros((2, 2, 2, 2)), 1.0)
    with pytest.raises(InputError, match="voxel size"):
        write_mrc(tmp_path / "x.mrc", np.zeros((2, 2)), -1.0)
    assert not (tmp_path / "x.mrc").exists()


def test_write_accepts_device_arrays(tmp_path, xp):
    vol = xp.arange(4 * 5 * 6, dtype=xp.float32).reshape(4, 5, 6)
    write_mrc(tmp_path / "dev.mrc", vol, 1.5)
    np.testing.assert_array_equal(read_mrc(tmp_path / "dev.mrc")[0], np.arange(120, dtype=np.float32).reshape(4, 5, 6))


# ---------------------------------------------------------------------------------------------------------------
# non-finite values
# ---------------------------------------------------------------------------------------------------------------

def test_check_finite_names_the_items(xp):
    stack = xp.zeros((600, 4, 4), dtype=xp.float32)  # more than one chunk of 256
    check_finite(stack, "particles.mrcs", item_name="particle")
    stack[2, 1, 1] = float("nan")
    stack[599, 0, 0] = float("inf")
    with pytest.raises(InputError) as info:
        check_finite(stack, "particles.mrcs", item_name="particle")
    msg = str(info.value)
    assert "particles.mrcs" in msg and "particle 3, 600" in msg and "2 particle(s)" in msg
    with pytest.raises(InputError, match=r"map.mrc contains 2 non-finite values"):
        check_finite(stack, "map.mrc")


def test_check_finite_on_memmapped_file(tmp_path):
    data = np.zeros((3, 4, 4), np.float32)
    data[1, 2, 2] = np.nan
    write_mrc(tmp_path / "nan.mrcs", data, 1.0)
    mm, _ = read_mrc(tmp_path / "nan.mrcs", mmap=True)
    with pytest.raises(InputError, match=r"nan.mrcs.*particle 2 \(1-based\)"):
        check_finite(mm, str(tmp_path / "nan.mrcs"), item_name="particle")
    check_finite(np.arange(5), "integers")  # integer data are always finite


def test_module_has_no_cupy_import():
    src = open(mrc_module.__file__).read()
    assert "import cupy" not in src


def test_complex_data_kept_as_complex64(tmp_path, rng):
    z = rng.standard_normal((3, 4, 4)) + 1j * rng.standard_normal((3, 4, 4))
    write_mrc(tmp_path / "c.mrc", z, 1.0)
    back, _ = read_mrc(tmp_path / "c.mrc")
    assert back.dtype == np.complex64
    np.testing.assert_allclose(back, z.astype(np.complex64))
