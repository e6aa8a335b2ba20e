"""What the engine hands back to callers, field names as in vLLM."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# One entry per generated (or prompt) position: token id -> Logprob.
PositionLogprobs = dict[int, Logprob]


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "abort" | None while running
    stop_reason: int | str | None = None  # the stop string or stop token id that ended it
    logprobs: list[PositionLogprobs] | None = None
    cumulative_logprob: float | None = None
    delta_text: str = ""  # streaming requests: text released since the previous output

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    metrics: RequestMetrics | None = None
    error: str | None = None
    num_cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    spec_proposed_tokens: int = 0  # draft tokens verified for this request (all samples)
    spec_accepted_tokens: int = 0  # of which accepted
    spec_num_drafts: int = 0  # steps that verified drafts

    @property
    def spec_acceptance_rate(self) -> float | None:
        return self.spec_accepted_tokens / self.spec_proposed_tokens if self.spec_proposed_tokens else None

    @property
    def spec_mean_accepted_length(self) -> float | None:
        """Draft tokens accepted per verification step (each step also adds one of its own)."""
        return self.spec_accepted_tokens / self.spec_num_drafts if self.spec_num_drafts else None
