"""Every movie format a detector writes, read into the caller's buffer and checked pixel by pixel.

Each file is written by another program (mrcfile, tifffile, RELION) or, for MRC mode 101 and EER which
no library here writes, coded by hand from the format's description (IMOD's mrc_format.txt; the EER
format documentation, see ``eer_synth``); RELION 3.1 is the independent reader for EER, TIFF row
order and the gain rotations/flips.
"""
import json

import numpy as np
import pytest

from xmipp_accel.errors import FileFormatError, InputError
from xmipp_accel.io.movie import movie_info, read_movie, read_movie_raw, read_reference, upsample_eer_reference
from xmipp_accel.io.mrc import mrc_info, open_stack, read_mrc, unpack_4bit
from xmipp_accel.io.star import read_star
from xmipp_accel.tests import eer_synth
from xmipp_accel.tests.relion_peer import relion_program, run_relion

mrcfile = pytest.importorskip("mrcfile")
tifffile = pytest.importorskip("tifffile")
imagecodecs = pytest.importorskip("imagecodecs")

RNG = np.random.default_rng(16)


# --------------------------------------------------------------------------------------------------- MRC

@pytest.mark.parametrize("mode,dtype", [(0, np.int8), (1, np.int16), (2, np.float32), (6, np.uint16),
                                        (12, np.float16)])
def test_mrc_modes_written_by_mrcfile(tmp_path, mode, dtype):
    frames = RNG.integers(0, 100, (5, 20, 28)).astype(dtype)
    path = str(tmp_path / f"m{mode}.mrcs")
    with mrcfile.new(path) as m:
        m.set_data(frames)
        m.set_image_stack()
        m.voxel_size = 0.83
    assert int(mrcfile.open(path, header_only=True).header.mode) == mode
    info = movie_info(path)
    assert (info.n_frames, info.ny, info.nx, info.dtype.newbyteorder("=")) == (5, 20, 28, np.dtype(dtype))
    assert info.pixel_size_A == pytest.approx(0.83)
    out = np.empty((3, 20, 28), dtype)                      # the caller's (pinned) buffer
    assert read_movie_raw(path, (1, 4), out=out, workers=3, info=info) is out
    np.testing.assert_array_equal(out, frames[1:4])


