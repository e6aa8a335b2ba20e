"""The worker's copy of each request: what it needs to run the model for it.

The scheduler owns request state; this copy is created from `NewRequestData`, brought up to
date by every `ScheduledRequest` (tokens appended, block table, computed count) and dropped
when the request's id comes back as finished. Only the worker's own state lives nowhere
else: the request's random generator, and how many prompt logprobs it has sent.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from servelm.sampling_params import SamplingParams
from servelm.step_io import ScheduledRequest, SchedulerOutput


@dataclass(slots=True)
class CachedRequestState:
    req_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    generator: torch.Generator | None
    token_ids: list[int]  # prompt, then output
    stop_token_ids: list[int]
    output_token_ids: list[int] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_evicted_tokens: int = 0
    num_prompt_logprobs: int = 0  # prompt positions whose logprobs were sent (position 0 has none)
    draft_seed: int = 0
    device: torch.device = torch.device("cpu")  # where its generators draw
    _draft_generator: torch.Generator | None = None
    # Structured outputs with drafts: an xgrammar matcher, and the output tokens fed to it
    # (worker/draft_grammar.py).
    grammar: Any = None
    grammar_fed: int = 0

    def draft_generator(self) -> torch.Generator:
        """What a proposer draws sampled drafts from (made on first use)."""
        if self._draft_generator is None:
            self._draft_generator = torch.Generator(self.device).manual_seed(self.draft_seed)
        return self._draft_generator

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_kv_tokens(self) -> int:
        """Computed tokens whose K/V the cache holds: the cache index of the next one."""
        return self.num_computed_tokens - self.num_evicted_tokens


class RequestStates(dict[str, CachedRequestState]):
    """req_id -> its state, kept in step with the scheduler by `update`. Seeded requests'
    generators live on `device`, with the logits they sample from."""

    def __init__(self, device: torch.device = torch.device("cpu")) -> None:
        super().__init__()
        self.device = device

    def update(self, step: SchedulerOutput) -> list[str]:
        """Apply one step's changes. Returns the ids of requests that finished or whose
        block table starts over (first step, or back from preemption): whatever was kept
        for them elsewhere under the old table (a draft model's K/V) is gone."""
        for req_id in step.finished_req_ids:
            self.pop(req_id, None)
        for new in step.new_requests:
            gen = None if new.seed is None else torch.Generator(self.device).manual_seed(new.seed)
            if gen is not None and new.generator_state is not None:  # moved from another engine
                gen.set_state(torch.frombuffer(bytearray(new.generator_state), dtype=torch.uint8))
            self[new.req_id] = CachedRequestState(new.req_id, list(new.prompt_token_ids), new.params,
                                                  gen, list(new.prompt_token_ids), new.stop_token_ids,
                                                  draft_seed=new.draft_seed, device=self.device)
        for sched in step.scheduled:
            self._apply(sched)
        return [*step.finished_req_ids, *(s.req_id for s in step.scheduled if s.block_table_start == 0)]

    def _apply(self, sched: ScheduledRequest) -> None:
        state = self[sched.req_id]
        state.token_ids.extend(sched.new_token_ids)
        state.output_token_ids.extend(sched.new_token_ids)  # the prompt came with NewRequestData
        del state.block_table[sched.block_table_start:]
        state.block_table.extend(sched.new_block_ids)
        state.num_computed_tokens = sched.num_computed_tokens
        state.num_evicted_tokens = sched.num_evicted_tokens
