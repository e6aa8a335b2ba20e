"""Live migration of running requests between replicas (Llumnix), driven by the front end.

A move copies in stages while the request keeps decoding at its source: each stage reads
up to `stage_blocks` full blocks not yet copied (`read_kv`, returned into Ray's object
store; a bounded stage holds up the source's steps only briefly) and the target writes
them into blocks it holds for the request (`stage_kv`; the bytes go actor to actor, never
through the front end). Once a stage finds at most `stop_blocks` new blocks, the source
stops the request and hands it over with only those (`export`); the
front end's stream of the request then continues from the target, so the client sees
neither a gap nor a repeat. Its downtime is from the export to the target's first token.

Moves are made for three reasons: an operator asks (the admin endpoint), the replicas of a
group are out of balance (the busiest gives a request to the idlest), or a replica is
drained before it is scaled in.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from ray.exceptions import RayActorError

from servelm.cluster.handle import ReplicaHandle

logger = logging.getLogger("servelm.cluster")


@dataclass
class Flight:
    """A request the pool is serving, and where it runs now."""

    request_id: str
    movable: bool  # one sample (n=1): it can move
    replica: ReplicaHandle | None = None
    group: Any = None  # the ReplicaGroup of `replica`
    tokens: int = 0  # generated so far
    target: ReplicaHandle | None = None  # where a migration in progress is taking it
    arrived: asyncio.Future | None = None  # the move's downtime, once it goes on at the target

    def describe(self) -> dict[str, Any]:
        return {"request_id": self.request_id, "replica": self.replica and self.replica.name,
                "tokens": self.tokens, "movable": self.movable,
                "migrating_to": self.target and self.target.name}


@dataclass
class Migrations:
    """What the pool's /metrics reports of moves."""

    done: dict[str, int] = field(default_factory=dict)  # reason -> moves completed
    failed: int = 0
    downtime_s: list[float] = field(default_factory=list)  # the latest moves'


async def migrate(flight: Flight, target: ReplicaHandle, transport: str, *, stop_blocks: int = 2,
                  stage_blocks: int = 16, max_stages: int = 64, timeout_s: float = 30.0
                  ) -> dict[str, Any]:
    """Move `flight` to `target`; returns what was copied and the downtime. Raises ValueError
    when it cannot move now (not decoding yet, finished meanwhile, already moving)."""
    source, rid = flight.replica, flight.request_id
    if not flight.movable or flight.tokens == 0:
        raise ValueError(f"request {rid!r} cannot move: it has n > 1 samples or no token yet")
    if flight.target is not None or source is None:
        raise ValueError(f"request {rid!r} is already moving")
    if source is target:
        raise ValueError(f"request {rid!r} runs on {target.name} already")
    flight.target = target  # claimed: no second move of it starts meanwhile
    staged, stages, started = 0, 0, time.monotonic()
    try:
        for _ in range(max_stages):
            payloads, count = source.actor.read_kv.options(num_returns=2).remote(rid, staged, stage_blocks)
            n = await count
            if n == 0:
                break
            staged = await target.actor.stage_kv.remote(rid, staged, payloads)
            stages += 1
            if n <= stop_blocks:
                break
        arrived = flight.arrived = asyncio.get_running_loop().create_future()
        final = await source.actor.export.remote(rid, staged, transport)
    except (ValueError, RayActorError) as exc:
        flight.target = flight.arrived = None
        with contextlib.suppress(Exception):
            await target.actor.drop_staged.remote(rid)
        raise ValueError(f"request {rid!r} did not move: {exc}") from exc
    downtime = await asyncio.wait_for(arrived, timeout_s)  # set by the pool's stream
    return {"request_id": rid, "from": source.name, "to": target.name, "stages": stages,
            "blocks_staged": staged, "blocks_at_stop": final["blocks"], "bytes_at_stop": final["bytes"],
            "tokens": final["tokens"], "copy_s": time.monotonic() - started, "downtime_s": downtime}


def pick_to_balance(loads: dict[str, int], flights: list[Flight], imbalance: int
                    ) -> tuple[Flight, str] | None:
    """A request to move from the busiest replica to the idlest, when their counts of
    requests differ by `imbalance` or more (and by half the busiest's): of those decoding
    there, the one with the least K/V (the cheapest move, likely the longest left)."""
    if imbalance <= 0 or len(loads) < 2:
        return None
    busiest = max(loads, key=loads.get)
    idlest = min(loads, key=loads.get)
    if loads[busiest] - loads[idlest] < max(imbalance, loads[busiest] / 2):
        return None
    movable = [f for f in flights if f.replica is not None and f.replica.name == busiest
               and f.movable and f.tokens and f.target is None]
    if not movable:
        return None
    return min(movable, key=lambda f: f.tokens), idlest
