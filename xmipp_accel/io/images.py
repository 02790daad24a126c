"""Particle images addressed as ``N@stack.mrcs`` (RELION/Xmipp, N 1-based) or ``image.mrc``.

:func:`read_images` groups the references by stack, memory-maps each stack once
(an LRU of open maps is kept between calls) and reads the requested images with
one sorted fancy index per stack, so 10^5 references into a few stacks cost a
few file opens and one pass over the pages needed. :func:`write_stack` and
:class:`ImageStackWriter` write stacks atomically.
"""
from __future__ import annotations

import collections
import os
import threading
from typing import Iterable, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import FileFormatError, InputError
from .atomic import atomic_write
from .mrc import open_stack, write_mrc
from .paths import FORMAT_HINTS, locate, resolve_name

__all__ = ["parse_image_ref", "parse_image_refs", "format_image_ref", "resolve_image_path", "read_images",
           "stack_size", "write_stack", "ImageStackWriter", "clear_stack_cache"]

_CACHE_SIZE = 64


def _strip_format_hint(path: str) -> str:
    head, sep, tail = path.rpartition(":")
    if sep and head and tail.lower() in FORMAT_HINTS:
        return head
    return path


def parse_image_ref(ref: str) -> Tuple[Optional[int], str]:
    """Split an image reference into a 0-based index and a file name.

    Parameters
    ----------
    ref : str
        ``"12@stack.mrcs"`` (RELION/Xmipp, index 1-based in the string, leading
        zeros allowed) or ``"image.mrc"`` (a whole file). An Xmipp format hint
        such as ``":mrcs"`` after the name is dropped.

    Returns
    -------
    index0 : int or None
        0-based image index in the stack (11 for ``"12@..."``); None for a plain file.
    path : str
        The file name as written (relative names are resolved by :func:`read_images`).

    Raises
    ------
    InputError
        Empty reference, an index that is not a positive integer, or no file name.
    """
    ref = str(ref).strip()
    if not ref:
        raise InputError("empty image reference; expected 'N@stack.mrcs' or 'image.mrc'")
    number, sep, path = ref.partition("@")
    if not sep:
        return None, _strip_format_hint(ref)
    if not path:
        raise InputError(f"image reference {ref!r} has no file name after '@'")
    try:
        index = int(number)
    except ValueError:
        raise InputError(f"image reference {ref!r}: {number!r} before '@' is not an image number; "
                         "expected 'N@stack.mrcs' with N = 1, 2, ...") from None
    if index < 1:
        raise InputError(f"image reference {ref!r}: image numbers start at 1 (RELION/Xmipp convention), got {index}")
    return index - 1, _strip_format_hint(path)


def parse_image_refs(refs: Iterable[str]) -> Tuple[np.ndarray, List[str]]:
    """Parse many references at once.

    Returns
    -------
    index0 : numpy.ndarray, shape (n,), int64
        0-based indices; -1 for plain files.
    paths : list of str
        File names as written.
    """
    indices, paths = [], []
    for ref in refs:
        i, p = parse_image_ref(ref)
        indices.append(-1 if i is None else i)
        paths.append(p)
    return np.asarray(indices, dtype=np.int64), paths


def format_image_ref(index0: Optional[int], path: str) -> str:
    """Inverse of :func:`parse_image_ref`: ``(11, "s.mrcs") -> "000012@s.mrcs"`` (RELION's 6-digit style)."""
    if index0 is None or index0 < 0:
        return path
    return f"{index0 + 1:06d}@{path}"


def resolve_image_path(path: str, base_dir: Optional[str] = None, *, datadir: Optional[str] = None) -> str:
    """Find the file an image reference names, by the rule of :mod:`xmipp_accel.io.paths`.

    A relative name is looked up under ``datadir`` (``--datadir``), then in the working directory
    (RELION's project folder), then under ``base_dir`` (the STAR file's folder).

    Returns
    -------
    str
        The first path that exists, or the working-directory candidate when none does (the caller
        reports it missing).
    """
    found = resolve_name(path, base_dir, datadir=datadir)
    return found if found is not None else os.path.expanduser(path)


class _StackCache:
    """LRU of read-only memory maps of stacks, keyed by absolute path and checked against mtime/size."""

    def __init__(self, maxsize: int = _CACHE_SIZE):
        self.maxsize = maxsize
        self._maps: collections.OrderedDict = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, path: str) -> np.memmap:
        key = os.path.abspath(path)
        stat = os.stat(key)
        stamp = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        with self._lock:
            hit = self._maps.get(key)
            if hit is not None and hit[0] == stamp:
                self._maps.move_to_end(key)
                return hit[1]
        mm = open_stack(key)
        with self._lock:
            self._maps[key] = (stamp, mm)
            self._maps.move_to_end(key)
            while len(self._maps) > self.maxsize:
                self._maps.popitem(last=False)
        return mm

    def clear(self) -> None:
        with self._lock:
            self._maps.clear()


