"""MRC/MRCS files: read (copied or memory-mapped), write atomically, check headers.

Headers are read and checked with :mod:`mrcfile` (``permissive=False`` first);
when that fails the file is examined again to say *what* is wrong (missing,
empty, not an MRC file, truncated: the header announces N bytes of data but the
file holds M, unsupported mode) and a :class:`~xmipp_accel.errors.FileFormatError`
naming the file is raised, never a traceback from inside mrcfile. Files that
lack only the ``MAP`` identifier (pre-2014 MRC writers) but are otherwise
consistent are read with a logged warning.

Data are mapped with :class:`numpy.memmap` at the offset mrcfile reports
(1024-byte header + extended header), as ``mrcfile.mmap`` does, so a
10^5-image stack is opened in microseconds and only the images indexed are read.

Array axes are (z, y, x) for volumes and (n, y, x) for image stacks; the voxel
size is in Å (the header's ``cella.x / mx``; ``None`` when unset).
"""
from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np

from ..errors import FileFormatError, InputError, TruncatedFileError
from .atomic import atomic_write

__all__ = ["MrcInfo", "read_mrc", "write_mrc", "mrc_shape", "mrc_voxel_size", "mrc_info", "open_stack",
           "check_finite", "unpack_4bit", "MODE_4BIT"]

logger = logging.getLogger(__name__)

_HEADER_BYTES = 1024
_WRITE_DTYPES = (np.dtype(np.float32), np.dtype(np.float16), np.dtype(np.int8), np.dtype(np.int16),
                 np.dtype(np.uint16), np.dtype(np.complex64))
_MODE_NAMES = {0: "int8", 1: "int16", 2: "float32", 3: "complex int16", 4: "complex64", 6: "uint16",
               12: "float16", 101: "4-bit packed"}
_SUPPORTED = "0 int8, 1 int16, 2 float32, 4 complex64, 6 uint16, 12 float16, 101 4-bit packed"
#: SerialEM/IMOD's packed 4-bit mode: two pixels per byte, the first (lower x) in the low 4 bits, each row
#: padded to a whole byte when nx is odd (IMOD's mrc_format.txt: "Each line has int((nx + 1) / 2) bytes").
MODE_4BIT = 101


@dataclass(frozen=True)
class MrcInfo:
    """What the header of an MRC file says, read without touching the data.

    Attributes
    ----------
    path : str
        The file.
    nx, ny, nz : int
        Header dimensions (x fastest); for a stack ``nz`` is the number of images.
    dtype : numpy.dtype
        Data type of the stored values, with the file's byte order.
    voxel_size_A : float or None
        Voxel size in Å along x (``cella.x / mx``); None when 0 or unset.
    is_stack : bool
        True for an image stack (space group 0 with nz > 1, or a ``.mrcs`` name).
    data_offset : int
        Byte offset of the data block (1024 + extended header).
    origin_A : (x, y, z) floats
        Header origin in Å (where ChimeraX places voxel 0); (0, 0, 0) when unset.
    """

    path: str
    nx: int
    ny: int
    nz: int
    dtype: np.dtype
    voxel_size_A: Optional[float]
    is_stack: bool
    data_offset: int
    origin_A: Tuple[float, float, float] = (0.0, 0.0, 0.0)
    packed4bit: bool = False

    @property
    def row_nbytes(self) -> int:
        """Bytes of one stored row: ``nx * itemsize``, or ``(nx + 1) // 2`` for mode 101."""
        return (self.nx + 1) // 2 if self.packed4bit else self.nx * self.dtype.itemsize

    @property
    def shape(self) -> Tuple[int, ...]:
        """Shape of the array :func:`read_mrc` returns: ``(ny, nx)`` when nz == 1, else ``(nz, ny, nx)``."""
        return (self.ny, self.nx) if self.nz == 1 else (self.nz, self.ny, self.nx)

    @property
    def data_nbytes(self) -> int:
        """Bytes of data the header announces (as stored: packed for mode 101)."""
        return self.row_nbytes * self.ny * self.nz


