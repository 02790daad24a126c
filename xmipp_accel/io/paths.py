"""Where the file names inside STAR files point: one rule, RELION's, for every command.

RELION runs in its project folder and reads every name in a STAR file (``rlnImageName``,
``rlnMicrographName``, ``rlnMicrographMetadata``, ...) relative to it: ``relion_reconstruct`` run
from the project folder on ``Refine3D/job010/run_data.star`` opens ``Extract/job007/.../x.mrcs``, not
``Refine3D/job010/Extract/...``. cryoDRGN adds ``--datadir`` for names that do not resolve (a STAR
file from another machine). We do both, and write names the way RELION does, so a STAR file we write
is read by RELION run from the same folder as our command:

* **Reading** a relative name: under ``--datadir DIR`` first (``DIR/NAME``, then ``DIR/<file name
  alone>``, as cryoDRGN), then relative to the working directory (RELION's rule), then relative to
  the folder of the STAR file (a STAR file kept beside its stacks, as Scipion and Xmipp often write).
  Absolute names are used as they are.
* **Writing**: names relative to the working directory (run the command from the RELION project
  folder), absolute with ``--absolute-paths``; a file outside the working directory is written
  absolute (a ``../`` name would break as soon as the project is moved). A name that no longer
  resolves to a file is written back as it was read.

:data:`PATH_RULE` says this in the words of ``--help``; ``docs/conventions.md`` repeats it.
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence, Tuple

from ..errors import FileFormatError

__all__ = ["PATH_RULE", "name_candidates", "resolve_name", "locate", "written_name", "rewrite_image_refs",
           "split_ref", "FORMAT_HINTS"]

#: The rule, as ``--help`` of every command reading or writing STAR files states it.
PATH_RULE = ("File names inside STAR files (rlnImageName, rlnMicrographName, ...) follow RELION: a relative "
             "name is read relative to the working directory (RELION's project folder), then relative to the "
             "STAR file's folder; with --datadir DIR it is looked up in DIR first (DIR/NAME, then DIR/<file "
             "name alone>). Names are written relative to the working directory, so run the command from the "
             "RELION project folder; with --absolute-paths, or for files outside the working directory, they "
             "are written absolute.")


def name_candidates(name: str, star_dir: Optional[str] = None, datadir: Optional[str] = None) -> List[str]:
    """The places a file name from a STAR file is looked for, in order (see the module docstring).

    Parameters
    ----------
    name : str
        The file part of a reference (``stack.mrcs`` of ``12@stack.mrcs``), as written.
    star_dir : str, optional
        Folder of the STAR file that holds the name.
    datadir : str, optional
        ``--datadir``: a folder searched first.

    Returns
    -------
    list of str
        ``[name]`` for an absolute name; else the ``datadir`` candidates, the name itself (relative to
        the working directory) and the ``star_dir`` candidate, without repeats.
    """
    name = os.path.expanduser(name)
    if os.path.isabs(name):
        return [name]
    out: List[str] = []
    if datadir:
        out += [os.path.join(datadir, name), os.path.join(datadir, os.path.basename(name))]
    out.append(name)
    if star_dir:
        out.append(os.path.join(star_dir, name))
    seen = set()
    unique = []
    for c in out:
        key = os.path.abspath(c)
        if key not in seen:
            seen.add(key)
            unique.append(c)
    return unique


def resolve_name(name: str, star_dir: Optional[str] = None, *, datadir: Optional[str] = None) -> Optional[str]:
    """The first existing place of ``name`` (:func:`name_candidates`), or None when none exists."""
    for candidate in name_candidates(name, star_dir, datadir):
        if os.path.exists(candidate):
            return candidate
    return None


def locate(name: str, star_dir: Optional[str] = None, *, datadir: Optional[str] = None, kind: str = "image file",
           source: Optional[str] = None) -> str:
    """Like :func:`resolve_name`, but a missing file raises an error listing every place tried.

    Raises
    ------
    FileFormatError
        None of the candidates exists; the message names ``source`` (the STAR file), the places
        looked in, and the fix (run from the project folder, or ``--datadir``).
    """
    found = resolve_name(name, star_dir, datadir=datadir)
    if found is not None:
        return found
    tried = ", ".join(os.path.abspath(c) for c in name_candidates(name, star_dir, datadir))
    where = f" (named in {source})" if source else ""
    raise FileFormatError(f"{kind} {name} not found{where}; looked for {tried}. Relative names are read from the "
                          "working directory (RELION's project folder), then from the STAR file's folder: run the "
                          "command from the project folder, or give --datadir FOLDER holding the files")


def written_name(path: str, *, absolute: bool = False) -> str:
    """How a file we know the place of is named in a STAR file we write.

    Parameters
    ----------
    path : str
        The file (absolute, or relative to the working directory).
    absolute : bool
        ``--absolute-paths``: write the absolute name.

    Returns
    -------
    str
        The name relative to the working directory, or absolute when ``absolute`` is set or the file
        lies outside the working directory.
    """
    full = os.path.abspath(os.path.expanduser(path))
    if absolute:
        return full
    rel = os.path.relpath(full, os.getcwd())
    if rel == os.pardir or rel.startswith(os.pardir + os.sep):
        return full
    return rel


#: Format hints Xmipp/Scipion may append to a file name: "stack.mrcs:mrcs", "img.mrc:mrc".
FORMAT_HINTS = {"mrc", "mrcs", "spi", "stk", "xmp", "tif", "tiff", "em", "img", "hed", "dm4"}


def split_ref(ref: str) -> Tuple[str, str, str]:
    """``"12@stack.mrcs:mrcs"`` -> ``("12@", "stack.mrcs", ":mrcs")``: number with its ``@``, file name, hint."""
    number, sep, rest = ref.partition("@") if "@" in ref else ("", "", ref)
    head, colon, tail = rest.rpartition(":")
    if colon and head and tail.lower() in FORMAT_HINTS:
        return number + sep, head, colon + tail
    return number + sep, rest, ""


def rewrite_image_refs(refs: Sequence[str], star_dir: Optional[str], *, datadir: Optional[str] = None,
                       absolute: bool = False) -> List[str]:
    """Image references read from a STAR file in ``star_dir``, renamed for a STAR file we write.

    Each file is found by the reading rule and named by :func:`written_name`; the image number and
    any format hint are kept. A name that resolves to no file is kept as it is.

    Parameters
    ----------
    refs : sequence of str
        ``"N@stack.mrcs"`` or ``"image.mrc"`` references, as read.
    star_dir, datadir
        As for :func:`name_candidates`.
    absolute : bool
        ``--absolute-paths``.

    Returns
    -------
    list of str
        One reference per input, in order.
    """
    cache: Dict[str, str] = {}
    out = []
    for ref in refs:
        ref = str(ref)
        number, name, hint = split_ref(ref)
        new = cache.get(name)
        if new is None:
            found = resolve_name(name, star_dir, datadir=datadir)
            new = name if found is None else written_name(found, absolute=absolute)
            cache[name] = new
        out.append(f"{number}{new}{hint}")
    return out
