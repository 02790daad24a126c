"""Atomic file writes: write to a temporary name in the same folder, rename on success.

Every writer in :mod:`xmipp_accel.io` goes through :func:`atomic_write`, so an
interrupted or failed write never leaves a half-written output under the final
name (a reader, or Scipion polling the folder, sees either the old file or the
complete new one).
"""
from __future__ import annotations

import contextlib
import os
import uuid
from typing import Iterator

from ..errors import InputError

__all__ = ["atomic_write"]


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