def _import_mrcfile():
    import mrcfile  # local import: keeps ``import xmipp_accel.io`` light
    return mrcfile


def _check_exists(path: str) -> int:
    """Return the file size, or raise FileFormatError when the path is missing, a folder or empty."""
    if not os.path.exists(path):
        raise FileFormatError(f"MRC file not found: {path}")
    if os.path.isdir(path):
        raise FileFormatError(f"{path} is a folder, not an MRC file")
    size = os.path.getsize(path)
    if size == 0:
        raise TruncatedFileError(f"{path} is empty (0 bytes), not an MRC file; re-export or re-copy it")
    if size < _HEADER_BYTES:
        raise TruncatedFileError(f"{path} is not an MRC file: it has {size} bytes, fewer than the "
                              f"{_HEADER_BYTES}-byte MRC header")
    return size


def _file_start(path: str, n: int = 16) -> bytes:
    with open(path, "rb") as f:
        return f.read(n)


def _plausible(header, size: int) -> bool:
    """True when a header read permissively still describes this file (sane sizes, known mode, data fit)."""
    try:
        nx, ny, nz, mode = int(header.nx), int(header.ny), int(header.nz), int(header.mode)
        nsymbt = int(header.nsymbt)
    except (ValueError, OverflowError):
        return False
    if mode not in (0, 1, 2, 4, 6, 12, MODE_4BIT) or min(nx, ny, nz) < 1 or max(nx, ny, nz) > 10**6 or nsymbt < 0:
        return False
    row = (nx + 1) // 2 if mode == MODE_4BIT else nx * {0: 1, 1: 2, 2: 4, 4: 8, 6: 2, 12: 2}[mode]
    return size == _HEADER_BYTES + nsymbt + row * ny * nz


def _read_header(path: str, size: int):
    """Header (numpy recarray) of ``path``, checked strictly, salvaged for old files, else FileFormatError."""
    mrcfile = _import_mrcfile()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with mrcfile.open(path, mode="r", header_only=True, permissive=False) as m:
                return m.header.copy()
    except (ValueError, OSError, EOFError) as strict_error:
        reason = str(strict_error)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with mrcfile.open(path, mode="r", header_only=True, permissive=True) as m:
                header = m.header.copy()
    except (ValueError, OSError, EOFError) as exc:
        raise FileFormatError(f"{path} is not a readable MRC file: {exc}") from None
    if "Map ID" in reason and _plausible(header, size):
        logger.warning("%s has no 'MAP ' identifier (old MRC writer); reading it as MRC since its header "
                       "and size are consistent", path)
        return header
    if "Map ID" in reason:
        raise FileFormatError(f"{path} is not an MRC file: no 'MAP ' identifier at byte 208 and the header does "
                              f"not describe the file (it starts with {_file_start(path)!r})")
    try:
        mode = int(header.mode)
    except (TypeError, ValueError, OverflowError):
        mode = -1
    if "mode" in reason.lower() or mode not in _MODE_NAMES:
        raise FileFormatError(f"{path} has an unsupported MRC data mode {mode} ({reason}); supported modes: "
                              f"{_SUPPORTED}")
    raise FileFormatError(f"{path} has an invalid MRC header: {reason}")


