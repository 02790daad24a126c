"""3-D Fourier reconstruction (gather formulation) on NumPy or CuPy arrays.

Public names (see :mod:`.fourier` (the maths), :mod:`.batches` (batches, devices and MPI ranks on the
task runtime), :mod:`.insert`, :mod:`.blob`)::

    reconstruct(images, matrices, *, shifts_px, ctf, subset, pixel_size_A, sym, ...) -> ReconstructionResult
    reconstruct_batches(batches, box, *, devices, halves, mpi, ...)                 -> ReconstructionResult
    FourierReconstructor(box, *, settings, xp, n_subsets)   .insert(...)  .volume(subset)
    ReconstructionSettings, ParticleBatch, KaiserBesselBlob, FourierGrid
    insert_gather(...), symmetrize_fourier_volume(...)      (kernel and NumPy twin)
"""
from .batches import (
    ParticleBatch,
    ReconstructionResult,
    batches_from_arrays,
    reconstruct,
    reconstruct_batches,
    reduce_accumulators,
)
from .blob import KaiserBesselBlob
from .fourier import (
    CTF_MODES,
    SYM_MODES,
    FourierAccumulator,
    FourierReconstructor,
    ReconstructionSettings,
    finish_volume,
    projection_transforms,
)
from .insert import (
    INSERT_TUNING_SPACE,
    FourierGrid,
    insert_gather,
    insert_gather_numpy,
)
from .symmetrize import symmetrize_fourier_volume

__all__ = ["KaiserBesselBlob", "CTF_MODES", "SYM_MODES", "FourierAccumulator", "FourierReconstructor",
           "ParticleBatch", "ReconstructionResult", "ReconstructionSettings", "batches_from_arrays", "finish_volume",
           "projection_transforms", "reconstruct", "reconstruct_batches", "reduce_accumulators",
           "INSERT_TUNING_SPACE", "FourierGrid", "insert_gather", "insert_gather_numpy", "symmetrize_fourier_volume"]
