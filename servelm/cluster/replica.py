"""One engine replica, as the body of a Ray actor: an AsyncLLM whose outputs stream back to
the front end through a Ray generator.

Errors the engine raises for a request travel as a `ReplicaError` item rather than a Ray
task error, so the front end can tell a bad request (raised as the same ValueError a single
engine raises) from a replica that can no longer run anything (retried elsewhere).

A request that leaves the replica (a prefill replica's handover after the first token, or
a live migration) ends its stream with a `Handover` item: its K/V sent through the chosen
transport, for the front end to pass to the next replica's `resume`. A migration first
copies full blocks while the request runs (`read_kv` here, `stage_kv` there: Ray moves the
payload between the two actors), then `export` stops it with only the newest blocks left.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from servelm.cluster.kv_transport import Handover, receive_handoff, send_handoff
from servelm.config import EngineConfig
from servelm.engine.async_engine import AsyncLLM, EngineDeadError, EngineStepError, RequestMoved
from servelm.engine.engine import PromptInput
from servelm.outputs import RequestOutput
from servelm.sampling_params import SamplingParams
from servelm.worker.kv_payload import KVPayload

logger = logging.getLogger("servelm.cluster")


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
        self.transports: dict[str, str] = {}  # request id -> how its K/V leaves, if it does
        self.kv_received = self.kv_transfer_failures = 0

    async def info(self) -> dict[str, Any]:
        engine = self.llm.engine
        return {"pid": os.getpid(), "node": socket.gethostname(), "load_s": self.load_s,
                "max_model_len": engine.max_model_len, "vocab_size": engine.arch.vocab_size,
                "worker_pids": list(getattr(engine.executor, "pids", []))}

    async def stats(self) -> dict[str, Any]:
        """What the front end's health check reads each second."""
        fatal = self.llm.fatal_error
        return {"pid": os.getpid(), "metrics": self.llm.engine.get_metrics(),
                "num_waiting": self.llm.num_waiting, "role": self.llm.role,
                "kv_received": self.kv_received, "kv_transfer_failures": self.kv_transfer_failures,
                "fatal_error": None if fatal is None else str(fatal)}

    async def generate(self, request_id: str, prompt: PromptInput, params: SamplingParams,
                       priority: int, transport: str = "ray"
                       ) -> AsyncIterator[RequestOutput | ReplicaError | Handover]:
        """Cancelled (`ray.cancel`) when the front end stops listening: AsyncLLM then aborts
        the request. `transport`: how its K/V leaves if a prefill engine hands it over."""
        try:
            stream = self.llm.generate(request_id, prompt, params, priority)
        except ValueError as exc:  # refused before it started (a decode engine given a prompt)
            yield ReplicaError("invalid", str(exc))
            return
        self.transports[request_id] = transport
        async for item in self._outputs(request_id, stream):
            yield item

    async def resume(self, handover: Handover) -> AsyncIterator[RequestOutput | ReplicaError | Handover]:
        """Go on with a request another replica handed over; its K/V is fetched first, and
        recomputed here when that fails."""
        handoff, failure = await asyncio.to_thread(receive_handoff, handover)
        if handoff.kv is not None:
            self.kv_received += 1
        if failure is not None:
            self.kv_transfer_failures += 1
            logger.warning("recomputing %s: its K/V did not arrive (%s)", handoff.request_id, failure)
        self.transports[handoff.request_id] = handover.transport
        async for item in self._outputs(handoff.request_id, self.llm.import_request(handoff)):
            yield item

    async def _outputs(self, request_id: str, stream: AsyncIterator[RequestOutput]
                       ) -> AsyncIterator[RequestOutput | ReplicaError | Handover]:
        try:
            async for out in stream:
                yield out
        except RequestMoved as exc:
            yield await asyncio.to_thread(send_handoff, exc.handoff, self.transports.get(request_id, "ray"))
        except ValueError as exc:
            yield ReplicaError("invalid", str(exc))
        except EngineDeadError as exc:
            yield ReplicaError("dead", str(exc))
        except EngineStepError as exc:
            yield ReplicaError("failed", str(exc))
        finally:
            self.transports.pop(request_id, None)

    # ---- live migration, called by the front end -------------------------------------
    async def read_kv(self, request_id: str, first_block: int,
                      max_blocks: int) -> tuple[list[KVPayload] | None, int]:
        """Called with num_returns=2: the payloads stay in the object store for `stage_kv`
        on the target while the front end reads only the count."""
        return await self.llm.read_kv(request_id, first_block, max_blocks)

    async def stage_kv(self, request_id: str, first_block: int, payloads: list[KVPayload]) -> int:
        return await self.llm.stage_kv(request_id, first_block, payloads)

    async def drop_staged(self, request_id: str) -> None:
        await self.llm.drop_staged(request_id)

    async def export(self, request_id: str, first_block: int, transport: str) -> dict[str, Any]:
        """Stop the request and end its stream with a Handover carrying the blocks from
        `first_block` on. Raises ValueError when it is not here or not between two steps."""
        self.transports[request_id] = transport
        h = await self.llm.export_request(request_id, first_block)
        sent = h.kv is not None and transport != "none"
        return {"blocks": h.kv[0].num_blocks if sent else 0, "tokens": h.num_computed_tokens + 1,
                "bytes": sum(p.nbytes for p in h.kv) if sent else 0}

    def shutdown(self) -> None:
        self.llm.shutdown()
