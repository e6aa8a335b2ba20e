"""One simulated engine replica: the real Scheduler and KV cache manager, on the
simulator's clock, with each step's duration from the step-time model and its "output" a
token for every request whose scheduled chunk reached the end of its tokens.

A request that moves between replicas (a prefill replica's handover, a live migration, a
replay after a replica is lost) leaves and joins through the calls engine/handoff.py makes
on the real engine, so the scheduler and KV state are what the real engine's would be."""

from __future__ import annotations

import functools
import math
import random
from collections.abc import Callable
from dataclasses import dataclass

from servelm.cluster.router import Router
from servelm.engine.policies import Policy
from servelm.engine.request import Request, RequestStatus
from servelm.engine.scheduler import Scheduler
from servelm.kv.manager import KVCacheManager
from servelm.sampling_params import SamplingParams
from servelm.simulate.step_model import StepModel
from servelm.speculative.config import SpecConfig
from servelm.step_io import ModelRunnerOutput, ScheduledRequest, SchedulerOutput

ROLES = ("both", "prefill", "decode")
SIM_TOKEN = 0  # what every simulated step samples (EOS is ignored: lengths come from the trace)
_SAMPLED, _NOTHING = [SIM_TOKEN], []  # read only, so shared by every request


@dataclass
class SimEngineConfig:
    """The engine options that shape scheduling (as EngineConfig names them)."""

    num_kv_blocks: int = 4096
    block_size: int = 16
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 256
    max_model_len: int = 4096
    enable_prefix_caching: bool = True
    preemption_mode: str = "recompute"
    num_swap_blocks: int = 0
    scheduling_policy: str = "fcfs"
    # Speculative decoding: drafts per decode (a chain), each accepted with this probability
    # (until the first rejected), as the drafter would on the workload.
    num_speculative_tokens: int = 0
    spec_acceptance_rate: float = 0.0

    def __post_init__(self) -> None:
        if self.num_speculative_tokens < 0 or not 0.0 <= self.spec_acceptance_rate <= 1.0:
            raise ValueError("--num-speculative-tokens must be >= 0 and --spec-acceptance-rate in "
                             f"[0, 1], got {self.num_speculative_tokens}, {self.spec_acceptance_rate}")

    @property
    def spec(self) -> SpecConfig | None:
        if not self.num_speculative_tokens:
            return None
        return SpecConfig("ngram", self.num_speculative_tokens)  # the method is the drafter's


@dataclass
class ReplicaSpec:
    """One kind of replica in a simulated cluster (several kinds: mixed GPU generations, edge
    devices): its step-time model, its engine options and how many there are."""

    model: StepModel
    config: SimEngineConfig
    count: int = 1
    name: str = "sim"
    role: str = "both"  # or "prefill" / "decode": disaggregated serving
    spot: int = 0  # how many of the `count` are preemptible (the first ones)

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"--roles: {self.role!r} is not one of {', '.join(ROLES)}")
        if not 0 <= self.spot <= self.count:
            raise ValueError(f"--spot-replicas: {self.spot} for {self.name!r}, which has "
                             f"{self.count} replicas (allowed: 0 to {self.count})")

    @property
    def decode_rate(self) -> float:
        """Tokens per second decoding 16 requests at 512 tokens of context: the replica's speed
        as a speed-aware router weighs it."""
        step = SchedulerOutput([ScheduledRequest("", 1, 512) for _ in range(16)])
        return 16 / self.model.seconds(step)


def sim_request(request_id: str, prompt_ids: list[int], output_len: int, now: float,
                max_model_len: int) -> Request:
    """A trace request as the engine holds it: exactly `output_len` tokens (EOS ignored)."""
    return Request(request_id, prompt_ids, _params(output_len), (), max_model_len, arrival_time=now)


@functools.lru_cache(maxsize=4096)
def _params(output_len: int) -> SamplingParams:
    """One (read-only) SamplingParams per output length: validating one per request would
    cost more than the rest of its admission."""
    return SamplingParams(max_tokens=output_len, ignore_eos=True, temperature=0.0)


