"""File formats, in one place: MRC (mrcfile; memory-mapped stacks, voxel size
kept), TIFF movies (tifffile), RELION 3.0/3.1+ STAR and Xmipp ``.xmd`` metadata,
and image references ``N@stack.mrcs``. Writes are atomic (temporary name, then
rename) and bad files raise :class:`xmipp_accel.errors.FileFormatError` naming
the file and the problem.
"""
