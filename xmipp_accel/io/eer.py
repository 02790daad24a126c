"""EER movies (Thermo Fisher Falcon 4/4i electron events): raw frames grouped into fractions, 4K or 8K.

The format (EER file format documentation 3.0, section 4, M. Leichsenring, Thermo Fisher Scientific,
2023; as decoded by imagecodecs' ``eer_decode`` and RELION's ``src/renderEER.cpp``): a BigTIFF with one
page per raw frame, compression 65000 (8-bit run lengths), 65001 (7-bit) or 65002 (bit widths in tags
65007-65009), the acquisition XML in tag 65001. A page's strips form one little-endian, least significant
bit first stream of codes. A code starts with a run length of ``rlebits`` bits: that many empty pixels
(raster order, x fastest) come before the next electron. The largest value, ``2**rlebits - 1``, means
"that many empty pixels and no electron" and the code ends there; any other value is followed by
``horzbits`` then ``vertbits`` bits, the electron's sub-pixel x and y, each stored XOR ``2**(bits - 1)``
(RELION's ``^ 0x0A`` for 2 + 2 bits). The pixel after an electron starts the next run; the stream ends
where the runs reach the last pixel. A pixel holds at most one electron per raw frame.

Grouping follows RELION's ``--eer_grouping``: fraction ``g`` (0-based) is the sum of raw frames
``g * F`` to ``g * F + F - 1``; the ``n_raw % F`` raw frames left at the end are not used (RELION
drops them too). Upsampling 1 renders on the 4K pixel grid, 2 on the 8K grid: the first sub-pixel bit
of x and of y picks the half pixel (RELION's ``render8K``).

Decoding: imagecodecs decodes each raw frame at 4K (in C, without the GIL, so threads run in
parallel); for 8K the sub-pixel bits are read straight from the stream at offsets computed from the 4K
events (a gap of ``g`` empty pixels before an electron is always coded as ``g // (2**rlebits - 1)``
skip codes and one electron code, so each electron's code position follows from the gaps alone). This
does not depend on imagecodecs' own super-resolution mode, whose sub-pixel order changed in 2025; where
:func:`native_8k` finds a decoder that renders 8K correctly (imagecodecs >= 2025.11.11) that is used
instead (all in C, without the GIL).
"""
from __future__ import annotations

import functools
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import List, Optional, Tuple

import numpy as np

from ..errors import FileFormatError, InputError

__all__ = ["EER_COMPRESSIONS", "EerLayout", "eer_layout", "read_eer", "eer_event_subpixels",
           "DEFAULT_EER_FRACTIONS", "native_8k"]

logger = logging.getLogger(__name__)

#: TIFF compression codes of EER pages: (rlebits, horzbits, vertbits); 65002 reads them from tags
EER_COMPRESSIONS = {65000: (8, 2, 2), 65001: (7, 2, 2), 65002: None}
#: RELION's default --eer_grouping
DEFAULT_EER_FRACTIONS = 40


@dataclass(frozen=True)
class EerLayout:
    """Where the raw frames of an EER file lie and how they are coded.

    Attributes
    ----------
    path : str
    n_raw : int
        Raw frames (TIFF pages).
    ny, nx : int
        Physical pixels of a frame (4096 x 4096 on a Falcon 4).
    rlebits, horzbits, vertbits : int
        Code widths in bits.
    segments : list of (offsets, bytecounts) per raw frame, or None when only the header was read.
    """
    path: str
    n_raw: int
    ny: int
    nx: int
    rlebits: int
    horzbits: int
    vertbits: int
    segments: Optional[List[Tuple[Tuple[int, ...], Tuple[int, ...]]]] = None


def _code_bits(page) -> Tuple[int, int, int]:
    bits = EER_COMPRESSIONS[int(page.compression)]
    if bits is not None:
        return bits
    return (int(page.tags.valueof(65007, 7)), int(page.tags.valueof(65008, 2)), int(page.tags.valueof(65009, 2)))


def is_eer_compression(code: int) -> bool:
    """True for the TIFF compression codes of EER pages."""
    return int(code) in EER_COMPRESSIONS


