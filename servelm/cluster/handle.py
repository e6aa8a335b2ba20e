"""The front end's view of one replica: its Ray actor and placement group, its state, and
a request stream from it that turns a lost actor into `ReplicaLost`."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import RayActorError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from servelm.cluster.kv_transport import Handover
from servelm.cluster.replica import ReplicaError, ReplicaServer
from servelm.engine.async_engine import EngineStepError
from servelm.outputs import RequestOutput

logger = logging.getLogger("servelm.cluster")

# A replica's states: starting -> ready <-> down (died or hung; Ray restarts it), and
# ready -> draining -> stopped when scaled down.


class ReplicaLost(RuntimeError):
    """The replica died, hung, or its engine can no longer run requests."""


@dataclass
class ReplicaHandle:
    name: str
    actor: Any
    group: Any  # the placement group holding the replica's ranks
    state: str = "starting"
    created: float = field(default_factory=time.monotonic)
    ready_s: float | None = None  # from creation to its first answer (a cold start's cost)
    pid: int | None = None
    node: str | None = None
    restarts: int = 0
    failed_checks: int = 0
    down_since: float = 0.0
    killed_pid: int | None = None  # the process last killed for a dead engine
    in_flight: int = 0
    routed: int = 0
    stats: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def create(cls, name: str, config: dict[str, Any], ranks: int, cpus_per_rank: float,
               log_level: str) -> ReplicaHandle:
        """A placement group of one bundle per rank, packed on one node, and the replica's
        actor in its first bundle (the actor spawns the other ranks' processes itself).
        Ray restarts the actor whenever its process dies."""
        group = placement_group([{"CPU": cpus_per_rank}] * ranks, strategy="STRICT_PACK",
                                name=f"{name}-group")
        threads = config.get("num_threads") or max(1, int(cpus_per_rank))
        actor = ray.remote(ReplicaServer).options(
            name=name, num_cpus=cpus_per_rank, max_restarts=-1, max_task_retries=0,
            max_concurrency=10_000,
            scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=0),
        ).remote({**config, "num_threads": threads}, log_level)
        return cls(name, actor, group)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "state": self.state, "pid": self.pid, "node": self.node,
                "restarts": self.restarts, "in_flight": self.in_flight,
                "worker_pids": self.info.get("worker_pids", []),
                "kv_cache_usage": self.stats.get("metrics", {}).get("kv_cache_usage"),
                "ready_s": self.ready_s}

    def kill(self, restart: bool) -> None:
        try:
            ray.kill(self.actor, no_restart=not restart)
        except Exception as exc:  # already gone
            logger.debug("killing %s: %s", self.name, exc)

    def stop(self) -> None:
        self.state = "stopped"
        self.kill(restart=False)
        try:
            remove_placement_group(self.group)
        except Exception as exc:
            logger.debug("removing %s's placement group: %s", self.name, exc)

    def stream(self, request_id: str, prompt: dict, params, priority: int, transport: str
               ) -> AsyncIterator[RequestOutput | Handover]:
        """The request's outputs from this replica, ending in a Handover if it leaves (a
        prefill replica's, or a migration's). A ValueError from the engine is raised as
        itself (a bad request), a failed step as EngineStepError, anything that says the
        replica is gone as ReplicaLost. Leaving early cancels the request on the replica."""
        gen = self.actor.generate.remote(request_id, prompt, params, priority, transport)
        return self._items(request_id, gen)

    def resume(self, handover: Handover) -> AsyncIterator[RequestOutput | Handover]:
        """The outputs of a request handed over from another replica, going on here."""
        return self._items(handover.handoff.request_id, self.actor.resume.remote(handover))

    async def _items(self, request_id: str, gen) -> AsyncIterator[RequestOutput | Handover]:
        finished = False
        try:
            async for ref in gen:
                item = await ref
                if isinstance(item, ReplicaError):
                    finished = True
                    if item.kind == "invalid":
                        raise ValueError(item.message)
                    if item.kind == "dead":
                        raise ReplicaLost(item.message)
                    raise EngineStepError(item.message)
                finished = isinstance(item, Handover) or item.finished
                yield item
            if not finished:
                raise ReplicaLost(f"replica {self.name} ended the stream early")
        except RayActorError as exc:
            raise ReplicaLost(f"replica {self.name} is gone: {type(exc).__name__}") from exc
        finally:
            if not finished:
                try:
                    ray.cancel(gen)
                except Exception as exc:  # the actor is gone already
                    logger.debug("cancelling %s on %s: %s", request_id, self.name, exc)
