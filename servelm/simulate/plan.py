"""`servelm simulate plan`: the cheapest deployment (GPU type, replicas x tensor x pipeline
parallel degrees) that serves a target request rate within latency SLOs, found by simulation.

The SLO: each `--slo NAME:MS` bounds the `--slo-percentile` (default 90) of that metric over
a run's requests, as `bench serve` reports it (p90_ttft_ms, ...). A percentile rather than a
goodput fraction, so the table's p90 columns are the very figures judged. A TTFT or E2EL
bound is required: a replica that falls behind fails it (its queue, so its TTFT, grows
without end), while TPOT alone would pass it, since max_num_seqs caps the running batch.

For each (gpu, tp, pp) whose weights leave room for a KV cache (roofline.py sizes it, as
`simulate profile --roofline` does; one that does not fit is reported, with the reason):
1. Capacity of one replica: the highest request rate at which `--num-prompts` requests meet
   the SLO, by bisection over (0, the throughput it reaches with every request at once]: no
   replica sustains more than that, however short a trace hides its growing queue. The
   same requests are replayed at each rate, their arrival gaps scaled, so a higher rate is
   the same load sooner and bisection's "monotone" assumption holds.
2. replicas = ceil(target / capacity).
3. Validation: the whole cluster at the target rate through the real router, on
   `--num-prompts` requests per replica (at most `--max-validate-prompts`); one more
   replica while it misses, at most `MAX_EXTRA_REPLICAS` more and within `--max-gpus`.
Cost = replicas x tp x pp x the GPU's $/hour (an assumption, see hardware.py). The plan is
the cheapest candidate that met the SLO in validation (ties: fewer GPUs, then lower TTFT).
A short trace judges capacity a little high (a small overload needs time to show); a longer
`--num-prompts` tightens it at the cost of run time.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from servelm.bench.serve_datasets import send_times
from servelm.bench.serve_metrics import percentile_key
from servelm.cluster.router import POLICIES as ROUTERS
from servelm.simulate.hardware import GPUSpec
from servelm.simulate.model_shape import ModelShape
from servelm.simulate.replica import ReplicaSpec, SimEngineConfig
from servelm.simulate.roofline import RooflineStepModel, replica_engine
from servelm.simulate.simulator import simulate
from servelm.simulate.workload import TraceRequest

MAX_EXTRA_REPLICAS = 2  # validation adds at most this many replicas to the estimate
SEARCH_STEPS = 6  # bisection halvings: capacity to within 1/64 of the saturated throughput


class Workload:
    """Requests to replay: lengths and prefixes drawn once per count (`draw(n)`), arrivals
    at the rate tried, from one seed, so a faster rate is the same requests sooner."""

    def __init__(self, draw: Callable[[int], list[TraceRequest]], longest: int,
                 burstiness: float = 1.0, seed: int = 0) -> None:
        if not burstiness > 0:
            raise ValueError(f"--burstiness must be > 0, got {burstiness}")
        self.draw, self.longest, self.burstiness, self.seed = draw, longest, burstiness, seed
        self._drawn: dict[int, list[TraceRequest]] = {}

    def at(self, rate: float, n: int) -> list[TraceRequest]:
        if n not in self._drawn:
            self._drawn[n] = self.draw(n)
        times = send_times(n, rate, self.burstiness, self.seed)
        return [dataclasses.replace(r, arrival_s=t) for r, t in zip(self._drawn[n], times)]

    @classmethod
    def cycled(cls, pool: list[TraceRequest], burstiness: float = 1.0, seed: int = 0) -> Workload:
        """A trace file's requests, repeated as needed (a repeat gets new prompt tokens, so
        it does not hit the prefix cache its first pass filled); recorded arrivals unused."""
        if not pool:
            raise ValueError("--trace: the file holds no requests")

        def draw(n: int) -> list[TraceRequest]:
            return [dataclasses.replace(pool[i % len(pool)], seed=pool[i % len(pool)].seed
                                        + i // len(pool)) for i in range(n)]

        return cls(draw, max(r.prompt_len + r.output_len for r in pool), burstiness, seed)


@dataclass
class PlanSpec:
    """What to plan for, and how hard to search; errors name the command's flags."""

    target_rate: float
    slos: dict[str, float]
    percentile: float = 90.0
    tp_options: tuple[int, ...] = (1, 2, 4, 8)
    pp_options: tuple[int, ...] = (1, 2)
    max_gpus: int = 64
    router: str = "prefix-aware"
    num_prompts: int = 300
    max_validate_prompts: int = 3000
    model_options: dict[str, Any] = field(default_factory=dict)  # RooflineStepModel's
    engine_options: dict[str, Any] = field(default_factory=dict)  # replica_engine's

    def __post_init__(self) -> None:
        if not (isinstance(self.target_rate, (int, float)) and 0 < self.target_rate < math.inf):
            raise ValueError(f"--target-rate must be a number of req/s > 0, got {self.target_rate!r}")
        if not ({"ttft", "e2el"} & set(self.slos)):
            raise ValueError(f"--slo needs a ttft or e2el bound (an overloaded replica passes "
                             f"tpot alone), got {self.slos or 'none'}")
        if not 0 < self.percentile <= 100:
            raise ValueError(f"--slo-percentile must be in (0, 100], got {self.percentile}")
        for flag, options in (("--tp-options", self.tp_options), ("--pp-options", self.pp_options)):
            if not options or not all(isinstance(v, int) and v >= 1 for v in options):
                raise ValueError(f"{flag} must be integers >= 1, got {list(options)}")
        for flag, value in (("--max-gpus", self.max_gpus), ("--num-prompts", self.num_prompts),
                            ("--max-validate-prompts", self.max_validate_prompts)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{flag} must be an integer >= 1, got {value!r}")
        if self.router not in ROUTERS:
            raise ValueError(f"--router must be one of {', '.join(ROUTERS)}, got {self.router!r}")

    @property
    def pkey(self) -> str:
        return percentile_key(self.percentile)


@dataclass
class Candidate:
    """One (gpu, tp, pp) and what the search found; `reason` says why it was left out."""

    gpu: str
    tp: int
    pp: int
    usd_per_gpu_hour: float
    reason: str | None = None
    max_rate: float | None = None  # req/s one replica sustains within the SLO
    saturated_rate: float | None = None  # req/s one replica completes with all at once
    replicas: int | None = None
    p_ttft_ms: float | None = None  # at the target rate, the whole cluster
    p_tpot_ms: float | None = None
    meets_slo: bool = False
    engine: dict[str, Any] = field(default_factory=dict)
    validation: list[dict[str, Any]] = field(default_factory=list)
    simulations: int = 0
    wall_s: float = 0.0

    @property
    def gpus(self) -> int | None:
        return None if self.replicas is None else self.replicas * self.tp * self.pp

    @property
    def usd_per_hour(self) -> float | None:
        return None if self.gpus is None else self.gpus * self.usd_per_gpu_hour

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "gpus": self.gpus, "usd_per_hour": self.usd_per_hour}


