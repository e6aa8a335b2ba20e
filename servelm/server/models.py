"""What the HTTP API serves: one or more named models, each behind the same small interface.

A model is either one engine in this process (`LocalModel`, over AsyncLLM) or a pool of
engine replicas on Ray (`servelm.cluster.pool.ReplicaPool`). The API layer only needs what
is below, so streaming, errors and metrics behave the same for both.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Protocol

from servelm.engine.async_engine import AsyncLLM
from servelm.engine.engine import PromptInput
from servelm.outputs import RequestOutput
from servelm.sampling_params import SamplingParams

# (labels, figures) pairs: one per engine, figures as LLMEngine.get_metrics() names them
MetricSnapshots = list[tuple[dict[str, str], dict[str, float]]]
# ("counter" | "gauge", name, help, labels, value): a served model's own series
MetricRows = list[tuple[str, str, str, dict[str, str], float]]


class ServedModel(Protocol):
    name: str

    @property
    def tokenizer(self) -> Any: ...

    @property
    def max_model_len(self) -> int | None: ...

    @property
    def vocab_size(self) -> int: ...

    @property
    def num_waiting(self) -> int: ...

    def new_request_id(self, prefix: str) -> str: ...

    async def start(self) -> None:
        """Called as the server starts: a replicated model launches its replicas."""

    async def stop(self) -> None: ...

    def generate(self, request_id: str, prompt: PromptInput, params: SamplingParams,
                 priority: int = 0, stream: bool = False,
                 session: str | None = None) -> AsyncIterator[RequestOutput]:
        """Outputs as the request progresses; `stream` says whether the client sees them
        as they come (a replicated model retries a lost request only while nothing has
        reached the client), `session` names a chat session to keep on one replica."""
        ...

    def health(self) -> tuple[bool, dict[str, Any]]: ...

    async def refresh_metrics(self) -> None:
        """Bring what `metric_snapshots` reports up to date (before a /metrics scrape)."""

    def metric_snapshots(self) -> MetricSnapshots: ...

    def extra_metrics(self) -> MetricRows:
        """Series beyond the engines' (a replica pool's routing and failover counts)."""
        ...


class LocalModel:
    """One engine in this process."""

    def __init__(self, llm: AsyncLLM, name: str) -> None:
        self.llm, self.name = llm, name

    @property
    def tokenizer(self) -> Any:
        return self.llm.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.llm.engine.max_model_len

    @property
    def vocab_size(self) -> int:
        return self.llm.engine.arch.vocab_size

    @property
    def num_waiting(self) -> int:
        return self.llm.num_waiting

    def new_request_id(self, prefix: str) -> str:
        return self.llm.new_request_id(prefix)

    async def start(self) -> None:
        pass  # the engine was built with the AsyncLLM

    async def stop(self) -> None:
        pass  # whoever built the AsyncLLM shuts it down

    def generate(self, request_id: str, prompt: PromptInput, params: SamplingParams,
                 priority: int = 0, stream: bool = False,
                 session: str | None = None) -> AsyncIterator[RequestOutput]:
        return self.llm.generate(request_id, prompt, params, priority)

    def health(self) -> tuple[bool, dict[str, Any]]:
        if self.llm.fatal_error is not None:  # a worker died or hung: a load balancer should move on
            return False, {"status": "unhealthy", "error": str(self.llm.fatal_error)}
        return True, {"status": "ok"}

    async def refresh_metrics(self) -> None:
        pass  # read from the engine at scrape time

    def metric_snapshots(self) -> MetricSnapshots:
        return [({}, self.llm.engine.get_metrics())]

    def extra_metrics(self) -> MetricRows:
        return []