def eer_layout(path: str, *, segments: bool = False) -> EerLayout:
    """Read the TIFF structure of an EER file (pages, size, code widths; strip positions with ``segments``).

    Raises
    ------
    FileFormatError
        Not a TIFF, pages that are not EER-compressed, or pages of different sizes.
    """
    import tifffile
    try:
        with tifffile.TiffFile(path) as tif:
            first = tif.pages[0]
            compression = int(first.compression)
            shape = tuple(int(s) for s in first.shape)
            if not is_eer_compression(compression):
                raise FileFormatError(f"{path}: TIFF compression {compression} is not EER (65000, 65001 or "
                                      "65002); read it as a TIFF movie (.tif/.tiff)")
            bits = _code_bits(first)
            tif.pages.useframes = True           # light TiffFrame objects: offsets and byte counts only
            n = len(tif.pages)
            segs = None
            if segments:
                segs = []
                for page in tif.pages:
                    segs.append((tuple(int(o) for o in page.dataoffsets),
                                 tuple(int(c) for c in page.databytecounts)))
    except FileFormatError:
        raise
    except Exception as exc:  # tifffile raises many types for damaged files
        raise FileFormatError(f"{path} is not a readable EER movie (truncated or corrupt?): "
                              f"{type(exc).__name__}: {exc}") from None
    if len(shape) != 2:
        raise FileFormatError(f"{path}: EER pages of shape {shape}; expected one 2D frame per page")
    return EerLayout(path, n, shape[0], shape[1], *bits, segments=segs)


