"""One simulated engine replica: the real Scheduler and KV cache manager, on the
simulator's clock, with each step's duration from the step-time model and its "output" a
token for every request whose scheduled chunk reached the end of its tokens."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from servelm.engine.policies import Policy
from servelm.engine.request import Request
from servelm.engine.scheduler import Scheduler
from servelm.kv.manager import KVCacheManager
from servelm.sampling_params import SamplingParams
from servelm.simulate.step_model import StepModel
from servelm.step_io import ModelRunnerOutput, SchedulerOutput

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


class SimReplica:
    def __init__(self, name: str, config: SimEngineConfig, model: StepModel,
                 clock: Callable[[], float]) -> None:
        self.name, self.config, self.model = name, config, model
        kv = KVCacheManager(config.num_kv_blocks, config.block_size, config.enable_prefix_caching,
                            config.num_swap_blocks)
        self.scheduler = Scheduler(kv, config.max_num_batched_tokens, config.max_num_seqs,
                                   config.preemption_mode, Policy(config.scheduling_policy),
                                   max_model_len=config.max_model_len, clock=clock)
        self.step: SchedulerOutput | None = None  # the step in progress
        self.num_steps = 0
        self.busy_s = 0.0

    def add(self, request_id: str, prompt_ids: list[int], output_len: int, now: float,
            priority: int = 0) -> Request:
        params = SamplingParams(max_tokens=output_len, ignore_eos=True, temperature=0.0)
        req = Request(request_id, prompt_ids, params, (), self.config.max_model_len, arrival_time=now)
        req.priority = priority
        self.scheduler.add(req)
        return req

    def start_step(self) -> float | None:
        """Schedule the next step; its duration, or None when there is nothing to run."""
        step = self.scheduler.schedule()
        if not step.scheduled:  # at most news for the worker (finished ids): no step to time
            return None
        self.step = step
        seconds = self.model.seconds(step)
        self.num_steps += 1
        self.busy_s += seconds
        return seconds

    def finish_step(self) -> list[Request]:
        """Apply the step in progress; the requests that got a token."""
        step, self.step = self.step, None
        reqs = self.scheduler.requests
        ids, sampled = [], []
        for s in step.scheduled:
            ids.append(s.req_id)
            req = reqs.get(s.req_id)
            done = req is not None and s.num_computed_tokens + s.num_new_tokens >= len(req.all_token_ids)
            sampled.append(_SAMPLED if done else _NOTHING)
        n = len(ids)
        nones, zeros = [None] * n, [0] * n  # no logprobs, drafts or K/V compression
        result = ModelRunnerOutput(ids, sampled, nones, nones, zeros, zeros, [], zeros)
        return self.scheduler.update_from_output(step, result)