def mrc_info(path: str | os.PathLike) -> MrcInfo:
    """Read and check the header of an MRC file without reading its data.

    Parameters
    ----------
    path : str or os.PathLike
        ``.mrc``, ``.mrcs``, ``.map``, ``.st`` ... file.

    Returns
    -------
    MrcInfo
        Dimensions, dtype, voxel size (Å) and data offset.

    Raises
    ------
    FileFormatError
        Missing, empty, not MRC, unsupported mode, or truncated (the message
        gives the byte counts the header announces and the file holds).
    """
    path = os.fspath(path)
    size = _check_exists(path)
    header = _read_header(path, size)
    mrcfile = _import_mrcfile()
    packed = int(header.mode) == MODE_4BIT
    try:
        dtype = np.dtype(np.uint8) if packed else mrcfile.utils.data_dtype_from_header(header)
    except ValueError:
        mode = int(header.mode)
        raise FileFormatError(f"{path} has an unsupported MRC data mode {mode} "
                              f"({_MODE_NAMES.get(mode, 'unknown')}); supported modes: {_SUPPORTED}") from None
    nx, ny, nz = int(header.nx), int(header.ny), int(header.nz)
    if min(nx, ny, nz) < 1:
        raise FileFormatError(f"{path} has an invalid MRC header: dimensions nx={nx}, ny={ny}, nz={nz} "
                              "must all be at least 1")
    offset = _HEADER_BYTES + int(header.nsymbt)
    info = MrcInfo(path=path, nx=nx, ny=ny, nz=nz, dtype=dtype, voxel_size_A=_voxel_size_from_header(header),
                   is_stack=(int(header.ispg) == 0 and nz > 1) or path.lower().endswith(".mrcs"),
                   data_offset=offset, origin_A=_origin_from_header(header), packed4bit=packed)
    have = size - offset
    if have < info.data_nbytes:
        kind = "4-bit" if packed else dtype.name
        raise TruncatedFileError(
            f"{path} is truncated: the header says {nx}x{ny}x{nz} {kind} values ({info.data_nbytes} bytes "
            f"of data after the {offset}-byte header) but the file has {max(have, 0)} bytes of data; "
            "the copy or the export was interrupted: copy or write it again")
    if have > info.data_nbytes:
        logger.debug("%s has %d bytes after the data block (ignored)", path, have - info.data_nbytes)
    return info


def _origin_from_header(header) -> Tuple[float, float, float]:
    o = header.origin
    values = tuple(float(v) for v in (o.x, o.y, o.z))
    return values if all(np.isfinite(values)) else (0.0, 0.0, 0.0)


def _voxel_size_from_header(header) -> Optional[float]:
    mx = int(header.mx)
    cella_x = float(header.cella.x)
    if mx <= 0 or not np.isfinite(cella_x) or cella_x <= 0:
        return None
    # cella is float32: 48 x 4.88 is stored as 234.2400055; 6 significant digits recover 4.88
    return float(f"{cella_x / mx:.6g}")


def mrc_shape(path: str | os.PathLike) -> Tuple[int, ...]:
    """Shape of the data :func:`read_mrc` would return, from the header only.

    Returns
    -------
    tuple of int
        ``(ny, nx)`` for a single image (nz == 1), else ``(nz, ny, nx)``
        (volume z slices or stack images).
    """
    return mrc_info(path).shape


def mrc_voxel_size(path: str | os.PathLike) -> Optional[float]:
    """Voxel size in Å from the header (``cella.x / mx``), or None when unset (0)."""
    return mrc_info(path).voxel_size_A


def open_stack(path: str | os.PathLike) -> np.memmap:
    """Memory-map an MRC file as an image stack.

    Parameters
    ----------
    path : str or os.PathLike
        MRC/MRCS file.

    Returns
    -------
    numpy.memmap, shape (n, y, x), the file's dtype, read-only
        A single image gives n = 1; a volume gives its z slices.
    """
    info = mrc_info(path)
    if info.packed4bit:  # cannot be mapped unpacked
        return unpack_4bit(_memmap(info, (info.nz, info.ny, info.row_nbytes)), info.nx)
    return _memmap(info, (info.nz, info.ny, info.nx))


def _memmap(info: MrcInfo, shape) -> np.memmap:
    try:
        dtype = np.uint8 if info.packed4bit else info.dtype
        return np.memmap(info.path, dtype=dtype, mode="r", offset=info.data_offset, shape=shape)
    except (OSError, ValueError) as exc:
        raise FileFormatError(f"cannot memory-map {info.path}: {exc}") from None


