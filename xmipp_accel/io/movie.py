"""Movie files: MRC/MRCS, TIFF and EER frames, gain and dark references, defect files.

Reading is built for throughput: every format is decoded by several threads straight into the caller's
buffer (a pinned buffer, so the copy to the GPU runs at full PCIe speed), in the file's own integer or
float dtype; converting to float32 is left to the device. MRC modes 0, 1, 2, 6, 12 are read with
``os.preadv`` in 64 MiB chunks; mode 101 (4-bit, two pixels per byte) is read and unpacked frame by
frame to uint8; TIFF pages (none, LZW, deflate...) are decoded by tifffile/imagecodecs one page per
thread; EER raw frames are decoded by imagecodecs and summed into fractions of ``eer_fractions`` raw
frames, one fraction per thread, on the 4K or 8K grid (:mod:`xmipp_accel.io.eer`). Truncated or corrupt
files raise :class:`~xmipp_accel.errors.FileFormatError` naming the file (the MRC header is checked
against the file size by :func:`xmipp_accel.io.mrc.mrc_info`).

Frame ranges are ``(start, stop)``, 0-based, ``stop`` excluded (Python slices); the command line's
``--frames A:B`` is 1-based and inclusive.

Defect files: MotionCor2 text files with one rectangle ``x y width height`` (pixels, top-left corner,
0-based) per line, or an image (MRC/TIFF) whose non-zero pixels are defects.
"""
from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np

from ..errors import FileFormatError, InputError
from . import eer
from .mrc import mrc_info, read_mrc, unpack_4bit

__all__ = ["MovieInfo", "movie_info", "read_movie", "read_movie_raw", "read_reference", "read_defects",
           "parse_defect_rectangles", "MOVIE_EXTENSIONS", "TIFF_ROW_ORDER", "upsample_eer_reference"]

logger = logging.getLogger(__name__)

MOVIE_EXTENSIONS = (".mrc", ".mrcs", ".st", ".tif", ".tiff", ".eer")
#: TIFF movies, gain, dark and defect images are read upside down (last stored row first), as IMOD, RELION
#: and MotionCor2 read them, so that --gain-rot/--gain-flip values and defect coordinates that work there
#: work here and the frames (hence shifts) match RELION's; EPU's EER ``.gain`` files are not (RELION's
#: loadEERGain reverts its TIFF flip for them), nor are EER frames (raster order from the first pixel).
TIFF_ROW_ORDER = "bottom-up"
_CHUNK_BYTES = 64 << 20


@dataclass(frozen=True)
class MovieInfo:
    """What a movie file holds, read from its header only.

    Attributes
    ----------
    path : str
    format : ``"mrc"``, ``"tiff"`` or ``"eer"``
    n_frames, ny, nx : int
        Frames as read: for EER the fractions (``raw_frames // eer_fractions``) and the rendered grid
        (physical pixels times ``eer_upsampling``).
    dtype : numpy.dtype
        Data type of the frames as read: stored type (native byte order for TIFF; the file's for MRC);
        uint8 for MRC mode 101 (unpacked) and EER fractions of up to 255 raw frames, else uint16.
    pixel_size_A : float or None
        From the MRC header (None when unset, for TIFF and EER).
    data_offset : int
        Byte offset of the first frame (MRC only).
    packed4bit : bool
        MRC mode 101.
    raw_frames : int or None
        EER raw frames in the file.
    eer_fractions, eer_upsampling : int
        EER grouping and grid (0 and 1 for other formats).
    """
    path: str
    format: str
    n_frames: int
    ny: int
    nx: int
    dtype: np.dtype
    pixel_size_A: Optional[float]
    data_offset: int = 0
    packed4bit: bool = False
    raw_frames: Optional[int] = None
    eer_fractions: int = 0
    eer_upsampling: int = 1

    @property
    def frame_shape(self) -> Tuple[int, int]:
        return (self.ny, self.nx)

    def nbytes(self, n_frames: Optional[int] = None) -> int:
        """Bytes of ``n_frames`` frames (default all) in the stored dtype."""
        n = self.n_frames if n_frames is None else n_frames
        return n * self.ny * self.nx * self.dtype.itemsize


def _format_of(path: str) -> str:
    low = path.lower()
    if low.endswith((".tif", ".tiff")):
        return "tiff"
    if low.endswith((".mrc", ".mrcs", ".st", ".map")):
        return "mrc"
    if low.endswith(".eer"):
        return "eer"
    raise FileFormatError(f"{path}: unknown movie format (expected {', '.join(MOVIE_EXTENSIONS)})")


