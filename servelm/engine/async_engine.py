"""AsyncLLM: one background thread drives `LLMEngine.step()`; callers get async streams.

The engine is single-threaded by design: only the worker thread touches it. The event loop
puts adds and aborts in an inbox that the worker drains between steps, so the loop never
waits for a step to finish (holding a lock across steps starved it: an unfair lock let the
worker re-take it step after step while every stream stalled). A prompt the engine rejects
comes back as the stream's first item and is raised to the caller. Outputs are handed back
to each request's asyncio queue with `call_soon_threadsafe`. A step that raises fails the
requests in flight (with the error) and the loop keeps serving new ones.

Roles (disaggregated prefill/decode): an engine of role "prefill" hands every request over
after its first token (its stream raises RequestMoved with the handoff); one of role
"decode" refuses prompts and continues requests handed over (`import_request`).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from servelm.config import EngineConfig
from servelm.engine import handoff as moves
from servelm.engine.engine import LLMEngine, PromptInput
from servelm.engine.handoff import RequestHandoff
from servelm.engine.step_trace import StepTrace
from servelm.outputs import RequestOutput
from servelm.sampling_params import SamplingParams
from servelm.worker.kv_payload import KVPayload

logger = logging.getLogger("servelm")


class EngineStepError(RuntimeError):
    """The engine failed while this request was in flight."""


class EngineDeadError(EngineStepError):
    """The engine's workers are gone (a process died or hung): no request can run."""


class RequestMoved(Exception):
    """Raised by a request's stream once `export_request` took it out of this engine: its
    outputs until then came first, and `handoff` goes on elsewhere."""

    def __init__(self, handoff: RequestHandoff) -> None:
        super().__init__(f"request {handoff.request_id!r} moved to another engine")
        self.handoff = handoff


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue


