"""Reconstruction from batches of particles on the task runtime: one or several devices, MPI ranks.

Particles arrive in :class:`ParticleBatch` objects, read lazily. They run through a
:class:`~xmipp_accel.gpu.runtime.pipeline.Pipeline` with one compute worker per device: the
runtime's reader threads check each batch and copy its images into pinned host buffers (its
:class:`~xmipp_accel.gpu.runtime.pinned.PinnedPool`), the worker copies them to its GPU on its
stream and inserts them into that device's :class:`~.fourier.FourierReconstructor` (the maths),
in chunks that shrink when the GPU runs out of memory. Memory is bounded by the runtime's queues
whatever the particle count. The devices' partial volumes are then summed, across MPI ranks too
(:func:`reduce_accumulators`), and root finishes the volumes.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import numpy as np

from ... import backend
from ...errors import InputError
from ..runtime.pipeline import Pipeline, WorkerContext
from . import fourier
from .fourier import FourierAccumulator, FourierReconstructor, ReconstructionSettings, fourier_grid
from .insert import packed_width

#: Upload the next batch on a copy stream while the previous one inserts (GPU only). Off: on the H100 (RESULTS.md,
#: 2026-12-07 run B) C1 256²×10 000 took 0.764 s with it and 0.646 s without, so the overlap does not pay here.
#: ``benchmarks/reconstruct.py --prefetch`` times it again.
UPLOAD_PREFETCH = False

__all__ = ["ParticleBatch", "ReconstructionResult", "batches_from_arrays", "default_batch_size", "reconstruct",
           "reconstruct_batches", "reduce_accumulators"]

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- batches

@dataclass
class ParticleBatch:
    """A batch of aligned particles.

    Attributes
    ----------
    images : ndarray ``(n, N, N)`` float32 (NumPy or CuPy).
    matrices : ndarray ``(n, 3, 3)``: projection rotations (``euler_to_matrix(rot, tilt, psi)``).
    shifts_px : ndarray ``(n, 2)`` or None: (x, y) shifts in pixels applied to the images
        (``origin_A / pixel_size_A`` in RELION's convention).
    ctf : dict or None: per-particle ``defocus_u_A``, ``defocus_v_A``, ``defocus_angle_deg`` and
        optionally ``voltage_kV``, ``cs_mm``, ``amplitude_contrast``, ``phase_shift_deg`` arrays ``(n,)``.
    subset : ndarray ``(n,)`` int (1 or 2) or None: half-map subset of each particle.
    first_index : int
        Index of the first particle in the whole data set (for messages).
    """

    images: object
    matrices: np.ndarray
    shifts_px: Optional[np.ndarray] = None
    ctf: Optional[Dict[str, np.ndarray]] = None
    subset: Optional[np.ndarray] = None
    first_index: int = 0

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def take(self, start: int, stop: int) -> ParticleBatch:
        """Particles ``start:stop`` of this batch."""
        def sl(a):
            return None if a is None else a[start:stop]
        return ParticleBatch(self.images[start:stop], np.asarray(self.matrices)[start:stop], sl(self.shifts_px),
                             None if self.ctf is None else {k: np.asarray(v)[start:stop] for k, v in self.ctf.items()},
                             sl(self.subset), self.first_index + start)


def batches_from_arrays(images, matrices, *, shifts_px=None, ctf=None, subset=None,
                        batch_size: int = 256) -> Iterable[ParticleBatch]:
    """Split in-memory arrays into :class:`ParticleBatch` objects of ``batch_size`` particles."""
    n = int(images.shape[0])
    for name, arr, width in (("matrices", matrices, 9), ("shifts_px", shifts_px, 2), ("subset", subset, 1)):
        if arr is not None and np.asarray(arr).size != n * width:
            raise InputError(f"{name} must describe the {n} images (shape ({n}, ...)), got shape {np.shape(arr)}")
    full = ParticleBatch(images, np.asarray(matrices, dtype=np.float64).reshape(-1, 3, 3),
                         None if shifts_px is None else np.asarray(shifts_px, dtype=np.float64).reshape(-1, 2),
                         None if ctf is None else {k: np.broadcast_to(np.asarray(v, dtype=np.float64), (n,))
                                                   for k, v in ctf.items()},
                         None if subset is None else np.asarray(subset).reshape(-1))
    for start in range(0, n, batch_size):
        yield full.take(start, min(n, start + batch_size))


def default_batch_size(box: int, settings: ReconstructionSettings, *, gpu: bool,
                       budget_bytes: float = 2.0e9) -> int:
    """Particles per batch keeping the per-batch buffers near ``budget_bytes`` (GPU) or small (CPU).

    A GPU batch holds the images, their padded transforms and CTFs (rfft layout) and the packed
    projections (``W² x 16`` bytes each, :func:`.insert.packed_width`).
    """
    grid = fourier_grid(box, settings)
    M = grid.padded_box
    W = packed_width(grid, settings.blob)
    per_image = M * (M // 2 + 1) * (8 + 4) + M * M * 4 + W * W * 16 + box * box * 4 * 3
    if not gpu:
        budget_bytes = 1.5e8
    return int(max(1, min(4096, budget_bytes // per_image)))


def reduce_accumulators(accumulators: List[FourierAccumulator], mpi=None) -> Optional[List[FourierAccumulator]]:
    """Sum per-subset accumulators across MPI ranks (``gpu.runtime.mpi``); the sums on root, None elsewhere."""
    if mpi is None or not getattr(mpi, "enabled", False):
        return accumulators
    out = []
    for acc in accumulators:
        d = mpi.reduce_sum(acc.data)
        w = mpi.reduce_sum(acc.weight)
        counts = mpi.gather(int(acc.count))
        out.append(None if d is None else FourierAccumulator(d, w, int(sum(counts))))
    return out if mpi.is_root else None


# ---------------------------------------------------------------------------------------------- drivers

@dataclass
class ReconstructionResult:
    """Output of :func:`reconstruct_batches` (host arrays; None on non-root MPI ranks).

    Attributes
    ----------
    volume : ``(N, N, N)`` float32; half1, half2 : same or None (without half maps).
    n_particles : int, particles inserted (all ranks); timings : dict of seconds per stage.
    """

    volume: Optional[np.ndarray]
    half1: Optional[np.ndarray] = None
    half2: Optional[np.ndarray] = None
    n_particles: int = 0
    timings: dict = field(default_factory=dict)


class _DeviceState:
    """What one device's compute worker keeps: its reconstructor, its chunk size (halved on
    out-of-memory) and, on a GPU, the per-particle finite checks read back at the end."""

    def __init__(self, device: backend.Device, box: int, settings: ReconstructionSettings, pixel_size_A: float,
                 n_subsets: int, chunk: int, check_finite: bool = True):
        self.device = device
        self.check_finite = check_finite
        self.chunk = max(1, int(chunk))
        self.finite_checks: list = []   # (first particle index, device bool per particle)
        with backend.on_device(device):
            self.xp = device.xp
            self.rec = FourierReconstructor(box, settings=settings, pixel_size_A=pixel_size_A, xp=self.xp,
                                            n_subsets=n_subsets)
            if device.is_gpu:
                self.xp.cuda.Device().synchronize()   # accumulators zeroed before the workers' streams use them

    # ------------------------------------------------------------------ batches
    def process(self, batch: ParticleBatch) -> None:
        """Insert a batch (images on this device), in chunks; on GPU out-of-memory halve the chunk and retry."""
        start = 0
        n = len(batch)
        while start < n:
            stop = min(n, start + self.chunk)
            part = batch.take(start, stop)
            try:
                if self.device.is_gpu:
                    self._insert_gpu(part)
                else:
                    self.rec.insert(part.images, part.matrices, shifts_px=part.shifts_px, ctf=part.ctf,
                                    subset=part.subset)
            except Exception as exc:
                if not backend.is_out_of_memory(exc) or self.chunk <= 1 or getattr(exc, "_inserted", False):
                    raise
                self.chunk = max(1, (stop - start) // 2)
                logger.warning("%s ran out of memory with %d particles per batch: retrying with %d",
                               self.device.describe() if self.device.is_gpu else "cpu", stop - start, self.chunk)
                if self.device.is_gpu:
                    self.xp.cuda.Device().synchronize()
                    self.xp.get_default_memory_pool().free_all_blocks()
                continue
            start = stop

    def _insert_gpu(self, part: ParticleBatch) -> None:
        """Transform, pack and insert device images on the current stream (no synchronisation)."""
        cp = self.xp
        images = part.images.astype(cp.float32, copy=False)
        if self.check_finite:   # on the device, read back once at the end
            self.finite_checks.append((part.first_index, cp.isfinite(images).all(axis=(1, 2))))
        settings = self.rec.settings
        packed = fourier.packed_projections(images, self.rec.grid, shifts_px=part.shifts_px, ctf=part.ctf,
                                            pixel_size_A=self.rec.pixel_size_A, ctf_mode=settings.ctf_mode,
                                            ctf_premultiplied=settings.ctf_premultiplied, blob=settings.blob)
        try:
            self.rec.insert_transforms(packed, None, part.matrices, part.subset, packed=True)
        except Exception as exc:  # past this point a retry would insert twice
            exc._inserted = True
            raise

    def synchronize(self) -> None:
        """Wait for the device's work; raise InputError for particles found holding NaN/inf."""
        if self.device.is_gpu:
            with backend.on_device(self.device):
                self.xp.cuda.Device().synchronize()
                for first, flags in self.finite_checks:
                    ok = backend.to_host(flags)
                    if not ok.all():
                        raise InputError(f"particle {first + int(np.argmin(ok)) + 1} has NaN or infinite pixels: "
                                         "fix or remove it (e.g. re-extract the particles)")
                self.finite_checks = []


