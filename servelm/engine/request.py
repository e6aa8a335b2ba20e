"""One sequence being generated: the unit the scheduler moves toward completion.

An `n > 1` request becomes n of these (one per sample), grouped again by the engine
when outputs are reported. The scheduler owns these objects and is the only writer of
their progress (tokens, computed count, status); the worker keeps a copy of what it needs,
sent as plain data (servelm/step_io.py).
"""

from __future__ import annotations

import enum
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from servelm.engine.detokenizer import IncrementalDetokenizer
    from servelm.outputs import PositionLogprobs
    from servelm.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    SWAPPED = "swapped"  # preempted with its KV kept in CPU swap space
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"
    FINISHED_ERROR = "error"

    def __init__(self, value: str) -> None:
        # a plain attribute, not a property: it is read for every request every step
        self.finished = value not in ("waiting", "running", "swapped")


class Request:
    """State of one sequence. `num_computed_tokens` advances toward `num_tokens`;
    everything else (prefill, decode, recompute after preemption) follows from that."""

    # Slotted: the scheduler reads every running request every step, and a cluster
    # simulation holds tens of thousands at once. What a decode step reads comes first,
    # so that it shares a couple of cache lines.
    __slots__ = ('request_id', 'all_token_ids', 'output_token_ids', 'num_computed_tokens',
                 'num_evicted_tokens', 'status', 'last_scheduled_step', 'num_synced_tokens',
                 'num_synced_blocks', 'first_token_time', 'detokenizer', 'stop_token_ids',
                 'max_tokens', 'params',
                 'prompt_token_ids', 'num_cached_tokens', 'wait_for', 'priority',
                 'sample_index', 'arrival_step', 'mlfq_join_level', 'mlfq_base_tokens',
                 'predicted_output_len', 'spec_proposed', 'spec_accepted', 'spec_drafts',
                 'stop_reason', 'arrival_time', 'first_scheduled_time', 'finished_time',
                 'num_preemptions', 'seed', 'generator_state', 'error', 'logprobs',
                 'cumulative_logprob', 'prompt_logprobs', 'grammar', 'grammar_json')

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
        self.wait_for: Request | None = None  # n > 1: the sample whose prompt blocks we reuse
        self.priority = 0  # lower runs first under the priority policy
        self.sample_index = 0  # which of the request's n samples this is
        self.arrival_step = 0  # scheduler step it arrived at: priority and sjf aging
        self.last_scheduled_step = 0  # scheduler step it last ran (or arrived): mlfq promotion
        self.mlfq_join_level = 0  # mlfq: queue it joined (or was promoted to)
        self.mlfq_base_tokens = 0  # mlfq: output tokens it had when it joined that queue
        self.predicted_output_len = 0.0  # sjf: output tokens it is expected to generate
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
        self.seed = seed  # the worker's generator for this sequence starts from it
        self.generator_state: bytes | None = None  # moved from another engine: its state there
        self.error: str | None = None  # why it failed (FINISHED_ERROR)
        # What the worker's copy holds: tokens (0: it has not seen the request yet), blocks.
        self.num_synced_tokens = 0
        self.num_synced_blocks = 0
        self.logprobs: list[PositionLogprobs] | None = [] if params.logprobs is not None else None
        self.cumulative_logprob = 0.0
        self.prompt_logprobs: list[PositionLogprobs | None] | None = (
            [None] if params.prompt_logprobs is not None else None
        )
        self.detokenizer: IncrementalDetokenizer | None = None
        self.grammar: Any = None  # structured outputs: an xgrammar matcher (engine/structured.py)
        self.grammar_json: str | None = None  # its compiled grammar, for a worker that drafts
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

    def append_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    def check_stop(self) -> bool:
        """Set a finished status from the last token (stop token or length). Stop strings
        are checked by the detokenizer, which sees text."""
        n = len(self.output_token_ids)
        last = self.output_token_ids[-1]
        if last in self.stop_token_ids and n >= self.params.min_tokens:
            self.status = RequestStatus.FINISHED_STOPPED
            self.stop_reason = last
        elif n >= self.max_tokens:
            self.status = RequestStatus.FINISHED_LENGTH
        return self.status.finished