def eer_event_subpixels(stream: bytes, events: np.ndarray, rlebits: int, horzbits: int,
                        vertbits: int) -> Tuple[np.ndarray, np.ndarray]:
    """Sub-pixel x and y (0 to 2**bits - 1) of each electron of one raw frame.

    Parameters
    ----------
    stream : bytes
        The frame's EER code stream.
    events : int array (n,)
        Raster indices of the frame's electrons, increasing (from the 4K decode).
    rlebits, horzbits, vertbits : int
        Code widths.

    Returns
    -------
    (sub_x, sub_y) : two int arrays (n,)
    """
    events = np.asarray(events, dtype=np.int64)
    if events.size == 0:
        return np.zeros(0, np.int32), np.zeros(0, np.int32)
    skip = (1 << rlebits) - 1
    gaps = (np.diff(events, prepend=-1) - 1).astype(np.int32)     # empty pixels before each electron
    code_bits = rlebits + horzbits + vertbits
    lengths = (gaps // skip) * rlebits + code_bits                # skip codes, then the electron's code
    sub_start = np.cumsum(lengths, dtype=np.int64) - (horzbits + vertbits)
    data = np.frombuffer(stream, dtype=np.uint8)
    need = int(sub_start[-1] + horzbits + vertbits + 7) // 8
    if need > data.size:
        raise FileFormatError(f"EER stream of {data.size} bytes is shorter than its electrons need ({need})")
    padded = np.concatenate([data, np.zeros(1, np.uint8)]).astype(np.uint16)
    words = padded[:-1] | (padded[1:] << 8)                      # 16 bits from every byte: shift + bits <= 16
    sub = words[sub_start >> 3] >> (sub_start & 7).astype(np.uint16)
    sub_x = ((sub & ((1 << horzbits) - 1)) ^ (1 << (horzbits - 1))).astype(np.int32)
    sub_y = (((sub >> horzbits) & ((1 << vertbits) - 1)) ^ (1 << (vertbits - 1))).astype(np.int32)
    return sub_x, sub_y


def _pack_codes(codes: List[Tuple[int, int]]) -> bytes:
    """(value, bits) codes as an LSB-first stream padded to 8 bytes."""
    word, nbits = 0, 0
    for value, bits in codes:
        word |= value << nbits
        nbits += bits
    return word.to_bytes(max(8, (nbits + 63) // 64 * 8), "little")


@functools.lru_cache(maxsize=None)
def native_8k() -> bool:
    """True when imagecodecs itself renders the 8K grid as the format says (``superres=1``, imagecodecs
    >= 2025.11.11): checked on a 2 x 2 pixel frame with electrons at (y 0, x 1, sub-pixel x 3, y 1) and
    (y 1, x 0, sub x 0, y 2), which land on 8K pixels (0, 3) and (3, 0). Older versions take
    ``superres`` as a flag for the 16K grid with x and y swapped; then the sub-pixel bits are read here."""
    import imagecodecs
    stream = _pack_codes([(1 | ((3 ^ 2) << 7) | ((1 ^ 2) << 9), 11), (0 | ((0 ^ 2) << 7) | ((2 ^ 2) << 9), 11),
                          (1, 7)])
    try:
        got = imagecodecs.eer_decode(stream, (4, 4), 7, 2, 2, superres=1)
    except Exception:  # old decoders reject the shape or overrun: not usable
        return False
    expect = np.zeros((4, 4), bool)
    expect[0, 3] = expect[3, 0] = True
    return bool(np.array_equal(np.asarray(got, bool), expect))


class _FrameDecoder:
    """Reads and decodes the raw frames of one EER file; one scratch frame per thread."""

    def __init__(self, layout: EerLayout, upsampling: int):
        import imagecodecs
        self.codec = imagecodecs
        self.layout = layout
        self.upsampling = upsampling
        self._local = threading.local()

    def stream(self, fd: int, frame: int) -> bytes:
        offsets, counts = self.layout.segments[frame]
        parts = [os.pread(fd, c, o) for o, c in zip(offsets, counts)]
        if any(len(p) != c for p, c in zip(parts, counts)):
            raise FileFormatError(f"{self.layout.path} is truncated: raw frame {frame + 1} ends past the end "
                                  "of the file")
        return b"".join(parts)

    def add_frame(self, fd: int, frame: int, acc: np.ndarray) -> None:
        """Add the electrons of raw frame ``frame`` (0-based) to ``acc`` (ny*u, nx*u)."""
        lay = self.layout
        data = self.stream(fd, frame)
        if len(data) % 2:  # imagecodecs >= 2025 wants whole 16-bit words; the padding bits are never read
            data += b"\0"
        scratch = getattr(self._local, "scratch", None)
        if scratch is None:
            scratch = self._local.scratch = np.empty((lay.ny, lay.nx), dtype=np.bool_)
        try:
            self.codec.eer_decode(data, (lay.ny, lay.nx), lay.rlebits, lay.horzbits, lay.vertbits, out=scratch)
        except Exception as exc:  # imagecodecs.EerError and ValueError
            raise FileFormatError(f"{lay.path}: raw frame {frame + 1} is not a valid EER stream "
                                  f"({type(exc).__name__}: {exc})") from None
        if self.upsampling == 1:
            np.add(acc, scratch.view(np.uint8), out=acc)
            return
        if native_8k():
            fine = getattr(self._local, "fine", None)
            if fine is None:
                fine = self._local.fine = np.empty(acc.shape, dtype=np.bool_)
            self.codec.eer_decode(data, acc.shape, lay.rlebits, lay.horzbits, lay.vertbits, superres=1, out=fine)
            np.add(acc, fine.view(np.uint8), out=acc)
            return
        events = np.flatnonzero(scratch)
        sub_x, sub_y = eer_event_subpixels(data, events, lay.rlebits, lay.horzbits, lay.vertbits)
        y, x = np.divmod(events.astype(np.int32), np.int32(lay.nx))
        index = (2 * y + (sub_y >> (lay.vertbits - 1))) * np.int32(2 * lay.nx) + 2 * x + (sub_x >> (lay.horzbits - 1))
        flat = acc.reshape(-1)
        flat[index] += 1                                 # one electron per 4K pixel: no index repeats


def grouped_frames(n_raw: int, fractions: int, path: str = "") -> int:
    """Fractions of ``fractions`` raw frames each (RELION's --eer_grouping); the remainder is dropped."""
    if fractions < 1:
        raise InputError(f"--eer-fractions must be at least 1 raw frame per fraction, got {fractions}")
    n = n_raw // fractions
    if n < 1:
        raise InputError(f"{path} has {n_raw} raw EER frames, fewer than one fraction of {fractions}: "
                         "give a smaller --eer-fractions")
    return n


def check_upsampling(upsampling: int) -> int:
    if upsampling not in (1, 2):
        raise InputError(f"--eer-upsampling must be 1 (4K grid) or 2 (8K grid), got {upsampling}")
    return int(upsampling)


def read_eer(path: str, fractions: int, upsampling: int, frames: Tuple[int, int], out: np.ndarray,
             *, workers: int = 8) -> np.ndarray:
    """Decode fractions ``frames = (start, stop)`` (0-based, stop excluded) of an EER movie into ``out``.

    Parameters
    ----------
    path : str
    fractions : int
        Raw frames summed into each output frame (RELION's --eer_grouping).
    upsampling : {1, 2}
        1: physical pixel grid (4K on a Falcon 4); 2: twice as fine (8K).
    frames : (start, stop)
        Output frames to decode.
    out : array (stop - start, ny * upsampling, nx * upsampling), uint8 or uint16
        Destination, e.g. a pinned buffer; overwritten.
    workers : int
        Threads; each decodes whole fractions.
    """
    layout = eer_layout(path, segments=True)
    start, stop = frames
    decoder = _FrameDecoder(layout, check_upsampling(upsampling))
    fd = os.open(path, os.O_RDONLY)

    def one(g: int) -> None:
        acc = out[g - start]
        acc[...] = 0
        for raw in range(g * fractions, (g + 1) * fractions):
            decoder.add_frame(fd, raw, acc)

    try:
        if workers <= 1 or stop - start == 1:
            for g in range(start, stop):
                one(g)
        else:
            with ThreadPoolExecutor(min(workers, stop - start)) as pool:
                list(pool.map(one, range(start, stop)))
    except OSError as exc:
        raise FileFormatError(f"cannot read {path}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    return out
