"""The event loop: requests arrive at their trace times, the real router picks a replica
(servelm/cluster/router.py, fed the same outstanding counts the serving front end keeps),
and each replica runs steps back to back while it has work, each as long as the step-time
model says. Time is virtual: a run of hours takes as long as its scheduling decisions.

What comes out is what `bench serve` measures, per request: arrival, first token, each
token's time, end; so the result has the same keys (servelm/bench/serve_metrics.py).
"""

from __future__ import annotations

import heapq
import time
from typing import Any

from servelm.bench.serve_metrics import RequestRecord, compute_metrics
from servelm.cluster.router import Router
from servelm.engine.request import Request
from servelm.simulate.replica import SimEngineConfig, SimReplica
from servelm.simulate.step_model import StepModel
from servelm.simulate.workload import TraceRequest


class Simulation:
    def __init__(self, config: SimEngineConfig, model: StepModel, replicas: int = 1,
                 router: str = "round-robin", keep_itl: bool = True) -> None:
        if replicas < 1:
            raise ValueError(f"--replicas must be >= 1, got {replicas}")
        self.now = 0.0
        self.router = Router(router)
        self.replicas = {f"sim-{i}": SimReplica(f"sim-{i}", config, model, self.clock)
                         for i in range(replicas)}
        for name in self.replicas:
            self.router.add_replica(name)
        self.keep_itl = keep_itl
        self.events = 0

    def clock(self) -> float:
        return self.now

    def run(self, trace: list[TraceRequest]) -> tuple[list[RequestRecord], dict[str, Any]]:
        """Replay `trace` to the end; the per-request records and the run's own figures."""
        started = time.perf_counter()
        token_times: dict[str, list[float]] = {}  # per request, with keep_itl
        records: list[RequestRecord] = []
        heap: list[tuple[float, int, str]] = []  # (time a replica's step ends, seq, replica)
        seq = 0
        order = sorted(range(len(trace)), key=lambda i: trace[i].arrival_s)
        nxt = 0
        while nxt < len(order) or heap:
            arrival = trace[order[nxt]].arrival_s if nxt < len(order) else float("inf")
            if heap and heap[0][0] <= arrival:
                self.now, _, name = heapq.heappop(heap)
                for req in self.replicas[name].finish_step():
                    if self.keep_itl:
                        token_times[req.request_id].append(self.now)
                    if req.status.finished:
                        records.append(self._record(req, token_times.pop(req.request_id, None),
                                                    len(records)))
                        self.router.finished(name)
            else:
                i = order[nxt]
                nxt += 1
                self.now = arrival
                req = trace[i]
                prompt = req.prompt_ids
                name = self.router.route(prompt)
                rid = f"r{i}"
                if self.keep_itl:
                    token_times[rid] = []
                self.replicas[name].add(rid, prompt, req.output_len, arrival)
            self.events += 1
            r = self.replicas[name]  # the only replica this event may have given work
            if r.step is None:
                seconds = r.start_step()
                if seconds is not None:
                    seq += 1
                    heapq.heappush(heap, (self.now + seconds, seq, name))
        wall = time.perf_counter() - started
        stats = {"simulated_s": self.now, "wall_s": wall, "events": self.events,
                 "events_per_s": self.events / wall if wall else None,
                 "num_preemptions": sum(r.scheduler.num_preemptions for r in self.replicas.values()),
                 "steps": sum(r.num_steps for r in self.replicas.values()),
                 "replica_busy_share": sum(r.busy_s for r in self.replicas.values())
                 / (len(self.replicas) * self.now) if self.now else None,
                 "prefix_cache_hit_rate": self._hit_rate()}
        return records, stats

    @staticmethod
    def _record(req: Request, times: list[float] | None, index: int) -> RequestRecord:
        """What bench serve records of a request, from the scheduler's own timestamps."""
        itl = [b - a for a, b in zip(times, times[1:])] if times else []
        return RequestRecord(True, req.num_prompt_tokens, req.num_output_tokens,
                             req.first_token_time - req.arrival_time, itl,
                             req.finished_time - req.arrival_time, req.arrival_time, session=index)

    def _hit_rate(self) -> float | None:
        q = sum(r.scheduler.prefix_cache_query_tokens for r in self.replicas.values())
        h = sum(r.scheduler.prefix_cache_hit_tokens for r in self.replicas.values())
        return h / q if q else None


def simulate(trace: list[TraceRequest], config: SimEngineConfig, model: StepModel,
             replicas: int = 1, router: str = "round-robin", keep_itl: bool = True,
             percentiles: list[float] | None = None, slos: dict[str, float] | None = None,
             fluidity: tuple[float, float] | None = None) -> dict[str, Any]:
    """One simulated run: bench serve's result keys plus the simulator's own figures."""
    records, stats = Simulation(config, model, replicas, router, keep_itl).run(trace)
    first = min(r.arrival_s for r in trace)
    duration = max(r.start + r.latency for r in records) - first
    metrics = compute_metrics(records, max(duration, 1e-9), percentiles, None if keep_itl else
                              ["ttft", "tpot", "e2el"], slos, fluidity)
    return {**metrics, **stats}
