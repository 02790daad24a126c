"""Watch a folder for new files and hand each one over once it is complete.

:class:`FolderWatcher` is what ``xmipp-accel align-movies --watch`` reads its movies from. It wakes on the
kernel's file events (Linux inotify, through the C library with :mod:`ctypes`: no dependency) and
otherwise sleeps until the next deadline it knows of: a file becoming quiet for ``settle_s``, the idle
timeout, or the slow safety rescan. A file is *complete* once its size and modification time have not
changed for ``settle_s`` seconds (a file whose mtime is already older than that when first seen is
complete at once, so a backlog starts without waiting) and, when ``complete(path)`` is given, that says
so too (e.g. an MRC file whose header announces more data than it holds is still being written; after
``incomplete_grace_s`` of quiet, by default 10 ``settle_s`` and at least 5 s, it is handed over anyway, and
its reader names it as truncated; should the copy resume later, the file changes and is handed over again).
The idle timeout does not end the wait while such a file is pending.

Each file is handed over once; a file that changes afterwards (rewritten, re-copied) is handed over again
once it is complete. Names starting with ``.`` are ignored (rsync and most copy tools write under such a
temporary name and rename at the end, which inotify reports as a move into the folder).

Where inotify is missing (not Linux) the folder is scanned with :func:`os.scandir`, after 0.25 s, then
at intervals doubling up to ``rescan_s`` while nothing changes (back to 0.25 s when something does).
Where it works, a scan every ``rescan_s`` still runs as a safety net: inotify sees only writes made
through this machine's kernel, so files written into an NFS/SMB/CephFS mount by *another* machine raise
no event here and are found by that scan (lower ``rescan_s`` for such mounts).
"""
from __future__ import annotations

import ctypes
import fnmatch
import logging
import os
import select
import struct
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from ..errors import InputError, TruncatedFileError

__all__ = ["FolderWatcher", "MOVIE_PATTERNS", "Inotify", "inotify_available", "mrc_complete", "tiff_complete",
           "movie_complete"]

logger = logging.getLogger(__name__)

#: File patterns of the movie formats :func:`xmipp_accel.io.movie.movie_info` reads.
MOVIE_PATTERNS = ("*.mrc", "*.mrcs", "*.st", "*.tif", "*.tiff", "*.eer")

# <sys/inotify.h>
_IN_MODIFY, _IN_ATTRIB, _IN_CLOSE_WRITE = 0x2, 0x4, 0x8
_IN_MOVED_FROM, _IN_MOVED_TO, _IN_CREATE, _IN_DELETE = 0x40, 0x80, 0x100, 0x200
_IN_DELETE_SELF, _IN_MOVE_SELF = 0x400, 0x800
_IN_Q_OVERFLOW, _IN_IGNORED, _IN_ISDIR = 0x4000, 0x8000, 0x40000000
_WATCH_MASK = (_IN_MODIFY | _IN_ATTRIB | _IN_CLOSE_WRITE | _IN_MOVED_FROM | _IN_MOVED_TO | _IN_CREATE
               | _IN_DELETE | _IN_DELETE_SELF | _IN_MOVE_SELF)
_EVENT = struct.Struct("iIII")          # wd, mask, cookie, len; then len bytes of NUL-padded name
_FIRST_POLL_S = 0.25


