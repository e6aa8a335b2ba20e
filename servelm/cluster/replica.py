"""One engine replica, as the body of a Ray actor: an AsyncLLM whose outputs stream back to
the front end through a Ray generator.

Errors the engine raises for a request travel as a `ReplicaError` item rather than a Ray
task error, so the front end can tell a bad request (raised as the same ValueError a single
engine raises) from a replica that can no longer run anything (retried elsewhere).
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from servelm.config import EngineConfig
from servelm.engine.async_engine import AsyncLLM, EngineDeadError, EngineStepError
from servelm.engine.engine import PromptInput
from servelm.outputs import RequestOutput
from servelm.sampling_params import SamplingParams


@dataclass
class ReplicaError:
    kind: str  # "invalid" (the request's fault), "failed" (a step failed), "dead" (the engine)
    message: str


class ReplicaServer:
    """Made a Ray actor by the pool (`ray.remote(ReplicaServer)`); runs in its own process,
    and spawns its tensor/pipeline-parallel workers beside it, inside its placement group."""

    def __init__(self, config: dict[str, Any], log_level: str = "WARNING") -> None:
        logging.basicConfig(level=log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
        started = time.monotonic()
        self.llm = AsyncLLM(EngineConfig(**config))
        self.load_s = time.monotonic() - started

    async def info(self) -> dict[str, Any]:
        engine = self.llm.engine
        return {"pid": os.getpid(), "node": socket.gethostname(), "load_s": self.load_s,
                "max_model_len": engine.max_model_len, "vocab_size": engine.arch.vocab_size,
                "worker_pids": list(getattr(engine.executor, "pids", []))}

    async def stats(self) -> dict[str, Any]:
        """What the front end's health check reads each second."""
        fatal = self.llm.fatal_error
        return {"pid": os.getpid(), "metrics": self.llm.engine.get_metrics(),
                "num_waiting": self.llm.num_waiting,
                "fatal_error": None if fatal is None else str(fatal)}

    async def generate(self, request_id: str, prompt: PromptInput, params: SamplingParams,
                       priority: int) -> AsyncIterator[RequestOutput | ReplicaError]:
        """Cancelled (`ray.cancel`) when the front end stops listening: AsyncLLM then aborts
        the request."""
        try:
            async for out in self.llm.generate(request_id, prompt, params, priority):
                yield out
        except ValueError as exc:
            yield ReplicaError("invalid", str(exc))
        except EngineDeadError as exc:
            yield ReplicaError("dead", str(exc))
        except EngineStepError as exc:
            yield ReplicaError("failed", str(exc))

    def shutdown(self) -> None:
        self.llm.shutdown()
