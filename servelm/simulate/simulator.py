"""The event loop: requests arrive at their trace times, the real router picks a replica
(servelm/cluster/router.py, fed the same outstanding counts the serving front end keeps),
and each replica runs steps back to back while it has work, each as long as the step-time
model says. Time is virtual: a run of hours takes as long as its scheduling decisions.

Besides arrivals and step ends, the heap holds the cluster's own events as callables: a
K/V transfer's end (disagg.py: prefill-to-decode handovers, migrations) and spot notices,
vanishings and replacements (spot.py). A run without them pays one type check per step.

What comes out is what `bench serve` measures, per request: arrival, first token, each
token's time, end; so the result has the same keys (servelm/bench/serve_metrics.py).
"""

from __future__ import annotations

import dataclasses
import gc
import heapq
import itertools
import time
from collections.abc import Callable
from functools import partial
from typing import Any

from servelm.bench.serve_metrics import RequestRecord, compute_metrics
from servelm.cluster.router import Router
from servelm.engine.request import Request
from servelm.simulate.balance import Balancer
from servelm.simulate.disagg import KVLink, check_roles
from servelm.simulate.replica import ReplicaSpec, SimReplica, sim_request
from servelm.simulate.spot import SpotMarket, SpotOptions
from servelm.simulate.workload import TraceRequest

COUNTS = ("num_handovers", "num_migrations", "num_kv_not_taken", "num_restarted_requests",
          "num_rerouted_requests", "recomputed_tokens", "replicas_lost", "replicas_joined")


