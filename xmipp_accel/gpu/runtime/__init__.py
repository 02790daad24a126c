"""Task runtime: payloads with logical and physical descriptors, a pipeline of stages over GPUs
and CPU workers with bounded queues, the pinned host-memory pool, and MPI helpers for jobs past one
machine.

Public names are re-exported here; see :mod:`.payload`, :mod:`.pipeline`, :mod:`.pinned` and :mod:`.mpi`.
"""
from __future__ import annotations

from .mpi import MPIContext, launched_by_mpi, mpi_context
from .payload import LogicalDescriptor, Payload, PhysicalDescriptor
from .pinned import PinnedPool
from .pipeline import ItemResult, Pipeline, PipelineRun, StageStats, WorkerContext

__all__ = ["MPIContext", "launched_by_mpi", "mpi_context", "LogicalDescriptor", "Payload", "PhysicalDescriptor",
           "PinnedPool", "ItemResult", "Pipeline", "PipelineRun", "StageStats", "WorkerContext"]