def unpack_4bit(packed: np.ndarray, nx: int, out: Optional[np.ndarray] = None) -> np.ndarray:
    """Unpack MRC mode-101 data (two 4-bit pixels per byte) into one uint8 per pixel.

    Parameters
    ----------
    packed : uint8 array (..., ny, (nx + 1) // 2)
        Stored rows; in each byte the first pixel (lower x) is in the low 4 bits, the second in the
        high 4 bits; with an odd ``nx`` the high 4 bits of each row's last byte are padding.
    nx : int
        Pixels per row.
    out : uint8 array (..., ny, nx), optional
        Destination (e.g. a pinned buffer).

    Returns
    -------
    uint8 array (..., ny, nx), values 0 to 15.
    """
    packed = np.asarray(packed)
    if packed.shape[-1] != (nx + 1) // 2:
        raise ValueError(f"4-bit rows of {packed.shape[-1]} bytes do not hold {nx} pixels")
    if out is None:
        out = np.empty(packed.shape[:-1] + (nx,), dtype=np.uint8)
    np.bitwise_and(packed, 0x0F, out=out[..., 0::2])
    np.right_shift(packed[..., :nx // 2], 4, out=out[..., 1::2])
    return out


def read_mrc(path: str | os.PathLike, *, mmap: bool = False) -> Tuple[np.ndarray, Optional[float]]:
    """Read an MRC/MRCS file.

    Parameters
    ----------
    path : str or os.PathLike
        The file.
    mmap : bool, optional
        False (default): return an in-memory float32 copy (complex64 for
        complex modes). True: return a read-only :class:`numpy.memmap` in the
        file's own dtype, reading pages only when indexed.

    Returns
    -------
    data : numpy.ndarray
        ``(ny, nx)`` for a single image, ``(nz, ny, nx)`` for a volume (z, y, x)
        or an image stack (n, y, x).
    voxel_size_A : float or None
        Voxel size in Å, None when the header leaves it 0.

    Raises
    ------
    FileFormatError
        Missing, empty, not MRC, truncated or unsupported file; the message
        names the file and the problem.

    See Also
    --------
    mrcfile.open, mrcfile.mmap
    """
    info = mrc_info(path)
    if info.packed4bit:
        data = open_stack(path).reshape(info.shape)
        return (data if mmap else data.astype(np.float32)), info.voxel_size_A
    data = _memmap(info, info.shape)
    if mmap:
        return data, info.voxel_size_A
    out_dtype = np.complex64 if data.dtype.kind == "c" else np.float32
    try:
        out = np.array(data, dtype=out_dtype)
    except OSError as exc:  # I/O error while paging in (e.g. network file system)
        raise FileFormatError(f"cannot read the data of {info.path}: {exc}") from None
    del data
    return out, info.voxel_size_A


def _to_host(data) -> np.ndarray:
    if isinstance(data, np.ndarray):
        return data
    if hasattr(data, "get") and type(data).__module__.startswith("cupy"):
        return data.get()
    return np.asarray(data)


def write_mrc(path: str | os.PathLike, data, voxel_size_A: Optional[float], *,
              is_stack: Optional[bool] = None, origin_A: Optional[Sequence[float]] = None) -> None:
    """Write an image, a volume or an image stack atomically (temporary name, then rename).

    Parameters
    ----------
    path : str or os.PathLike
        Output file; an existing file is replaced only once the new one is complete.
    data : array_like, shape (y, x), (z, y, x) or (n, y, x)
        Written as float32 (float16, int8, int16, uint16 and complex64 are
        kept as they are, complex128 becomes complex64; CuPy arrays are copied
        to the host).
    voxel_size_A : float or None
        Voxel size in Å stored in the header (None leaves it 0, i.e. unset).
    is_stack : bool, optional
        For 3D data: True writes an image stack (space group 0, mz = 1), False a
        volume (space group 1). Default: a stack when the name ends in ``.mrcs``.
    origin_A : (x, y, z) floats or None
        Header origin in Å (e.g. that of the map this one was computed from, so that viewers overlay
        them); None leaves it 0.

    Raises
    ------
    InputError
        Data not 2D/3D, or a voxel size that is not positive and finite.
    """
    path = os.fspath(path)
    arr = _to_host(data)
    if arr.ndim not in (2, 3):
        raise InputError(f"cannot write {path}: MRC data must be 2D (y, x) or 3D (z|n, y, x), got shape {arr.shape}")
    if min(arr.shape) < 1:
        raise InputError(f"cannot write {path}: empty array of shape {arr.shape}")
    if voxel_size_A is not None:
        voxel_size_A = float(voxel_size_A)
        if not (np.isfinite(voxel_size_A) and voxel_size_A > 0):
            raise InputError(f"cannot write {path}: voxel size must be a positive number of Å, got {voxel_size_A}")
    if arr.dtype not in _WRITE_DTYPES:
        arr = arr.astype(np.complex64 if arr.dtype.kind == "c" else np.float32)
    arr = np.ascontiguousarray(arr)
    if is_stack is None:
        is_stack = path.lower().endswith(".mrcs")
    mrcfile = _import_mrcfile()
    with atomic_write(path) as tmp, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Data array contains NaN")  # the caller's choice; see check_finite
        with mrcfile.new(tmp, overwrite=True) as m:
            m.set_data(arr)
            if arr.ndim == 3:  # 2D data get mrcfile's image header (space group 0) already
                if is_stack:
                    m.set_image_stack()
                else:
                    m.set_volume()
            if voxel_size_A is not None:
                m.voxel_size = voxel_size_A
            if origin_A is not None:
                m.header.origin = tuple(float(v) for v in origin_A)


def check_finite(array, what: str, *, item_name: Optional[str] = None, chunk: int = 256) -> None:
    """Raise InputError when ``array`` holds NaN or infinite values.

    Parameters
    ----------
    array : numpy.ndarray, numpy.memmap or cupy.ndarray
        Data to check (any shape).
    what : str
        What the data are, used in the message (a file name, "particle 12 of x.star").
    item_name : str, optional
        When given (e.g. ``"particle"`` or ``"frame"``), the first axis indexes
        items and the message lists the bad items, 1-based.
    chunk : int, optional
        Items along the first axis checked at a time (bounds the temporary memory).

    Raises
    ------
    InputError
        Naming ``what``, how many values are not finite and, with ``item_name``,
        which items.
    """
    xp = np
    if not isinstance(array, np.ndarray) and type(array).__module__.startswith("cupy"):
        from .. import backend
        xp = backend.get_xp(array)
    if array.ndim == 0 or array.shape[0] == 0:
        bad = int((~xp.isfinite(array)).sum())
        if bad:
            raise InputError(f"{what} is not finite (NaN or inf)")
        return
    counts = []
    for start in range(0, array.shape[0], chunk):
        block = array[start:start + chunk]
        if block.dtype.kind not in "fc":
            counts.append(np.zeros(block.shape[0], dtype=np.int64))
            continue
        nonfinite = ~xp.isfinite(block)
        per_item = nonfinite.reshape(block.shape[0], -1).sum(axis=1)
        counts.append(np.asarray(per_item.get() if xp is not np else per_item, dtype=np.int64))
    per_item = np.concatenate(counts)
    total = int(per_item.sum())
    if total == 0:
        return
    if item_name:
        bad_items = np.flatnonzero(per_item) + 1
        shown = ", ".join(str(i) for i in bad_items[:10]) + (" ..." if bad_items.size > 10 else "")
        raise InputError(f"{what}: {bad_items.size} {item_name}(s) contain non-finite values (NaN or inf), "
                         f"{total} values in all: {item_name} {shown} (1-based); remove or re-extract them")
    raise InputError(f"{what} contains {total} non-finite values (NaN or inf); fix or regenerate it")
