"""One worker in the engine's own process: a step is a function call, nothing is copied."""

from __future__ import annotations

from servelm.config import EngineConfig
from servelm.executor.base import Executor
from servelm.step_io import ModelRunnerOutput, SchedulerOutput
from servelm.worker.kv_payload import KVPayload
from servelm.worker.worker import Worker


class InProcessExecutor(Executor):
    def __init__(self, config: EngineConfig) -> None:
        super().__init__()
        self.worker: Worker | None = Worker(config)
        self.info = self.worker.info

    def execute_model(self, step: SchedulerOutput) -> ModelRunnerOutput:
        self.check_health()
        return self.worker.execute_model(step)

    def export_request(self, req_id: str, block_ids: list[int]) -> tuple[list[KVPayload], bytes | None]:
        self.check_health()
        kv, state = self.worker.export_request(req_id, block_ids)
        return [kv], state

    def import_kv(self, block_ids: list[int], payloads: list[KVPayload]) -> None:
        self.check_health()
        if len(payloads) != 1:
            raise ValueError(f"K/V from an engine of {len(payloads)} worker processes; this one has 1")
        self.worker.import_kv(block_ids, payloads[0])

    def check_health(self) -> None:
        if self.worker is None:
            raise RuntimeError("the executor was shut down")

    def shutdown(self) -> None:
        self.worker = None  # the model and KV tensors go with it