def plan(shape: ModelShape, gpus: list[GPUSpec], spec: PlanSpec, workload: Workload,
         say: Callable[..., None] = lambda *_: None) -> tuple[list[Candidate], Candidate | None]:
    """Every candidate, searched and validated, and the cheapest that met the SLO (or None)."""
    for gpu in gpus:
        if gpu.usd_per_gpu_hour is None:
            raise ValueError(f"--usd-per-gpu-hour: GPU {gpu.name!r} has no price to rank by")
    _check_options(gpus[0], shape, spec)
    pairs = [(Candidate(g.name, tp, pp, g.usd_per_gpu_hour), g) for g in gpus
             for tp in spec.tp_options for pp in spec.pp_options]
    candidates = [c for c, _ in pairs]
    replicas = [_sized(c, g, shape, spec, workload) for c, g in pairs]
    if all(c.reason for c in candidates):
        raise ValueError(f"--max-gpus {spec.max_gpus}: no candidate fits; "
                         + "; ".join(f"{c.gpu} tp={c.tp} pp={c.pp}: {c.reason}" for c in candidates))
    for c, replica in zip(candidates, replicas):
        if replica is not None:
            started = time.perf_counter()
            _search(c, replica, spec, workload, say)
            c.wall_s = time.perf_counter() - started
    met = [c for c in candidates if c.meets_slo]
    best = min(met, key=lambda c: (c.usd_per_hour, c.gpus, c.p_ttft_ms)) if met else None
    return candidates, best


