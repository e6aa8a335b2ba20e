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

    @abstractmethod
    def check_health(self) -> None:
        """Raise if a worker is gone or can no longer run steps."""

    @abstractmethod
    def shutdown(self) -> None:
        """Release the workers (idempotent)."""