def _check_batch(batch: ParticleBatch, box: int, n_subsets: int) -> None:
    shape = tuple(batch.images.shape)
    if len(shape) != 3 or shape[1:] != (box, box):
        raise InputError(f"particles {batch.first_index + 1}..{batch.first_index + len(batch)} have images of shape "
                         f"{shape[1:]} but the first ones are {box} x {box}: all particles must have the same box")
    m = np.asarray(batch.matrices)
    if m.shape != (shape[0], 3, 3) or not np.all(np.isfinite(m)):
        raise InputError(f"particles {batch.first_index + 1}..: rotations must be finite (n, 3, 3) arrays")
    if n_subsets == 2:
        sub = None if batch.subset is None else np.asarray(batch.subset)
        if sub is None or not np.all((sub == 1) | (sub == 2)):
            raise InputError("half maps need a subset of 1 or 2 for every particle (rlnRandomSubset)")


def reconstruct_batches(batches: Iterable[ParticleBatch], box: int, *, pixel_size_A: float = 1.0,
                        settings: ReconstructionSettings = ReconstructionSettings(),
                        devices: Optional[Sequence[backend.Device]] = None, halves: bool = False,
                        chunk: Optional[int] = None, mpi=None,
                        on_batch: Optional[Callable[[int], None]] = None,
                        check_finite: bool = True) -> ReconstructionResult:
    """Reconstruct from a stream of batches on one or several devices (and MPI ranks).

    Parameters
    ----------
    batches : iterable of ParticleBatch
        Read lazily (overlapping the devices' work); host images are staged through pinned memory.
    box : int
        Image box ``N``.
    pixel_size_A : float
        Pixel size (Å), for the CTF.
    settings : ReconstructionSettings
    devices : sequence of backend.Device or None
        One or more GPUs (each gets batches from a shared queue) or one CPU device; default
        ``backend.resolve_device()``.
    halves : bool
        Keep two accumulators (``batch.subset``) and return both half maps as well.
    chunk : int or None
        Largest number of particles a device transforms at once (default: :func:`default_batch_size`).
    mpi : gpu.runtime.mpi.MPIContext or None
        With several ranks, partial sums are reduced to root, which finishes the volumes.
    on_batch : callable or None
        Called with the number of particles of each batch once it is inserted (progress bars).
    check_finite : bool
        Raise InputError for a batch holding NaN or infinite pixels.

    Returns
    -------
    ReconstructionResult (volumes on the host; None on non-root ranks).
    """
    settings = settings.validated()
    if devices is None:
        devices = [backend.resolve_device()]
    devices = list(devices)
    if not devices:
        raise ValueError("no device given")
    if any(not d.is_gpu for d in devices):
        devices = [backend.Device("cpu")]
    n_subsets = 2 if halves else 1
    if chunk is None:
        chunk = default_batch_size(box, settings, gpu=devices[0].is_gpu)
    timings = {}
    t0 = time.perf_counter()
    states = [_DeviceState(d, box, settings, pixel_size_A, n_subsets, chunk, check_finite) for d in devices]
    timings["setup"] = time.perf_counter() - t0

    def validate(batch: ParticleBatch) -> None:
        _check_batch(batch, box, n_subsets)
        if check_finite and not devices[0].is_gpu:   # GPU workers check on the device
            xp = backend.get_xp(batch.images)
            if not bool(xp.all(xp.isfinite(batch.images))):
                bad = np.nonzero(~np.isfinite(backend.to_host(batch.images)).reshape(len(batch), -1).all(axis=1))[0]
                raise InputError(f"particle {batch.first_index + int(bad[0]) + 1} has NaN or infinite pixels: "
                                 "fix or remove it (e.g. re-extract the particles)")

    t1 = time.perf_counter()
    _run_pipeline(states, batches, validate, on_batch)
    for st in states:
        st.synchronize()
    timings["insert"] = time.perf_counter() - t1

    # sum the devices' partial volumes on the first device, then across MPI ranks
    t2 = time.perf_counter()
    main = states[0]
    with backend.on_device(main.device):
        for a in main.rec.accumulators:
            a.collapse()
        for st in states[1:]:
            for a, b in zip(main.rec.accumulators, st.rec.accumulators):
                with backend.on_device(st.device):
                    host = b.to_host()
                a.add(host)
        accs = reduce_accumulators(main.rec.accumulators, mpi)
        n_particles = 0 if accs is None else sum(a.count for a in accs)
        timings["reduce"] = time.perf_counter() - t2
        if accs is None:
            return ReconstructionResult(None, n_particles=0, timings=timings)
        t3 = time.perf_counter()
        main.rec.accumulators = [FourierAccumulator(main.xp.asarray(a.data), main.xp.asarray(a.weight), a.count)
                                 for a in accs]
        result = ReconstructionResult(backend.to_host(main.rec.volume()), n_particles=n_particles)
        if halves:
            result.half1 = backend.to_host(main.rec.volume(1))
            result.half2 = backend.to_host(main.rec.volume(2))
        backend.synchronize(main.xp)
        timings["finish"] = time.perf_counter() - t3
    result.timings = timings
    return result


