"""Write EER movies for the tests: electrons at known pixels and sub-pixel positions.

No program writes EER but the camera, and no small EER file is published in the repositories searched
(tifffile, imagecodecs, RELION), so the tests build their own, coded as the EER file format
documentation 3.0, section 4 (Thermo Fisher, 2023) describes and RELION's ``renderEER.cpp`` and
imagecodecs' ``imcd_eer_decode`` read it: per raw frame one little-endian, LSB-first bit stream; a
run length of ``rlebits`` bits (empty pixels before the next electron, raster order), the largest value
meaning "that many empty pixels, no electron"; after any other value 2 bits of sub-pixel x then 2 of y,
each XOR 2; the last run reaches the last pixel. The container is a BigTIFF written by tifffile (one
strip per page, the acquisition XML in tag 65001); tifffile cannot write EER compression, so the pages
are written as deflate-compressed with the EER stream as their bytes and the Compression tag is then
overwritten with 65000/65001.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import numpy as np

Frame = Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # y, x, sub_x, sub_y (sub 0..3)


def pack_bits(values: Sequence[int], widths: Sequence[int]) -> bytes:
    """Codes ``values`` of ``widths`` bits as one LSB-first stream, padded to 8 bytes."""
    vals = np.asarray(values, dtype=np.int64)
    lens = np.asarray(widths, dtype=np.int64)
    code = np.repeat(np.arange(vals.size), lens)
    bit = np.arange(int(lens.sum())) - np.repeat(np.cumsum(lens) - lens, lens)
    bits = ((vals[code] >> bit) & 1).astype(np.uint8)
    bits = np.concatenate([bits, np.zeros(-bits.size % 64, np.uint8)])
    return np.packbits(bits, bitorder="little").tobytes()


def eer_stream(ny: int, nx: int, frame: Frame, rlebits: int = 7) -> bytes:
    """The EER code stream of one raw frame (at most one electron per pixel)."""
    y, x, sub_x, sub_y = (np.asarray(a, dtype=np.int64) for a in frame)
    pix = y * nx + x
    order = np.argsort(pix)
    assert np.unique(pix).size == pix.size, "one electron per pixel per raw frame"
    skip = (1 << rlebits) - 1
    p, sx, sy = pix[order], sub_x[order], sub_y[order]
    gaps = np.diff(p, prepend=-1) - 1                      # empty pixels before each electron
    nskip = gaps // skip                                    # "skip" codes first, then the electron's code
    count = nskip + 1
    ends = np.cumsum(count) - 1
    values = np.full(int(count.sum()), skip, np.int64)
    widths = np.full(values.size, rlebits, np.int64)
    values[ends] = (gaps - nskip * skip) | ((sx ^ 2) << rlebits) | ((sy ^ 2) << (rlebits + 2))
    widths[ends] = rlebits + 4
    tail = ny * nx - (int(p[-1]) + 1 if p.size else 0)      # the last run reaches the last pixel
    values = np.concatenate([values, np.full(tail // skip, skip), [tail % skip]])
    widths = np.concatenate([widths, np.full(tail // skip + 1, rlebits)])
    return pack_bits(values, widths)


def random_frames(rng: np.random.Generator, n: int, ny: int, nx: int, electrons: int) -> List[Frame]:
    """``n`` raw frames of ``electrons`` electrons each at distinct random pixels, random sub-pixels."""
    frames = []
    for _ in range(n):
        pix = rng.choice(ny * nx, electrons, replace=False)
        y, x = np.divmod(pix, nx)
        frames.append((y, x, rng.integers(0, 4, electrons), rng.integers(0, 4, electrons)))
    return frames


def write_eer(path: str, ny: int, nx: int, frames: Sequence[Frame], compression: int = 65001) -> None:
    """A BigTIFF EER movie of ``frames`` (compression 65000: 8-bit runs, 65001: 7-bit runs)."""
    import tifffile
    rlebits = {65000: 8, 65001: 7}[compression]
    xml = b'<metadata><item name="numberOfFrames">%d</item></metadata>' % len(frames)
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        for i, frame in enumerate(frames):
            tw.write(iter([eer_stream(ny, nx, frame, rlebits)]), shape=(ny, nx), dtype=np.uint8,
                     compression="zlib", rowsperstrip=ny, photometric="minisblack", metadata=None,
                     extratags=[(65001, 7, len(xml), xml, True)] if i == 0 else [])
    with tifffile.TiffFile(path, mode="r+b") as tif:
        for page in tif.pages:
            page.tags["Compression"].overwrite(compression)


def render(frames: Sequence[Frame], ny: int, nx: int, upsampling: int) -> np.ndarray:
    """The frames as counts on the 4K (1) or 8K (2) grid: RELION's render4K/render8K of what was coded."""
    out = np.zeros((len(frames), ny * upsampling, nx * upsampling), np.int64)
    for k, (y, x, sx, sy) in enumerate(frames):
        if upsampling == 1:
            np.add.at(out[k], (y, x), 1)
        else:
            np.add.at(out[k], (2 * y + (sy >> 1), 2 * x + (sx >> 1)), 1)
    return out