def _tiff_error(path: str, exc: BaseException) -> FileFormatError:
    return FileFormatError(f"{path} is not a readable TIFF movie (truncated or corrupt?): "
                           f"{type(exc).__name__}: {exc}")


def _eer_info(path: str, fractions: int, upsampling: int) -> MovieInfo:
    layout = eer.eer_layout(path)
    n = eer.grouped_frames(layout.n_raw, fractions, path)
    u = eer.check_upsampling(upsampling)
    if layout.n_raw % fractions:
        logger.info("%s: %d raw EER frames in %d fractions of %d; the last %d raw frames are not used", path,
                    layout.n_raw, n, fractions, layout.n_raw % fractions)
    dtype = np.dtype(np.uint8 if fractions <= 255 else np.uint16)
    return MovieInfo(path, "eer", n, layout.ny * u, layout.nx * u, dtype, None, raw_frames=layout.n_raw,
                     eer_fractions=int(fractions), eer_upsampling=u)


def movie_info(path: str | os.PathLike, *, eer_fractions: int = eer.DEFAULT_EER_FRACTIONS,
               eer_upsampling: int = 1) -> MovieInfo:
    """Header of a movie: frames, size, dtype, pixel size.

    Parameters
    ----------
    path : str
        MRC/MRCS/ST (modes 0, 1, 2, 6, 12, 101), TIFF or EER movie.
    eer_fractions : int
        EER only: raw frames summed into each frame read (RELION's --eer_grouping; default 40).
    eer_upsampling : {1, 2}
        EER only: 1 renders the physical 4K grid, 2 the 8K grid.

    Raises
    ------
    FileFormatError
        Missing, unknown format, truncated MRC, unreadable TIFF or EER.
    """
    path = os.fspath(path)
    fmt = _format_of(path)
    if not os.path.isfile(path):
        raise FileFormatError(f"movie not found: {path}")
    if fmt == "mrc":
        info = mrc_info(path)
        if info.dtype.kind == "c":
            raise FileFormatError(f"{path} holds complex values; a movie must hold real frames")
        return MovieInfo(path, "mrc", info.nz, info.ny, info.nx, info.dtype, info.voxel_size_A, info.data_offset,
                         packed4bit=info.packed4bit)
    if fmt == "eer":
        return _eer_info(path, eer_fractions, eer_upsampling)
    import tifffile
    try:
        with tifffile.TiffFile(path) as tif:
            pages = tif.pages
            first = pages[0]
            compression = int(first.compression)
            shape = first.shape
            dtype = np.dtype(first.dtype)
            n = len(pages) if not eer.is_eer_compression(compression) else 0
    except Exception as exc:  # tifffile raises many types for damaged files
        raise _tiff_error(path, exc) from None
    if eer.is_eer_compression(compression):  # an EER movie named .tif
        return _eer_info(path, eer_fractions, eer_upsampling)
    if len(shape) != 2:
        raise FileFormatError(f"{path}: TIFF pages of shape {shape}; expected one 2D frame per page")
    return MovieInfo(path, "tiff", n, int(shape[0]), int(shape[1]), dtype, None)


def _check_range(frames: Optional[Tuple[int, int]], n: int, path: str) -> Tuple[int, int]:
    if frames is None:
        return 0, n
    start, stop = int(frames[0]), int(n if frames[1] is None else frames[1])
    if not (0 <= start < stop <= n):
        raise InputError(f"{path} has {n} frames; the frame range {start + 1}:{stop} (1-based, inclusive) "
                         f"is outside 1:{n}")
    return start, stop


def _pread_into(fd: int, view: memoryview, offset: int, path: str) -> None:
    done = 0
    total = len(view)
    while done < total:
        got = os.preadv(fd, [view[done:]], offset + done)
        if got <= 0:
            raise FileFormatError(f"{path} is truncated: reading stopped {total - done} bytes before the end of "
                                  "the frames its header announces")
        done += got


