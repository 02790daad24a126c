"""File formats, in one place: MRC (mrcfile; memory-mapped stacks, voxel size
kept), TIFF movies (tifffile), the STAR format (``star``) and Xmipp ``.xmd``
metadata (``xmd``), particle sets read from and written to either
(``particles``, ``xmipp_particles``), and image references ``N@stack.mrcs``.
Writes are atomic (temporary name, then rename) and bad files raise :class:`xmipp_accel.errors.FileFormatError` naming
the file and the problem.
"""

from typing import Any

#: Public name -> submodule that defines it. The submodules are imported on first use (PEP 562), so
#: that ``import xmipp_accel.io.paths`` (every command line) does not pay for the particle and STAR
#: readers (~20 ms of start-up).
_EXPORTS = {
    "atomic_write": "atomic",
    "ImageStackWriter": "images", "parse_image_ref": "images", "read_images": "images", "write_stack": "images",
    "check_finite": "mrc", "mrc_info": "mrc", "mrc_shape": "mrc", "mrc_voxel_size": "mrc", "read_mrc": "mrc",
    "write_mrc": "mrc",
    "ParticleSet": "particles", "read_particles": "particles", "write_particles": "particles",
    "write_particles_from_arrays": "particles",
    "Table": "star", "read_star": "star", "write_star": "star",
    "read_xmd": "xmd", "write_xmd": "xmd",
}


def __getattr__(name: str) -> Any:
    """Import the submodule defining ``name`` on first access and return the attribute."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


__all__ = ["atomic_write", "ImageStackWriter", "parse_image_ref", "read_images", "write_stack", "check_finite",
           "mrc_info", "mrc_shape", "mrc_voxel_size", "read_mrc", "write_mrc", "ParticleSet", "Table",
           "read_particles", "read_star", "write_particles", "write_particles_from_arrays", "write_star",
           "read_xmd", "write_xmd"]
