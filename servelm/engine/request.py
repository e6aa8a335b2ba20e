"""One sequence being generated: the unit the scheduler moves toward completion.

An `n > 1` request becomes n of these (one per sample), grouped again by the engine
when outputs are reported.
"""

from __future__ import annotations

import enum
import time
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from servelm.engine.detokenizer import IncrementalDetokenizer
    from servelm.outputs import PositionLogprobs
    from servelm.sampling_params import SamplingParams
    from servelm.speculative.tree import DraftTree


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    SWAPPED = "swapped"  # preempted with its KV kept in CPU swap space
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"
    FINISHED_ERROR = "error"

    @property
    def finished(self) -> bool:
        return self not in (RequestStatus.WAITING, RequestStatus.RUNNING, RequestStatus.SWAPPED)


class Request:
    """State of one sequence. `num_computed_tokens` advances toward `num_tokens`;
    everything else (prefill, decode, recompute after preemption) follows from that."""

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        eos_token_ids: tuple[int, ...],
        max_model_len: int,
        arrival_time: float | None = None,
        seed: int | None = None,
    ) -> None:
        self.request_id = request_id
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.output_token_ids: list[int] = []
        self.all_token_ids: list[int] = list(prompt_token_ids)
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0  # prompt tokens found in the prefix cache at admission
        self.num_evicted_tokens = 0  # computed tokens whose K/V KV compression dropped
        self.block_hashes: list[bytes] = []  # of full blocks, filled by the KV manager
        self.wait_for: Request | None = None  # n > 1: the sample whose prompt blocks we reuse
        self.priority = 0  # lower runs first under the priority policy
        self.arrival_step = 0  # scheduler step it arrived at: priority and sjf aging
        self.last_scheduled_step = 0  # scheduler step it last ran (or arrived): mlfq promotion
        self.mlfq_join_level = 0  # mlfq: queue it joined (or was promoted to)
        self.mlfq_base_tokens = 0  # mlfq: output tokens it had when it joined that queue
        self.predicted_output_len = 0.0  # sjf: output tokens it is expected to generate
        self.spec_token_ids: list[int] = []  # draft tokens to verify in the next step
        self.spec_tree: DraftTree | None = None  # their shape; None: a chain
        self.spec_draft_probs: torch.Tensor | None = None  # [drafts, vocab] q; None: one-hot
        self.draft_num_computed = 0  # tokens whose K/V a draft model's own cache holds
        self.spec_proposed = 0  # draft tokens verified, cumulative
        self.spec_accepted = 0  # of which accepted
        self.spec_drafts = 0  # steps that verified drafts
        self.status = RequestStatus.WAITING
        self.stop_reason: int | str | None = None
        self.arrival_time = arrival_time if arrival_time is not None else time.monotonic()
        self.first_scheduled_time: float | None = None
        self.first_token_time: float | None = None
        self.finished_time: float | None = None
        self.num_preemptions = 0
        self.generator: torch.Generator | None = None
        if seed is not None:
            self.generator = torch.Generator().manual_seed(seed)
        self.logprobs: list[PositionLogprobs] | None = [] if params.logprobs is not None else None
        self.cumulative_logprob = 0.0
        self.prompt_logprobs: list[PositionLogprobs | None] | None = (
            [None] if params.prompt_logprobs is not None else None
        )
        self.detokenizer: IncrementalDetokenizer | None = None
        self.stop_token_ids = frozenset(params.stop_token_ids or ()) | (
            frozenset() if params.ignore_eos else frozenset(eos_token_ids)
        )
        budget = max_model_len - len(prompt_token_ids)
        self.max_tokens = budget if params.max_tokens is None else min(params.max_tokens, budget)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_kv_tokens(self) -> int:
        """Computed tokens whose K/V the cache holds: the request's cache index of the next one."""
        return self.num_computed_tokens - self.num_evicted_tokens

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    @property
    def wants_prompt_logprobs(self) -> bool:
        """True while prompt logprobs are still to be collected (not again after recompute)."""
        return self.prompt_logprobs is not None and len(self.prompt_logprobs) < self.num_prompt_tokens

    @property
    def is_decoding(self) -> bool:
        """Prompt done: each step computes the last token (and verifies any drafts)."""
        return self.num_output_tokens > 0 and self.num_computed_tokens == self.num_tokens - 1

    def step_token_ids(self, start: int, n: int) -> list[int]:
        """The `n` input tokens from position `start`, draft tokens after the real ones."""
        ids = self.all_token_ids[start:start + n]
        if len(ids) < n:
            ids = ids + self.spec_token_ids[:n - len(ids)]
        return ids

    def set_drafts(self, token_ids: list[int], tree: DraftTree | None = None,
                   probs: torch.Tensor | None = None) -> None:
        self.spec_token_ids = token_ids
        self.spec_tree = tree if tree is not None and not tree.is_chain else None
        self.spec_draft_probs = probs

    def keep_drafts(self, n: int) -> None:
        """Keep the first `n` drafts (level order: still a tree)."""
        if n >= len(self.spec_token_ids):
            return
        self.spec_token_ids = self.spec_token_ids[:n]
        if self.spec_tree is not None:
            self.spec_tree = self.spec_tree.truncated(n)
        if self.spec_draft_probs is not None:
            self.spec_draft_probs = self.spec_draft_probs[:n]

    def clear_drafts(self) -> None:
        self.set_drafts([])

    def append_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    def check_stop(self) -> bool:
        """Set a finished status from the last token (stop token or length). Stop strings
        are checked by the detokenizer, which sees text."""
        n = self.num_output_tokens
        last = self.output_token_ids[-1]
        if n >= self.params.min_tokens and last in self.stop_token_ids:
            self.status = RequestStatus.FINISHED_STOPPED
            self.stop_reason = last
        elif n >= self.max_tokens:
            self.status = RequestStatus.FINISHED_LENGTH
        return self.is_finished