def _write_4bit(path, values):
    """A mode-101 stack: header by mrcfile (as a uint8 stack), mode and data packed here by hand."""
    n, ny, nx = values.shape
    with mrcfile.new(path) as m:
        m.set_data(np.zeros((n, ny, nx), np.uint8))
        m.set_image_stack()
        m.voxel_size = 1.08
    row = (nx + 1) // 2
    packed = np.zeros((n, ny, row), np.uint8)
    for x in range(nx):                                     # pixel x: byte x // 2, low nibble when x is even
        packed[:, :, x // 2] |= (values[:, :, x] << (4 * (x % 2))).astype(np.uint8)
    with open(path, "r+b") as f:
        f.seek(12)
        f.write(np.array([101], "<i4").tobytes())
        f.seek(1024)
        f.write(packed.tobytes())
        f.truncate(1024 + packed.size)


@pytest.mark.parametrize("nx", [16, 11])                       # odd width: 4 bits of padding per row
def test_mrc_mode_101_packed_4bit(tmp_path, nx):
    values = RNG.integers(0, 16, (4, 9, nx)).astype(np.uint8)
    values[0, 0, :3] = [1, 15, 7]                            # first byte 0xF1: left pixel in the low nibble
    path = str(tmp_path / "k3.mrc")
    _write_4bit(path, values)
    with open(path, "rb") as f:
        f.seek(1024)
        assert f.read(1) == b"\xf1"
    hdr = mrc_info(path)
    assert hdr.packed4bit and hdr.data_nbytes == 4 * 9 * ((nx + 1) // 2)
    info = movie_info(path)
    assert (info.n_frames, info.ny, info.nx, info.dtype, info.packed4bit) == (4, 9, nx, np.uint8, True)
    out = np.full((3, 9, nx), 255, np.uint8)
    read_movie_raw(path, (1, 4), out=out, workers=2, info=info)
    np.testing.assert_array_equal(out, values[1:4])
    np.testing.assert_array_equal(read_movie(path), values.astype(np.float32))
    np.testing.assert_array_equal(open_stack(path), values)
    np.testing.assert_array_equal(read_mrc(path)[0], values)
    np.testing.assert_array_equal(unpack_4bit(np.array([[0x21, 0x03]], np.uint8), 3), [[1, 2, 3]])


def test_truncated_mode_101_names_the_file(tmp_path):
    path = str(tmp_path / "cut4.mrc")
    _write_4bit(path, RNG.integers(0, 16, (3, 8, 8)).astype(np.uint8))
    with open(path, "r+b") as f:
        f.truncate(1024 + 50)
    with pytest.raises(FileFormatError, match="cut4.mrc is truncated.*4-bit"):
        movie_info(path)


# -------------------------------------------------------------------------------------------------- TIFF

@pytest.mark.parametrize("compression", [None, "lzw", "zlib", "deflate"])
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_tiff_compressions_decoded_in_parallel_into_the_buffer(tmp_path, compression, dtype):
    frames = RNG.integers(0, 200, (6, 24, 36)).astype(dtype)
    path = str(tmp_path / "m.tif")
    tifffile.imwrite(path, frames, compression=compression, photometric="minisblack", metadata=None)
    code = {None: 1, "lzw": 5, "zlib": 8, "deflate": 32946}[compression]
    with tifffile.TiffFile(path) as tif:
        assert len(tif.pages) == 6 and tif.pages[0].compression == code
    info = movie_info(path)
    out = np.empty((4, 24, 36), dtype)
    assert read_movie_raw(path, (2, 6), out=out, workers=3, info=info) is out
    np.testing.assert_array_equal(out, frames[2:6, ::-1])    # upside down: RELION's, IMOD's row order
    one = np.empty((1, 24, 36), dtype)
    np.testing.assert_array_equal(read_movie_raw(path, (5, 6), out=one, info=info), frames[5:6, ::-1])


def test_tiff_row_order_is_relions(tmp_path):
    """relion_run_motioncorr's sum of a TIFF movie matches our frames, not tifffile's row order."""
    relion_program("relion_run_motioncorr")
    frames = RNG.poisson(30.0, (3, 48, 64)).astype(np.uint8)   # same image in every frame: no motion
    frames[1:] = frames[0]
    tifffile.imwrite(str(tmp_path / "t.tif"), frames, photometric="minisblack", metadata=None)
    run_relion(["relion_run_motioncorr", "--i", "t.tif", "--o", "MC/", "--use_own", "--skip_defect",
                "--angpix", "1", "--voltage", "300"], cwd=tmp_path)
    relion_sum = read_mrc(str(tmp_path / "MC" / "t.mrc"))[0]
    ours = read_movie(str(tmp_path / "t.tif")).sum(axis=0)
    assert np.corrcoef(relion_sum.ravel(), ours.ravel())[0, 1] > 0.99
    assert abs(np.corrcoef(relion_sum.ravel(), frames.sum(0).ravel())[0, 1]) < 0.2


# --------------------------------------------------------------------------------------------------- EER

@pytest.mark.parametrize("compression", [65000, 65001])
def test_eer_raw_frames_at_4k_and_8k(tmp_path, compression):
    ny, nx = 24, 40
    frames = eer_synth.random_frames(RNG, 4, ny, nx, electrons=300)
    inner = RNG.choice(np.arange(1, ny * nx - 1), 298, replace=False)
    y, x = np.divmod(np.concatenate([[0, ny * nx - 1], inner]), nx)   # electrons on the first and last pixel
    frames[0] = (y, x, RNG.integers(0, 4, 300), RNG.integers(0, 4, 300))
    path = str(tmp_path / "m.eer")
    eer_synth.write_eer(path, ny, nx, frames, compression)
    with tifffile.TiffFile(path) as tif:                    # tifffile + imagecodecs decode the same events
        assert tif.is_eer and tif.pages[0].compression == compression
        for k in range(4):
            np.testing.assert_array_equal(tif.pages[k].asarray(), eer_synth.render(frames[k:k + 1], ny, nx, 1)[0])
    for up in (1, 2):
        info = movie_info(path, eer_fractions=1, eer_upsampling=up)
        assert (info.format, info.n_frames, info.ny, info.nx, info.dtype) == ("eer", 4, ny * up, nx * up, np.uint8)
        out = np.empty((3, ny * up, nx * up), np.uint8)
        read_movie_raw(path, (1, 4), out=out, workers=2, info=info)
        np.testing.assert_array_equal(out, eer_synth.render(frames, ny, nx, up)[1:4])


def test_eer_fractions_group_raw_frames_like_relion(tmp_path):
    ny, nx = 16, 20
    frames = eer_synth.random_frames(RNG, 11, ny, nx, electrons=80)
    path = str(tmp_path / "m.eer")
    eer_synth.write_eer(path, ny, nx, frames)
    info = movie_info(path, eer_fractions=3, eer_upsampling=2)
    assert (info.n_frames, info.raw_frames, info.eer_fractions) == (3, 11, 3)   # raw frames 10, 11 unused
    expect = eer_synth.render(frames, ny, nx, 2)[:9].reshape(3, 3, 2 * ny, 2 * nx).sum(axis=1)
    np.testing.assert_array_equal(read_movie(path, eer_fractions=3, eer_upsampling=2), expect)
    with pytest.raises(InputError, match="11 raw EER frames, fewer than one fraction of 12"):
        movie_info(path, eer_fractions=12)
    with pytest.raises(InputError, match="--eer-upsampling must be 1"):
        movie_info(path, eer_fractions=3, eer_upsampling=3)


def test_truncated_eer_names_the_file(tmp_path):
    ny, nx = 16, 16
    path = str(tmp_path / "cut.eer")
    eer_synth.write_eer(path, ny, nx, eer_synth.random_frames(RNG, 3, ny, nx, electrons=60))
    with tifffile.TiffFile(path) as tif:
        end = tif.pages[2].dataoffsets[0] + 4
    with open(path, "r+b") as f:
        f.truncate(end)
    with pytest.raises(FileFormatError, match="cut.eer"):
        read_movie(path, eer_fractions=1)


@pytest.mark.parametrize("upsampling", [1, 2])
def test_eer_matches_relion_convert_to_tiff(tmp_path, upsampling):
    """RELION renders the same fractions (it reads only 4096 x 4096 EER; its TIFF is written upside down,
    which our TIFF reader turns back)."""
    relion_program("relion_convert_to_tiff")
    n = 4096
    frames = eer_synth.random_frames(RNG, 6, n, n, electrons=2000)
    eer_synth.write_eer(str(tmp_path / "big.eer"), n, n, frames)
    run_relion(["relion_convert_to_tiff", "--i", "big.eer", "--o", "out/", "--eer_grouping", "2",
                "--eer_upsampling", str(upsampling)], cwd=tmp_path)
    relion = read_movie_raw(str(tmp_path / "out" / "big.tif"))
    ours = read_movie_raw(str(tmp_path / "big.eer"), info=movie_info(str(tmp_path / "big.eer"), eer_fractions=2,
                                                                      eer_upsampling=upsampling))
    assert ours.shape == relion.shape == (3, n * upsampling, n * upsampling)
    assert int(ours.sum()) == 6 * 2000
    np.testing.assert_array_equal(ours, relion)


def test_align_movies_on_eer_with_an_8k_gain_from_4k(tmp_path, capsys):
    from xmipp_accel.cli.__main__ import main
    ny = nx = 64
    frames = eer_synth.random_frames(RNG, 26, ny, nx, electrons=1200)
    eer_synth.write_eer(str(tmp_path / "m.eer"), ny, nx, frames)
    gain = RNG.uniform(0.9, 1.1, (ny, nx)).astype(np.float32)
    tifffile.imwrite(str(tmp_path / "gain.gain"), gain)     # EPU's .gain: a TIFF read as stored
    code = main(["align-movies", str(tmp_path / "m.eer"), "-o", str(tmp_path / "o"), "--pixel-size", "0.5",
                 "--eer-fractions", "5", "--eer-upsampling", "2", "--gain", str(tmp_path / "gain.gain"),
                 "--no-local", "--psd-size", "0", "--device", "cpu", "--json", "-q"])
    out, err = capsys.readouterr()
    assert code == 0, err
    movie = json.loads(out.strip().splitlines()[-1])["movies"][0]
    assert movie["status"] == "ok", movie
    assert len(movie["shifts_px"]) == 5                                      # 26 raw frames: 5 fractions of 5
    assert read_mrc(movie["outputs"]["sum"])[0].shape == (2 * ny, 2 * nx)
    general = read_star(movie["outputs"]["shifts"])["general"]
    assert (general["rlnImageSizeX"][0], general["rlnImageSizeZ"][0]) == (2 * nx, 5)
    assert (general["rlnEERGrouping"][0], general["rlnEERUpsampling"][0]) == (5, 2)   # what polishing re-reads
    np.testing.assert_array_equal(read_reference(str(tmp_path / "gain.gain")), gain)
    np.testing.assert_array_equal(upsample_eer_reference(gain, (128, 128))[::2, 1::2], gain)


# ------------------------------------------------------------------------------------------ gain orientation

def test_gain_rot_flip_as_relion_applies_them(tmp_path):
    """RELION writes the gain it applied (MotionCorr/gain.mrc); ours must be the same image, for the 11
    rotations and flips of an asymmetric gain."""
    from xmipp_accel.gpu.movie.preprocess import orient_reference
    relion_program("relion_run_motioncorr")
    ny, nx = 40, 56
    movie = RNG.poisson(20.0, (3, ny, nx)).astype(np.float32)
    with mrcfile.new(str(tmp_path / "m.mrcs")) as m:
        m.set_data(movie)
    stored = {0: RNG.uniform(0.5, 1.5, (ny, nx)).astype(np.float32),    # even turns keep the shape
              1: RNG.uniform(0.5, 1.5, (nx, ny)).astype(np.float32)}    # odd turns swap it
    for parity, image in stored.items():
        with mrcfile.new(str(tmp_path / f"g{parity}.mrc")) as m:
            m.set_data(image)
    for rot in range(4):
        for flip in range(3):
            if rot == flip == 0:
                continue                                    # RELION writes no gain.mrc then: nothing to turn
            out = f"MC_{rot}_{flip}/"
            run_relion(["relion_run_motioncorr", "--i", "m.mrcs", "--o", out, "--use_own", "--skip_defect",
                        "--angpix", "1", "--voltage", "300", "--gainref", f"g{rot % 2}.mrc", "--gain_rot",
                        str(rot), "--gain_flip", str(flip)], cwd=tmp_path)
            applied = read_mrc(str(tmp_path / out / "gain.mrc"))[0]
            ours = orient_reference(read_reference(str(tmp_path / f"g{rot % 2}.mrc")), rotation=rot, flip=flip)
            np.testing.assert_array_equal(ours, applied, err_msg=f"--gain-rot {rot} --gain-flip {flip}")
    stored = stored[1]
    tifffile.imwrite(str(tmp_path / "g.tif"), stored)         # a TIFF gain: read upside down, as RELION does
    run_relion(["relion_run_motioncorr", "--i", "m.mrcs", "--o", "MT/", "--use_own", "--skip_defect",
                "--angpix", "1", "--voltage", "300", "--gainref", "g.tif", "--gain_rot", "1"], cwd=tmp_path)
    np.testing.assert_array_equal(orient_reference(read_reference(str(tmp_path / "g.tif")), rotation=1),
                                  read_mrc(str(tmp_path / "MT" / "gain.mrc"))[0])


def test_gain_rot_is_clockwise_as_displayed():
    """rot 1 turns the image 90° clockwise with row 0 at the top (RELION's --gain_rot help: "clock-wise
    (in relion_display)"; MotionCor2's -RotGain), then flip 1 reverses rows, flip 2 columns."""
    from xmipp_accel.gpu.movie.preprocess import orient_reference
    g = np.array([[1, 2, 3], [4, 5, 6]])
    np.testing.assert_array_equal(orient_reference(g, rotation=1), [[4, 1], [5, 2], [6, 3]])
    np.testing.assert_array_equal(orient_reference(g, rotation=1, flip=1), [[6, 3], [5, 2], [4, 1]])


def test_native_8k_probe_expects_what_the_format_says(tmp_path, monkeypatch):
    """The frame that decides whether imagecodecs renders 8K itself is decoded by our sub-pixel reader to
    the 8K pixels the probe expects; with a new enough imagecodecs both paths must agree on a movie."""
    from xmipp_accel.io import eer
    stream = eer._pack_codes([(1 | ((3 ^ 2) << 7) | ((1 ^ 2) << 9), 11), (0 | ((0 ^ 2) << 7) | ((2 ^ 2) << 9), 11),
                              (1, 7)])
    events = np.flatnonzero(imagecodecs.eer_decode(stream, (2, 2), 7, 2, 2))
    sub_x, sub_y = eer.eer_event_subpixels(stream, events, 7, 2, 2)
    y, x = np.divmod(events, 2)
    assert list(zip(2 * y + (sub_y >> 1), 2 * x + (sub_x >> 1))) == [(0, 3), (3, 0)]
    if not eer.native_8k():
        pytest.skip(f"imagecodecs {imagecodecs.__version__} does not render 8K EER itself (fallback tested above)")
    path = str(tmp_path / "m.eer")
    eer_synth.write_eer(path, 32, 48, eer_synth.random_frames(RNG, 4, 32, 48, electrons=400))
    native = read_movie(path, eer_fractions=2, eer_upsampling=2)
    monkeypatch.setattr(eer, "native_8k", lambda: False)
    np.testing.assert_array_equal(read_movie(path, eer_fractions=2, eer_upsampling=2), native)


def test_multipage_tiff_gain_is_refused(tmp_path):
    tifffile.imwrite(str(tmp_path / "g.tif"), np.ones((2, 8, 8), np.float32), photometric="minisblack",
                     metadata=None)
    with pytest.raises(FileFormatError, match="g.tif has 2 TIFF pages"):
        read_reference(str(tmp_path / "g.tif"))
