"""The owner of every request's state and of the KV cache manager: one token-budget loop
over running then waiting requests (`schedule`), and the bookkeeping after each step
(`update_from_output`).

There is no prefill or decode phase: each step every scheduled request gets some number of
new tokens (a whole prompt, a prefill chunk, one decode token, or one plus drafts) and the
blocks that back them. A request being admitted first takes the longest prefix the KV
cache already holds (prefix caching) and computes only the rest. When blocks run out, the
most recently admitted (under a policy: the worst-ranked) running request is preempted, by
recompute (its blocks are freed, their cached contents findable until evicted, and it goes
back to the front of the waiting queue) or by swap (its KV is copied to CPU swap space and
back). Under pipeline parallelism up to `num_micro_batches` steps are in flight at once:
a request in flight sits out the steps scheduled before its output is back (it is never
preempted meanwhile), and each step takes at most its share of the requests, so that the
micro-batches keep every stage busy. What the worker must do is described in a plain
`SchedulerOutput` (engine/step_builder.py); what it did comes back as a
`ModelRunnerOutput`, from which this class appends tokens, checks stops, and finishes,
frees or caches blocks.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable

from servelm.engine.policies import Policy
from servelm.engine.request import Request, RequestStatus
from servelm.engine.step_builder import StepBuilder
from servelm.engine.stop import append_tokens
from servelm.kv.manager import KVCacheManager
from servelm.speculative.config import SpecConfig
from servelm.step_io import ModelRunnerOutput, SchedulerOutput

logger = logging.getLogger("servelm")

COUNTERS = ("prompt_tokens_total", "generation_tokens_total", "spec_proposed_tokens",
            "spec_accepted_tokens", "spec_num_drafts", "kv_evicted_tokens")


class Scheduler:
    def __init__(self, kv: KVCacheManager, max_num_batched_tokens: int, max_num_seqs: int,
                 preemption_mode: str = "recompute", policy: Policy | None = None,
                 spec: SpecConfig | None = None, max_model_len: int | None = None,
                 num_micro_batches: int = 1, clock: Callable[[], float] = time.monotonic) -> None:
        self.kv = kv
        self.clock = clock  # the simulator's virtual time instead of the wall clock
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.preemption_mode = preemption_mode
        self.policy = policy or Policy()
        self.spec = spec
        self.max_model_len = max_model_len
        self.num_micro_batches = num_micro_batches
        # ids scheduled in steps whose output is not back yet; always empty with one
        # micro-batch, where the next step is scheduled after the last one's output is in
        self.in_flight: set[str] = set()
        self.step_count = 0
        self.requests: dict[str, Request] = {}  # every request not finished yet
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.swapped: deque[Request] = deque()  # preempted by swap, resumed before new admissions
        self.builder = StepBuilder(kv)
        self._preempted = False  # this step had to preempt for memory
        self.num_preemptions = 0  # for lack of KV blocks
        self.num_policy_preemptions = 0  # to run a request the policy ranks higher
        self.prefix_cache_query_tokens = 0  # tokens of admitted requests looked up
        self.prefix_cache_hit_tokens = 0  # of which found in the cache
        self.counters = dict.fromkeys(COUNTERS, 0)

    def add(self, request: Request) -> None:
        request.arrival_step = request.last_scheduled_step = self.step_count
        if self.policy.name == "mlfq":
            request.mlfq_join_level = self.policy.join_level(request)
        elif self.policy.name == "sjf":
            request.predicted_output_len = self.policy.predict_output_len(request)
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def adopt(self, request: Request) -> None:
        """A request moved here with its K/V already in its blocks: it runs from its next
        token, as if it had been running here."""
        request.arrival_step = request.last_scheduled_step = self.step_count
        request.status = RequestStatus.RUNNING
        self.requests[request.request_id] = request
        self.running.append(request)

    def schedule(self) -> SchedulerOutput:
        out = self.builder.start()
        budget = self.max_num_batched_tokens
        self.step_count += 1
        self._preempted = False
        # No drafts while the batch is big: it is compute-bound, and rejected drafts only
        # add work to it.
        speculating = self.spec is not None and len(self.running) <= self.spec.disable_by_batch_size
        if self.policy.reorders:
            self._order_by_policy(out)

        # A micro-batch's share of the requests (all of them without pipeline parallelism).
        seats = -(-min(self.max_num_seqs, len(self.requests)) // self.num_micro_batches)

        # 1. Running requests, oldest first; preempt from the newest end when blocks run out.
        # Draft tokens ride along with a decode while budget and blocks allow; they are the
        # first thing given up.
        # (the loop runs for every request every step: what it reads is held in locals)
        running, in_flight, kv, scheduled = self.running, self.in_flight, self.kv, out.scheduled
        add, step, drafts, i = self.builder.add, self.step_count, 0, 0
        while i < len(running) and budget > 0 and len(scheduled) < seats:
            req = running[i]
            rid = req.request_id
            if rid in in_flight:
                i += 1
                continue
            num_tokens = len(req.all_token_ids)
            if speculating:
                drafts = self._num_drafts(req, budget)
                if drafts and not kv.can_allocate(rid, num_tokens + drafts):
                    drafts = 0
            n = min(num_tokens + drafts - req.num_computed_tokens, budget)
            total = req.num_computed_tokens - req.num_evicted_tokens + n  # K/V slots needed
            if total > kv.num_slots(rid):  # a new block (most decodes: no)
                while not kv.can_allocate(rid, total):
                    victim = self._victim()
                    self._preempt(victim, out)
                    if victim is req:
                        break
                if req.status is not RequestStatus.RUNNING:
                    break  # req preempted itself: nothing after it can run either
                kv.allocate(rid, total)
            req.last_scheduled_step = step
            add(req, n, drafts)
            budget -= n
            i += 1

        # 2. Queued requests: swapped-out ones resume (KV copied back in), waiting ones are
        # admitted, best first, unless this step already had to preempt for memory.
        while (budget > 0 and not self._preempted and len(self.running) < self.max_num_seqs
               and len(out.scheduled) < seats):
            req = self._next_queued()
            if req is None:
                break
            n = (self._resume(req, out, budget) if req.status is RequestStatus.SWAPPED
                 else self._admit(req, budget))
            if not n:
                break
            budget -= n
        out.offload, out.restore = self.kv.take_tier_copies()
        if self.num_micro_batches > 1:
            self.in_flight.update(s.req_id for s in out.scheduled)
        return out

    def update_from_output(self, step: SchedulerOutput, result: ModelRunnerOutput) -> list[Request]:
        """Apply what the worker did: count the computed tokens, free the slots of rejected
        drafts and of K/V that compression dropped, make new full blocks findable, append
        the new tokens (checking stop tokens, stop strings and length), and finish requests
        that are done. Returns the requests that got tokens this step."""
        now = self.clock()
        progressed = []
        requests, kv, generated = self.requests, self.kv, 0
        if self.in_flight:
            self.in_flight.difference_update(s.req_id for s in step.scheduled)
        for i, (sched, tokens, logprobs, prompt_logprobs, drafted, accepted, evicted) in enumerate(zip(
                step.scheduled, result.sampled_token_ids, result.logprobs, result.prompt_logprobs,
                result.num_draft_tokens, result.num_accepted_tokens, result.num_evicted_tokens)):
            req = requests.get(sched.req_id)
            if req is None:
                continue  # aborted during the step
            if drafted and self.num_micro_batches > 1:
                self.builder.pending_verified.append((req.request_id, result.accepted_paths[i]))
            req.num_computed_tokens += sched.num_new_tokens - sched.num_draft_tokens + accepted
            if sched.num_draft_tokens:
                self._count_drafts(req, drafted, accepted)
                # The KV of rejected drafts is garbage: uncount it, free emptied blocks.
                self._trim(req, req.num_computed_tokens + 1)
            if kv.enable_prefix_caching:  # (a call saved per request per step when off)
                kv.cache_blocks(req.request_id, req.all_token_ids, req.num_computed_tokens)
            if prompt_logprobs is not None:
                req.prompt_logprobs.extend(prompt_logprobs)
            if tokens:
                progressed.append(req)
                if req.first_token_time is None:
                    self._first_token(req, now)
                try:
                    generated += append_tokens(req, tokens, logprobs)
                except Exception as exc:  # fail this request only; the batch goes on
                    logger.exception("request %s failed", req.request_id)
                    req.error = f"{type(exc).__name__}: {exc}"
                    self.finish(req, RequestStatus.FINISHED_ERROR)
                    continue
                if req.status.finished:
                    self.finish(req, req.status)
                    continue
            if evicted:
                req.num_evicted_tokens += evicted
                self.counters["kv_evicted_tokens"] += evicted
                self._trim(req, req.num_kv_tokens)  # the blocks past the budget
        self.counters["generation_tokens_total"] += generated
        return progressed

    def finish(self, req: Request, status: RequestStatus) -> None:
        """Remove a request from whichever queue holds it and release its blocks; the
        worker learns it is gone with the next step."""
        if not req.is_finished:
            req.status = status
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        elif req in self.swapped:
            self.swapped.remove(req)
        self.kv.forget(req.request_id)
        self.requests.pop(req.request_id, None)
        self.builder.finished(req.request_id)
        req.finished_time = self.clock()

    # ---- the budget loop's parts -------------------------------------------------------
    def _num_drafts(self, req: Request, budget: int) -> int:
        """Draft tokens a decoding request may verify this step: its speculative depth
        within what it may still generate (the verified step adds a token of its own), as
        tree nodes, within the budget. None for requests whose logits depend on the tokens
        before each position (penalties, a min_tokens ban still in force)."""
        p = req.params
        if (not req.is_decoding or p.presence_penalty != 0 or p.frequency_penalty != 0
                or p.repetition_penalty != 1 or req.num_output_tokens < p.min_tokens):
            return 0
        k = self.spec.num_speculative_tokens
        k = k if p.num_speculative_tokens is None else min(k, p.num_speculative_tokens)
        room = min(req.max_tokens - req.num_output_tokens, self.max_model_len - req.num_tokens) - 1
        depth = min(k, room)
        return min(self.spec.num_nodes(depth), budget - 1) if depth > 0 else 0

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
        self._add(req, n)
        return n

    def _admit(self, req: Request, budget: int) -> int:
        """Start a waiting request from its longest cached prefix; returns its new tokens,
        or 0 when it cannot start yet."""
        if req.wait_for is not None and not self._prompt_done(req.wait_for):
            return 0  # n > 1: let the first sample fill the prompt blocks the others share
        # A request that wants prompt logprobs computes its whole prompt.
        cached = [] if req.wants_prompt_logprobs else self.kv.find_cached(req.request_id, req.all_token_ids)
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
            req.first_scheduled_time = self.clock()
        self.running.append(req)
        self._add(req, n)
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
            victim = self._victim()
            if best is None or victim is None or not key(best) < key(victim):
                break
            self.running.remove(victim)
            victim.num_preemptions += 1
            self.num_policy_preemptions += 1
            self._park(victim, out)
            if victim.status is RequestStatus.SWAPPED:
                self.swapped = deque(sorted([*self.swapped, victim], key=key))
            else:
                self.waiting = deque(sorted([*self.waiting, victim], key=key))

    def _victim(self) -> Request | None:
        """The newest running request not in flight: the one to preempt."""
        return next((r for r in reversed(self.running) if r.request_id not in self.in_flight), None)

    def abandon_in_flight(self) -> None:
        """The workers lost the steps in flight (they failed): nothing is in flight."""
        self.in_flight.clear()

    @staticmethod
    def _prompt_done(req: Request) -> bool:
        return req.is_finished or req.num_computed_tokens >= req.num_prompt_tokens

    def _add(self, req: Request, n: int, drafts: int = 0) -> None:
        req.last_scheduled_step = self.step_count
        self.builder.add(req, n, drafts)

    def _preempt(self, req: Request, out: SchedulerOutput) -> None:
        """Preempt for lack of blocks: park the victim at the front of its queue."""
        self.running.remove(req)
        req.num_preemptions += 1
        self.num_preemptions += 1
        self._preempted = True
        self._park(req, out)
        (self.swapped if req.status is RequestStatus.SWAPPED else self.waiting).appendleft(req)

    def _park(self, req: Request, out: SchedulerOutput) -> None:
        """Swap a preempted request's KV out when that mode is on and swap space has room;
        else free its blocks (their cached contents stay findable) so it is recomputed from
        its tokens when admitted again. The caller queues it by its new status."""
        req.num_synced_blocks = 0  # it comes back with a new block table either way
        if self.preemption_mode == "swap" and self.kv.can_swap_out(req.request_id):
            out.swap_out.extend(self.kv.swap_out(req.request_id))
            req.status = RequestStatus.SWAPPED
            return
        self.kv.free(req.request_id)
        req.status = RequestStatus.WAITING
        req.num_computed_tokens = req.num_evicted_tokens = 0

    # ---- after a step ------------------------------------------------------------------
    def _trim(self, req: Request, num_tokens: int) -> None:
        """Free the request's blocks past what `num_tokens` tokens need."""
        self.kv.trim(req.request_id, num_tokens)
        req.num_synced_blocks = min(req.num_synced_blocks, len(self.kv.block_table(req.request_id)))

    def _count_drafts(self, req: Request, proposed: int, accepted: int) -> None:
        if not proposed:
            return
        req.spec_proposed += proposed
        req.spec_accepted += accepted
        req.spec_drafts += 1
        self.counters["spec_num_drafts"] += 1
        self.counters["spec_proposed_tokens"] += proposed
        self.counters["spec_accepted_tokens"] += accepted

    def _first_token(self, req: Request, now: float) -> None:
        req.first_token_time = now
        if req.sample_index == 0:  # n samples share one prompt
            self.counters["prompt_tokens_total"] += req.num_prompt_tokens
