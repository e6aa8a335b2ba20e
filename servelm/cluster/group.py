"""The replicas of one served model in one role (both, prefill or decode): launching them,
health checks, autoscaling, draining, and the router that picks one for a request.

A health check every `health_interval_s` takes out a replica that does not answer within
`health_timeout_s` twice, asks Ray to restart it (Ray restarts a dead one by itself), and
puts it back once it answers again. A replica lost while serving leaves rotation at once
(`take_out`). Scaling in drains a replica: the pool's `on_drain` moves its running requests
elsewhere (live migration), and it stops once nothing is left on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from ray.exceptions import ActorDiedError, RayActorError

from servelm.cluster.autoscale import AutoscaleOptions, Autoscaler
from servelm.cluster.handle import ReplicaHandle
from servelm.cluster.options import ClusterOptions, ModelSpec
from servelm.cluster.router import Router
from servelm.engine.async_engine import EngineDeadError

logger = logging.getLogger("servelm.cluster")


class ReplicaGroup:
    def __init__(self, spec: ModelSpec, options: ClusterOptions, role: str, router: str,
                 scale: AutoscaleOptions) -> None:
        self.name, self.spec, self.options, self.role = spec.name, spec, options, role
        self.router = Router(router)
        self.autoscaler = Autoscaler(scale)
        self.replicas: dict[str, ReplicaHandle] = {}
        self.info: dict[str, Any] = {}  # the model's facts, from the first replica ready
        self.on_drain: Callable[[ReplicaHandle], Awaitable[None]] | None = None
        self._serial = itertools.count()
        self.pending = 0  # requests waiting for any replica to be ready
        self._changed = asyncio.Event()  # replaced each time the ready set changes
        self._tasks: set[asyncio.Task] = set()
        self._monitor: asyncio.Task | None = None

    async def start(self, count: int) -> None:
        """Launch `count` replicas and wait until every one is ready."""
        launched = [self._launch() for _ in range(count)]
        await asyncio.gather(*(self._wait_ready(r, raise_errors=True) for r in launched))
        self._monitor = asyncio.create_task(self._watch())

    async def stop(self) -> None:
        for task in [self._monitor, *self._tasks]:
            if task is not None:
                task.cancel()
        for r in self.replicas.values():
            r.stop()
        self.replicas.clear()

    def ready(self) -> list[ReplicaHandle]:
        return [r for r in self.replicas.values() if r.state == "ready"]

    async def acquire(self, prompt_ids: list[int], session: str | None) -> tuple[ReplicaHandle, bool]:
        """A ready replica for the request, waiting (bounded) while there is none: scaled to
        zero, still starting, or every one down. Returns whether it had to wait."""
        waited = False
        if not self.router.replicas:
            waited = True
            self.pending += 1
            if self._monitor is not None:
                self._autoscale()  # from zero: start a replica now, not at the next tick
            deadline = time.monotonic() + self.options.acquire_timeout_s
            try:
                while not self.router.replicas:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise EngineDeadError(f"no {self._what} of model {self.name!r} became "
                                              f"ready within {self.options.acquire_timeout_s:g}s")
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(self._changed.wait(), left)
            finally:
                self.pending -= 1
        return self.replicas[self.router.route(prompt_ids, session)], waited

    @property
    def _what(self) -> str:
        return "replica" if self.role == "both" else f"{self.role} replica"

    def take_out(self, r: ReplicaHandle, why: str) -> None:
        if r.state == "ready":
            logger.warning("%s %s of %s out of rotation: %s", self._what, r.name, self.name, why)
            r.state, r.down_since = "down", time.monotonic()
            self.router.remove_replica(r.name)

    def _put_in(self, r: ReplicaHandle) -> None:
        r.state, r.failed_checks = "ready", 0
        self.router.add_replica(r.name)
        self._changed.set()
        self._changed = asyncio.Event()

    # ---- replicas' lives ------------------------------------------------------------
    def _launch(self) -> ReplicaHandle:
        slug = self.name.rsplit("/", 1)[-1] + ("" if self.role == "both" else f"-{self.role}")
        r = ReplicaHandle.create(f"{slug}-{next(self._serial)}", {**self.spec.engine, "role": self.role},
                                 self.spec.ranks, self.options.cpus_per_rank,
                                 self.options.replica_log_level)
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
                raise RuntimeError(f"{self._what} {r.name} of {self.name!r} {why}") from None
            logger.error("%s %s of %s %s", self._what, r.name, self.name, why)
            return
        r.info, r.pid, r.node = info, info["pid"], info["node"]
        r.ready_s = time.monotonic() - r.created
        self.info = {k: info[k] for k in ("max_model_len", "vocab_size")}
        logger.info("%s %s of %s ready in %.1fs (pid %d)", self._what, r.name, self.name, r.ready_s, r.pid)
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
                self.take_out(r, "stopped answering health checks")
                r.down_since = time.monotonic()
                r.kill(restart=True)
            return
        except ActorDiedError as exc:  # beyond restarting (it failed to start again)
            self.take_out(r, str(exc))
            r.stop()
            self.replicas.pop(r.name, None)
            return
        except RayActorError as exc:  # died; Ray is restarting it
            self.take_out(r, f"died ({type(exc).__name__})")
            return
        if stats["fatal_error"] is not None:
            if r.state == "ready" or stats["pid"] != r.killed_pid:
                self.take_out(r, stats["fatal_error"])
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
            logger.warning("%s %s of %s back in rotation", self._what, r.name, self.name)
            self._put_in(r)

    async def refresh_stats(self) -> None:
        """Each ready replica's figures as of now, not as of the last health check."""
        async def fetch(r: ReplicaHandle) -> None:
            try:
                r.stats = await asyncio.wait_for(r.actor.stats.remote(), self.options.health_timeout_s)
            except (asyncio.TimeoutError, RayActorError):
                pass  # the health check deals with it; its last figures stand

        await asyncio.gather(*(fetch(r) for r in self.ready()))

    def _autoscale(self) -> None:
        live = [r for r in self.replicas.values() if r.state in ("starting", "ready", "down")]
        demand = self.pending + sum(r.in_flight for r in live)
        ready = self.ready()
        kv = sum(r.stats.get("metrics", {}).get("kv_cache_usage", 0.0) for r in ready) / max(1, len(ready))
        target = self.autoscaler.decide(time.monotonic(), demand, kv, len(live))
        for _ in range(target - len(live)):
            self._background(self._wait_ready(self._launch()))
        # scale down the idlest: those down first, then those serving least
        for r in sorted(live, key=lambda r: (r.state != "down", r.in_flight))[:max(0, len(live) - target)]:
            self.take_out(r, "scaling down")
            r.state = "draining"
            self._background(self._drain(r))

    async def _drain(self, r: ReplicaHandle) -> None:
        """Move what runs on a replica elsewhere, then stop it once nothing is left."""
        if self.on_drain is not None and r.in_flight:
            try:
                await self.on_drain(r)
            except Exception as exc:  # what did not move finishes where it is
                logger.warning("draining %s: %r", r.name, exc)
        deadline = time.monotonic() + self.options.drain_timeout_s
        while r.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        r.stop()
        self.replicas.pop(r.name, None)
        logger.info("%s %s of %s stopped (scaled down)", self._what, r.name, self.name)