def read_movie_raw(path: str | os.PathLike, frames: Optional[Tuple[int, int]] = None, *,
                   out: Optional[np.ndarray] = None, workers: int = 8, info: Optional[MovieInfo] = None) -> np.ndarray:
    """Read frames in the file's own dtype (native byte order), optionally into a given buffer.

    Parameters
    ----------
    path : str
    frames : (start, stop), optional
        0-based frame range, stop excluded; default all frames.
    out : ndarray, optional
        Destination of shape (stop - start, ny, nx) and the stored dtype (e.g. a pinned buffer).
    workers : int
        Reader threads (MRC: parallel ``preadv`` of 64 MiB chunks, or 4-bit frames; TIFF: pages; EER:
        fractions).
    info : MovieInfo, optional
        Header already read.

    Returns
    -------
    ndarray (n, ny, nx)
    """
    path = os.fspath(path)
    info = info or movie_info(path)
    start, stop = _check_range(frames, info.n_frames, path)
    shape = (stop - start, info.ny, info.nx)
    dtype = info.dtype.newbyteorder("=") if info.format == "mrc" else info.dtype
    if out is None:
        out = np.empty(shape, dtype=dtype)
    elif out.shape != shape or out.dtype != dtype or not out.flags.c_contiguous:
        raise ValueError(f"buffer of shape {out.shape} {out.dtype} does not fit frames {shape} {dtype}")
    if info.format == "eer":
        return eer.read_eer(path, info.eer_fractions, info.eer_upsampling, (start, stop), out, workers=workers)
    if info.format == "tiff":
        return _read_tiff(path, start, stop, out, workers)
    if info.packed4bit:
        return _read_mrc_4bit(info, start, stop, out, workers)
    return _read_mrc(info, start, out, workers)