def _libc():
    """The C library when it has inotify (Linux), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return None
    return libc if hasattr(libc, "inotify_init1") else None


def inotify_available() -> bool:
    """True where :class:`Inotify` can be made (Linux with inotify in the C library)."""
    return _libc() is not None


class Inotify:
    """Linux inotify: :meth:`add_watch` folders, ``select`` on :meth:`fileno`, :meth:`read` the events."""

    def __init__(self):
        libc = _libc()
        if libc is None:
            raise OSError("inotify is not available on this system")
        fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_init1 failed: {os.strerror(err)}")
        self._libc, self.fd = libc, fd

    def fileno(self) -> int:
        return self.fd

    def add_watch(self, folder: str) -> int:
        """Watch ``folder`` (creations, writes, closes, moves, deletions); returns the watch descriptor."""
        wd = self._libc.inotify_add_watch(self.fd, os.fsencode(folder), _WATCH_MASK)
        if wd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"cannot watch {folder}: {os.strerror(err)} (for ENOSPC raise "
                               "fs.inotify.max_user_watches)")
        return wd

    def read(self) -> List[Tuple[int, int, str]]:
        """The pending events as (watch descriptor, mask, name); [] when there are none."""
        try:
            buf = os.read(self.fd, 1 << 16)
        except BlockingIOError:
            return []
        events, pos = [], 0
        while pos + _EVENT.size <= len(buf):
            wd, mask, _, n = _EVENT.unpack_from(buf, pos)
            name = buf[pos + _EVENT.size:pos + _EVENT.size + n].rstrip(b"\0")
            events.append((wd, mask, os.fsdecode(name)))
            pos += _EVENT.size + n
        return events

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def mrc_complete(path: str) -> bool:
    """False while an MRC file holds fewer bytes than its header announces (still being written); True
    for other formats, complete files and files whose header is broken (their reader names the problem)."""
    if not path.lower().endswith((".mrc", ".mrcs", ".st")):
        return True
    from .mrc import mrc_info
    try:
        mrc_info(path)
    except TruncatedFileError:
        return False
    except InputError:
        return True
    return True


_TIFF_TYPE_BYTES = {3: 2, 4: 4, 16: 8}          # SHORT, LONG, LONG8: strip/tile offsets and byte counts
_TIFF_DATA_TAGS = ((273, 279), (324, 325))      # (StripOffsets, StripByteCounts), (TileOffsets, TileByteCounts)


def _tiff_values(f, order: str, typ: int, count: int, inline: bytes, pointer_fmt: str, size: int):
    """Values of a TIFF entry (inline, or at the offset it holds); None when they lie past the end."""
    width = _TIFF_TYPE_BYTES.get(typ)
    if width is None:
        return []
    fmt = order + {2: "H", 4: "I", 8: "Q"}[width] * count
    n = width * count
    if n <= len(inline):
        return struct.unpack(fmt, inline[:n])
    (offset,) = struct.unpack(order + pointer_fmt, inline)
    if offset + n > size:
        return None
    f.seek(offset)
    return struct.unpack(fmt, f.read(n))


def tiff_complete(path: str, max_pages: int = 1 << 20) -> bool:
    """False while a TIFF/EER file is visibly still being written: an IFD (page directory) or the last
    page's data lies past the end of the file. True otherwise, and for files that are not TIFF (their
    reader names the problem). A copy cut exactly between two pages cannot be told from a shorter movie:
    that case rests on the size-stable rule."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(16)
            if len(head) < 8:
                return len(head) >= 2 and head[:2] not in (b"II", b"MM")     # empty: just created
            order = "<" if head[:2] == b"II" else ">" if head[:2] == b"MM" else None
            if order is None:
                return True
            (magic,) = struct.unpack(order + "H", head[2:4])
            if magic not in (42, 43):
                return True
            big = magic == 43
            cnt_fmt, ent, ptr = ("Q", 20, "Q") if big else ("H", 12, "I")
            (ifd,) = struct.unpack(order + ptr, head[8:16] if big else head[4:8])
            last, seen = None, set()
            while ifd and len(seen) < max_pages:
                cnt_bytes = struct.calcsize(cnt_fmt)
                if ifd in seen or ifd + cnt_bytes > size:
                    return ifd in seen
                seen.add(ifd)
                f.seek(ifd)
                (n,) = struct.unpack(order + cnt_fmt, f.read(cnt_bytes))
                end = ifd + cnt_bytes + n * ent + struct.calcsize(ptr)
                if end > size:
                    return False
                entries = f.read(n * ent)
                (ifd,) = struct.unpack(order + ptr, f.read(struct.calcsize(ptr)))
                last = entries
            if last is None:
                return False
            tags = {}
            for i in range(0, len(last), ent):
                e = last[i:i + ent]
                tag, typ = struct.unpack(order + "HH", e[:4])
                (count,) = struct.unpack(order + ("Q" if big else "I"), e[4:12] if big else e[4:8])
                tags[tag] = (typ, count, e[12:20] if big else e[8:12])
            for off_tag, cnt_tag in _TIFF_DATA_TAGS:
                if off_tag in tags and cnt_tag in tags:
                    offs = _tiff_values(f, order, *tags[off_tag], ptr, size)
                    cnts = _tiff_values(f, order, *tags[cnt_tag], ptr, size)
                    if offs is None or cnts is None:
                        return False
                    if any(o + c > size for o, c in zip(offs, cnts)):
                        return False
            return True
    except (OSError, struct.error):
        return True


