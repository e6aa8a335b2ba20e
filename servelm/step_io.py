"""What crosses between the engine and a worker: plain, picklable data, nothing else.

The scheduler owns every request's state. A worker keeps its own copy of what it needs to
run the model (token ids, sampling settings and generator, block table), created from a
`NewRequestData` the first step a request is scheduled and kept current by a
`ScheduledRequest` each step it runs, until its id comes back in `finished_req_ids`. So the
worker can live in another process: each step it receives one `SchedulerOutput` and
returns one `ModelRunnerOutput`, and no engine object ever crosses.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from servelm.model.arch import ModelArch
from servelm.outputs import PositionLogprobs
from servelm.sampling_params import SamplingParams

BlockCopy = tuple[int, int]  # (source block, destination block)


@dataclass(slots=True)
class NewRequestData:
    """A request the worker has not seen: sent once, with its first scheduled step."""

    req_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    seed: int | None  # the worker draws this request's samples from its own generator
    stop_token_ids: list[int]  # its stop ids and EOS (unless ignored): banned before min_tokens
    # Sampled drafts come from a generator of their own, seeded alike on every pipeline
    # stage (the request's generator is also drawn on by verification, on the last stage only).
    draft_seed: int = 0
    # A request moved here from another engine: its generator's state there, so its seeded
    # samples continue the same stream (torch.Generator.get_state() bytes).
    generator_state: bytes | None = None
    # A constrained request that may draft: its compiled grammar (xgrammar JSON), for the
    # worker to check drafts against (worker/draft_grammar.py).
    grammar: str | None = None


@dataclass(slots=True)
class ScheduledRequest:
    """One request's part of a step: which tokens to compute and the slots backing them."""

    req_id: str
    num_new_tokens: int  # tokens computed this step: a prompt chunk, one decode, or root + drafts
    num_computed_tokens: int  # before this step; the chunk starts here
    num_evicted_tokens: int = 0  # computed tokens whose K/V KV compression dropped
    new_token_ids: list[int] = field(default_factory=list)  # appended since the worker's copy
    block_table_start: int = 0  # the worker keeps this many blocks of its table ...
    new_block_ids: list[int] = field(default_factory=list)  # ... and appends these
    num_draft_tokens: int = 0  # draft tokens it may propose and verify (inside num_new_tokens)


@dataclass(slots=True)
class SchedulerOutput:
    """One step's input for the worker; `scheduled` is the batch order."""

    scheduled: list[ScheduledRequest] = field(default_factory=list)
    new_requests: list[NewRequestData] = field(default_factory=list)
    finished_req_ids: list[str] = field(default_factory=list)  # the worker forgets them
    # KV block copies to make before the forward pass, in this order: everything leaving a
    # cache block is read before anything lands in one.
    # Pipeline stages before the last verify nothing: (request, accepted draft nodes) of
    # the drafts verified since the last step, applied (tree K/V moved, proposer told)
    # before anything else, ahead of any step that may reuse the blocks the drafts held.
    verified_drafts: list[tuple[str, list[int]]] = field(default_factory=list)
    swap_out: list[BlockCopy] = field(default_factory=list)  # (cache block, swap block)
    offload: list[BlockCopy] = field(default_factory=list)  # (cache block, CPU-tier slot)
    swap_in: list[BlockCopy] = field(default_factory=list)  # (swap block, cache block)
    restore: list[BlockCopy] = field(default_factory=list)  # (CPU-tier slot, cache block)
    # Structured outputs (engine/structured.py): the requests that sample under a grammar
    # this step, and their rows of allowed tokens (numpy int32 [rows, ceil(vocab / 32)],
    # bit j of word w allows token 32 w + j).
    grammar_req_ids: list[str] = field(default_factory=list)
    grammar_bitmask: Any = None
    # xgrammar's tokenizer info (JSON), once, with the first request that sends a grammar.
    grammar_tokenizer_info: str | None = None

    @property
    def moves_kv(self) -> bool:
        return bool(self.swap_out or self.offload or self.swap_in or self.restore)

    @property
    def is_empty(self) -> bool:
        """Nothing for the worker to do or learn."""
        return not (self.scheduled or self.finished_req_ids or self.moves_kv)


@dataclass(slots=True)
class ModelRunnerOutput:
    """Aligned with `SchedulerOutput.scheduled`."""

    req_ids: list[str] = field(default_factory=list)
    # New tokens: one, or with drafts the accepted ones plus one of the target's; [] when
    # the step's chunk did not reach the end of the request's tokens (a partial prefill).
    sampled_token_ids: list[list[int]] = field(default_factory=list)
    logprobs: list[list[PositionLogprobs] | None] = field(default_factory=list)  # per new token
    prompt_logprobs: list[list[PositionLogprobs] | None] = field(default_factory=list)  # new positions
    num_draft_tokens: list[int] = field(default_factory=list)  # drafts verified
    num_accepted_tokens: list[int] = field(default_factory=list)  # of which accepted
    accepted_paths: list[list[int]] = field(default_factory=list)  # their tree nodes, root to leaf
    num_evicted_tokens: list[int] = field(default_factory=list)  # K/V dropped by KV compression
    # Tensor parallelism: the all-reduces the output rank ran this step (calls, bytes, seconds).
    allreduce: tuple[int, int, float] = (0, 0, 0.0)


@dataclass(frozen=True)
class WorkerInfo:
    """What the engine learns from its workers once they have loaded the model."""

    arch: ModelArch
    model_source: str
    max_model_len: int
    num_kv_blocks: int
    num_swap_blocks: int
    num_offload_blocks: int
    kv_bytes_per_token: int  # the target model's cache, all layers
    model_weight_bytes: int  # every weight held, a tied LM head counted once
    decode_weight_bytes: int  # what one decode step reads in full (embedding rows excluded)
