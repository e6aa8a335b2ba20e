"""Executors: how the engine reaches the workers that hold the model (executor/base.py)."""

from __future__ import annotations

from servelm.config import EngineConfig
from servelm.executor.base import Executor
from servelm.executor.in_process import InProcessExecutor


def make_executor(config: EngineConfig) -> Executor:
    """The executor for `config`: today one worker in this process."""
    return InProcessExecutor(config)
