"""The pool's balancer in the simulator (`--migrate-imbalance N`, as `servelm serve` has it).

Once a health interval, when the last group's replicas are out of balance, the busiest gives
one decoding request to the idlest: the same decision as cluster/pool.py's `_balance`, by the
same function (cluster/migration.py `pick_to_balance`). The move is made between two of the
busiest replica's steps, as the engine exports between steps, and its K/V crosses that
replica's link (a stop-and-copy: the real migration's staged copies, which keep the request
decoding meanwhile, are not modelled).
"""

from __future__ import annotations

from typing import Any

from servelm.cluster.migration import Flight, pick_to_balance

HEALTH_INTERVAL_S = 1.0  # cluster/options.py's default


class Balancer:
    def __init__(self, sim: Any, imbalance: int, interval_s: float = HEALTH_INTERVAL_S) -> None:
        if imbalance < 0:
            raise ValueError(f"--migrate-imbalance must be >= 0, got {imbalance}")
        self.sim, self.imbalance, self.interval_s = sim, imbalance, interval_s

    def start(self) -> None:
        self.sim.at(self.sim.now + self.interval_s, self.tick)

    def tick(self) -> None:
        sim = self.sim
        router = sim.decode_router  # the last group's
        loads = {name: r.outstanding for name, r in router.replicas.items()}
        flights = [Flight(q.request_id, True, sim.replicas[name], tokens=q.num_output_tokens)
                   for name in loads for q in sim.replicas[name].scheduler.running if q.is_decoding]
        pick = pick_to_balance(loads, flights, self.imbalance)
        if pick is not None:
            flight, target = pick
            source = flight.replica
            source.moves.append((flight.request_id, target))
            source.hooked = True  # moved after its step in progress
            if source.step is None:
                self.move(source)
        if sim.busy():
            sim.at(sim.now + self.interval_s, self.tick)

    def move(self, r: Any) -> None:
        """Between two of `r`'s steps: export each request picked there to its target."""
        sim = self.sim
        moves, r.moves = r.moves, []
        r.hooked = r.role == "prefill" or r.draining
        for request_id, target in moves:
            req = r.scheduler.requests.get(request_id)
            if req is None or not req.is_decoding or target not in r.router.replicas:
                continue  # finished, preempted or its target gone meanwhile
            r.router.finished(r.name)
            r.router.assign(target)
            sim.counts["num_migrations"] += 1
            sim.send(r, r.export(req), target)