class AsyncLLM:
    def __init__(self, config: EngineConfig) -> None:
        self._lock = threading.Lock()  # guards _streams and _inbox; never held during a step
        # (kind, request id, prompt / handoff / future, params, priority)
        self._inbox: deque[tuple[str, str, Any, SamplingParams | None, int]] = deque()
        self._wakeup = threading.Event()
        self._streams: dict[str, _Stream] = {}
        self._ids = itertools.count()
        self._hand_over: set[str] = set()  # role prefill: requests to export after a token
        self.role = config.role
        self._trace: StepTrace | None = None  # config.step_trace's file, opened with the engine
        self._stopped = False
        self.fatal_error: Exception | None = None  # set once the executor reports it cannot run
        self.engine: LLMEngine
        built = threading.Event()
        failed: list[BaseException] = []
        self._thread = threading.Thread(target=self._run, args=(config, built, failed),
                                        name="servelm-engine", daemon=True)
        self._thread.start()
        built.wait()
        if failed:
            raise failed[0]

    def _run(self, config: EngineConfig, built: threading.Event, failed: list[BaseException]) -> None:
        """Build the engine on this thread, then serve. Its OpenMP thread team then belongs to
        the one thread that runs every step: a team made on another thread (the loader's)
        stays alive, and with more OpenMP threads than cores libgomp stops spinning between
        parallel regions, which made each token through the server 4x slower than offline."""
        try:
            self.engine = LLMEngine(config)
            self._trace = None if config.step_trace is None else StepTrace(config.step_trace, self.engine)
        except BaseException as exc:  # raised to the constructor's caller
            failed.append(exc)
            return
        finally:
            built.set()
        self._loop()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def new_request_id(self, prefix: str = "req") -> str:
        return f"{prefix}-{next(self._ids)}"

    def generate(self, request_id: str, prompt: PromptInput, params: SamplingParams,
                 priority: int = 0) -> AsyncIterator[RequestOutput]:
        """Yields a RequestOutput whenever the request makes progress; the last is finished.
        Leaving the iteration early (client gone, task cancelled) aborts the request."""
        if self.role == "decode":
            raise ValueError("this engine's role is decode: it only continues requests a prefill "
                             "engine hands over (import_request)")
        return self._stream(("add", request_id, prompt, params, priority))

    def import_request(self, handoff: RequestHandoff) -> AsyncIterator[RequestOutput]:
        """Go on with a request exported by another engine; its outputs from here on, as
        `generate` yields them."""
        return self._stream(("import", handoff.request_id, handoff, None, 0))

    async def export_request(self, request_id: str, first_block: int = 0) -> RequestHandoff:
        """Take a decoding request out between two steps (see engine/handoff.py), with its
        K/V from `first_block` on; its stream then raises RequestMoved."""
        return await self._on_engine_thread(lambda: self._export(request_id, first_block))

    async def read_kv(self, request_id: str, first_block: int,
                      max_blocks: int | None = None) -> tuple[list[KVPayload] | None, int]:
        """A running request's full blocks from `first_block` on, copied between steps."""
        return await self._on_engine_thread(
            lambda: moves.read_kv(self.engine, request_id, first_block, max_blocks))

    async def stage_kv(self, request_id: str, first_block: int, payloads: list[KVPayload]) -> int:
        """Hold copied blocks for a request migrating here; returns the number staged."""
        return await self._on_engine_thread(
            lambda: moves.stage_kv(self.engine, request_id, first_block, payloads))

    async def drop_staged(self, request_id: str) -> None:
        await self._on_engine_thread(lambda: moves.drop_staged(self.engine, request_id))

    async def _on_engine_thread(self, fn):
        """fn() run by the engine thread between two steps; its result or its exception."""
        future = asyncio.get_running_loop().create_future()
        with self._lock:
            self._inbox.append(("call", "", (fn, future), None, 0))
        self._wakeup.set()
        return await future

    async def _stream(self, item: tuple) -> AsyncIterator[RequestOutput]:
        if self.fatal_error is not None:
            raise EngineDeadError(f"the engine cannot run requests: {self.fatal_error}")
        kind, request_id, _, params, _ = item
        if (kind == "add" and params is not None and params.structured_outputs is not None
                and self.engine.tokenizer is not None):
            # Compile here, off the engine's loop: a first use (seconds) or a large schema
            # would stall every running stream; the engine's compile is then a cache hit.
            await asyncio.to_thread(self.engine.structured.compile, params.structured_outputs)
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        with self._lock:
            self._streams[request_id] = stream
            self._inbox.append(item)
        self._wakeup.set()
        finished = False
        try:
            while not finished:
                item = await stream.queue.get()
                if isinstance(item, Exception):
                    raise item
                finished = item.finished
                if item.error is not None:
                    raise EngineStepError(f"request failed: {item.error}")
                yield item
        finally:
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._streams.pop(request_id, None)
            self._inbox.append(("abort", request_id, None, None, 0))
        self._wakeup.set()

    @property
    def num_waiting(self) -> int:
        """Requests not yet running: queued in the scheduler or still in the inbox."""
        return len(self.engine.scheduler.waiting) + len(self._inbox)

    def shutdown(self) -> None:
        self._stopped = True
        self._wakeup.set()
        self._thread.join(timeout=10)
        if self._trace is not None:
            self._trace.close()
        self.engine.shutdown()

    def _deliver(self, request_id: str, item: RequestOutput | Exception,
                 last: bool = False) -> asyncio.AbstractEventLoop | None:
        """Hand `item` to the request's stream; returns the stream's loop (None: gone)."""
        with self._lock:
            stream = self._streams.pop(request_id, None) if last else self._streams.get(request_id)
        if stream is None:
            return None
        try:
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, item)
        except RuntimeError:  # its loop closed: nobody is listening
            return None
        return stream.loop

    def _drain_inbox(self) -> None:
        """Apply queued adds and aborts, in the order they were made (worker thread only)."""
        with self._lock:
            items = list(self._inbox)
            self._inbox.clear()
        for kind, request_id, prompt, params, priority in items:
            if kind == "abort":
                self._hand_over.discard(request_id)
                self.engine.abort_request(request_id)
                continue
            if kind == "call":
                self._call(*prompt)
                continue
            if self.fatal_error is not None:
                dead = EngineDeadError(f"the engine cannot run requests: {self.fatal_error}")
                self._deliver(request_id, dead, last=True)
                continue
            try:
                if kind == "import":
                    self.engine.import_request(prompt, stream=True)
                else:
                    self.engine.add_request(request_id, prompt, params, stream=True, priority=priority)
                    if self.role == "prefill":
                        self._hand_over.add(request_id)
            except Exception as exc:  # a rejected prompt: the caller raises it (400 in the server)
                self._deliver(request_id, exc, last=True)

    def _export(self, request_id: str, first_block: int = 0) -> RequestHandoff:
        """Export a request and end its stream with RequestMoved (engine thread)."""
        handoff = self.engine.export_request(request_id, first_block)
        self._hand_over.discard(request_id)
        self._deliver(request_id, RequestMoved(handoff), last=True)
        return handoff

    @staticmethod
    def _call(fn, future: asyncio.Future) -> None:
        """Run fn for `_on_engine_thread`'s caller and settle its future (engine thread)."""
        try:
            result, failed = fn(), None
        except Exception as exc:  # the caller raises it
            result, failed = None, exc

        def settle() -> None:
            if future.done():  # the caller gave up waiting
                return
            if failed is None:
                future.set_result(result)
            else:
                future.set_exception(failed)

        try:
            future.get_loop().call_soon_threadsafe(settle)
        except RuntimeError:  # its loop closed
            pass

    def _hand_over_prefilled(self, outputs: list[RequestOutput]) -> None:
        """Role prefill: export each request that has its first token, once no pipeline step
        holds it (else after a later step); finished ones need no handing over."""
        for out in outputs:
            if out.request_id not in self._hand_over:
                continue
            if out.finished:
                self._hand_over.discard(out.request_id)
                continue
            try:
                self._export(out.request_id)
            except ValueError as exc:
                if not self.engine.num_steps_in_flight:  # n > 1: it cannot move, it runs here
                    self._hand_over.discard(out.request_id)
                logger.debug("not handing %s over now: %s", out.request_id, exc)

    def _loop(self) -> None:
        while not self._stopped:
            self._drain_inbox()
            if not self.engine.has_unfinished_requests():
                self._check_executor()  # a worker that dies while idle shows within a second
                self._wakeup.wait(timeout=1.0)
                self._wakeup.clear()  # an add after wait() returned is drained just below
                continue
            try:
                started = time.perf_counter()
                outputs = self.engine.step()
                if self._trace is not None:
                    self._trace.record(started, self.engine)
            except Exception as exc:  # fail what was in flight, keep the loop alive
                logger.exception("engine step failed")
                self._check_executor()
                self._fail_all(exc)
                continue
            loops = {loop for out in outputs
                     if (loop := self._deliver(out.request_id, out, last=out.finished)) is not None}
            if self._hand_over:
                self._hand_over_prefilled(outputs)
            for loop in loops:
                self._wait_for(loop)

    def _check_executor(self) -> None:
        """Ask the executor whether its workers can still run steps (engine thread only);
        once they cannot, every request is refused with the reason."""
        if self.fatal_error is not None:
            return
        try:
            self.engine.executor.check_health()
        except Exception as exc:
            logger.error("the engine's workers cannot run steps: %s", exc)
            self.fatal_error = exc

    @staticmethod
    def _wait_for(loop: asyncio.AbstractEventLoop) -> None:
        """Let `loop` handle a step's outputs before the next step starts. The kernels use
        every core; a stream's work (detokenizing, SSE writes) running beside a step stalls
        each of its parallel regions behind a preempted thread, which made a token through
        the server 3-4x slower than offline on 2 cores. A callback queued behind the
        deliveries, re-queued once so the woken streams run first, releases the engine; the
        timeout bounds the wait when the loop is busy elsewhere."""
        done = threading.Event()
        try:
            loop.call_soon_threadsafe(loop.call_soon, done.set)
        except RuntimeError:  # the loop closed
            return
        done.wait(timeout=0.05)

    def _fail_all(self, exc: Exception) -> None:
        with self._lock:
            in_flight = list(self._streams)
        for request_id in in_flight:
            self.engine.abort_request(request_id)
            self._deliver(request_id, EngineStepError(f"engine step failed: {exc}"), last=True)
