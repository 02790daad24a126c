"""Xmipp metadata (``.xmd``): STAR text with Xmipp labels, read and written.

Xmipp writes ``# XMIPP_STAR_1 *`` first, then ``data_`` blocks holding either a
``loop_`` table (``_angleRot``, ``_image``, ...) or key/value pairs (one row,
e.g. ``data_noname`` or ``data_extra``); an empty ``loop_`` gives an empty
table. The parser is the one in :mod:`xmipp_accel.io.star`; labels keep Xmipp's
names without the underscore (``"angleRot"``). Angles are in degrees (ZYZ, the
same convention as RELION), shifts ``shiftX``/``shiftY`` in pixels.
"""
from __future__ import annotations

import os
from typing import Dict, Mapping, Union

from .atomic import atomic_write
from .star import Table, format_star_text, parse_star_text, read_star_file_text

__all__ = ["read_xmd", "write_xmd", "XMIPP_HEADER"]

XMIPP_HEADER = "# XMIPP_STAR_1 *\n#"


def read_xmd(path: str | os.PathLike) -> Dict[str, Table]:
    """Read an Xmipp metadata file.

    Parameters
    ----------
    path : str or os.PathLike
        ``.xmd`` file.

    Returns
    -------
    dict of str to Table
        Block name without ``data_`` (``"noname"``, ``"projectionDirections"``)
        -> table; key/value blocks are one-row tables with ``loop`` False.

    Raises
    ------
    FileFormatError
        Missing, empty, binary or malformed file (the message gives the line).
    """
    path = os.fspath(path)
    return parse_star_text(read_star_file_text(path, "Xmipp metadata"), path)


def write_xmd(path: str | os.PathLike, blocks: Mapping[str, Union[Table, Mapping]]) -> None:
    """Write tables as an Xmipp metadata file, atomically.

    Parameters
    ----------
    path : str or os.PathLike
        Output ``.xmd`` file.
    blocks : mapping of str to Table (or mapping of columns)
        Block name (without ``data_``; Xmipp's single-block files use
        ``"noname"``) -> table. A table with ``loop=False`` and one row is written
        as key/value pairs.
    """
    path = os.fspath(path)
    text = format_star_text(blocks, header=XMIPP_HEADER)
    with atomic_write(path) as tmp:
        with open(tmp, "w") as f:
            f.write(text)
