"""What a :class:`~.pipeline.Pipeline` run reports and gives its workers: the stages, per-stage busy
times, per-item results (with the stage that failed), the run's summary, and the worker context.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Sequence

from ... import backend

__all__ = ["STAGES", "Cancelled", "StageStats", "ItemResult", "PipelineRun", "WorkerContext"]

STAGES = ("read", "h2d", "compute", "d2h", "write")


class Cancelled(RuntimeError):
    """The item was not processed because the run was stopped (fail_fast or an interrupt)."""


@dataclass
class StageStats:
    """Busy time of one stage, summed over its workers (seconds)."""
    name: str
    count: int = 0
    busy_s: float = 0.0
    max_s: float = 0.0

    @property
    def mean_s(self) -> float:
        return self.busy_s / self.count if self.count else 0.0


@dataclass
class ItemResult:
    """What happened to one input item.

    Attributes
    ----------
    index : position of the item in the input.
    item : the input item.
    value : what ``write`` returned (or the host result of ``compute`` without ``write``).
    error : the exception, or None on success.
    stage : stage that raised (``"read"``, ``"h2d"``, ``"compute"``, ``"d2h"``, ``"write"``, ``"cancelled"``).
    worker : name of the compute worker (``"gpu0"``, ``"cpu0"``).
    """
    index: int
    item: Any
    value: Any = None
    error: Optional[BaseException] = None
    stage: Optional[str] = None
    worker: Optional[str] = None

    @property
    def ok(self) -> bool:
        return self.error is None


class PipelineRun(list):
    """The list of :class:`ItemResult` of a run (input order when ``ordered``), with timing.

    Attributes
    ----------
    stats : dict of StageStats by stage name.
    wall_s : wall time of the run (seconds).
    peak_in_flight : most items held at once; max_in_flight: the bound.
    """

    def __init__(self, results: Iterable[ItemResult], stats: Dict[str, StageStats], wall_s: float,
                 peak_in_flight: int, max_in_flight: int, workers: Sequence[str],
                 stage_workers: Optional[Dict[str, int]] = None):
        super().__init__(results)
        self.stats = stats
        self.stage_workers = dict(stage_workers or {})
        self.wall_s = wall_s
        self.peak_in_flight = peak_in_flight
        self.max_in_flight = max_in_flight
        self.workers = list(workers)

    @property
    def errors(self) -> List[ItemResult]:
        return [r for r in self if not r.ok]

    @property
    def values(self) -> List[Any]:
        return [r.value for r in self]

    def summary(self) -> Dict[str, Any]:
        """Stage busy times, wall time and overlap.

        ``overlap`` = sum of stage busy times / wall (> 1: stages overlapped); ``stage_floor_s`` = the
        largest busy time of a stage divided by its number of workers, the shortest wall time any
        schedule of these stages could reach; ``wall_over_floor`` = wall / that floor (1 is perfect).
        """
        busy = {k: round(s.busy_s, 6) for k, s in self.stats.items() if s.count}
        total = sum(s.busy_s for s in self.stats.values())
        slowest = max((s.busy_s for s in self.stats.values()), default=0.0)
        floor = max((s.busy_s / max(1, self.stage_workers.get(k, 1)) for k, s in self.stats.items()), default=0.0)
        return {"items": len(self), "failed": len(self.errors), "wall_s": self.wall_s, "stage_busy_s": busy,
                "sum_stages_s": total, "slowest_stage_s": slowest, "stage_floor_s": floor,
                "overlap": total / self.wall_s if self.wall_s > 0 else float("nan"),
                "wall_over_floor": self.wall_s / floor if floor > 0 else float("nan"),
                "workers": self.workers, "stage_workers": self.stage_workers,
                "peak_in_flight": self.peak_in_flight, "max_in_flight": self.max_in_flight}


@dataclass
class WorkerContext:
    """What a compute worker gives ``compute`` and ``setup``.

    Attributes
    ----------
    name : ``"gpu<id>"`` (``"gpu<id>.<k>"`` with several workers per GPU) or ``"cpu<k>"``.
    device : the worker's :class:`~xmipp_accel.backend.Device`.
    xp : numpy or cupy.
    stream : the worker's CUDA stream (current while ``compute`` runs), None on the CPU.
    state : what ``setup(worker)`` returned (plans, kernels, buffers set up once per worker).
    """
    name: str
    device: backend.Device
    xp: Any
    stream: Any = None
    state: Any = None

    @property
    def is_gpu(self) -> bool:
        return self.device.is_gpu
