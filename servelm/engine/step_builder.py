"""Turns the scheduler's decisions into the plain `SchedulerOutput` a worker runs.

A worker keeps a copy of each request; this sends it only what changed since the last step
it saw: the whole request once (`NewRequestData`), then per step the tokens appended since,
the blocks added to its table (or a new table after preemption, or a shorter one after
rejected drafts and KV compression freed blocks), the computed count, and the ids of
requests that finished, so the worker can forget them.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from servelm.engine.request import Request
from servelm.kv.manager import KVCacheManager
from servelm.step_io import NewRequestData, ScheduledRequest, SchedulerOutput


class StepBuilder:
    def __init__(self, kv: KVCacheManager) -> None:
        self.kv = kv
        self.out = SchedulerOutput()
        self.pending_finished: list[str] = []  # finished since the last step
        self.pending_verified: list[tuple[str, list[int]]] = []  # for earlier pipeline stages
        # Structured outputs with drafts: xgrammar's tokenizer info, sent once (the engine sets it).
        self.grammar_info: Callable[[], str] | None = None
        self._grammar_info_sent = False

    def start(self) -> SchedulerOutput:
        """A new step's output, carrying the ids finished and the drafts verified since the
        last one."""
        self.out = SchedulerOutput(finished_req_ids=self.pending_finished,
                                   verified_drafts=self.pending_verified)
        self.pending_finished, self.pending_verified = [], []
        return self.out

    def finished(self, request_id: str) -> None:
        self.pending_finished.append(request_id)

    def add(self, req: Request, num_new_tokens: int, num_draft_tokens: int = 0) -> None:
        """Schedule `req` for `num_new_tokens` (its blocks already allocated)."""
        if req.num_synced_tokens == 0:
            self.out.new_requests.append(NewRequestData(
                req.request_id, req.prompt_token_ids, req.params, req.seed, sorted(req.stop_token_ids),
                _draft_seed(req.seed), req.generator_state, req.grammar_json))
            if req.grammar_json is not None and not self._grammar_info_sent:
                self.out.grammar_tokenizer_info = self.grammar_info()
                self._grammar_info_sent = True
            req.num_synced_tokens = req.num_prompt_tokens
        tokens, table, start = req.all_token_ids, self.kv.block_table(req.request_id), req.num_synced_blocks
        self.out.scheduled.append(ScheduledRequest(
            req.request_id, num_new_tokens, req.num_computed_tokens, req.num_evicted_tokens,
            tokens[req.num_synced_tokens:], start, table[start:], num_draft_tokens))
        req.num_synced_tokens, req.num_synced_blocks = len(tokens), len(table)


def _draft_seed(seed: int | None) -> int:
    """A seeded request's drafts are reproducible too, from a seed unlike its own (two
    generators with one seed would draw the same numbers); an unseeded one's are fresh."""
    if seed is None:
        return random.getrandbits(63)
    return (seed * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019) % (1 << 63)
