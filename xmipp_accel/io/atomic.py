"""Atomic file writes: write to a temporary name in the same folder, rename on success.

Every writer in :mod:`xmipp_accel.io` goes through :func:`atomic_write`, so an
interrupted or failed write never leaves a half-written output under the final
name (a reader, or Scipion polling the folder, sees either the old file or the
complete new one).

The one way a command writes its outputs:

1. :func:`check_outputs` before any work: every output file (and folder) can be written, or an
   :class:`~xmipp_accel.errors.InputError` names the path and the fix (no pose is computed, no map
   reconstructed, for a file that cannot be saved);
2. :func:`write_outputs` after the work: each output written under a temporary name, then all renamed;
   a failure removes the temporary files and says that nothing was written.
"""
from __future__ import annotations

import contextlib
import os
import uuid
from typing import Callable, Iterable, Iterator, Mapping

from ..errors import InputError

__all__ = ["atomic_write", "check_writable", "check_outputs", "write_outputs"]


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path beside ``path``; rename it to ``path`` on success.

    Parameters
    ----------
    path : str or os.PathLike
        Final output file. Its folder is created if missing.

    Yields
    ------
    str
        A temporary file name in the same folder (same extension, so writers
        that look at the extension behave the same). The caller writes it.

    Notes
    -----
    On a normal exit the temporary file replaces ``path`` with :func:`os.replace`
    (atomic on POSIX within one file system). On an exception the temporary file
    is removed and the exception propagates; ``path`` is left untouched.

    Raises
    ------
    InputError
        If ``path`` is an existing folder, or its folder cannot be created.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise InputError(f"cannot write {path}: it is a folder; give a file name")
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create the output folder {folder} for {path}: {exc.strerror}") from exc
    base = os.path.basename(path)
    stem, ext = os.path.splitext(base)
    tmp = os.path.join(folder, f".{stem}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}{ext}")
    try:
        yield tmp
        if not os.path.exists(tmp):
            raise InputError(f"writing {path} produced no file (internal error: writer did not create {tmp})")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def check_writable(path: str | os.PathLike, *, folder: bool = True) -> str:
    """Check, before any work, that outputs can be written at ``path``; creates nothing.

    Parameters
    ----------
    path : str or os.PathLike
        An output folder (``folder=True``: it may not exist yet, then the nearest existing folder above
        it must let us create it) or an output file (``folder=False``: its folder must be writable).

    Returns
    -------
    str
        The absolute path.

    Raises
    ------
    InputError
        Naming the path: it is a file where a folder is needed (or the reverse), a folder on the way is a
        file, or the folder that would receive the outputs is not writable.
    """
    path = os.path.abspath(os.fspath(path))
    if folder and os.path.exists(path) and not os.path.isdir(path):
        raise InputError(f"cannot write outputs in {path}: it is a file, not a folder; give a folder name")
    if not folder and os.path.isdir(path):
        raise InputError(f"cannot write {path}: it is a folder; give a file name")
    probe = path if folder else os.path.dirname(path)
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        raise InputError(f"cannot write outputs in {path}: {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        what = "the output folder" if probe == (path if folder else os.path.dirname(path)) else \
            f"the folder {probe} that would hold it"
        raise InputError(f"cannot write {path}: {what} is not writable (permission denied); "
                         "choose another output folder or fix its permissions")
    return path


def check_outputs(files: Iterable[str | os.PathLike] = (), folders: Iterable[str | os.PathLike] = ()) -> None:
    """Check, before any work, that each output file and output folder can be written; creates nothing.

    Raises :class:`~xmipp_accel.errors.InputError` naming the first path that cannot be written
    (:func:`check_writable`).
    """
    for path in files:
        check_writable(path, folder=False)
    for path in folders:
        check_writable(path, folder=True)


def write_outputs(writers: Mapping[str, Callable[[str], None]]) -> None:
    """Write several outputs all or nothing: each under a temporary name, then all renamed.

    Parameters
    ----------
    writers : mapping of final path -> function writing that output to the path it is given
        (a temporary name beside the final one, with the same extension).

    Raises
    ------
    InputError
        When a file cannot be written (permissions, disk full): the temporary files are removed and
        the message says that nothing was written; outputs of an earlier run are left as they were.
    """
    temporary = {}
    try:
        for path in writers:
            path = os.fspath(path)
            folder = os.path.dirname(os.path.abspath(path))
            os.makedirs(folder, exist_ok=True)
            stem, ext = os.path.splitext(os.path.basename(path))
            temporary[path] = os.path.join(folder, f".{stem}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}{ext}")
        for path, write in writers.items():
            write(temporary[os.fspath(path)])
        for path, tmp in temporary.items():
            os.replace(tmp, path)
    except OSError as exc:
        raise InputError(f"cannot write the outputs ({exc}); nothing was written") from None
    finally:
        for tmp in temporary.values():
            with contextlib.suppress(OSError):
                os.remove(tmp)
