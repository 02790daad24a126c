"""The one place that decides between NumPy (CPU) and CuPy (GPU).

Every algorithm obtains its array module through :func:`get_xp` or
:func:`array_module`; no other module imports CuPy. The device is chosen by
``--device``/``XMIPP_ACCEL_DEVICE`` (``auto``, ``gpu``, ``cpu``) and the GPU id
by ``--gpus``/``XMIPP_ACCEL_GPU``. ``auto`` falls back to the CPU with a
one-line warning when no usable GPU is found; ``gpu`` without one is an error.
"""
from __future__ import annotations

import functools
import logging
import os
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import numpy as np

logger = logging.getLogger(__name__)

DEVICE_ENV = "XMIPP_ACCEL_DEVICE"
GPU_ENV = "XMIPP_ACCEL_GPU"
DEVICE_CHOICES = ("auto", "gpu", "cpu")


class BackendError(RuntimeError):
    """Raised when the requested device cannot be used (message says how to fix)."""


@functools.lru_cache(maxsize=1)
def _import_cupy() -> Optional[Any]:
    """Return the cupy module if it imports and sees a GPU, else None."""
    try:
        import cupy  # noqa: PLC0415  (the only cupy import in the package)
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return None
        return cupy
    except Exception as exc:  # ImportError, CUDARuntimeError, missing driver...
        logger.debug("CuPy not usable: %s", exc)
        return None


def cupy_module() -> Optional[Any]:
    """The cupy module when a GPU is usable, else None (never raises)."""
    return _import_cupy()


def cupyx_fft_module() -> Optional[Any]:
    """``cupyx.scipy.fft`` (cuFFT plans: ``get_fft_plan``) when a GPU is usable, else None."""
    if _import_cupy() is None:
        return None
    import cupyx.scipy.fft  # noqa: PLC0415
    return cupyx.scipy.fft


def gpu_available() -> bool:
    """True when CuPy imports and at least one CUDA device is visible."""
    return _import_cupy() is not None


_THREAD = threading.local()


def _entered_scopes() -> list:
    """This thread's stack of ``with device:`` scopes."""
    if not hasattr(_THREAD, "scopes"):
        _THREAD.scopes = []
    return _THREAD.scopes


@dataclass(frozen=True)
class Device:
    """A resolved compute device.

    Attributes
    ----------
    kind : ``"gpu"`` or ``"cpu"``.
    gpu_id : CUDA device ordinal when ``kind == "gpu"``, else None.
    """
    kind: str
    gpu_id: Optional[int] = None

    @property
    def xp(self):
        """numpy or cupy, matching the device."""
        return _import_cupy() if self.kind == "gpu" else np

    @property
    def is_gpu(self) -> bool:
        return self.kind == "gpu"

    def __enter__(self):
        """``with device:`` makes it current in this thread (re-entrant, safe from several threads)."""
        scope = on_device(self)
        _entered_scopes().append(scope)
        scope.__enter__()
        return self

    def __exit__(self, *exc):
        return _entered_scopes().pop().__exit__(*exc)

    def describe(self) -> str:
        if not self.is_gpu:
            return "cpu (numpy)"
        info = gpu_info(self.gpu_id)
        return f"gpu {self.gpu_id} ({info['name']}, {info['free_bytes'] / 2**30:.1f} GiB free)"



@contextmanager
def on_device(device: Device) -> Iterator[Device]:
    """Make ``device`` the current CUDA device in this thread for the block; nothing to do on the CPU.

    Each call opens its own CuPy device context, so it nests and can be used from many threads at once.
    """
    if device.is_gpu:
        with _import_cupy().cuda.Device(device.gpu_id):
            yield device
    else:
        yield device

def parse_gpu_list(spec: Optional[str]) -> list[int]:
    """Parse ``"0,1"``, ``"0 1"`` or ``"0-3"`` into a list of GPU ids."""
    if spec is None or str(spec).strip() == "":
        return []
    ids: list[int] = []
    for tok in str(spec).replace(",", " ").split():
        if "-" in tok:
            lo, hi = tok.split("-", 1)
            ids.extend(range(int(lo), int(hi) + 1))
        else:
            try:
                ids.append(int(tok))
            except ValueError:
                raise BackendError(f"invalid GPU id {tok!r} in {spec!r}: use e.g. '0' or '0,1'") from None
    return ids


