"""Image references N@stack.mrcs: parsing, grouped memory-mapped reads, stack writers, errors."""
from __future__ import annotations

import os

import numpy as np
import pytest

from xmipp_accel.errors import FileFormatError, InputError
from xmipp_accel.io import images as images_module
from xmipp_accel.io.images import (ImageStackWriter, clear_stack_cache, format_image_ref, parse_image_ref,
                                   parse_image_refs, read_images, resolve_image_path, stack_size, write_stack)
from xmipp_accel.io.mrc import read_mrc, write_mrc
from xmipp_accel.io.particles import read_particles


@pytest.fixture
def stacks(tmp_path):
    """Two stacks with images whose every pixel encodes (stack, index): value = 1000 * stack + index."""
    a = (np.arange(7)[:, None, None] + np.zeros((7, 6, 5))).astype(np.float32)
    b = (1000 + np.arange(4)[:, None, None] + np.zeros((4, 6, 5))).astype(np.float32)
    write_stack(tmp_path / "a.mrcs", a, 1.0)
    os.makedirs(tmp_path / "sub")
    write_stack(tmp_path / "sub" / "b.mrcs", b, 1.0)
    clear_stack_cache()
    return tmp_path, a, b


@pytest.mark.parametrize("ref, expected", [
    ("12@stack.mrcs", (11, "stack.mrcs")),
    ("000001@Extract/job1/m.mrcs", (0, "Extract/job1/m.mrcs")),
    ("image.mrc", (None, "image.mrc")),
    ("3@/abs/path/s.mrcs:mrcs", (2, "/abs/path/s.mrcs")),  # Xmipp format hint dropped
    ("  7@s.mrcs \n", (6, "s.mrcs")),
    ("d@ta/weird:name.mrcs", None),
])
def test_parse_image_ref(ref, expected):
    if expected is None:
        with pytest.raises(InputError, match="not an image number"):
            parse_image_ref(ref)
    else:
        assert parse_image_ref(ref) == expected


@pytest.mark.parametrize("bad, message", [("0@s.mrcs", "start at 1"), ("-2@s.mrcs", "start at 1"),
                                          ("", "empty"), ("5@", "no file name")])
def test_parse_image_ref_errors(bad, message):
    with pytest.raises(InputError, match=message):
        parse_image_ref(bad)


def test_format_is_inverse_of_parse():
    for index0, path in [(0, "a.mrcs"), (123455, "x/y.mrcs"), (None, "img.mrc")]:
        assert parse_image_ref(format_image_ref(index0, path)) == (index0, path)
    idx, paths = parse_image_refs(["2@a.mrcs", "b.mrc"])
    assert idx.tolist() == [1, -1] and paths == ["a.mrcs", "b.mrc"]


def test_read_images_any_order_duplicates_and_two_stacks(stacks):
    folder, a, b = stacks
    refs = ["3@a.mrcs", "1@sub/b.mrcs", "7@a.mrcs", "3@a.mrcs", "4@sub/b.mrcs", "1@a.mrcs"]
    out = read_images(refs, base_dir=str(folder))
    assert out.shape == (6, 6, 5) and out.dtype == np.float32
    np.testing.assert_array_equal(out[:, 0, 0], [2, 1000, 6, 2, 1003, 0])
    np.testing.assert_array_equal(out[2], a[6])
    sel = read_images(refs, base_dir=str(folder), indices=[4, 0])
    np.testing.assert_array_equal(sel[:, 0, 0], [1003, 2])


def test_many_refs_match_direct_indexing(stacks):
    folder, a, b = stacks
    rng = np.random.default_rng(1)
    which = rng.integers(0, 2, 20000)
    idx = np.where(which == 0, rng.integers(0, 7, 20000), rng.integers(0, 4, 20000))
    refs = [f"{i + 1:06d}@{'a.mrcs' if w == 0 else 'sub/b.mrcs'}" for w, i in zip(which, idx)]
    out = read_images(refs, base_dir=str(folder))
    expected = np.where(which == 0, idx, 1000 + idx).astype(np.float32)
    np.testing.assert_array_equal(out[:, 3, 2], expected)


def test_relative_names_fall_back_to_current_folder(stacks, monkeypatch):
    folder, a, _ = stacks
    monkeypatch.chdir(folder)
    other = folder / "elsewhere"
    other.mkdir()
    # not beside base_dir, but in the working directory (RELION's project-folder rule, io/paths.py)
    assert resolve_image_path("a.mrcs", str(other)) == "a.mrcs"
    np.testing.assert_array_equal(read_images(["2@a.mrcs"], base_dir=str(other))[0], a[1])
    assert stack_size("a.mrcs") == 7


def test_plain_image_reference(tmp_path):
    img = np.arange(12, dtype=np.float32).reshape(3, 4)
    write_mrc(tmp_path / "single.mrc", img, 1.0)
    out = read_images(["single.mrc", "1@single.mrc"], base_dir=str(tmp_path))
    np.testing.assert_array_equal(out[0], img)
    np.testing.assert_array_equal(out[1], img)


def test_past_the_end_names_file_and_size(stacks):
    folder, _, _ = stacks
    with pytest.raises(FileFormatError) as info:
        read_images(["1@a.mrcs", "8@a.mrcs"], base_dir=str(folder), source="parts.star")
    msg = str(info.value)
    assert "8@a.mrcs" in msg and "parts.star" in msg and "holds 7 images" in msg