def movie_complete(path: str) -> bool:
    """:func:`mrc_complete` for MRC files, :func:`tiff_complete` for TIFF and EER, True for other files."""
    if path.lower().endswith((".tif", ".tiff", ".eer")):
        return tiff_complete(path)
    return mrc_complete(path)


@dataclass
class _Seen:
    """A file not yet handed over: its last size (bytes) and mtime (ns), since when (monotonic s) they
    have not changed, the order in which files were first seen, and when to look again at a file that
    ``complete`` refused (monotonic s)."""
    size: int
    mtime_ns: int
    quiet_since: float
    order: int
    recheck_at: float = 0.0


class FolderWatcher:
    """Complete files appearing in a folder, one at a time (see the module docstring).

    Parameters
    ----------
    folder : str
        The folder watched (must exist).
    patterns : sequence of str
        :mod:`fnmatch` patterns (case-insensitive) of the files wanted, matched against the file name, or,
        for a pattern containing ``/``, against the path relative to ``folder``.
    settle_s : float
        Seconds a file's size and mtime must stay the same before it is complete.
    recursive : bool
        Also watch subfolders (and those created later), e.g. EPU's ``GridSquare_*/Data``.
    exclude : sequence of str
        Folders never looked into (the output folder when it lies inside ``folder``).
    complete : callable ``(path) -> bool``, optional
        Extra test of completeness (e.g. :func:`mrc_complete`).
    incomplete_grace_s : float, optional
        Seconds of quiet after which a file ``complete`` still refuses is handed over anyway (default
        ``max(10 * settle_s, 5)``).
    rescan_s : float
        Safety scan interval with inotify; the longest poll interval without it.
    use_inotify : bool
        False forces the scanning fallback (tests, or file systems where events are known to be missing).
    handed : dict of path -> (size in bytes, mtime in ns), optional
        Files handed over before (a restart): passed over while their size and mtime stay so.
    """

    def __init__(self, folder: str, patterns: Sequence[str] = MOVIE_PATTERNS, *, settle_s: float = 3.0,
                 recursive: bool = False, exclude: Sequence[str] = (),
                 complete: Optional[Callable[[str], bool]] = None, incomplete_grace_s: Optional[float] = None,
                 rescan_s: float = 30.0, use_inotify: bool = True,
                 handed: Optional[Dict[str, Tuple[int, int]]] = None):
        self.folder = os.path.abspath(folder)
        if not os.path.isdir(self.folder):
            raise InputError(f"watched folder {self.folder} does not exist or is not a folder; create it first")
        if incomplete_grace_s is None:
            incomplete_grace_s = max(10.0 * settle_s, 5.0)
        if settle_s < 0 or rescan_s <= 0 or incomplete_grace_s < 0:
            raise InputError("--watch-settle and the grace time must be >= 0 and --watch-rescan > 0 seconds")
        self.patterns = [p.lower() for p in patterns] or [p for p in MOVIE_PATTERNS]
        self.settle_s, self.rescan_s, self.grace_s = float(settle_s), float(rescan_s), float(incomplete_grace_s)
        self.recursive = recursive
        self.exclude = {os.path.abspath(e) for e in exclude}
        self.complete = complete
        self._pending: Dict[str, _Seen] = {}
        self._handed: Dict[str, Tuple[int, int]] = {os.path.abspath(p): tuple(k) for p, k in (handed or {}).items()}
        self._order = 0
        self._stop = threading.Event()
        self._recheck: List[str] = []
        self._recheck_lock = threading.Lock()
        self._wake_r, self._wake_w = os.pipe()
        self.inotify: Optional[Inotify] = None
        self._folders: Dict[int, str] = {}
        if use_inotify and inotify_available():
            try:
                self.inotify = Inotify()
            except OSError as exc:
                logger.warning("inotify unavailable (%s): scanning %s instead", exc, self.folder)
        self.last_activity = time.monotonic()
        self._poll_s = _FIRST_POLL_S
        self._next_scan = 0.0
        self._watch_tree(self.folder)
        self.scan()

    # ------------------------------------------------------------------------------------------ public
    @property
    def uses_inotify(self) -> bool:
        return self.inotify is not None

    def next_ready(self, idle_timeout_s: Optional[float] = None) -> Optional[str]:
        """Block until a file is complete and return its absolute path; None after :meth:`stop`, or once
        no file has appeared or changed for ``idle_timeout_s`` seconds and none is pending."""
        while True:
            with self._recheck_lock:
                again, self._recheck = self._recheck, []
            for p in again:
                self._handed.pop(p, None)
                self._observe(p)
            now = time.monotonic()
            path = self._pop_ready(now)
            if path is not None:
                return path
            if self._stop.is_set():
                return None
            if idle_timeout_s is not None and not self._pending and now - self.last_activity >= idle_timeout_s:
                return None
            deadlines = [self._next_scan] + [self._due(s) for s in self._pending.values()]
            if idle_timeout_s is not None:
                deadlines.append(self.last_activity + idle_timeout_s)
            self._wait(max(0.0, min(deadlines) - now))
            if time.monotonic() >= self._next_scan:
                self.scan()

    def recheck(self, path: str) -> None:
        """Hand ``path`` over again once complete, even if it was handed over as it is now (thread safe; e.g.
        for a file that changed while the one handed over earlier was still being processed)."""
        with self._recheck_lock:
            self._recheck.append(os.path.abspath(path))
        try:
            os.write(self._wake_w, b"r")
        except OSError:
            pass

    def stop(self) -> None:
        """Make :meth:`next_ready` return None (from any thread, or a signal handler)."""
        self._stop.set()
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    def close(self) -> None:
        if self.inotify is not None:
            self.inotify.close()
            self.inotify = None
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
        self._wake_r = self._wake_w = -1

    def scan(self) -> None:
        """Look at every file of the folder(s) now (at start, and as the safety net or fallback)."""
        changed = False
        for path in self._walk():
            changed |= self._observe(path)
        now = time.monotonic()
        if self.inotify is not None:
            self._poll_s = self.rescan_s
        else:
            self._poll_s = _FIRST_POLL_S if changed else min(self.rescan_s, 2 * self._poll_s)
        self._next_scan = now + self._poll_s

    # ------------------------------------------------------------------------------------------ files
    def _wanted(self, path: str) -> bool:
        name = os.path.basename(path)
        if name.startswith("."):
            return False
        rel = os.path.relpath(path, self.folder).replace(os.sep, "/").lower()
        return any(fnmatch.fnmatchcase(rel if "/" in p else name.lower(), p) for p in self.patterns)

    def _walk(self):
        stack = [self.folder]
        while stack:
            folder = stack.pop()
            try:
                with os.scandir(folder) as it:
                    entries = list(it)
            except OSError:
                continue
            for e in sorted(entries, key=lambda e: e.name):
                if e.is_dir(follow_symlinks=False):
                    if self.recursive and not e.name.startswith(".") and os.path.abspath(e.path) not in self.exclude:
                        stack.append(e.path)
                elif self._wanted(e.path):
                    yield os.path.abspath(e.path)

    def _observe(self, path: str) -> bool:
        """Note a file's size and mtime; True when it is new or changed."""
        try:
            st = os.stat(path)
        except OSError:
            self._pending.pop(path, None)
            return False
        key = (st.st_size, st.st_mtime_ns)
        if self._handed.get(path) == key:
            return False
        seen = self._pending.get(path)
        if seen is not None and (seen.size, seen.mtime_ns) == key:
            return False
        now = time.monotonic()
        if seen is None:   # first sight: a file untouched for a while is quiet already (a backlog starts at once)
            age = min(max(time.time() - st.st_mtime_ns * 1e-9, 0.0), self.settle_s)
            self._order += 1
            self._pending[path] = _Seen(st.st_size, st.st_mtime_ns, now - age, self._order)
        else:
            seen.size, seen.mtime_ns, seen.quiet_since, seen.recheck_at = st.st_size, st.st_mtime_ns, now, 0.0
        self.last_activity = now
        return True

    def _due(self, seen: _Seen) -> float:
        return max(seen.quiet_since + self.settle_s, seen.recheck_at)

    def _pop_ready(self, now: float) -> Optional[str]:
        """The first-seen pending file that has been quiet for settle_s (checked again now), if any."""
        for path, seen in sorted(self._pending.items(), key=lambda kv: kv[1].order):
            if now < self._due(seen):
                continue
            if self._observe(path) or path not in self._pending:   # changed since, or gone
                continue
            if self.complete is not None and now - seen.quiet_since < self.grace_s and not self.complete(path):
                seen.recheck_at = now + min(1.0, seen.quiet_since + self.grace_s - now)
                continue
            del self._pending[path]
            self._handed[path] = (seen.size, seen.mtime_ns)
            return path
        return None

    # ------------------------------------------------------------------------------------------ events
    def _watch_tree(self, folder: str) -> None:
        if self.inotify is None:
            return
        stack = [folder]
        while stack:
            f = stack.pop()
            try:
                self._folders[self.inotify.add_watch(f)] = f
            except OSError as exc:
                logger.warning("%s; it is scanned every %g s instead", exc, self.rescan_s)
            if self.recursive:
                try:
                    with os.scandir(f) as it:
                        stack += [e.path for e in it if e.is_dir(follow_symlinks=False) and not e.name.startswith(".")
                                  and os.path.abspath(e.path) not in self.exclude]
                except OSError:
                    pass

    def _wait(self, timeout_s: float) -> None:
        """Sleep until a file event, :meth:`stop`, or ``timeout_s``; then take in the events."""
        fds = [self._wake_r] + ([self.inotify.fileno()] if self.inotify is not None else [])
        try:
            ready, _, _ = select.select(fds, [], [], timeout_s)
        except InterruptedError:
            return
        if self._wake_r in ready:
            os.read(self._wake_r, 1024)
        if self.inotify is not None and self.inotify.fileno() in ready:
            self._take_events()

    def _take_events(self) -> None:
        for wd, mask, name in self.inotify.read():
            if mask & _IN_Q_OVERFLOW:
                logger.info("inotify queue overflow: rescanning %s", self.folder)
                self._next_scan = 0.0
                continue
            folder = self._folders.get(wd)
            if mask & _IN_IGNORED:
                self._folders.pop(wd, None)
                continue
            if folder is None or not name:
                continue
            path = os.path.join(folder, name)
            if mask & _IN_ISDIR:
                if self.recursive and mask & (_IN_CREATE | _IN_MOVED_TO) and not name.startswith(".") \
                        and os.path.abspath(path) not in self.exclude:
                    self._watch_tree(path)
                    self._next_scan = 0.0          # files may be in it already
                continue
            if not self._wanted(path):
                continue
            if mask & (_IN_DELETE | _IN_MOVED_FROM):
                self._pending.pop(path, None)
                self._handed.pop(path, None)
            else:
                self._observe(path)