def _sized(c: Candidate, gpu: GPUSpec, shape: ModelShape, spec: PlanSpec,
           workload: Workload) -> ReplicaSpec | None:
    """The candidate's replica, or None with `c.reason` set when it cannot serve at all."""
    if c.tp * c.pp > spec.max_gpus:
        c.reason = f"a replica needs {c.tp * c.pp} GPUs, more than --max-gpus {spec.max_gpus}"
        return None
    try:
        model = RooflineStepModel(gpu, shape, c.tp, c.pp, **spec.model_options)
        c.engine = replica_engine(model, **spec.engine_options)
    except ValueError as exc:
        c.reason = str(exc)
        return None
    if workload.longest > c.engine["max_model_len"]:
        c.reason = (f"the longest request ({workload.longest} tokens) is more than a replica holds "
                    f"({c.engine['max_model_len']})")
        return None
    return ReplicaSpec(model, SimEngineConfig(**c.engine), 1, f"{c.gpu}-tp{c.tp}-pp{c.pp}")


def _run(c: Candidate, replica: ReplicaSpec, spec: PlanSpec, trace: list[TraceRequest]
         ) -> tuple[bool, dict[str, Any]]:
    """One simulation: whether it met every SLO at the percentile, and its figures."""
    c.simulations += 1
    result = simulate(trace, [replica], spec.router, keep_itl=False,
                      percentiles=[spec.percentile], slos=spec.slos)
    ok = result["completed"] == len(trace) and all(
        result[f"{spec.pkey}_{name}_ms"] <= limit for name, limit in spec.slos.items())
    return ok, result


def _search(c: Candidate, replica: ReplicaSpec, spec: PlanSpec, workload: Workload,
            say: Callable[..., None]) -> None:
    label = f"{c.gpu} tp={c.tp} pp={c.pp}"
    n = spec.num_prompts
    _, result = _run(c, replica, spec, workload.at(math.inf, n))
    c.saturated_rate = result["request_throughput"]
    lo, hi = 0.0, c.saturated_rate
    if _run(c, replica, spec, workload.at(hi, n))[0]:
        lo = hi
    else:
        for _ in range(SEARCH_STEPS):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if _run(c, replica, spec, workload.at(mid, n))[0] else (lo, mid)
    if lo == 0:
        c.max_rate = 0.0
        c.reason = f"misses the SLO on one replica even at {hi:.3g} req/s"
        say(f"{label}: {c.reason}")
        return
    c.max_rate = lo
    estimate = math.ceil(spec.target_rate / lo)
    say(f"{label}: {lo:.3g} req/s per replica ({c.simulations} simulations) -> {estimate} replicas")
    per_replica = c.tp * c.pp
    for replicas in range(estimate, estimate + MAX_EXTRA_REPLICAS + 1):
        if replicas * per_replica > spec.max_gpus:
            if c.replicas is None:  # none validated: show what the target needs
                c.replicas = replicas
                c.reason = (f"needs {replicas} replicas = {replicas * per_replica} GPUs, more than "
                            f"--max-gpus {spec.max_gpus}")
            else:
                c.reason = (f"misses the SLO with {c.replicas} replicas; one more exceeds "
                            f"--max-gpus {spec.max_gpus}")
            return
        c.replicas = replicas
        count = min(n * replicas, spec.max_validate_prompts)
        ok, result = _run(c, dataclasses.replace(replica, count=replicas), spec,
                          workload.at(spec.target_rate, count))
        c.p_ttft_ms, c.p_tpot_ms = (result[f"{spec.pkey}_{m}_ms"] for m in ("ttft", "tpot"))
        c.validation.append({"replicas": replicas, "requests": count, "meets_slo": ok,
                             **{k: result.get(k) for k in (
                                 f"{spec.pkey}_ttft_ms", f"{spec.pkey}_tpot_ms",
                                 f"{spec.pkey}_e2el_ms", "goodput_fraction",
                                 "replica_busy_share", "num_preemptions", "wall_s")}})
        say(f"  {replicas} replicas at {spec.target_rate:g} req/s: {spec.pkey} TTFT "
            f"{c.p_ttft_ms:.0f} ms, TPOT {c.p_tpot_ms:.1f} ms: {'meets' if ok else 'misses'} the SLO")
        if ok:
            c.meets_slo = True
            return
    c.reason = f"misses the SLO at the target with {c.replicas} replicas"


def _check_options(gpu: GPUSpec, shape: ModelShape, spec: PlanSpec) -> None:
    """Bad dtype, efficiency or engine flags are the user's to fix, not a candidate that
    does not fit: raise them before the search (one KV block stands in for the sizing)."""
    model = RooflineStepModel(gpu, shape, 1, 1, **spec.model_options)
    replica_engine(model, **{**spec.engine_options, "num_kv_blocks": 1})