def resolve_device(device: Optional[str] = None, gpu: Optional[int] = None) -> Device:
    """Resolve a device request into a :class:`Device`.

    Parameters
    ----------
    device : ``"auto"``, ``"gpu"`` or ``"cpu"``; default from ``XMIPP_ACCEL_DEVICE``, else ``auto``.
    gpu : GPU ordinal; default from ``XMIPP_ACCEL_GPU``, else 0.
    """
    device = (device or os.environ.get(DEVICE_ENV) or "auto").strip().lower()
    if device not in DEVICE_CHOICES:
        raise BackendError(f"unknown device {device!r}: choose one of {', '.join(DEVICE_CHOICES)}")
    if gpu is None:
        env_ids = parse_gpu_list(os.environ.get(GPU_ENV))
        gpu = env_ids[0] if env_ids else 0
    if device == "cpu":
        return Device("cpu")
    cp = _import_cupy()
    if cp is None:
        if device == "gpu":
            raise BackendError(
                "--device gpu was requested but no usable GPU was found (CuPy missing or no CUDA device); "
                "install the 'gpu' extra (pip install 'scipion-em-xmipp-accel[gpu]') or use --device cpu")
        logger.warning("no usable GPU found: running on the CPU (numpy)")
        return Device("cpu")
    n = cp.cuda.runtime.getDeviceCount()
    if not 0 <= gpu < n:
        raise BackendError(f"GPU {gpu} requested but only {n} device(s) visible (ids 0..{n - 1})")
    return Device("gpu", gpu)


def get_xp(*arrays: Any):
    """Array module (numpy or cupy) for the given arrays; numpy when none is a CuPy array."""
    cp = _import_cupy()
    if cp is not None:
        for a in arrays:
            if isinstance(a, cp.ndarray):
                return cp
    return np


def array_module(device: Optional[Device | str] = None):
    """Array module for a device (a :class:`Device` or a device string)."""
    if device is None or isinstance(device, str):
        device = resolve_device(device)
    return device.xp


def to_device(a: Any, device: Device, dtype=None):
    """Copy a host array to the device (no copy on the CPU unless dtype changes)."""
    xp = device.xp
    return xp.asarray(a, dtype=dtype)


def to_host(a: Any) -> np.ndarray:
    """Return a NumPy array for a NumPy or CuPy array."""
    cp = _import_cupy()
    if cp is not None and isinstance(a, cp.ndarray):
        return cp.asnumpy(a)
    return np.asarray(a)


def synchronize(xp) -> None:
    """Wait for queued GPU work (no-op on the CPU)."""
    if xp is not np:
        xp.cuda.get_current_stream().synchronize()


def gpu_info(gpu_id: int = 0) -> dict:
    """Name, total and free memory (bytes) and compute capability of a GPU."""
    cp = _import_cupy()
    if cp is None:
        raise BackendError("no usable GPU")
    with cp.cuda.Device(gpu_id):
        free, total = cp.cuda.runtime.memGetInfo()
        props = cp.cuda.runtime.getDeviceProperties(gpu_id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    return {"id": gpu_id, "name": name, "total_bytes": int(total), "free_bytes": int(free),
            "compute_capability": f"{props['major']}.{props['minor']}"}


def list_gpus() -> list[dict]:
    """Information for every visible GPU (empty list when none)."""
    cp = _import_cupy()
    if cp is None:
        return []
    return [gpu_info(i) for i in range(cp.cuda.runtime.getDeviceCount())]


def versions() -> dict:
    """Versions of numpy, cupy and CUDA runtime as strings (None when absent)."""
    cp = _import_cupy()
    out = {"numpy": np.__version__, "cupy": None, "cuda_runtime": None}
    if cp is not None:
        out["cupy"] = cp.__version__
        out["cuda_runtime"] = str(cp.cuda.runtime.runtimeGetVersion())
    return out


def is_out_of_memory(exc: BaseException) -> bool:
    """True when an exception is a GPU out-of-memory error (CuPy) or a host MemoryError."""
    if isinstance(exc, MemoryError):
        return True
    cp = _import_cupy()
    return cp is not None and isinstance(exc, cp.cuda.memory.OutOfMemoryError)


def get_raw_module(source: str, name_expressions=None, options=("-std=c++17",)):
    """Compile (cached per device by CuPy) a CUDA source into a RawModule."""
    cp = _import_cupy()
    if cp is None:
        raise BackendError("CUDA kernels need a GPU")
    return cp.RawModule(code=source, options=tuple(options), name_expressions=name_expressions)


def pinned_empty(shape, dtype) -> np.ndarray:
    """A NumPy array backed by page-locked (pinned) host memory; plain memory without a GPU."""
    cp = _import_cupy()
    if cp is None:
        return np.empty(shape, dtype)
    dtype = np.dtype(dtype)
    n = int(np.prod(shape)) * dtype.itemsize
    mem = cp.cuda.alloc_pinned_memory(max(n, 1))
    return np.frombuffer(mem, dtype, int(np.prod(shape))).reshape(shape)
