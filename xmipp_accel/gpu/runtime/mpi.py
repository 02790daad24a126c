"""MPI helpers: split work across ranks and reduce partial results (mpi4py).

One job past one machine runs as an MPI program, one rank per GPU, as Xmipp and
RELION do and as Scipion launches it (``numberOfMpi`` wraps the command in the
``PARALLEL_COMMAND`` of ``hosts.conf``, e.g. ``mpirun -np 4 xmipp-accel ...``).
Reconstruction reduces partial volumes across ranks; angular assignment and movie
alignment split their inputs across ranks.

:func:`mpi_context` returns an :class:`MPIContext` that behaves the same with or
without MPI: with no ``mpi4py``, or when the process was not started by an MPI
launcher, it is a one-rank context whose collectives are no-ops, so algorithms
call it unconditionally. Arrays may be NumPy or CuPy; CuPy arrays are copied to
the host for MPI and the result comes back on the same device.

Example
-------
>>> ctx = mpi_context()
>>> mine = ctx.split(len(images))                      # this rank's slice
>>> partial = insert(images[mine], ...)                # any array module
>>> total = ctx.reduce_sum(partial)                    # summed on root, None elsewhere
>>> if ctx.is_root:
...     write(total)
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
from typing import Any, Iterator, List, Optional, Sequence

import numpy as np

from ... import backend
from ...backend import BackendError

logger = logging.getLogger(__name__)

__all__ = ["MPIContext", "mpi_context", "launched_by_mpi", "MPI_ENV"]

#: ``XMIPP_ACCEL_MPI=0`` never uses MPI, ``=1`` always initialises it (default: only when launched by mpirun/srun).
MPI_ENV = "XMIPP_ACCEL_MPI"

# Variables set by common MPI launchers (Open MPI, MPICH/Hydra and Intel MPI, PMIx/SLURM srun, MVAPICH).
_LAUNCHER_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "PMI_RANK", "MV2_COMM_WORLD_SIZE",
                  "MPI_LOCALNRANKS", "HYDI_CONTROL_FD")
_LOCAL_RANK_VARS = ("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "MV2_COMM_WORLD_LOCAL_RANK",
                    "SLURM_LOCALID", "PALS_LOCAL_RANKID")

# Largest number of elements per MPI message (stays under the 2**31 count limit of MPI-3 for any dtype).
_CHUNK_ELEMENTS = 1 << 27


def launched_by_mpi(environ: Optional[dict] = None) -> bool:
    """True when an MPI launcher (mpirun, mpiexec, srun with PMI/PMIx) started this process."""
    env = os.environ if environ is None else environ
    return any(v in env for v in _LAUNCHER_VARS)


def _want_mpi() -> bool:
    flag = os.environ.get(MPI_ENV, "").strip().lower()
    if flag in ("0", "no", "false", "off"):
        return False
    if flag in ("1", "yes", "true", "on"):
        return True
    return launched_by_mpi()


class MPIContext:
    """This process's place in an MPI job, with the few collectives the algorithms need.

    Parameters
    ----------
    comm : mpi4py communicator or None
        ``None`` gives a single-process context (rank 0 of 1) whose collectives return their input.

    Attributes
    ----------
    rank, size : int
        This rank and the number of ranks.
    is_root : bool
        ``rank == 0``: the rank that writes outputs.
    local_rank : int
        Rank among the ranks on this host (used to pick one GPU per rank).
    """

    def __init__(self, comm: Any = None):
        self.comm = comm
        self.rank = int(comm.Get_rank()) if comm is not None else 0
        self.size = int(comm.Get_size()) if comm is not None else 1
        self.local_rank = self._find_local_rank()

    # ------------------------------------------------------------------ identity
    @property
    def is_root(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        """True when more than one rank takes part."""
        return self.comm is not None and self.size > 1

    def __repr__(self) -> str:
        return f"MPIContext(rank={self.rank}, size={self.size}, local_rank={self.local_rank})"

    def _find_local_rank(self) -> int:
        if self.comm is None or self.size == 1:
            return 0
        for var in _LOCAL_RANK_VARS:
            if var in os.environ:
                with contextlib.suppress(ValueError):
                    return int(os.environ[var])
        try:  # MPI-3: ranks sharing memory are on one host
            from mpi4py import MPI  # noqa: PLC0415
            node = self.comm.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
            try:
                return int(node.Get_rank())
            finally:
                node.Free()
        except Exception:  # pragma: no cover - very old MPI
            return self.rank

    def pick_gpu(self, gpu_ids: Sequence[int]) -> Optional[int]:
        """The GPU this rank should use: ``gpu_ids[local_rank % len(gpu_ids)]`` (None when the list is empty).

        With ``--gpus 0,1`` and 4 ranks per host, ranks 0 and 2 use GPU 0, ranks 1 and 3 GPU 1.
        """
        ids = list(gpu_ids)
        if not ids:
            return None
        return int(ids[self.local_rank % len(ids)])

    # ------------------------------------------------------------------ splitting
    def split(self, n: int) -> slice:
        """This rank's contiguous share of ``n`` items, as a slice.

        Shares differ by at most one item and cover ``range(n)`` in rank order, so
        concatenating per-rank results in rank order restores the input order.
        """
        n = int(n)
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        return slice(self.rank * n // self.size, (self.rank + 1) * n // self.size)

    def split_indices(self, n: int) -> np.ndarray:
        """This rank's share of ``range(n)`` as an int64 index array (same items as :meth:`split`)."""
        s = self.split(n)
        return np.arange(s.start, s.stop, dtype=np.int64)

    def counts(self, n: int) -> List[int]:
        """Number of items of each rank for ``n`` items (length ``size``)."""
        return [(r + 1) * n // self.size - r * n // self.size for r in range(self.size)]

    # ------------------------------------------------------------------ collectives
    def barrier(self) -> None:
        """Wait for every rank (no-op with one rank)."""
        if self.enabled:
            self.comm.Barrier()

    def bcast(self, obj: Any, root: int = 0) -> Any:
        """Send a picklable object from ``root`` to every rank; every rank returns it."""
        if not self.enabled:
            return obj
        return self.comm.bcast(obj, root=root)

    def gather(self, obj: Any, root: int = 0) -> Optional[list]:
        """Collect one picklable object per rank: a list in rank order on ``root``, None elsewhere."""
        if not self.enabled:
            return [obj]
        return self.comm.gather(obj, root=root)

    def allgather(self, obj: Any) -> list:
        """Collect one picklable object per rank on every rank (list in rank order)."""
        if not self.enabled:
            return [obj]
        return self.comm.allgather(obj)

    def gather_concat(self, array: Any, axis: int = 0, root: int = 0) -> Any:
        """Concatenate each rank's array along ``axis`` in rank order on ``root`` (None elsewhere).

        The counterpart of :meth:`split`: per-rank results of ``items[ctx.split(n)]`` come
        back in the input order. The result has the array module of the input.
        """
        xp = backend.get_xp(array)
        if not self.enabled:
            return array
        parts = self.comm.gather(backend.to_host(array), root=root)
        if self.rank != root:
            return None
        return xp.asarray(np.concatenate(parts, axis=axis))

    def reduce_sum(self, array: Any, root: int = 0, *, ordered: bool = False) -> Any:
        """Element-wise sum of every rank's array, on ``root``; None on the other ranks.

        Parameters
        ----------
        array : numpy.ndarray or cupy.ndarray
            Same shape and dtype on every rank (real or complex). Not modified.
        root : int
            Rank that receives the sum.
        ordered : bool
            False: MPI's reduction (a tree; fastest). True: ``root`` adds the ranks' arrays
            one by one in rank order, so the floating-point result does not depend on the MPI
            library or the number of processes per host (memory on root: two arrays).

        Returns
        -------
        Array of the input's shape, dtype and array module on ``root``; None elsewhere.
        With one rank, a copy of ``array``.
        """
        xp = backend.get_xp(array)
        if not self.enabled:
            return array.copy()
        host = np.ascontiguousarray(backend.to_host(array))
        out = np.empty_like(host) if self.rank == root else None
        if ordered:
            self._ordered_reduce(host, out, root)
        else:
            self._chunked(host, out, root)
        if self.rank != root:
            return None
        return xp.asarray(out)

    def allreduce_sum(self, array: Any) -> Any:
        """Element-wise sum of every rank's array, returned on every rank (input's array module)."""
        xp = backend.get_xp(array)
        if not self.enabled:
            return array.copy()
        host = np.ascontiguousarray(backend.to_host(array))
        out = np.empty_like(host)
        self._chunked(host, out, None)
        return xp.asarray(out)

    def _chunked(self, host: np.ndarray, out: Optional[np.ndarray], root: Optional[int]) -> None:
        from mpi4py import MPI  # noqa: PLC0415
        src = host.reshape(-1)
        dst = out.reshape(-1) if out is not None else None
        for start in range(0, max(src.size, 1), _CHUNK_ELEMENTS):
            stop = min(start + _CHUNK_ELEMENTS, src.size)
            if root is None:
                self.comm.Allreduce(src[start:stop], dst[start:stop], op=MPI.SUM)
            else:
                recv = dst[start:stop] if dst is not None else None
                self.comm.Reduce(src[start:stop], recv, op=MPI.SUM, root=root)

    def _ordered_reduce(self, host: np.ndarray, out: Optional[np.ndarray], root: int) -> None:
        src = host.reshape(-1)
        if self.rank != root:
            for start in range(0, max(src.size, 1), _CHUNK_ELEMENTS):
                self.comm.Send(src[start:start + _CHUNK_ELEMENTS], dest=root, tag=77)
            return
        dst = out.reshape(-1)
        buf = np.empty(min(src.size, _CHUNK_ELEMENTS), dtype=src.dtype)
        for start in range(0, max(src.size, 1), _CHUNK_ELEMENTS):
            stop = min(start + _CHUNK_ELEMENTS, src.size)
            acc = None
            for r in range(self.size):  # rank order: the same sum as a serial loop over ranks' shares
                if r == root:
                    part = src[start:stop]
                else:
                    part = buf[:stop - start]
                    self.comm.Recv(part, source=r, tag=77)
                acc = part.copy() if acc is None else np.add(acc, part, out=acc)
            dst[start:stop] = acc

    # ------------------------------------------------------------------ failures
    @contextlib.contextmanager
    def abort_on_error(self) -> Iterator[None]:
        """Abort the whole job when this rank raises, so other ranks do not wait forever in a collective.

        With one rank the exception simply propagates.
        """
        try:
            yield
        except BaseException as exc:
            if self.enabled and not isinstance(exc, (KeyboardInterrupt, SystemExit)):
                logger.error("rank %d of %d failed: %s; aborting the MPI job", self.rank, self.size, exc)
                sys.stderr.flush()
                self.comm.Abort(1)
            raise


_CONTEXT: Optional[MPIContext] = None


def mpi_context(comm: Any = None) -> MPIContext:
    """The MPI context of this process (created once).

    Parameters
    ----------
    comm : mpi4py communicator, optional
        Use this communicator (e.g. a sub-communicator) instead of ``COMM_WORLD``; not cached.

    Notes
    -----
    ``mpi4py`` is imported (and MPI initialised) only when the process was started by an
    MPI launcher or ``XMIPP_ACCEL_MPI=1``; otherwise, or when ``mpi4py`` is missing, the
    context has one rank and every collective is a no-op. ``XMIPP_ACCEL_MPI=0`` disables MPI.
    """
    global _CONTEXT
    if comm is not None:
        return MPIContext(comm)
    if _CONTEXT is None:
        _CONTEXT = MPIContext(_world_comm())
    return _CONTEXT


def _world_comm() -> Any:
    if not _want_mpi():
        return None
    try:
        from mpi4py import MPI  # noqa: PLC0415
    except ImportError:
        if _launcher_size() > 1:
            raise BackendError(
                f"started by an MPI launcher with {_launcher_size()} processes but mpi4py is not installed, so "
                "every process would run the whole job; install the 'mpi' extra "
                "(pip install 'scipion-em-xmipp-accel[mpi]') or run without mpirun") from None
        return None
    return MPI.COMM_WORLD


def _launcher_size() -> int:
    for var in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE", "SLURM_NTASKS"):
        with contextlib.suppress(KeyError, ValueError):
            return int(os.environ[var])
    return 1
