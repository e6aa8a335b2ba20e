"""One token-budget loop over running then waiting requests.

There is no prefill or decode phase: each step every scheduled request gets some number of
new tokens (a whole prompt, a prefill chunk, or one decode token) and the blocks that back
them. A request being admitted first takes the longest prefix the KV cache already holds
(prefix caching) and computes only the rest. When blocks run out, the most recently
admitted (under a policy: the worst-ranked) running request is preempted, by recompute (its
blocks are freed, their cached contents findable until evicted, and it goes back to the
front of the waiting queue) or by swap (its KV is copied to CPU swap space and back).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from servelm.engine.policies import Policy
from servelm.engine.request import Request, RequestStatus
from servelm.kv.manager import KVCacheManager


@dataclass
class SchedulerOutput:
    """Requests to run this step, in batch order, with their new-token counts."""

    requests: list[Request] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    swap_out: list[tuple[int, int]] = field(default_factory=list)  # (cache block, swap block)
    swap_in: list[tuple[int, int]] = field(default_factory=list)  # (swap block, cache block)
    offload: list[tuple[int, int]] = field(default_factory=list)  # (cache block, CPU-tier slot)
    restore: list[tuple[int, int]] = field(default_factory=list)  # (CPU-tier slot, cache block)

    @property
    def moves_kv(self) -> bool:
        return bool(self.swap_out or self.swap_in or self.offload or self.restore)


class Scheduler:
    def __init__(
        self,
        kv: KVCacheManager,
        max_num_batched_tokens: int,
        max_num_seqs: int,
        preemption_mode: str = "recompute",
        policy: Policy | None = None,
    ) -> None:
        self.kv = kv
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.preemption_mode = preemption_mode
        self.policy = policy or Policy()
        self.step_count = 0
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.swapped: deque[Request] = deque()  # preempted by swap, resumed before new admissions
        self.num_preemptions = 0  # for lack of KV blocks
        self.num_policy_preemptions = 0  # to run a request the policy ranks higher
        self.prefix_cache_query_tokens = 0  # tokens of admitted requests looked up
        self.prefix_cache_hit_tokens = 0  # of which found in the cache

    def add(self, request: Request) -> None:
        request.arrival_step = request.last_scheduled_step = self.step_count
        if self.policy.name == "mlfq":
            request.mlfq_join_level = self.policy.join_level(request)
        elif self.policy.name == "sjf":
            request.predicted_output_len = self.policy.predict_output_len(request)
        self.waiting.append(request)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        self.step_count += 1
        if self.policy.reorders:
            self._order_by_policy(out)

        # 1. Running requests, oldest first; preempt from the newest end when blocks run out.
        # Draft tokens ride along with a decode while budget and blocks allow; they are the
        # first thing given up.
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            req.keep_drafts(max(0, budget - 1))
            if req.spec_token_ids and not self.kv.can_allocate(
                    req.request_id, req.num_tokens + len(req.spec_token_ids)):
                req.clear_drafts()
            n = min(req.num_tokens + len(req.spec_token_ids) - req.num_computed_tokens, budget)
            total = req.num_kv_tokens + n  # slots needed
            while not self.kv.can_allocate(req.request_id, total):
                victim = self.running[-1]
                self._preempt(victim, out)
                if victim is req:
                    break
            if req.status is not RequestStatus.RUNNING:
                break  # req preempted itself: nothing after it can run either
            self.kv.allocate(req.request_id, total)
            self._add(out, req, n)
            budget -= n
            i += 1

        # 2. Queued requests: swapped-out ones resume (KV copied back in), waiting ones are
        # admitted, best first, unless this step already had to preempt for memory.
        while budget > 0 and not out.preempted and len(self.running) < self.max_num_seqs:
            req = self._next_queued()
            if req is None:
                break
            n = (self._resume(req, out, budget) if req.status is RequestStatus.SWAPPED
                 else self._admit(req, out, budget))
            if not n:
                break
            budget -= n
        out.offload, out.restore = self.kv.take_tier_copies()
        return out

    def _next_queued(self) -> Request | None:
        """The queued request to run next: under FCFS swapped requests always come back
        before new ones are admitted; under other policies the better key wins."""
        if not self.swapped or not self.waiting:
            return self.swapped[0] if self.swapped else (self.waiting[0] if self.waiting else None)
        if not self.policy.reorders:
            return self.swapped[0]
        step = self.step_count
        s, w = self.swapped[0], self.waiting[0]
        return s if self.policy.key(s, step) <= self.policy.key(w, step) else w

    def _resume(self, req: Request, out: SchedulerOutput, budget: int) -> int:
        """Bring a swapped-out request back (its KV copied in); returns its new tokens, or 0
        when its blocks do not fit."""
        n = min(req.num_tokens - req.num_computed_tokens, budget)
        if not self.kv.can_swap_in(req.request_id, req.num_kv_tokens + n):
            return 0
        self.swapped.remove(req)
        out.swap_in.extend(self.kv.swap_in(req.request_id, req.num_kv_tokens + n))
        req.status = RequestStatus.RUNNING
        self.running.append(req)
        self._add(out, req, n)
        return n

    def _admit(self, req: Request, out: SchedulerOutput, budget: int) -> int:
        """Start a waiting request from its longest cached prefix; returns its new tokens,
        or 0 when it cannot start yet."""
        if req.wait_for is not None and not self._prompt_done(req.wait_for):
            return 0  # n > 1: let the first sample fill the prompt blocks the others share
        cached = self.kv.find_cached(req)
        num_cached = len(cached) * self.kv.block_size
        n = min(req.num_tokens - num_cached, budget)
        if not self.kv.can_allocate(req.request_id, num_cached + n, cached):
            return 0
        self.waiting.remove(req)
        self.kv.allocate(req.request_id, num_cached + n, cached)
        req.num_computed_tokens = req.num_cached_tokens = num_cached
        self.prefix_cache_query_tokens += req.num_tokens
        self.prefix_cache_hit_tokens += num_cached
        req.status = RequestStatus.RUNNING
        if req.first_scheduled_time is None:
            req.first_scheduled_time = time.monotonic()
        self.running.append(req)
        self._add(out, req, n)
        return n

    def _order_by_policy(self, out: SchedulerOutput) -> None:
        """Sort every queue by the policy's key and, when the batch is full, preempt running
        requests that rank below a queued one (by swap or recompute, per `preemption_mode`)."""
        step = self.step_count
        if self.policy.name == "mlfq":
            for req in (*self.waiting, *self.swapped):
                self.policy.mlfq_promote_if_starved(req, step)

        def key(req: Request) -> tuple[float, ...]:
            return self.policy.key(req, step)

        self.running.sort(key=key)
        self.waiting = deque(sorted(self.waiting, key=key))
        self.swapped = deque(sorted(self.swapped, key=key))
        while self.running and len(self.running) >= self.max_num_seqs:
            best = self._next_queued()
            if best is None or not key(best) < key(self.running[-1]):
                break
            victim = self.running.pop()
            victim.num_preemptions += 1
            self.num_policy_preemptions += 1
            self._park(victim, out)
            if victim.status is RequestStatus.SWAPPED:
                self.swapped = deque(sorted([*self.swapped, victim], key=key))
            else:
                self.waiting = deque(sorted([*self.waiting, victim], key=key))

    @staticmethod
    def _prompt_done(req: Request) -> bool:
        return req.is_finished or req.num_computed_tokens >= req.num_prompt_tokens

    def _add(self, out: SchedulerOutput, req: Request, n: int) -> None:
        req.last_scheduled_step = self.step_count
        out.requests.append(req)
        out.num_new_tokens.append(n)

    def _preempt(self, req: Request, out: SchedulerOutput) -> None:
        """Preempt for lack of blocks: park the victim at the front of its queue."""
        self.running.remove(req)
        req.num_preemptions += 1
        self.num_preemptions += 1
        out.preempted.append(req)
        self._park(req, out)
        (self.swapped if req.status is RequestStatus.SWAPPED else self.waiting).appendleft(req)

    def _park(self, req: Request, out: SchedulerOutput) -> None:
        """Swap a preempted request's KV out when that mode is on and swap space has room;
        else free its blocks (their cached contents stay findable) so it is recomputed from
        its tokens when admitted again. The caller queues it by its new status."""
        req.clear_drafts()
        req.draft_num_computed = 0  # a draft model's cache follows the blocks, which go
        if self.preemption_mode == "swap" and self.kv.can_swap_out(req.request_id):
            out.swap_out.extend(self.kv.swap_out(req.request_id))
            req.status = RequestStatus.SWAPPED
            return
        self.kv.free(req.request_id)
        req.status = RequestStatus.WAITING
        req.num_computed_tokens = req.num_evicted_tokens = 0

    def finish(self, req: Request, status: RequestStatus) -> None:
        """Remove a request from whichever queue holds it and release its blocks."""
        if not req.is_finished:
            req.status = status
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        elif req in self.swapped:
            self.swapped.remove(req)
        self.kv.free(req.request_id)
        req.finished_time = time.monotonic()