def _run_pipeline(states: List[_DeviceState], batches: Iterable[ParticleBatch],
                  validate: Callable[[ParticleBatch], None], on_batch) -> None:
    """Run the batches through the task runtime: one compute worker per device, each owning its
    :class:`_DeviceState` (reconstructor, accumulators).

    The runtime's reader threads validate each batch and stage its host images into pinned buffers
    (float32); the worker copies them to its GPU on its stream and inserts them. Images already on a
    GPU (CuPy) are used where they are. Memory stays bounded by the runtime's queues; the first error
    is re-raised.
    """
    free = list(states)   # each compute worker takes its own state (a device listed twice: two states)
    lock = threading.Lock()
    gpu = states[0].device.is_gpu

    def setup(worker: WorkerContext) -> _DeviceState:
        with lock:
            for i, st in enumerate(free):
                if (st.device.kind, st.device.gpu_id) == (worker.device.kind, worker.device.gpu_id):
                    return free.pop(i)
        raise RuntimeError(f"no reconstruction state left for worker {worker.name}")

    def read(batch: ParticleBatch):
        validate(batch)
        images = batch.images
        if gpu and isinstance(images, np.ndarray):
            images = np.asarray(images, dtype=np.float32)   # what the GPU transforms; the runtime pins it
        return images, batch                                # only the images travel to the device

    def compute(data, worker: WorkerContext) -> None:
        images, batch = data
        if worker.is_gpu and not isinstance(batch.images, np.ndarray):
            ready = worker.xp.cuda.Event(disable_timing=True)   # the caller's work on them (legacy stream) first
            ready.record(worker.xp.cuda.Stream.null)
            worker.stream.wait_event(ready)
        worker.state.process(replace(batch, images=images))   # the worker's device and stream are current

    def write(batch: ParticleBatch, _result) -> None:
        if on_batch:
            on_batch(len(batch))

    read_workers = min(4, len(states) + 1) if gpu else 1   # several readers copy into pinned memory at once
    pipe = Pipeline(compute, read=read, write=write,
                    setup=setup,
                    devices=[st.device for st in states], read_workers=read_workers, queue_depth=1,
                    pinned=True, to_host=False, fail_fast=True,
                    prefetch=gpu and UPLOAD_PREFETCH,
                    on_error=lambda result: None)  # the first error is re-raised by run, with its message
    pipe.run(batches)


