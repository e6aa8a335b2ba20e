"""All replicas of one served model: routing, retries when a replica is lost, health checks,
and autoscaling. It is what the HTTP API serves (a `ServedModel`), so the API, streaming and
errors are those of a single engine.

Each request is routed by the model's Router to a ready replica and streamed back. If the
replica dies, hangs or reports its engine dead, the replica leaves rotation at once; the
request is retried on another replica if nothing of it has reached the client (any
non-streamed request, a streamed one before its first token), and otherwise fails with an
error saying the output is incomplete. A health check every `health_interval_s` takes out a
replica that does not answer within `health_timeout_s` twice, asks Ray to restart it (Ray
restarts a dead one by itself), and puts it back once it answers again.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from ray.exceptions import ActorDiedError, RayActorError

from servelm.cluster.autoscale import Autoscaler
from servelm.cluster.handle import ReplicaHandle, ReplicaLost
from servelm.cluster.options import ClusterOptions, ModelSpec
from servelm.cluster.router import Router
from servelm.engine.async_engine import EngineDeadError, EngineStepError
from servelm.engine.engine import PromptInput
from servelm.model.loader import load_tokenizer
from servelm.outputs import RequestOutput
from servelm.sampling_params import SamplingParams

logger = logging.getLogger("servelm.cluster")


class ReplicaPool:
    def __init__(self, spec: ModelSpec, options: ClusterOptions) -> None:
        self.name, self.spec, self.options = spec.name, spec, options
        self.tokenizer = load_tokenizer(spec.engine.get("model"))
        self.router = Router(spec.router or options.router)
        self.autoscaler = Autoscaler(spec.autoscale(options))
        self.replicas: dict[str, ReplicaHandle] = {}
        self.num_retried = self.num_failed = self.num_cold_starts = 0
        self.last_cold_start_s: float | None = None
        self._info: dict[str, Any] = {}
        self._ids, self._serial = itertools.count(), itertools.count()
        self._pending = 0  # requests waiting for any replica to be ready
        self._changed = asyncio.Event()  # replaced each time the ready set changes
        self._tasks: set[asyncio.Task] = set()
        self._monitor: asyncio.Task | None = None

    # ---- ServedModel ----------------------------------------------------------------
    @property
    def max_model_len(self) -> int | None:
        return self._info.get("max_model_len")  # known once a replica has started

    @property
    def vocab_size(self) -> int:
        return self._info.get("vocab_size", len(self.tokenizer))

    @property
    def num_waiting(self) -> int:
        return self._pending + sum(r.stats.get("num_waiting", 0) for r in self._ready())

    def new_request_id(self, prefix: str) -> str:
        return f"{prefix}-{next(self._ids)}"

    async def start(self) -> None:
        """Launch the initial replicas and wait until every one is ready."""
        launched = [self._launch() for _ in range(self.spec.initial_replicas)]
        await asyncio.gather(*(self._wait_ready(r, raise_errors=True) for r in launched))
        self._monitor = asyncio.create_task(self._watch())

    async def stop(self) -> None:
        for task in [self._monitor, *self._tasks]:
            if task is not None:
                task.cancel()
        for r in self.replicas.values():
            r.stop()
        self.replicas.clear()

    async def generate(self, request_id: str, prompt: PromptInput, params: SamplingParams,
                       priority: int = 0, stream: bool = False,
                       session: str | None = None) -> AsyncIterator[RequestOutput]:
        payload = self._prompt(prompt)
        arrived = time.monotonic()
        for attempt in range(1, self.options.max_attempts + 1):
            replica, waited = await self._acquire(payload["prompt_token_ids"], session)
            cold = waited and attempt == 1
            replica.in_flight += 1
            replica.routed += 1
            sent = False
            try:
                async with contextlib.aclosing(replica.stream(request_id, payload, params, priority)) as outs:
                    async for out in outs:
                        if cold and not sent:
                            self.num_cold_starts += 1
                            self.last_cold_start_s = time.monotonic() - arrived
                        sent = True
                        yield out
                return
            except ReplicaLost as exc:
                self._take_out(replica, str(exc))
                if (stream and sent) or attempt == self.options.max_attempts:
                    self.num_failed += 1
                    why = ("after part of the output was streamed; the output is incomplete"
                           if stream and sent else f"and on every one of {attempt} attempts")
                    raise EngineStepError(f"replica {replica.name} was lost {why}: {exc}") from exc
                self.num_retried += 1
                logger.warning("retrying %s after losing replica %s: %s", request_id, replica.name, exc)
            finally:
                replica.in_flight -= 1
                self.router.finished(replica.name)

    def health(self) -> tuple[bool, dict[str, Any]]:
        ready = self._ready()
        down = [r for r in self.replicas.values() if r.state == "down"]
        ok = bool(ready) or (self.autoscaler.options.min_replicas == 0 and not down)
        return ok, {"status": "ok" if ok else "unhealthy", "router": self.router.policy,
                    "min_replicas": self.autoscaler.options.min_replicas,
                    "max_replicas": self.autoscaler.options.max_replicas,
                    "replicas": [r.describe() for r in self.replicas.values()]}

    async def refresh_metrics(self) -> None:
        """Each ready replica's figures as of now, not as of the last health check."""
        async def fetch(r: ReplicaHandle) -> None:
            try:
                r.stats = await asyncio.wait_for(r.actor.stats.remote(), self.options.health_timeout_s)
            except (asyncio.TimeoutError, RayActorError):
                pass  # the health check deals with it; its last figures stand

        await asyncio.gather(*(fetch(r) for r in self._ready()))

    def metric_snapshots(self) -> list[tuple[dict[str, str], dict[str, float]]]:
        return [({"model": self.name, "replica": r.name}, r.stats["metrics"])
                for r in self.replicas.values() if r.stats]

    def extra_metrics(self) -> list[tuple[str, str, str, dict[str, str], float]]:
        model = {"model": self.name}
        rows = [
            ("counter", "servelm:router_requests_retried", "Requests retried on another replica "
             "after theirs was lost.", model, self.num_retried),
            ("counter", "servelm:router_requests_failed", "Requests failed because their replica "
             "was lost (streams cut, or every attempt lost).", model, self.num_failed),
            ("counter", "servelm:cold_starts", "Requests that waited for a replica to start.",
             model, self.num_cold_starts),
            ("gauge", "servelm:last_cold_start_seconds", "Arrival to first output of the latest "
             "request that found no replica ready.", model, self.last_cold_start_s or 0.0),
        ]
        for state in ("starting", "ready", "down", "draining"):
            rows.append(("gauge", "servelm:replicas", "Replicas by state.", {**model, "state": state},
                         sum(r.state == state for r in self.replicas.values())))
        for r in self.replicas.values():
            labels = {**model, "replica": r.name}
            rows += [("counter", "servelm:router_requests_routed", "Requests routed to each replica.",
                      labels, r.routed),
                     ("counter", "servelm:replica_restarts", "Times each replica was restarted.",
                      labels, r.restarts),
                     ("gauge", "servelm:replica_in_flight", "Requests each replica is serving.",
                      labels, r.in_flight)]
        return rows

    # ---- routing --------------------------------------------------------------------
    def _ready(self) -> list[ReplicaHandle]:
        return [r for r in self.replicas.values() if r.state == "ready"]

    def _prompt(self, prompt: PromptInput) -> dict[str, Any]:
        """Token ids to route on; the text too when there is one (for echo)."""
        if isinstance(prompt, str):
            return {"prompt": prompt, "prompt_token_ids": self.tokenizer.encode(prompt)}
        if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            return {"prompt": prompt.get("prompt"), "prompt_token_ids": list(prompt["prompt_token_ids"])}
        if isinstance(prompt, dict) and "prompt" in prompt:
            return self._prompt(prompt["prompt"])
        if isinstance(prompt, (list, tuple)):
            return {"prompt": None, "prompt_token_ids": list(prompt)}
        raise ValueError(f"prompt must be a string, a list of token ids or a dict, got {type(prompt).__name__}")

    async def _acquire(self, prompt_ids: list[int], session: str | None) -> tuple[ReplicaHandle, bool]:
        """A ready replica for the request, waiting (bounded) while there is none: scaled to
        zero, still starting, or every one down. Returns whether it had to wait."""
        waited = False
        if not self.router.replicas:
            waited = True
            self._pending += 1
            if self._monitor is not None:
                self._autoscale()  # from zero: start a replica now, not at the next tick
            deadline = time.monotonic() + self.options.acquire_timeout_s
            try:
                while not self.router.replicas:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise EngineDeadError(f"no replica of model {self.name!r} became ready "
                                              f"within {self.options.acquire_timeout_s:g}s")
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(self._changed.wait(), left)
            finally:
                self._pending -= 1
        return self.replicas[self.router.route(prompt_ids, session)], waited

    def _set_changed(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _put_in(self, r: ReplicaHandle) -> None:
        r.state, r.failed_checks = "ready", 0
        self.router.add_replica(r.name)
        self._set_changed()

    def _take_out(self, r: ReplicaHandle, why: str) -> None:
        if r.state == "ready":
            logger.warning("replica %s of %s out of rotation: %s", r.name, self.name, why)
            r.state, r.down_since = "down", time.monotonic()
            self.router.remove_replica(r.name)

    # ---- replicas' lives ------------------------------------------------------------
    def _launch(self) -> ReplicaHandle:
        slug = self.name.rsplit("/", 1)[-1]
        r = ReplicaHandle.create(f"{slug}-{next(self._serial)}", self.spec.engine, self.spec.ranks,
                                 self.options.cpus_per_rank, self.options.replica_log_level)
        self.replicas[r.name] = r
        return r

    def _background(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _wait_ready(self, r: ReplicaHandle, raise_errors: bool = False) -> None:
        timeout = self.options.start_timeout_s
        try:
            info = await asyncio.wait_for(r.actor.info.remote(), timeout)
        except (asyncio.TimeoutError, RayActorError) as exc:
            if r.state == "stopped":  # scaled down before it was ready
                return
            why = (f"did not start within {timeout:g}s: its placement group needs {self.spec.ranks} "
                   f"x {self.options.cpus_per_rank:g} CPU on one node"
                   if isinstance(exc, asyncio.TimeoutError) else f"failed to start: {exc}")
            r.stop()
            self.replicas.pop(r.name, None)
            if raise_errors:
                raise RuntimeError(f"replica {r.name} of {self.name!r} {why}") from None
            logger.error("replica %s of %s %s", r.name, self.name, why)
            return
        r.info, r.pid, r.node = info, info["pid"], info["node"]
        r.ready_s = time.monotonic() - r.created
        self._info = {k: info[k] for k in ("max_model_len", "vocab_size")}
        logger.info("replica %s of %s ready in %.1fs (pid %d)", r.name, self.name, r.ready_s, r.pid)
        if r.state == "starting":
            self._put_in(r)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.options.health_interval_s)
            checked = [r for r in self.replicas.values() if r.state in ("ready", "down")]
            for failed in await asyncio.gather(*(self._check(r) for r in checked), return_exceptions=True):
                if isinstance(failed, Exception):  # the watch itself must outlive any check
                    logger.error("health check failed: %r", failed)
            self._autoscale()

    async def _check(self, r: ReplicaHandle) -> None:
        """One health check: out of rotation when dead, hung or its engine is dead (with a
        restart asked of Ray for the last two), back in once it answers healthy."""
        try:
            stats = await asyncio.wait_for(r.actor.stats.remote(), self.options.health_timeout_s)
        except asyncio.TimeoutError:
            r.failed_checks += 1
            hung = r.state == "ready" and r.failed_checks >= 2
            stuck = r.state == "down" and time.monotonic() - r.down_since > self.options.start_timeout_s
            if hung or stuck:
                self._take_out(r, "stopped answering health checks")
                r.down_since = time.monotonic()
                r.kill(restart=True)
            return
        except ActorDiedError as exc:  # beyond restarting (it failed to start again)
            self._take_out(r, str(exc))
            r.stop()
            self.replicas.pop(r.name, None)
            return
        except RayActorError as exc:  # died; Ray is restarting it
            self._take_out(r, f"died ({type(exc).__name__})")
            return
        if stats["fatal_error"] is not None:
            if r.state == "ready" or stats["pid"] != r.killed_pid:
                self._take_out(r, stats["fatal_error"])
                r.killed_pid, r.down_since = stats["pid"], time.monotonic()
                r.kill(restart=True)
            return
        r.failed_checks, r.stats = 0, stats
        self.router.report(r.name, kv_usage=stats["metrics"]["kv_cache_usage"])
        if r.state == "down":
            if stats["pid"] != r.pid:  # a new process: Ray restarted it
                try:
                    r.info = await asyncio.wait_for(r.actor.info.remote(), self.options.health_timeout_s)
                except (asyncio.TimeoutError, RayActorError):
                    return  # the next check tries again
                r.restarts += 1
                r.pid = stats["pid"]
            logger.warning("replica %s of %s back in rotation", r.name, self.name)
            self._put_in(r)

    def _autoscale(self) -> None:
        live = [r for r in self.replicas.values() if r.state in ("starting", "ready", "down")]
        demand = self._pending + sum(r.in_flight for r in live)
        ready = self._ready()
        kv = sum(r.stats.get("metrics", {}).get("kv_cache_usage", 0.0) for r in ready) / max(1, len(ready))
        target = self.autoscaler.decide(time.monotonic(), demand, kv, len(live))
        for _ in range(target - len(live)):
            self._background(self._wait_ready(self._launch()))
        # scale down the idlest: those down first, then those serving least
        for r in sorted(live, key=lambda r: (r.state != "down", r.in_flight))[:max(0, len(live) - target)]:
            self._take_out(r, "scaling down")
            r.state = "draining"
            self._background(self._drain(r))

    async def _drain(self, r: ReplicaHandle) -> None:
        """Stop a replica once the requests it is serving have finished."""
        deadline = time.monotonic() + self.options.drain_timeout_s
        while r.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        r.stop()
        self.replicas.pop(r.name, None)
        logger.info("replica %s of %s stopped (scaled down)", r.name, self.name)