class SimReplica:
    def __init__(self, name: str, config: SimEngineConfig, model: StepModel,
                 clock: Callable[[], float], role: str = "both", born: float = 0.0) -> None:
        self.name, self.config, self.model, self.role = name, config, model, role
        kv = KVCacheManager(config.num_kv_blocks, config.block_size, config.enable_prefix_caching,
                            config.num_swap_blocks)
        self.scheduler = Scheduler(kv, config.max_num_batched_tokens, config.max_num_seqs,
                                   config.preemption_mode, Policy(config.scheduling_policy),
                                   spec=config.spec, max_model_len=config.max_model_len, clock=clock)
        self.rng = random.Random(name)  # draws which drafts are accepted
        self.step: SchedulerOutput | None = None  # the step in progress
        self.step_end = 0.0  # when it ends
        self.num_steps = 0
        self.busy_s = 0.0
        self.idle = True  # nothing ran since the last step (or ever): the next wakes it
        self.born, self.died = born, None  # died: when a spot replica vanished
        self.router: Router | None = None  # its group's (set by the simulation)
        self.spot = False
        self.draining = False  # a spot replica after its notice: its requests move away
        self.vanish_at = math.inf  # a spot replica's end, once it has its notice
        self.last_step_s = 0.0  # how long its latest step took
        self.link_free_at = 0.0  # its outbound K/V link is busy until then
        self.kv_bytes_per_token = 0.0
        self.moves: list[tuple[str, str]] = []  # (request, target) the balancer picked here
        # the simulation looks at it after each step: prefill (hands requests over) or draining
        self.hooked = role == "prefill"

    def add(self, request_id: str, prompt_ids: list[int], output_len: int, now: float,
            priority: int = 0) -> Request:
        req = sim_request(request_id, prompt_ids, output_len, now, self.config.max_model_len)
        req.priority = priority
        self.scheduler.add(req)
        return req

    def start_step(self) -> float | None:
        """Schedule the next step; its duration, or None when there is nothing to run."""
        step = self.scheduler.schedule()
        if not step.scheduled:  # at most news for the worker (finished ids): no step to time
            self.idle = True
            return None
        self.step = step
        self.last_step_s = seconds = self.model.seconds(step, self.idle)
        self.idle = False
        self.num_steps += 1
        self.busy_s += seconds
        return seconds

    def finish_step(self) -> list[Request]:
        """Apply the step in progress; the requests that got a token. (No request leaves a
        replica during a step: exports and migrations happen between steps.)"""
        step, self.step = self.step, None
        scheduled, reqs = step.scheduled, self.scheduler.requests
        ids = [s.req_id for s in scheduled]
        sampled = [_SAMPLED if s.num_computed_tokens + s.num_new_tokens >= len(reqs[s.req_id].all_token_ids)
                   else _NOTHING for s in scheduled]
        n = len(ids)
        nones, zeros = [None] * n, [0] * n  # no logprobs, drafts or K/V compression
        if self.config.num_speculative_tokens:
            drafted, accepted = self._verify(step, sampled)
        else:
            drafted = accepted = zeros
        result = ModelRunnerOutput(ids, sampled, nones, nones, drafted, accepted, [], zeros)
        return self.scheduler.update_from_output(step, result)

    def _verify(self, step: SchedulerOutput, sampled: list[list[int]]) -> tuple[list[int], list[int]]:
        """Each decode's drafts: accepted one after another with the configured rate until
        the first is rejected, then the target's own token (sampled grows to 1 + accepted)."""
        rate, draw = self.config.spec_acceptance_rate, self.rng.random
        drafted, accepted = [], []
        for i, s in enumerate(step.scheduled):
            d = s.num_draft_tokens if sampled[i] else 0
            a = 0
            while a < d and draw() < rate:
                a += 1
            drafted.append(d)
            accepted.append(a)
            if a:
                sampled[i] = [SIM_TOKEN] * (1 + a)
        return drafted, accepted

    def export(self, req: Request) -> Request:
        """Take a request out, as handoff.export_request does: finished here (its blocks
        freed, the full ones still findable by the prefix cache); `req` keeps its tokens,
        params and times for the replica that goes on with it."""
        self.scheduler.finish(req, RequestStatus.FINISHED_ABORTED)
        return req

    def take(self, old: Request, with_kv: bool) -> bool:
        """Go on with a request another replica gave up, as handoff.import_request does:
        its K/V written into freshly allocated blocks and adopted by the scheduler, or, when
        there is no K/V (a lost replica) or no room for it, recomputed from its tokens.
        Returns whether the K/V was taken. Its arrival and first token stay those of its
        stream (TTFT is where the first token came from)."""
        req = Request(old.request_id, old.prompt_token_ids, old.params, (),
                      self.config.max_model_len, arrival_time=old.arrival_time)
        req.priority = old.priority
        for token in old.output_token_ids:
            req.append_token(token)
        req.first_token_time = old.first_token_time
        kv, n = self.scheduler.kv, req.num_tokens - 1
        if with_kv and req.output_token_ids and kv.can_allocate(req.request_id, n):
            kv.allocate(req.request_id, n)
            req.num_computed_tokens = n
            self.scheduler.adopt(req)
            return True
        self.scheduler.add(req)
        return False

    def requests(self) -> list[Request]:
        """Every unfinished request here: running, waiting or swapped out."""
        return list(self.scheduler.requests.values())