def reconstruct(images, matrices, *, shifts_px=None, ctf=None, subset=None, pixel_size_A: float = 1.0,
                settings: Optional[ReconstructionSettings] = None, devices=None, halves: bool = False,
                batch_size: Optional[int] = None, **overrides) -> ReconstructionResult:
    """Reconstruct a volume from in-memory particles (convenience over :func:`reconstruct_batches`).

    Parameters
    ----------
    images : ndarray ``(n, N, N)`` float32 (NumPy, or CuPy already on the GPU).
    matrices : ndarray ``(n, 3, 3)``: rotations of the particles.
    shifts_px, ctf, subset : see :class:`ParticleBatch`.
    pixel_size_A : float
    settings : ReconstructionSettings or None; ``overrides`` (e.g. ``sym="d7"``) replace its fields.
    devices : sequence of backend.Device, a device string or None (``backend.resolve_device``).
    halves : bool
    batch_size : int or None

    Returns
    -------
    ReconstructionResult with host volumes.

    Examples
    --------
    >>> res = reconstruct(images, euler_to_matrix(rot, tilt, psi), shifts_px=origins_A / apix,
    ...                   ctf=dict(defocus_u_A=du, defocus_v_A=dv, defocus_angle_deg=da),
    ...                   pixel_size_A=apix, sym="i", devices="cpu")
    """
    settings = replace(settings or ReconstructionSettings(), **overrides)
    if devices is None or isinstance(devices, str):
        devices = [backend.resolve_device(devices)]
    box = int(images.shape[-1])
    n = int(images.shape[0])
    if halves and subset is None:
        subset = 1 + (np.arange(n) % 2)
    bs = int(batch_size or default_batch_size(box, settings, gpu=devices[0].is_gpu))
    return reconstruct_batches(batches_from_arrays(images, matrices, shifts_px=shifts_px, ctf=ctf, subset=subset,
                                                   batch_size=bs),
                               box, pixel_size_A=pixel_size_A, settings=settings, devices=devices, halves=halves,
                               chunk=bs)
