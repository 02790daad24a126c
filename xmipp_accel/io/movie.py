"""Movie files: MRC/MRCS and TIFF (incl. LZW) frames, gain and dark references, defect files.

Reading is built for throughput: an MRC movie is read with ``os.preadv`` by several threads straight
into the caller's buffer (a pinned buffer, so the copy to the GPU runs at full PCIe speed), in the
file's own dtype; converting to float32 is left to the device. TIFF movies are decoded by tifffile
with several workers. Truncated or corrupt files raise :class:`~xmipp_accel.errors.FileFormatError`
naming the file (the MRC header is checked against the file size by :func:`xmipp_accel.io.mrc.mrc_info`).

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
from .mrc import mrc_info, read_mrc

__all__ = ["MovieInfo", "movie_info", "read_movie", "read_movie_raw", "read_reference", "read_defects",
           "parse_defect_rectangles", "MOVIE_EXTENSIONS"]

logger = logging.getLogger(__name__)

MOVIE_EXTENSIONS = (".mrc", ".mrcs", ".st", ".tif", ".tiff")
_CHUNK_BYTES = 64 << 20


@dataclass(frozen=True)
class MovieInfo:
    """What a movie file holds, read from its header only.

    Attributes
    ----------
    path : str
    format : ``"mrc"`` or ``"tiff"``
    n_frames, ny, nx : int
    dtype : numpy.dtype
        Stored data type (native byte order for TIFF; the file's for MRC).
    pixel_size_A : float or None
        From the MRC header (None when unset or for TIFF).
    data_offset : int
        Byte offset of the first frame (MRC only).
    """
    path: str
    format: str
    n_frames: int
    ny: int
    nx: int
    dtype: np.dtype
    pixel_size_A: Optional[float]
    data_offset: int = 0

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
        raise FileFormatError(f"{path}: EER movies are not supported yet; convert them to TIFF "
                              "(e.g. relion_convert_to_tiff) or MRC first")
    raise FileFormatError(f"{path}: unknown movie format (expected {', '.join(MOVIE_EXTENSIONS)})")


def _tiff_error(path: str, exc: BaseException) -> FileFormatError:
    return FileFormatError(f"{path} is not a readable TIFF movie (truncated or corrupt?): "
                           f"{type(exc).__name__}: {exc}")


def movie_info(path: str | os.PathLike) -> MovieInfo:
    """Header of a movie: frames, size, dtype, pixel size.

    Raises
    ------
    FileFormatError
        Missing, unknown format, truncated MRC, unreadable TIFF.
    """
    path = os.fspath(path)
    fmt = _format_of(path)
    if not os.path.isfile(path):
        raise FileFormatError(f"movie not found: {path}")
    if fmt == "mrc":
        info = mrc_info(path)
        if info.dtype.kind == "c":
            raise FileFormatError(f"{path} holds complex values; a movie must hold real frames")
        return MovieInfo(path, "mrc", info.nz, info.ny, info.nx, info.dtype, info.voxel_size_A, info.data_offset)
    import tifffile
    try:
        with tifffile.TiffFile(path) as tif:
            pages = tif.pages
            n = len(pages)
            first = pages[0]
            shape = first.shape
            dtype = np.dtype(first.dtype)
    except Exception as exc:  # tifffile raises many types for damaged files
        raise _tiff_error(path, exc) from None
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
        Reader threads (MRC: parallel ``preadv`` of 64 MiB chunks; TIFF: tifffile decoders).
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
    if info.format == "mrc":
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
    import tifffile
    try:
        with tifffile.TiffFile(path) as tif:
            data = tif.asarray(key=range(start, stop), maxworkers=max(1, workers))
    except Exception as exc:  # damaged LZW streams, short files... from tifffile/imagecodecs
        raise _tiff_error(path, exc) from None
    data = np.asarray(data).reshape(shape)
    np.copyto(out, data, casting="no")
    return out


def read_movie(path: str | os.PathLike, frames: Optional[Tuple[int, int]] = None, *, workers: int = 8) -> np.ndarray:
    """Read a movie as float32 frames (n, ny, nx).

    Parameters
    ----------
    path : str
        MRC/MRCS/ST or TIFF (LZW, deflate, uncompressed) movie.
    frames : (start, stop), optional
        0-based range, stop excluded.

    Raises
    ------
    FileFormatError
        Missing, truncated or corrupt file (the message names it).
    """
    raw = read_movie_raw(path, frames, workers=workers)
    return raw if raw.dtype == np.float32 else raw.astype(np.float32)


def read_reference(path: str | os.PathLike, *, what: str = "gain") -> np.ndarray:
    """Read a gain or dark reference (MRC or TIFF) as a float32 image (y, x).

    A file with several frames/pages is accepted only when it has one.
    """
    path = os.fspath(path)
    low = path.lower()
    if low.endswith((".dm4", ".dm3")):
        raise FileFormatError(f"{what} reference {path}: DM4/DM3 files are not read; convert it to MRC "
                              "(e.g. with IMOD's dm2mrc or e2proc2d.py) and check its orientation")
    if not os.path.isfile(path):
        raise FileFormatError(f"{what} reference not found: {path}")
    if low.endswith((".tif", ".tiff")):
        import tifffile
        try:
            data = np.asarray(tifffile.imread(path))
        except Exception as exc:
            raise _tiff_error(path, exc) from None
    else:
        data, _ = read_mrc(path)
    data = np.squeeze(data)
    if data.ndim != 2:
        raise FileFormatError(f"{what} reference {path} has shape {data.shape}; expected a single 2D image")
    data = data.astype(np.float32)
    if not np.isfinite(data).all():
        raise FileFormatError(f"{what} reference {path} contains NaN or infinite values")
    return data


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