def test_missing_stack_names_it(stacks):
    folder, _, _ = stacks
    with pytest.raises(FileFormatError, match=r"missing.mrcs not found \(named in p.star\); looked for .*--datadir"):
        read_images(["1@a.mrcs", "1@missing.mrcs"], base_dir=str(folder), source="p.star")


def test_plain_reference_to_multi_image_stack_is_an_error(stacks):
    folder, _, _ = stacks
    with pytest.raises(FileFormatError, match="stack of 7 images without an image number"):
        read_images(["a.mrcs"], base_dir=str(folder))


def test_different_box_sizes_are_an_error(stacks):
    folder, _, _ = stacks
    write_stack(folder / "big.mrcs", np.zeros((2, 8, 8), np.float32), 1.0)
    with pytest.raises(FileFormatError, match="same box size"):
        read_images(["1@a.mrcs", "1@big.mrcs"], base_dir=str(folder))


def test_truncated_stack_is_reported(stacks):
    folder, _, _ = stacks
    raw = (folder / "a.mrcs").read_bytes()
    (folder / "a.mrcs").write_bytes(raw[:-10])
    with pytest.raises(FileFormatError, match="a.mrcs is truncated"):
        read_images(["1@a.mrcs"], base_dir=str(folder))


def test_cache_sees_rewritten_files(stacks):
    folder, a, _ = stacks
    assert read_images(["1@a.mrcs"], base_dir=str(folder))[0, 0, 0] == 0
    write_stack(folder / "a.mrcs", a + 50, 1.0)  # same size, new content (atomic replace: new inode)
    assert read_images(["1@a.mrcs"], base_dir=str(folder))[0, 0, 0] == 50


def test_cache_is_bounded(stacks, monkeypatch):
    folder, _, _ = stacks
    cache = images_module._StackCache(maxsize=2)
    monkeypatch.setattr(images_module, "_cache", cache)
    for k in range(4):
        write_stack(folder / f"c{k}.mrcs", np.full((1, 2, 2), k, np.float32), 1.0)
        assert read_images([f"1@c{k}.mrcs"], base_dir=str(folder))[0, 0, 0] == k
    assert len(cache._maps) == 2


def test_real_trpv1_stack_through_star(shared_data):
    star = os.path.join(shared_data, "trpv1-real", "trpv1_small_stack.star")
    pset = read_particles(star)
    imgs = pset.read_images()
    direct, voxel = read_mrc(os.path.join(shared_data, "trpv1-real", "batch_0_restacked.mrc"))
    assert imgs.shape == (10, 48, 48) and voxel == pytest.approx(4.88)
    np.testing.assert_array_equal(imgs, direct)


def test_stack_writer_batches(tmp_path):
    data = np.random.default_rng(3).standard_normal((10, 8, 6)).astype(np.float32)
    with ImageStackWriter(tmp_path / "w.mrcs", 10, (8, 6), 1.25) as w:
        w.write(data[:4])
        w.write(data[4:9])
        w.write(data[9])  # a single 2D image
        assert not (tmp_path / "w.mrcs").exists()  # only renamed when complete
    back, voxel = read_mrc(tmp_path / "w.mrcs")
    np.testing.assert_array_equal(back, data)
    assert voxel == pytest.approx(1.25)


def test_stack_writer_incomplete_or_failing_leaves_nothing(tmp_path):
    with pytest.raises(InputError, match="3 of 5 images were never written"):
        with ImageStackWriter(tmp_path / "inc.mrcs", 5, (4, 4), 1.0) as w:
            w.write(np.zeros((2, 4, 4), np.float32))
    with pytest.raises(RuntimeError, match="stop"):
        with ImageStackWriter(tmp_path / "fail.mrcs", 2, (4, 4), 1.0) as w:
            w.write(np.zeros((1, 4, 4), np.float32))
            raise RuntimeError("stop")
    with pytest.raises(InputError, match="past the end"):
        with ImageStackWriter(tmp_path / "over.mrcs", 1, (4, 4), 1.0) as w:
            w.write(np.zeros((2, 4, 4), np.float32))
    assert os.listdir(tmp_path) == []


def test_write_stack_of_one_2d_image(tmp_path):
    write_stack(tmp_path / "one.mrcs", np.ones((5, 5), np.float32), 2.0)
    assert read_mrc(tmp_path / "one.mrcs", mmap=True)[0].shape == (5, 5)
    assert read_images(["1@one.mrcs"], base_dir=str(tmp_path)).shape == (1, 5, 5)


@pytest.mark.parametrize("indices", [np.arange(3, 37), np.arange(36, 2, -1), np.array([5, 9, 2, 30, 31, 32]),
                                     np.r_[10:20, 25:30]])
def test_batched_reads_from_one_stack_equal_the_stack(tmp_path, monkeypatch, indices):
    """Runs of consecutive images are copied in parallel slices straight from the mapped file; every order
    of indices gives the images asked for, in the order asked (int16 stack: converted to float32)."""
    monkeypatch.setattr(images_module, "_PARALLEL_BYTES", 0)
    data = np.random.default_rng(4).integers(-500, 500, (40, 12, 10)).astype(np.int16)
    write_mrc(str(tmp_path / "s.mrcs"), data, 1.0)
    refs = [f"{i + 1}@s.mrcs" for i in range(40)]
    got = images_module.read_images(refs, str(tmp_path), indices=indices)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, data[indices].astype(np.float32))