_cache = _StackCache()


def clear_stack_cache() -> None:
    """Forget the cached memory maps (they are also refreshed when a file's mtime or size changes)."""
    _cache.clear()


def stack_size(path: str, base_dir: Optional[str] = None, *, datadir: Optional[str] = None) -> int:
    """Number of images in an MRC stack (z dimension), from its header."""
    return int(_cache.get(locate(path, base_dir, datadir=datadir)).shape[0])


_COPY_THREADS = 4
_PARALLEL_BYTES = 32 << 20
_copy_pool = None
_copy_pool_lock = threading.Lock()


def _pool():
    global _copy_pool
    with _copy_pool_lock:
        if _copy_pool is None:
            from concurrent.futures import ThreadPoolExecutor
            _copy_pool = ThreadPoolExecutor(max_workers=_COPY_THREADS, thread_name_prefix="xa-read")
        return _copy_pool


def _copy_frames(out: np.ndarray, positions: np.ndarray, stack, frames: np.ndarray) -> None:
    """``out[positions] = stack[frames]`` (both sorted by frame). Runs of consecutive frames going to
    consecutive positions (a batch of a stack, the usual case) are copied straight from the mapped file,
    large ones in parallel slices (numpy releases the GIL), instead of through a fancy-index temporary."""
    n = frames.size
    contiguous = (n > 0 and isinstance(stack, np.ndarray) and frames[-1] - frames[0] == n - 1
                  and positions[-1] - positions[0] == n - 1 and np.all(np.diff(positions) == 1))
    if not contiguous:
        out[positions] = stack[frames]
        return
    p0, f0 = int(positions[0]), int(frames[0])
    dst, src = out[p0:p0 + n], stack[f0:f0 + n]
    if dst.nbytes < _PARALLEL_BYTES or n < 2 * _COPY_THREADS:
        np.copyto(dst, src, casting="unsafe")
        return
    bounds = [n * k // _COPY_THREADS for k in range(_COPY_THREADS + 1)]
    futures = [_pool().submit(np.copyto, dst[a:b], src[a:b], casting="unsafe")
               for a, b in zip(bounds[:-1], bounds[1:])]
    for f in futures:
        f.result()


def read_images(refs: Sequence[str], base_dir: Optional[str] = None, *, indices=None,
                source: Optional[str] = None, datadir: Optional[str] = None) -> np.ndarray:
    """Read particle images named by references.

    Parameters
    ----------
    refs : sequence of str
        ``"N@stack.mrcs"`` or ``"image.mrc"`` references (e.g. ``ParticleSet.image_refs``).
    base_dir : str, optional
        The STAR file's folder. Relative names are looked up under ``datadir``, in the working
        directory, then under ``base_dir`` (:mod:`xmipp_accel.io.paths`).
    indices : array_like of int, optional
        Read only ``refs[indices]`` (in that order); default all.
    source : str, optional
        Where the references come from (a STAR file name), quoted in error messages.
    datadir : str, optional
        ``--datadir``: a folder searched first.

    Returns
    -------
    numpy.ndarray, shape (n, y, x), float32
        The images in the order requested.

    Raises
    ------
    FileFormatError
        A stack is missing or unreadable, an index is past the end of its stack,
        a plain reference names a multi-image stack, or images differ in size.
    """
    refs = list(refs) if not isinstance(refs, list) else refs
    if indices is not None:
        sel = np.asarray(indices, dtype=np.int64).reshape(-1)
        if sel.size and (sel.min() < -len(refs) or sel.max() >= len(refs)):
            raise InputError(f"image indices out of range 0..{len(refs) - 1}")
        refs = [refs[i] for i in sel.tolist()]
    where = f" (referenced in {source})" if source else ""
    n = len(refs)
    groups: dict = {}
    for pos, ref in enumerate(refs):
        idx, path = parse_image_ref(ref)
        entry = groups.get(path)
        if entry is None:
            entry = groups[path] = ([], [])
        entry[0].append(pos)
        entry[1].append(-1 if idx is None else idx)
    out = None
    first_shape = None
    for path, (positions, frames) in groups.items():
        resolved = locate(path, base_dir, datadir=datadir, source=source)
        stack = _cache.get(resolved)
        frames = np.asarray(frames, dtype=np.int64)
        positions = np.asarray(positions, dtype=np.int64)
        if (frames < 0).any():
            if stack.shape[0] != 1:
                raise FileFormatError(f"image reference {path!r}{where} names a stack of {stack.shape[0]} images "
                                      f"without an image number; write it as N@{path}")
            frames = np.where(frames < 0, 0, frames)
        if frames.max() >= stack.shape[0]:
            bad = int(frames.max())
            raise FileFormatError(f"image {bad + 1}@{path}{where} is past the end of {resolved}, which holds "
                                  f"{stack.shape[0]} images; the STAR file and the stack do not match")
        if first_shape is None:
            first_shape = (stack.shape[1], stack.shape[2], resolved)
            out = np.empty((n, stack.shape[1], stack.shape[2]), dtype=np.float32)
        elif stack.shape[1:] != first_shape[:2]:
            raise FileFormatError(f"images in {resolved} are {stack.shape[2]}x{stack.shape[1]} px but those in "
                                  f"{first_shape[2]} are {first_shape[1]}x{first_shape[0]} px; "
                                  "all particles must have the same box size")
        order = np.argsort(frames, kind="stable")
        try:
            _copy_frames(out, positions[order], stack, frames[order])
        except OSError as exc:
            raise FileFormatError(f"cannot read images from {resolved}: {exc}") from None
    if out is None:
        return np.empty((0, 0, 0), dtype=np.float32)
    return out


def write_stack(path: str | os.PathLike, images, voxel_size_A: Optional[float]) -> None:
    """Write images ``(n, y, x)`` as an MRC image stack (space group 0), float32, atomically.

    Parameters
    ----------
    path : str or os.PathLike
        Output ``.mrcs`` (or ``.mrc``) file.
    images : array_like, shape (n, y, x) or (y, x)
        Images; a single 2D image is written as a stack of one.
    voxel_size_A : float or None
        Pixel size in Å stored in the header.
    """
    arr = np.asarray(images) if isinstance(images, np.ndarray) or not hasattr(images, "get") else images.get()
    if arr.ndim == 2:
        arr = arr[None]
    write_mrc(path, arr, voxel_size_A, is_stack=True)


class ImageStackWriter:
    """Write a large image stack in batches, atomically, without holding it in memory.

    Parameters
    ----------
    path : str or os.PathLike
        Output ``.mrcs`` file (replaced only when the writer closes without error).
    n_images : int
        Number of images the stack will hold.
    shape : tuple of int
        Image shape ``(y, x)`` in pixels.
    voxel_size_A : float or None
        Pixel size in Å for the header.

    Examples
    --------
    >>> with ImageStackWriter("out.mrcs", 1000, (128, 128), 1.1) as w:  # doctest: +SKIP
    ...     for batch in batches:
    ...         w.write(batch)              # appended in order; or w.write(batch, start=i0)
    """

    def __init__(self, path: str | os.PathLike, n_images: int, shape: Tuple[int, int],
                 voxel_size_A: Optional[float]):
        self.path = os.fspath(path)
        self.n_images = int(n_images)
        self.shape = (int(shape[0]), int(shape[1]))
        if self.n_images < 1 or min(self.shape) < 1:
            raise InputError(f"cannot write {self.path}: need at least one image of positive size, "
                             f"got {self.n_images} images of {self.shape}")
        self.voxel_size_A = voxel_size_A
        self._next = 0
        self._written = np.zeros(self.n_images, dtype=bool)
        self._ctx = None
        self._mrc = None

    def __enter__(self) -> ImageStackWriter:
        import mrcfile
        self._ctx = atomic_write(self.path)
        tmp = self._ctx.__enter__()
        try:
            self._mrc = mrcfile.new_mmap(tmp, shape=(self.n_images,) + self.shape, mrc_mode=2, overwrite=True)
            self._mrc.set_image_stack()
            if self.voxel_size_A is not None:
                self._mrc.voxel_size = float(self.voxel_size_A)
        except BaseException as exc:
            self._ctx.__exit__(type(exc), exc, exc.__traceback__)
            raise
        return self

    def write(self, images, start: Optional[int] = None) -> None:
        """Store ``images`` (n, y, x) (or one (y, x) image) at ``start`` (default: after the last batch)."""
        arr = np.asarray(images.get() if hasattr(images, "get") and not isinstance(images, np.ndarray) else images)
        if arr.ndim == 2:
            arr = arr[None]
        if arr.shape[1:] != self.shape:
            raise InputError(f"{self.path}: images of shape {arr.shape[1:]} do not match the stack's {self.shape}")
        i0 = self._next if start is None else int(start)
        if i0 < 0 or i0 + arr.shape[0] > self.n_images:
            raise InputError(f"{self.path}: writing images {i0 + 1}..{i0 + arr.shape[0]} past the end of a stack "
                             f"of {self.n_images}")
        self._mrc.data[i0:i0 + arr.shape[0]] = arr
        self._written[i0:i0 + arr.shape[0]] = True
        self._next = i0 + arr.shape[0]

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            if exc_type is None and not self._written.all():
                missing = int((~self._written).sum())
                exc = InputError(f"{self.path}: {missing} of {self.n_images} images were never written")
                exc_type, tb = InputError, None
            if self._mrc is not None:
                if exc_type is None:
                    self._mrc.update_header_stats()
                self._mrc.close()
        finally:
            self._ctx.__exit__(exc_type, exc, tb)
        if exc_type is InputError and exc is not None and tb is None:
            raise exc
        return False
