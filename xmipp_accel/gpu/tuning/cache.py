"""A small persistent key-value store for tuning results, one JSON file per device signature.

Measured FFT sizes and tuned kernel configurations are only valid for the GPU
model and the CUDA/CuPy versions they were measured with (the thesis found tuned
configurations port across GPUs at 31-100% of the best), so every entry is keyed
by ``(device signature, kind, key)``: the signature (GPU model, compute
capability, CUDA runtime, CuPy version) picks the file, ``kind`` names what is
stored (``"fft"``, ``"kernel:insert"``...) and ``key`` the problem.

The store is safe under concurrent processes (several ranks or Scipion steps
sharing a cache on a shared disk): a writer takes an exclusive ``fcntl`` lock on
a lock file beside the data file, re-reads the file, merges its entry, writes a
temporary file and renames it over the old one; readers need no lock because the
rename is atomic. When the folder cannot be written the cache keeps entries in
memory for the process and logs one warning.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import threading
import uuid
from typing import Any, Dict, Iterator, Optional

from ... import backend

try:  # POSIX
    import fcntl
except ImportError:  # pragma: no cover - Windows: best effort without a lock
    fcntl = None

logger = logging.getLogger(__name__)

__all__ = ["CACHE_ENV", "TuningCache", "default_cache_dir", "device_signature", "make_key", "default_cache"]

#: Folder of the tuning cache; ``off`` keeps the cache in memory only.
CACHE_ENV = "XMIPP_ACCEL_CACHE"
FORMAT_VERSION = 1


def default_cache_dir() -> Optional[str]:
    """Folder of the tuning cache: ``$XMIPP_ACCEL_CACHE``, else the user cache folder of ``xmipp_accel``.

    Returns None when ``XMIPP_ACCEL_CACHE`` is ``off`` (or ``none``, ``0``): nothing is written.
    The user cache folder comes from ``platformdirs`` (``~/.cache/xmipp_accel`` on Linux), or
    ``$XDG_CACHE_HOME/xmipp_accel`` when platformdirs is missing.
    """
    env = os.environ.get(CACHE_ENV, "").strip()
    if env.lower() in ("off", "none", "0", "no"):
        return None
    if env:
        return os.path.abspath(os.path.expanduser(env))
    try:
        from platformdirs import user_cache_dir  # noqa: PLC0415
        return user_cache_dir("xmipp_accel", appauthor=False)
    except ImportError:  # pragma: no cover - platformdirs is a dependency
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        return os.path.join(base, "xmipp_accel")


def device_signature(gpu_id: Optional[int] = None) -> Dict[str, Optional[str]]:
    """What a tuning result depends on: GPU model, compute capability, CUDA runtime and CuPy versions.

    Parameters
    ----------
    gpu_id : CUDA device ordinal; default the current CuPy device. Without a GPU the
        signature names the CPU (``{"device": "cpu", "numpy": ...}``).
    """
    cp = backend.cupy_module()
    if cp is None:
        return {"device": "cpu", "numpy": backend.versions()["numpy"]}
    if gpu_id is None:
        gpu_id = cp.cuda.Device().id
    info = backend.gpu_info(gpu_id)
    ver = backend.versions()
    return {"device": info["name"], "cc": info["compute_capability"], "cuda": ver["cuda_runtime"],
            "cupy": ver["cupy"]}


def signature_slug(signature: Dict[str, Any]) -> str:
    """A file-name-safe string naming a device signature (e.g. ``NVIDIA-H100-80GB-HBM3_cc9.0_cuda12080_cupy14.0.1``)."""
    parts = [str(signature.get("device", "unknown"))]
    for k in sorted(k for k in signature if k != "device"):
        parts.append(f"{k}{signature[k]}")
    return re.sub(r"[^A-Za-z0-9.+-]+", "-", "_".join(parts)).strip("-")[:200]


def make_key(*parts: Any, **named: Any) -> str:
    """A canonical string key from values and named values (JSON, sorted), e.g. ``make_key("rfft", n=[30, 4096])``."""
    return json.dumps({"p": list(parts), **named} if named else list(parts), sort_keys=True,
                      separators=(",", ":"), default=str)


class TuningCache:
    """Persistent ``(kind, key) -> JSON value`` store for one device signature.

    Parameters
    ----------
    folder : str, optional
        Cache folder; default :func:`default_cache_dir`. ``None`` from there means memory only.
    signature : dict, optional
        Device signature; default :func:`device_signature` of the current device.
    memory_only : bool
        Keep entries in this process only (tests, read-only installs).

    Examples
    --------
    >>> cache = TuningCache()
    >>> cache.put("fft", make_key("r2c", 30, 4092, 5760), {"ms": 9.1})
    >>> cache.get("fft", make_key("r2c", 30, 4092, 5760))
    {'ms': 9.1}
    """

    def __init__(self, folder: Optional[str] = None, signature: Optional[Dict[str, Any]] = None, *,
                 memory_only: bool = False):
        self.signature = dict(signature) if signature is not None else device_signature()
        folder = folder if folder is not None else (None if memory_only else default_cache_dir())
        self.path = None if (memory_only or folder is None) else os.path.join(
            folder, f"tuning_{signature_slug(self.signature)}.json")
        self._entries: Dict[str, Dict[str, Any]] = {}
        self._mtime: Optional[float] = None
        self._thread_lock = threading.Lock()
        self._warned = False

    # ------------------------------------------------------------------ public API
    def get(self, kind: str, key: str, default: Any = None) -> Any:
        """The value stored under ``(kind, key)``, or ``default``."""
        with self._thread_lock:
            self._refresh()
            return self._entries.get(kind, {}).get(key, default)

    def put(self, kind: str, key: str, value: Any) -> None:
        """Store a JSON-serialisable value under ``(kind, key)`` (replacing an older one)."""
        json.dumps(value)  # fail early, before touching the file, on values JSON cannot hold
        with self._thread_lock:
            self._entries.setdefault(kind, {})[key] = value
            if self.path is None:
                return
            try:
                with self._file_lock():
                    on_disk = self._read_file()
                    on_disk.setdefault(kind, {})[key] = value
                    self._write_file(on_disk)
                    self._entries = on_disk
            except OSError as exc:
                self._warn_once(exc)

    def items(self, kind: str) -> Dict[str, Any]:
        """All ``key -> value`` entries of one kind (a copy)."""
        with self._thread_lock:
            self._refresh()
            return dict(self._entries.get(kind, {}))

    def kinds(self) -> list:
        with self._thread_lock:
            self._refresh()
            return sorted(self._entries)

    def clear(self, kind: Optional[str] = None) -> None:
        """Forget one kind, or everything."""
        with self._thread_lock:
            if self.path is None:
                self._entries = {} if kind is None else {k: v for k, v in self._entries.items() if k != kind}
                return
            try:
                with self._file_lock():
                    on_disk = {} if kind is None else self._read_file()
                    on_disk.pop(kind, None)
                    self._write_file(on_disk)
                    self._entries = on_disk
            except OSError as exc:
                self._warn_once(exc)

    def __repr__(self) -> str:
        return f"TuningCache(path={self.path!r})"

    # ------------------------------------------------------------------ file handling
    def _refresh(self) -> None:
        """Re-read the file when another process changed it since we last looked."""
        if self.path is None:
            return
        try:
            st = os.stat(self.path)
        except OSError:
            return
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)  # a rename gives a new inode
        if stamp != self._mtime:
            disk = self._read_file()
            if self._warned:  # writes fail: keep this run's entries on top of what is on disk
                for kind, entries in self._entries.items():
                    disk.setdefault(kind, {}).update(entries)
            self._entries = disk
            self._mtime = stamp

    def _read_file(self) -> Dict[str, Dict[str, Any]]:
        try:
            with open(self.path, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            logger.warning("ignoring unreadable tuning cache %s (%s); it will be rewritten", self.path, exc)
            return {}
        if not isinstance(data, dict) or data.get("format") != FORMAT_VERSION:
            return {}
        entries = data.get("entries", {})
        return entries if isinstance(entries, dict) else {}

    def _write_file(self, entries: Dict[str, Dict[str, Any]]) -> None:
        folder = os.path.dirname(self.path)
        tmp = os.path.join(folder, f".{os.path.basename(self.path)}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
        payload = {"format": FORMAT_VERSION, "signature": self.signature, "entries": entries}
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(payload, f, indent=1, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise
        with contextlib.suppress(OSError):
            st = os.stat(self.path)
            self._mtime = (st.st_ino, st.st_mtime_ns, st.st_size)

    @contextlib.contextmanager
    def _file_lock(self) -> Iterator[None]:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        with open(self.path + ".lock", "a+") as lock:
            if fcntl is not None:
                fcntl.lockf(lock.fileno(), fcntl.LOCK_EX)  # POSIX record lock: also works on NFS with lockd
            try:
                yield
            finally:
                if fcntl is not None:
                    fcntl.lockf(lock.fileno(), fcntl.LOCK_UN)

    def _warn_once(self, exc: OSError) -> None:
        if not self._warned:
            logger.warning("cannot write the tuning cache %s (%s); results are kept for this run only. "
                           "Set %s to a writable folder to keep them", self.path, exc, CACHE_ENV)
            self._warned = True


_DEFAULT: Dict[Any, TuningCache] = {}
_DEFAULT_LOCK = threading.Lock()


def default_cache(gpu_id: Optional[int] = None) -> TuningCache:
    """The process-wide cache of a device (default folder, current device signature)."""
    sig = device_signature(gpu_id)
    key = (default_cache_dir(), signature_slug(sig))
    with _DEFAULT_LOCK:
        if key not in _DEFAULT:
            _DEFAULT[key] = TuningCache(key[0], sig, memory_only=key[0] is None)
        return _DEFAULT[key]
