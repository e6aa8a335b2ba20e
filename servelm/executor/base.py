"""How the engine reaches its workers: one call per step, plain data in and out.

The engine never holds a model. It hands each step's `SchedulerOutput` to an `Executor` and
gets a `ModelRunnerOutput` back; whether the worker runs in this process, in other
processes (tensor and pipeline parallel ranks) or on other machines is the executor's
business.

Pipeline parallelism keeps several steps in flight: `submit` hands a step over without
waiting, `collect` returns the oldest submitted step's output. Executors that run one step
at a time get both from `execute_model`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import deque

from servelm.step_io import ModelRunnerOutput, SchedulerOutput, WorkerInfo
from servelm.worker.kv_payload import KVPayload

_UNSUPPORTED = "this executor cannot move a request's K/V to or from another engine"


class Executor(ABC):
    info: WorkerInfo  # set once the workers have loaded the model

    def __init__(self) -> None:
        self._submitted: deque[SchedulerOutput] = deque()

    @abstractmethod
    def execute_model(self, step: SchedulerOutput) -> ModelRunnerOutput:
        """Run one step on every worker; the output of the one that samples."""

    def submit(self, step: SchedulerOutput) -> None:
        """Start `step`; its output comes from a later `collect`, in submission order."""
        self._submitted.append(step)

    def collect(self) -> ModelRunnerOutput:
        """The output of the oldest step submitted and not yet collected."""
        return self.execute_model(self._submitted.popleft())

    def export_request(self, req_id: str, block_ids: list[int]) -> tuple[list[KVPayload], bytes | None]:
        """A request's K/V in `block_ids`, one payload per worker (its heads, its layers),
        and its generator's state: to move it elsewhere. No step may be in flight."""
        raise NotImplementedError(_UNSUPPORTED)

    def import_kv(self, block_ids: list[int], payloads: list[KVPayload]) -> None:
        """Write a request's K/V, moved from an engine of the same layout, into `block_ids`."""
        raise NotImplementedError(_UNSUPPORTED)

    @abstractmethod
    def check_health(self) -> None:
        """Raise if a worker is gone or can no longer run steps."""

    @abstractmethod
    def shutdown(self) -> None:
        """Release the workers (idempotent)."""

