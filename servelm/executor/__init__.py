"""Executors: how the engine reaches the workers that hold the model (executor/base.py)."""

from __future__ import annotations

from servelm.config import EngineConfig
from servelm.executor.base import Executor
from servelm.executor.in_process import InProcessExecutor
from servelm.executor.multiproc import MultiprocExecutor


def make_executor(config: EngineConfig) -> Executor:
    """One worker in this process, or a process per rank for tensor/pipeline parallelism."""
    if config.tensor_parallel_size * config.pipeline_parallel_size > 1:
        return MultiprocExecutor(config)
    return InProcessExecutor(config)