def _read_mrc(info: MovieInfo, start: int, out: np.ndarray, workers: int) -> np.ndarray:
    """Modes 0, 1, 2, 6, 12: parallel ``preadv`` of 64 MiB chunks into ``out``, then byte swap if needed."""
    path = info.path
    frame_bytes = info.ny * info.nx * info.dtype.itemsize
    offset = info.data_offset + start * frame_bytes
    view = memoryview(out.reshape(-1).view(np.uint8))
    nbytes = len(view)
    chunks = [(o, min(_CHUNK_BYTES, nbytes - o)) for o in range(0, nbytes, _CHUNK_BYTES)]
    fd = os.open(path, os.O_RDONLY)
    try:
        if workers <= 1 or len(chunks) == 1:
            _pread_into(fd, view, offset, path)
        else:
            with ThreadPoolExecutor(min(workers, len(chunks))) as pool:
                list(pool.map(lambda c: _pread_into(fd, view[c[0]:c[0] + c[1]], offset + c[0], path), chunks))
    except OSError as exc:
        raise FileFormatError(f"cannot read {path}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    if not info.dtype.isnative:
        out.byteswap(inplace=True)
    return out


def _read_mrc_4bit(info: MovieInfo, start: int, stop: int, out: np.ndarray, workers: int) -> np.ndarray:
    """Mode 101: each thread reads whole packed frames and unpacks them into ``out``."""
    row = (info.nx + 1) // 2
    frame_bytes = row * info.ny
    fd = os.open(info.path, os.O_RDONLY)

    def one(i: int) -> None:
        packed = np.empty((info.ny, row), dtype=np.uint8)
        _pread_into(fd, memoryview(packed.reshape(-1)), info.data_offset + (start + i) * frame_bytes, info.path)
        unpack_4bit(packed, info.nx, out=out[i])

    try:
        if workers <= 1 or stop - start == 1:
            for i in range(stop - start):
                one(i)
        else:
            with ThreadPoolExecutor(min(workers, stop - start)) as pool:
                list(pool.map(one, range(stop - start)))
    except OSError as exc:
        raise FileFormatError(f"cannot read {info.path}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    return out


def _flip_rows(out: np.ndarray, workers: int) -> None:
    """Reverse the rows of every frame of ``out`` in place (NumPy buffers the overlapping copy)."""
    def one(i: int) -> None:
        out[i] = out[i, ::-1]
    if workers <= 1 or len(out) == 1:
        for i in range(len(out)):
            one(i)
    else:
        with ThreadPoolExecutor(min(workers, len(out))) as pool:
            list(pool.map(one, range(len(out))))


def _read_tiff(path: str, start: int, stop: int, out: np.ndarray, workers: int) -> np.ndarray:
    """TIFF pages ``start:stop`` decoded by tifffile straight into ``out``, one page per thread, then turned
    upside down (TIFF_ROW_ORDER)."""
    import tifffile
    try:
        with tifffile.TiffFile(path) as tif:
            if stop - start == 1:
                tif.pages[start].asarray(out=out[0], maxworkers=max(1, workers))
            else:
                tif.asarray(key=range(start, stop), out=out, maxworkers=max(1, workers))
    except Exception as exc:  # damaged LZW streams, short files... from tifffile/imagecodecs
        raise _tiff_error(path, exc) from None
    _flip_rows(out, workers)
    return out


def read_movie(path: str | os.PathLike, frames: Optional[Tuple[int, int]] = None, *, workers: int = 8,
               eer_fractions: int = eer.DEFAULT_EER_FRACTIONS, eer_upsampling: int = 1) -> np.ndarray:
    """Read a movie as float32 frames (n, ny, nx).

    Parameters
    ----------
    path : str
        MRC/MRCS/ST (modes 0, 1, 2, 6, 12, 101), TIFF (LZW, deflate, uncompressed) or EER movie.
    frames : (start, stop), optional
        0-based range, stop excluded (EER: in fractions).
    eer_fractions, eer_upsampling : int
        EER grouping and grid (see :func:`movie_info`).

    Raises
    ------
    FileFormatError
        Missing, truncated or corrupt file (the message names it).
    """
    info = movie_info(path, eer_fractions=eer_fractions, eer_upsampling=eer_upsampling)
    raw = read_movie_raw(path, frames, workers=workers, info=info)
    return raw if raw.dtype == np.float32 else raw.astype(np.float32)


def read_reference(path: str | os.PathLike, *, what: str = "gain") -> np.ndarray:
    """Read a gain or dark reference (MRC, TIFF, or EPU's EER ``.gain`` TIFF) as a float32 image (y, x).

    A file with several frames is accepted only when it has one (TIFF: the first page is read). TIFF
    images are turned upside down as the movies are (:data:`TIFF_ROW_ORDER`), ``.gain`` files are not.
    """
    path = os.fspath(path)
    low = path.lower()
    if low.endswith((".dm4", ".dm3")):
        raise FileFormatError(f"{what} reference {path}: DM4/DM3 files are not read; convert it to MRC "
                              "(e.g. with IMOD's dm2mrc or e2proc2d.py) and check its orientation")
    if not os.path.isfile(path):
        raise FileFormatError(f"{what} reference not found: {path}")
    if low.endswith((".tif", ".tiff", ".gain")):
        import tifffile
        try:
            with tifffile.TiffFile(path) as tif:   # the first page (EPU's .gain files may hold more)
                pages = 1 if low.endswith(".gain") else len(tif.pages)
                data = np.asarray(tif.pages[0].asarray())
        except Exception as exc:
            raise _tiff_error(path, exc) from None
        if pages != 1:
            raise FileFormatError(f"{what} reference {path} has {pages} TIFF pages; expected a single 2D image")
        if not low.endswith(".gain"):
            data = data[..., ::-1, :]            # TIFF_ROW_ORDER
    else:
        data, _ = read_mrc(path)
    data = np.squeeze(data)
    if data.ndim != 2:
        raise FileFormatError(f"{what} reference {path} has shape {data.shape}; expected a single 2D image")
    data = data.astype(np.float32)
    if not np.isfinite(data).all():
        raise FileFormatError(f"{what} reference {path} contains NaN or infinite values")
    return data


def upsample_eer_reference(image: np.ndarray, frame_shape: Sequence[int]) -> np.ndarray:
    """A 4K reference for 8K EER frames (``--eer-upsampling 2``): each pixel repeated over 2 x 2, as RELION's
    ``loadEERGain`` does; a reference of any other size is returned as it is (and checked by the caller)."""
    if tuple(2 * s for s in image.shape) != tuple(int(s) for s in frame_shape[-2:]):
        return image
    return np.repeat(np.repeat(image, 2, axis=0), 2, axis=1)


def parse_defect_rectangles(text: str, source: str = "<text>") -> List[Tuple[int, int, int, int]]:
    """Rectangles ``(x, y, width, height)`` from MotionCor2 defect-file text (``#`` comments allowed)."""
    rects = []
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.replace(",", " ").split()
        try:
            vals = [int(round(float(p))) for p in parts]
        except ValueError:
            raise FileFormatError(f"{source} line {lineno}: expected 'x y width height', got {line!r}") from None
        if len(vals) != 4 or vals[2] <= 0 or vals[3] <= 0:
            raise FileFormatError(f"{source} line {lineno}: expected 'x y width height' with positive sizes, "
                                  f"got {line!r}")
        rects.append(tuple(vals))
    return rects


def read_defects(path: str | os.PathLike, frame_shape: Sequence[int]) -> np.ndarray:
    """Defect mask (y, x) bool from a MotionCor2 text file or a defect image (non-zero = defect)."""
    from ..em.detector import check_reference_shape, defect_mask_from_rectangles
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileFormatError(f"defect file not found: {path}")
    if path.lower().endswith((".mrc", ".tif", ".tiff")):
        img = read_reference(path, what="defect map")
        check_reference_shape(img.shape, frame_shape, what="defect map", path=path)
        return img != 0
    try:
        with open(path) as f:
            text = f.read()
    except UnicodeDecodeError:
        raise FileFormatError(f"{path}: a defect file must be text ('x y width height' per line) or an "
                              "MRC/TIFF defect map") from None
    return defect_mask_from_rectangles(frame_shape, parse_defect_rectangles(text, path))