class Simulation:
    def __init__(self, specs: list[ReplicaSpec], router: str = "round-robin",
                 keep_itl: bool = True, link: KVLink | None = None,
                 spot: SpotOptions | None = None, migrate_imbalance: int = 0) -> None:
        if not specs or any(spec.count < 1 for spec in specs):
            raise ValueError(f"--replicas must be >= 1 for each profile, got "
                             f"{[spec.count for spec in specs]}")
        if spot is not None and not any(spec.spot for spec in specs):
            raise ValueError("--spot-replicas: spot options were given but no replica is spot")
        self.now = 0.0
        self.keep_itl = keep_itl
        self.link = link or KVLink()
        self._bps, self._latency = self.link.gbs * 1e9, self.link.latency_ms / 1e3
        # Arrivals go to `router` (the prefill group when disaggregated); requests that have
        # tokens go on in the last group, least-loaded when it is the decode group (pool.py).
        self.router = Router(router)
        self.decode_router = Router("least-loaded") if check_roles(specs) else self.router
        self.replicas: dict[str, SimReplica] = {}
        self.gone: dict[str, SimReplica] = {}  # spot replicas that vanished
        self.kind: dict[str, str] = {}  # replica -> its spec's name
        self.spec_of: dict[str, ReplicaSpec] = {}
        self._serial: dict[str, itertools.count] = {}
        self._speed: dict[str, float] = {}
        self.heap: list[tuple[float, int, str | Callable[[], None]]] = []
        self._seq = itertools.count()
        self.events = 0
        self.counts = dict.fromkeys(COUNTS, 0)
        self.num_transfers, self.transfer_s_total = 0, 0.0
        self.pending: list[Request] = []  # with no replica to go to until one joins
        self.joins_pending = 0
        self.records: list[RequestRecord] = []
        self.token_times: dict[str, list[float]] = {}  # per request, with keep_itl
        for spec in specs:
            for i in range(spec.count):
                self.add_replica(spec, spot=i < spec.spot)
        self.market = SpotMarket(self, spot) if spot is not None else None
        self.balancer = Balancer(self, migrate_imbalance) if migrate_imbalance else None
        self.total = 0  # requests in the trace being run

    def clock(self) -> float:
        return self.now

    def add_replica(self, spec: ReplicaSpec, spot: bool = False) -> SimReplica:
        serial = self._serial.setdefault(spec.name, itertools.count())
        name = f"{spec.name}-{next(serial)}"
        r = SimReplica(name, spec.config, spec.model, self.clock, spec.role, self.now)
        r.router = self.decode_router if spec.role == "decode" else self.router
        r.spot, r.kv_bytes_per_token = spot, self.link.bytes_per_token_of(spec.model)
        self.replicas[name], self.kind[name], self.spec_of[name] = r, spec.name, spec
        if spec.name not in self._speed:
            self._speed[spec.name] = spec.decode_rate
        r.router.add_replica(name, self._speed[spec.name])
        return r

    def run(self, trace: list[TraceRequest]) -> tuple[list[RequestRecord], dict[str, Any]]:
        """Replay `trace` to the end; the per-request records and the run's own figures."""
        # Without the cyclic garbage collector: a run makes no reference cycles (a test
        # checks), so reference counting frees all it drops, while the collector's passes
        # over a million records and requests cost a fifth or more of the run.
        enabled = gc.isenabled()
        gc.disable()
        try:
            return self._run(trace)
        finally:
            if enabled:
                gc.enable()

    def _run(self, trace: list[TraceRequest]) -> tuple[list[RequestRecord], dict[str, Any]]:
        started = time.perf_counter()
        keep_itl, token_times, records = self.keep_itl, self.token_times, self.records
        heap, replicas, seq, router = self.heap, self.replicas, self._seq, self.router
        requests_by_kind = dict.fromkeys(self.kind.values(), 0)
        total, events = len(trace), 0
        order = sorted(range(total), key=lambda i: trace[i].arrival_s)
        nxt = 0
        self.total = total
        if self.market is not None:
            self.market.start()
        if self.balancer is not None:
            self.balancer.start()
        while len(records) < total:
            arrival = trace[order[nxt]].arrival_s if nxt < total else float("inf")
            if heap and heap[0][0] <= arrival:
                events += 1
                self.now, _, name = heapq.heappop(heap)
                if name.__class__ is not str:  # a cluster event: it starts what it gave work
                    name()
                    continue
                r = replicas.get(name)
                if r is None:  # it vanished during the step
                    continue
                progressed = r.finish_step()
                for req in progressed:
                    if keep_itl:
                        token_times[req.request_id].append(self.now)
                    if req.status.finished:
                        records.append(self._record(req, token_times.pop(req.request_id, None),
                                                    len(records)))
                        r.router.finished(name)
                if r.hooked:
                    self._after_step(r, progressed)
            elif nxt < total:
                events += 1
                i = order[nxt]
                nxt += 1
                self.now = arrival
                req = trace[i]
                rid = f"r{i}"
                if keep_itl:
                    token_times[rid] = []
                if not router.replicas:  # every one lost: wait for a replacement
                    self.place(sim_request(rid, req.prompt_ids, req.output_len, arrival, 1 << 30))
                    continue
                prompt = req.prompt_ids
                name = router.route(prompt)
                requests_by_kind[self.kind[name]] += 1
                r = replicas[name]  # the only replica this event may have given work
                r.add(rid, prompt, req.output_len, arrival)
            else:
                break  # nothing left that could run
            if r.step is None:
                seconds = r.start_step()
                if seconds is not None:
                    r.step_end = end = self.now + seconds
                    heapq.heappush(heap, (end, next(seq), name))
        for old in self.pending:
            self._fail(old, "every replica of its group was lost and none replaced it")
        self.pending = []
        self.events += events
        wall = time.perf_counter() - started
        every = {**self.replicas, **self.gone}
        stats = {"simulated_s": self.now, "wall_s": wall, "events": self.events,
                 "events_per_s": self.events / wall if wall else None,
                 "num_preemptions": sum(r.scheduler.num_preemptions for r in every.values()),
                 "steps": sum(r.num_steps for r in every.values()),
                 "replica_busy_share": self._busy_share(every),
                 "busy_share_by_kind": {kind: self._busy_share(
                     {n: r for n, r in every.items() if self.kind[n] == kind})
                     for kind in dict.fromkeys(self.kind.values())},
                 "requests_by_kind": dict(requests_by_kind),
                 "prefix_cache_hit_rate": self._hit_rate(every),
                 **self.counts, "mean_kv_transfer_ms": 1e3 * self.transfer_s_total
                 / self.num_transfers if self.num_transfers else None}
        return records, stats

    # ---- the cluster's events ------------------------------------------------------
    def busy(self) -> bool:
        """Requests are left to serve (periodic events stop rescheduling once none are)."""
        return len(self.records) < self.total

    def at(self, t: float, event: Callable[[], None]) -> None:
        heapq.heappush(self.heap, (t, next(self._seq), event))

    def kick(self, r: SimReplica) -> None:
        """Start a step on `r` if it is idle and has work."""
        if r.died is None and r.step is None:
            seconds = r.start_step()
            if seconds is not None:
                r.step_end = self.now + seconds
                self.at(r.step_end, r.name)

    def _after_step(self, r: SimReplica, progressed: list[Request]) -> None:
        if r.role == "prefill":  # each request hands over at its first token
            for req in progressed:
                if not req.status.finished:
                    r.router.finished(r.name)
                    self.counts["num_handovers"] += 1
                    r.export(req)
                    if self.decode_router.replicas:
                        self.send(r, req, self.decode_router.route([]))
                    else:  # no decode replica left: it waits, and recomputes
                        self.lost(req, req.num_tokens - 1)
                        self.place(req)
        if r.moves:
            self.balancer.move(r)
        if r.draining and self.market is not None:
            self.market.drain(r)

    def transfer_s(self, src: SimReplica, req: Request) -> float:
        """The link time of a request's K/V (every token but the last), latency included."""
        return (req.num_tokens - 1) * src.kv_bytes_per_token / self._bps + self._latency

    def send(self, src: SimReplica, req: Request, target: str) -> None:
        """Send an exported request's K/V to `target` after the transfers queued before it
        on `src`'s link; it goes on there when the copy ends."""
        start = max(self.now, src.link_free_at)
        end = start + self.transfer_s(src, req)
        src.link_free_at = end - self._latency
        self.num_transfers += 1
        self.transfer_s_total += end - self.now
        self.at(end, partial(self._arrive, src, req, target))

    def _arrive(self, src: SimReplica, old: Request, target: str) -> None:
        t = self.replicas.get(target)
        if t is None:  # the target was lost meanwhile: go on from the handover, recomputing
            self.lost(old, old.num_tokens - 1)
            self.place(old)
            return
        if src.died is not None:  # the source vanished before its K/V was out
            self.lost(old, old.num_tokens - 1)
        if not t.take(old, with_kv=src.died is None) and src.died is None:
            self.counts["num_kv_not_taken"] += 1  # no room: recomputed, as the engine does
            self.counts["recomputed_tokens"] += old.num_tokens - 1
        self.kick(t)

    def lost(self, req: Request, tokens: int) -> None:
        """A request whose K/V of `tokens` tokens is gone with a replica."""
        self.counts["num_restarted_requests"] += 1
        self.counts["recomputed_tokens"] += tokens

    def place(self, old: Request) -> None:
        """A request taken out of a replica (or never placed) goes on elsewhere by recompute:
        one with tokens in the last group, one without as a new arrival (pool._place)."""
        decoding = bool(old.output_token_ids)
        router = self.decode_router if decoding else self.router
        if not router.replicas:
            if self.joins_pending:
                self.pending.append(old)
            else:
                self._fail(old, "every replica of its group was lost and none replaced it")
            return
        t = self.replicas[router.route([] if decoding else old.prompt_token_ids)]
        t.take(old, with_kv=False)
        self.kick(t)

    def flush_pending(self) -> None:
        pending, self.pending = self.pending, []
        for old in pending:
            self.place(old)

    def _fail(self, old: Request, why: str) -> None:
        self.token_times.pop(old.request_id, None)
        self.records.append(RequestRecord(False, old.num_prompt_tokens, old.num_output_tokens,
                                          start=old.arrival_time, error=why,
                                          session=len(self.records)))

    # ---- results -------------------------------------------------------------------
    @staticmethod
    def _record(req: Request, times: list[float] | None, index: int) -> RequestRecord:
        """What bench serve records of a request, from the scheduler's own timestamps."""
        itl = [b - a for a, b in zip(times, times[1:])] if times else []
        return RequestRecord(True, req.num_prompt_tokens, req.num_output_tokens,
                             req.first_token_time - req.arrival_time, itl,
                             req.finished_time - req.arrival_time, req.arrival_time, session=index)

    def _busy_share(self, replicas: dict[str, SimReplica]) -> float | None:
        alive = sum((self.now if r.died is None else r.died) - r.born for r in replicas.values())
        return sum(r.busy_s for r in replicas.values()) / alive if alive > 0 else None

    @staticmethod
    def _hit_rate(replicas: dict[str, SimReplica]) -> float | None:
        q = sum(r.scheduler.prefix_cache_query_tokens for r in replicas.values())
        h = sum(r.scheduler.prefix_cache_hit_tokens for r in replicas.values())
        return h / q if q else None


