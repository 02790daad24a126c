"""File formats, in one place: MRC (mrcfile; memory-mapped stacks, voxel size
kept), TIFF movies (tifffile), the STAR format (``star``) and Xmipp ``.xmd``
metadata (``xmd``), particle sets read from and written to either
(``particles``, ``xmipp_particles``), and image references ``N@stack.mrcs``.
Writes are atomic (temporary name, then rename) and bad files raise :class:`xmipp_accel.errors.FileFormatError` naming
the file and the problem.
"""

from .atomic import atomic_write  # noqa: E402
from .images import ImageStackWriter, parse_image_ref, read_images, write_stack  # noqa: E402
from .mrc import check_finite, mrc_info, mrc_shape, mrc_voxel_size, read_mrc, write_mrc  # noqa: E402
from .particles import ParticleSet, read_particles, write_particles, write_particles_from_arrays  # noqa: E402
from .star import Table, read_star, write_star  # noqa: E402
from .xmd import read_xmd, write_xmd  # noqa: E402

__all__ = ["atomic_write", "ImageStackWriter", "parse_image_ref", "read_images", "write_stack", "check_finite",
           "mrc_info", "mrc_shape", "mrc_voxel_size", "read_mrc", "write_mrc", "ParticleSet", "Table",
           "read_particles", "read_star", "write_particles", "write_particles_from_arrays", "write_star",
           "read_xmd", "write_xmd"]
