"""Who runs first: the scheduling policies, as an ordering over requests.

Each policy maps a request to a sort key (smaller runs first). The scheduler admits waiting
requests in key order, and when the batch is full (`max_num_seqs`) it preempts a running
request whose key is worse than a waiting one's, at token granularity (any step). Every
policy but FCFS ages its keys in scheduler steps, so no request starves. Under priority a
request gains one level per `aging_steps` steps since it arrived, so it waits at most for
requests that arrived less than (its priority - theirs) x `aging_steps` steps after it. sjf
ranks by response ratio (highest response ratio next): 1 + `sjf_wait_weight` x steps since
arrival / predicted remaining tokens, ties to the shorter. Newcomers start at ratio 1, where
the order is shortest first; a waiting request's ratio grows without bound, so newcomers
cannot overtake it forever, and a long job is passed only by jobs that have waited
proportionally less than it. (Subtracting a fixed number of tokens per step instead would
turn sjf into fcfs once queues are deeper than the longest prediction.) Under sustained
overload every wait grows, so as a hard bound a request that has not run for
`sjf_max_wait_steps` steps goes first. mlfq returns a
request that has not run for `aging_steps` steps to the top queue with a fresh quantum
(FastServe's promotion).

- fcfs: arrival order; never preempts for ordering (only when memory runs out).
- priority: the request's `priority` (lower first, as in vLLM), FCFS within a level.
- sjf: shortest predicted remaining output first. The prediction comes from a learned
  `LengthPredictor` when one is configured (`servelm length-predictor train`), capped at the
  request's `max_tokens`; without one it is the `max_tokens` bound itself, the only length
  known up front. A request that outlives its prediction has it doubled (up to
  `max_tokens`), so a mispredicted long job sinks back instead of holding the batch.
- mlfq: FastServe's skip-join multi-level feedback queue. Queue i has a quantum of
  `base_quantum * 2**i` generated tokens; a new request skips the queues whose quantum its
  prefill alone would overrun (prompt tokens / `prefill_tokens_per_quantum_token`), runs
  until it has used its quantum, then drops a level.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from servelm.config import SCHEDULING_POLICIES
from servelm.engine.length_predictor import LengthPredictor
from servelm.engine.request import Request


@dataclass
class Policy:
    name: str = "fcfs"
    aging_steps: int = 200  # priority: steps per level gained; mlfq: steps idle before promotion
    sjf_wait_weight: float = 1.0  # sjf: weight of waiting in the response ratio (0: pure SJF)
    sjf_max_wait_steps: int = 2000  # sjf: a request not run for this many steps goes first
    base_quantum: int = 16  # mlfq: tokens of the top queue's quantum
    num_levels: int = 6
    prefill_tokens_per_quantum_token: int = 32  # mlfq skip-join: prefill cost in decode tokens
    predictor: LengthPredictor | None = None  # sjf: learned output lengths (else max_tokens)

    def __post_init__(self) -> None:
        if self.name not in SCHEDULING_POLICIES:
            raise ValueError(f"scheduling_policy must be one of {SCHEDULING_POLICIES}, got {self.name!r}")

    @property
    def reorders(self) -> bool:
        return self.name != "fcfs"

    def predict_output_len(self, req: Request) -> float:
        """sjf's length estimate at arrival: the learned one, capped at max_tokens."""
        if self.predictor is None:
            return float(req.max_tokens)
        return min(float(req.max_tokens), self.predictor.predict(req.prompt_token_ids))

    def remaining(self, req: Request) -> float:
        """sjf: predicted output tokens still to come, the prediction doubled each time the
        request outlives it."""
        predicted, done = max(1.0, req.predicted_output_len), req.num_output_tokens
        while predicted <= done and predicted < req.max_tokens:
            predicted = min(2 * predicted, req.max_tokens)
        req.predicted_output_len = predicted
        return predicted - done

    def join_level(self, req: Request) -> int:
        """mlfq skip-join: the first queue whose quantum covers the prompt's prefill."""
        cost = req.num_prompt_tokens / self.prefill_tokens_per_quantum_token
        level = 0
        while level < self.num_levels - 1 and cost > self.base_quantum * 2**level:
            level += 1
        return level

    def mlfq_level(self, req: Request) -> int:
        """The level a request has sunk to after the tokens it generated since joining."""
        level, left = req.mlfq_join_level, req.num_output_tokens - req.mlfq_base_tokens
        while level < self.num_levels - 1 and left >= self.base_quantum * 2**level:
            left -= self.base_quantum * 2**level
            level += 1
        return level

    def mlfq_promote_if_starved(self, req: Request, step: int) -> None:
        """mlfq anti-starvation: a request that has not run for `aging_steps` steps goes back
        to the top queue with a fresh quantum."""
        if step - req.last_scheduled_step >= self.aging_steps:
            req.mlfq_join_level, req.mlfq_base_tokens = 0, req.num_output_tokens
            req.last_scheduled_step = step

    def key(self, req: Request, step: int) -> tuple[float, ...]:
        age = step - req.arrival_step
        if self.name == "priority":
            return (req.priority - age / self.aging_steps, req.arrival_time)
        if self.name == "sjf":
            if step - req.last_scheduled_step >= self.sjf_max_wait_steps:
                return (-math.inf, 0.0, req.arrival_time)
            remaining = self.remaining(req)
            return (-(1 + self.sjf_wait_weight * age / remaining), remaining, req.arrival_time)
        if self.name == "mlfq":
            return (self.mlfq_level(req), req.arrival_time)
        return (0, req.arrival_time)