def simulate(trace: list[TraceRequest], specs: list[ReplicaSpec], router: str = "round-robin",
             keep_itl: bool = True,
             percentiles: list[float] | None = None, slos: dict[str, float] | None = None,
             fluidity: tuple[float, float] | None = None, link: KVLink | None = None,
             spot: SpotOptions | None = None, migrate_imbalance: int = 0) -> dict[str, Any]:
    """One simulated run: bench serve's result keys plus the simulator's own figures."""
    # The front end's own time (StepTimeModel.frontend_delay_s): each request reaches a
    # scheduler that much later, and is timed from when its client sent it. Negative: the
    # client sees each token that much before the step's period (which goes on with the
    # engine's work after delivering) ends.
    delay = max(getattr(spec.model, "frontend_delay_s", 0.0) for spec in specs)
    late = max(delay, 0.0)
    if late:
        trace = [dataclasses.replace(r, arrival_s=r.arrival_s + late) for r in trace]
    records, stats = Simulation(specs, router, keep_itl, link, spot, migrate_imbalance).run(trace)
    for r in records:
        r.start, r.ttft, r.latency = r.start - late, r.ttft + delay, r.latency + delay
    first = min(r.arrival_s for r in trace)
    duration = max(r.start + r.latency for r in records) - first
    metrics = compute_metrics(records, max(duration, 1e-9), percentiles, None if keep_itl else
                              ["ttft", "tpot", "e2el"], slos, fluidity)
    return {**metrics, **stats}
