"""Payloads: an array with a logical descriptor (what the data mean) and a physical one (where they live).

After Umpalumpa (Střelák et al., Computing 2023): an algorithm is set up once
for a reference logical descriptor (e.g. 30 frames of 4096 x 4096, real space)
and then runs on any payload that :meth:`LogicalDescriptor.fits` it; the
physical descriptor says whether the bytes are on the host (page-able or
pinned: pinned memory copies to the GPU 9x faster on our H100) or on a GPU,
so the runtime knows which copies a stage needs.

Shapes follow the package convention: ``(n, y, x)`` image stacks,
``(n, z, y, x)`` volume batches; the leading axis is the batch.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Dict, Optional, Tuple

import numpy as np

from ... import backend

__all__ = ["LogicalDescriptor", "PhysicalDescriptor", "Payload", "MEMORY_KINDS"]

#: Where a payload's bytes live: host page-able, host pinned (page-locked), GPU device memory, or nowhere yet.
MEMORY_KINDS = ("pageable", "pinned", "device", "none")


@dataclass(frozen=True)
class LogicalDescriptor:
    """What the data mean, independently of where they are.

    Attributes
    ----------
    shape : tuple of int
        Full shape, batch first: ``(n, y, x)`` or ``(n, z, y, x)``; for a half spectrum the stored shape
        (last axis ``x // 2 + 1``).
    dims : int
        Spatial dimensionality (1, 2 or 3): the last ``dims`` axes are spatial, the rest batch.
    padding : tuple of int
        Pixels of padding added to each spatial axis (total, both sides), e.g. ``(0, 4)`` for frames
        padded from 4092 to 4096 columns; zeros when none.
    fourier : bool
        Fourier space (True) or real space.
    half : bool
        For Fourier data: a real-to-complex half spectrum (last axis ``x // 2 + 1``).
    """
    shape: Tuple[int, ...]
    dims: int = 2
    padding: Tuple[int, ...] = ()
    fourier: bool = False
    half: bool = False

    def __post_init__(self):
        shape = tuple(int(s) for s in self.shape)
        object.__setattr__(self, "shape", shape)
        if not 1 <= self.dims <= 3 or self.dims > len(shape):
            raise ValueError(f"dims must be 1..3 and at most the number of axes of {shape}, got {self.dims}")
        padding = tuple(int(p) for p in self.padding) or (0,) * self.dims
        if len(padding) != self.dims or min(padding) < 0:
            raise ValueError(f"padding needs {self.dims} non-negative values, got {self.padding}")
        object.__setattr__(self, "padding", padding)
        if self.half and not self.fourier:
            raise ValueError("half=True describes a half spectrum: it needs fourier=True")

    @property
    def batch(self) -> int:
        """Number of items (product of the non-spatial axes)."""
        return int(np.prod(self.shape[: len(self.shape) - self.dims], dtype=np.int64))

    @property
    def spatial_shape(self) -> Tuple[int, ...]:
        return self.shape[len(self.shape) - self.dims:]

    @property
    def unpadded_shape(self) -> Tuple[int, ...]:
        """Spatial shape before padding (real-space sizes; for a half spectrum the full last size)."""
        spatial = list(self.spatial_shape)
        if self.half:
            spatial[-1] = 2 * (spatial[-1] - 1)
        return tuple(s - p for s, p in zip(spatial, self.padding))

    def with_batch(self, n: int) -> LogicalDescriptor:
        """The same description for ``n`` items."""
        return replace(self, shape=(int(n),) + self.spatial_shape)

    def fits(self, reference: LogicalDescriptor) -> bool:
        """True when an algorithm set up for ``reference`` can process this payload (same space and
        spatial shape, at most its batch)."""
        return (self.dims == reference.dims and self.fourier == reference.fourier and self.half == reference.half
                and self.spatial_shape == reference.spatial_shape and self.padding == reference.padding
                and self.batch <= reference.batch)


@dataclass(frozen=True)
class PhysicalDescriptor:
    """Where the bytes are.

    Attributes
    ----------
    memory : {"pageable", "pinned", "device", "none"}
        Host page-able, host pinned, GPU memory, or not allocated.
    gpu_id : int or None
        CUDA device of ``"device"`` memory.
    nbytes : int
        Size in bytes.
    dtype : numpy.dtype
    """
    memory: str
    nbytes: int
    dtype: np.dtype
    gpu_id: Optional[int] = None

    def __post_init__(self):
        if self.memory not in MEMORY_KINDS:
            raise ValueError(f"memory must be one of {MEMORY_KINDS}, got {self.memory!r}")
        object.__setattr__(self, "dtype", np.dtype(self.dtype))

    @property
    def on_gpu(self) -> bool:
        return self.memory == "device"

    @classmethod
    def of(cls, array: Any, *, pinned: bool = False) -> PhysicalDescriptor:
        """Describe an existing NumPy or CuPy array (NumPy arrays are page-able unless ``pinned``)."""
        cp = backend.cupy_module()
        if cp is not None and isinstance(array, cp.ndarray):
            return cls("device", int(array.nbytes), array.dtype, int(array.device.id))
        array = np.asarray(array)
        return cls("pinned" if pinned else "pageable", int(array.nbytes), array.dtype)


@dataclass
class Payload:
    """An array with its logical and physical descriptors and free-form metadata.

    Build with :meth:`wrap`; move with :meth:`to_device` / :meth:`to_host`.
    """
    data: Any
    logical: LogicalDescriptor
    physical: PhysicalDescriptor
    meta: Dict[str, Any] = field(default_factory=dict)

    @classmethod
    def wrap(cls, array: Any, *, dims: Optional[int] = None, fourier: Optional[bool] = None, half: bool = False,
             padding: Tuple[int, ...] = (), pinned: bool = False, **meta: Any) -> Payload:
        """Describe an array.

        ``dims`` defaults to 2 (an image or a stack of images; pass 3 for volumes), ``fourier`` to
        whether the dtype is complex; other keywords become metadata (e.g. ``name="movie_001.tif"``).
        """
        ndim = array.ndim
        dims = dims if dims is not None else min(ndim, 2)
        fourier = bool(np.iscomplexobj(array)) if fourier is None else fourier
        if ndim == dims:  # a single item: a batch axis of 1 is implied in the logical shape
            shape = (1,) + tuple(array.shape)
        else:
            shape = tuple(array.shape)
        logical = LogicalDescriptor(shape, dims=dims, padding=padding, fourier=fourier, half=half)
        return cls(array, logical, PhysicalDescriptor.of(array, pinned=pinned), dict(meta))

    @property
    def xp(self):
        """numpy or cupy, matching where the data are."""
        return backend.get_xp(self.data)

    def to_device(self, gpu_id: int = 0, stream: Any = None) -> Payload:
        """A copy on GPU ``gpu_id`` (asynchronous on ``stream`` when the host data are pinned)."""
        cp = backend.cupy_module()
        if cp is None:
            raise backend.BackendError("moving a payload to a GPU needs a usable GPU")
        if self.physical.on_gpu and self.physical.gpu_id == gpu_id:
            return self
        with cp.cuda.Device(gpu_id):
            if self.physical.on_gpu:
                data = cp.asarray(self.data)  # peer copy
            else:
                data = cp.empty(self.data.shape, self.data.dtype)
                data.set(np.ascontiguousarray(self.data), stream=stream)
        return Payload(data, self.logical, PhysicalDescriptor.of(data), dict(self.meta))

    def to_host(self, *, pinned: bool = False, stream: Any = None) -> Payload:
        """A host copy (into pinned memory when ``pinned``); waits for the copy to finish."""
        if not self.physical.on_gpu:
            return self
        out = backend.pinned_empty(self.data.shape, self.data.dtype) if pinned else \
            np.empty(self.data.shape, self.data.dtype)
        self.data.get(out=out, stream=stream)
        if stream is not None:
            stream.synchronize()
        return Payload(out, self.logical, PhysicalDescriptor.of(out, pinned=pinned), dict(self.meta))

    def subset(self, start: int, stop: int) -> Payload:
        """Items ``start:stop`` of the batch (a view; leading axis)."""
        if self.data.ndim == self.logical.dims:
            raise ValueError("subset needs a batch axis: this payload holds a single item")
        data = self.data[start:stop]
        return Payload(data, self.logical.with_batch(data.shape[0]),
                       replace(self.physical, nbytes=int(data.nbytes)), dict(self.meta))
