"""LLMEngine: add requests, call `step()` until done. The synchronous core of servelm."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from servelm.config import EngineConfig
from servelm.engine.detokenizer import IncrementalDetokenizer
from servelm.engine.length_predictor import LengthPredictor
from servelm.engine.policies import Policy
from servelm.engine.request import Request, RequestStatus
from servelm.engine.scheduler import Scheduler
from servelm.kv.manager import KVCacheManager, cdiv
from servelm.model.loader import load_model
from servelm.outputs import CompletionOutput, RequestMetrics, RequestOutput
from servelm.sampling_params import SamplingParams
from servelm.speculative.draft import DraftProposer, load_draft
from servelm.speculative.ngram import NgramProposer
from servelm.speculative.verify import speculation_allowed
from servelm.worker.model_runner import ModelRunner, kv_bytes_per_block

logger = logging.getLogger("servelm")

PromptInput = str | list[int] | dict


@dataclass
class _Group:
    """The n sequences of one user request, reported together."""

    request_id: str
    prompt: str | None
    seqs: list[Request]
    stream: bool
    error: str | None = None

    @property
    def finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        torch.set_num_threads(config.num_threads or os.cpu_count() or 1)
        torch.manual_seed(config.seed)
        t0 = time.monotonic()
        loaded = load_model(config.model, getattr(torch, config.dtype), keep_int4=config.quantization == "int4")
        self.model_source = loaded.source
        self.arch = loaded.arch
        self.tokenizer = loaded.tokenizer
        self.eos_token_ids = tuple(loaded.arch.eos_token_ids) or (
            (self.tokenizer.eos_token_id,) if self.tokenizer.eos_token_id is not None else ()
        )
        self.spec = config.spec
        self.compression = config.compression
        draft = load_draft(self.spec, loaded, getattr(torch, config.dtype)) if self.spec else None
        draft_per_block = (kv_bytes_per_block(draft.arch, config.block_size, getattr(torch, config.dtype),
                                              config.kv_cache_dtype) if draft else 0)
        self.runner = ModelRunner(config, loaded.arch, loaded.weights, self.eos_token_ids, draft_per_block)
        self.max_model_len = self.runner.max_model_len
        self.kv = KVCacheManager(self.runner.num_kv_blocks, config.block_size,
                                 config.enable_prefix_caching, self.runner.num_swap_blocks,
                                 self.runner.num_offload_blocks)
        self.scheduler = Scheduler(self.kv, config.max_num_batched_tokens, config.max_num_seqs,
                                   config.preemption_mode,
                                   Policy(config.scheduling_policy, predictor=self._predictor()))
        self.proposer: NgramProposer | DraftProposer | None = None
        if self.spec is not None and self.spec.method == "ngram":
            self.proposer = NgramProposer(self.spec.prompt_lookup_min, self.spec.prompt_lookup_max)
        elif self.spec is not None:
            self.proposer = DraftProposer.build(self.spec, self.runner, draft)
        self._groups: dict[str, _Group] = {}
        self._seq_to_group: dict[str, _Group] = {}
        self._counters = {"prompt_tokens_total": 0, "generation_tokens_total": 0,
                          "num_steps": 0, "requests_finished_total": 0,
                          "spec_proposed_tokens": 0, "spec_accepted_tokens": 0,
                          "spec_num_drafts": 0, "kv_evicted_tokens": 0}
        logger.info("servelm engine ready in %.1fs: %s, %d KV blocks of %d tokens, max_model_len %d",
                    time.monotonic() - t0, loaded.source, self.kv.num_blocks, config.block_size,
                    self.max_model_len)

    def _predictor(self) -> LengthPredictor | None:
        """sjf's learned output-length predictor, when one is configured."""
        if self.config.length_predictor is None:
            return None
        predictor = LengthPredictor.load(self.config.length_predictor)
        predictor.check_vocab(len(self.tokenizer))
        return predictor

    # ---- requests in -------------------------------------------------------------------
    def tokenize_prompt(self, prompt: PromptInput) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
            if "prompt" in prompt:
                return self.tokenize_prompt(prompt["prompt"])
            raise ValueError("prompt dict must have 'prompt' or 'prompt_token_ids'")
        if isinstance(prompt, (list, tuple)):
            return None, list(prompt)
        raise ValueError(f"prompt must be a string, a list of token ids or a dict, got {type(prompt).__name__}")

    def validate_prompt(self, token_ids: Sequence[int]) -> None:
        if not token_ids:
            raise ValueError("prompt must contain at least one token")
        vocab = self.arch.vocab_size
        for t in token_ids:
            if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab:
                raise ValueError(f"prompt token ids must be integers in [0, {vocab}), got {t!r}")
        if len(token_ids) >= self.max_model_len:
            raise ValueError(
                f"prompt has {len(token_ids)} tokens but the model's context window is "
                f"{self.max_model_len} tokens (prompt plus at least 1 generated token)"
            )
        if cdiv(len(token_ids) + 1, self.kv.block_size) > self.kv.num_blocks:
            raise ValueError(f"prompt of {len(token_ids)} tokens can never fit in the KV cache "
                             f"({self.kv.num_blocks} blocks of {self.kv.block_size} tokens)")

    def add_request(self, request_id: str, prompt: PromptInput, params: SamplingParams | None = None,
                    arrival_time: float | None = None, stream: bool = False,
                    priority: int = 0) -> None:
        if not isinstance(priority, int) or isinstance(priority, bool):
            raise ValueError(f"priority must be an integer (lower runs first), got {priority!r}")
        if request_id in self._groups:
            raise ValueError(f"request_id {request_id!r} is already in use")
        params = params or SamplingParams()
        text, token_ids = self.tokenize_prompt(prompt)
        self.validate_prompt(token_ids)
        arrival = arrival_time if arrival_time is not None else time.monotonic()
        seqs = []
        for i in range(params.n):
            child = params if i == 0 else params.clone(prompt_logprobs=None)
            seed = None if params.seed is None else params.seed + i
            req = Request(f"{request_id}#{i}", token_ids, child, self.eos_token_ids,
                          self.max_model_len, arrival, seed)
            req.detokenizer = IncrementalDetokenizer(self.tokenizer, token_ids, child)
            req.priority = priority
            if seqs and self.kv.enable_prefix_caching:
                req.wait_for = seqs[0]  # reuse the first sample's prompt blocks
            seqs.append(req)
        group = _Group(request_id, text, seqs, stream)
        self._groups[request_id] = group
        for req in seqs:
            self._seq_to_group[req.request_id] = group
            self.scheduler.add(req)

    def abort_request(self, request_id: str) -> None:
        group = self._groups.pop(request_id, None)
        if group is None:
            return
        for req in group.seqs:
            self._release(req, RequestStatus.FINISHED_ABORTED)

    # ---- the loop ----------------------------------------------------------------------
    def has_unfinished_requests(self) -> bool:
        return bool(self._groups)

    def step(self) -> list[RequestOutput]:
        """Schedule, run one forward pass, apply its tokens. Returns outputs for finished
        requests, and for streaming requests that produced something this step."""
        if self.proposer is not None:
            self._propose()
        sched = self.scheduler.schedule()
        if sched.moves_kv:  # before any block is written again
            self.runner.move_kv(sched.swap_out, sched.offload, sched.swap_in, sched.restore)
        if not sched.requests:
            return []
        tables = [self.kv.block_table(r.request_id) for r in sched.requests]
        result = self.runner.execute(sched.requests, sched.num_new_tokens, tables)
        self._counters["num_steps"] += 1
        now = time.monotonic()
        touched: dict[str, _Group] = {}
        computed_before = [r.num_computed_tokens for r in sched.requests]
        for i, req in enumerate(sched.requests):
            first_position = req.num_computed_tokens + 1  # of this step's prompt logprobs
            tokens = result.sampled[i]
            drafts = len(req.spec_token_ids)
            if drafts:
                accepted = len(tokens) - 1
                req.spec_proposed += drafts
                req.spec_accepted += accepted
                req.spec_drafts += 1
                self._counters["spec_num_drafts"] += 1
                self._counters["spec_proposed_tokens"] += drafts
                self._counters["spec_accepted_tokens"] += accepted
                req.clear_drafts()
                # The KV of rejected drafts is garbage: uncount it, free emptied blocks.
                req.num_computed_tokens += sched.num_new_tokens[i] - (drafts - accepted)
                self.kv.trim(req.request_id, req.num_computed_tokens + 1)
            else:
                req.num_computed_tokens += sched.num_new_tokens[i]
            self.kv.cache_blocks(req)
            if result.prompt_logprobs[i] is not None:
                # After a recompute, positions collected before the preemption come again.
                known = len(req.prompt_logprobs) - first_position
                req.prompt_logprobs.extend(result.prompt_logprobs[i][max(0, known):])
            if tokens is None:
                continue
            group = self._seq_to_group[req.request_id]
            touched[group.request_id] = group
            try:
                for j, token in enumerate(tokens):
                    lp = result.logprobs[i][j] if result.logprobs[i] is not None else None
                    self._apply_token(req, group, token, lp, now)
                    if req.is_finished:
                        break
            except Exception as exc:  # fail this request only; the batch goes on
                logger.exception("request %s failed", req.request_id)
                group.error = f"{type(exc).__name__}: {exc}"
                for seq in group.seqs:
                    if not seq.is_finished:
                        self.scheduler.finish(seq, RequestStatus.FINISHED_ERROR)
                continue
            if req.is_finished:
                self.scheduler.finish(req, req.status)
        if self.compression is not None:
            self._compress(sched.requests, computed_before)
        outputs = []
        for group in touched.values():
            if group.finished:
                outputs.append(self._make_output(group))
                self._forget(group)
            elif group.stream:
                outputs.append(self._make_output(group))
        return outputs

    def _compress(self, reqs: list[Request], computed_before: list[int]) -> None:
        """Bring every running request that passed its KV budget back to it; the blocks
        past the budget return to the pool."""
        comp = self.compression
        for req, before in zip(reqs, computed_before):
            kv_len = req.num_kv_tokens
            if req.is_finished or not comp.due(kv_len, before, req.num_computed_tokens, req.num_prompt_tokens):
                continue
            self.runner.compress(self.kv.block_table(req.request_id), kv_len)
            req.num_evicted_tokens += kv_len - comp.budget
            self._counters["kv_evicted_tokens"] += kv_len - comp.budget
            self.kv.trim(req.request_id, comp.budget)

    def _propose(self) -> None:
        """Draft tokens for every decoding request that speculates, within what it may
        still generate (the verified step adds one token of its own); none at all while the
        batch is past `disable_by_batch_size`. Drafts from a step that did not run them are
        dropped either way."""
        paused = len(self.scheduler.running) > self.spec.disable_by_batch_size
        todo: list[tuple[Request, int]] = []
        for req in self.scheduler.running:
            req.clear_drafts()
            if paused:
                continue
            k = req.params.num_speculative_tokens
            k = self.spec.num_speculative_tokens if k is None else min(k, self.spec.num_speculative_tokens)
            room = min(req.max_tokens - req.num_output_tokens, self.max_model_len - req.num_tokens) - 1
            if k > 0 and room > 0 and req.is_decoding and speculation_allowed(req.params, req):
                todo.append((req, min(k, room)))
        if isinstance(self.proposer, NgramProposer):
            for req, k in todo:
                req.set_drafts(self.proposer.propose(req.all_token_ids, k))
        else:
            self._draft_with_model(todo)

    def _draft_with_model(self, todo: list[tuple[Request, int]]) -> None:
        """A draft model writes K/V for the nodes it feeds: give them slots first (skipping
        requests whose slots do not fit), save the prefix blocks that evicted, then draft."""
        ready = []
        for req, k in todo:
            need = req.num_tokens + self.proposer.slots_written(k)
            if self.kv.can_allocate(req.request_id, need):
                self.kv.allocate(req.request_id, need)
                ready.append((req, k))
        if not ready:
            return
        saves, _ = self.kv.take_tier_copies()
        if saves:
            self.runner.move_kv([], saves, [], [])
        self.proposer.propose([r for r, _ in ready], [k for _, k in ready],
                              [self.kv.block_table(r.request_id) for r, _ in ready])

    def _apply_token(self, req: Request, group: _Group, token: int, logprobs, now: float) -> None:
        """Append a sampled token, detokenize it and decide whether the request is done."""
        if req.first_token_time is None:
            req.first_token_time = now
            if req is group.seqs[0]:  # n samples share one prompt
                self._counters["prompt_tokens_total"] += req.num_prompt_tokens
        req.append_token(token)
        self._counters["generation_tokens_total"] += 1
        if logprobs is not None:
            req.logprobs.append(logprobs)
            req.cumulative_logprob += logprobs[token].logprob
        req.check_stop()
        if req.status is not RequestStatus.FINISHED_STOPPED:  # a stop token adds no text
            stop_str = req.detokenizer.update([token])
            if stop_str is not None:
                req.status, req.stop_reason = RequestStatus.FINISHED_STOPPED, stop_str

    def _release(self, req: Request, status: RequestStatus) -> None:
        self.scheduler.finish(req, status)
        self._seq_to_group.pop(req.request_id, None)

    def _forget(self, group: _Group) -> None:
        self._groups.pop(group.request_id, None)
        for req in group.seqs:
            self._seq_to_group.pop(req.request_id, None)
        self._counters["requests_finished_total"] += 1

    def _make_output(self, group: _Group) -> RequestOutput:
        first = group.seqs[0]
        completions = []
        for i, req in enumerate(group.seqs):
            # flush() releases held-back text and any bytes of an unfinished character.
            if group.error is not None:
                delta = ""  # the failure may be in the detokenizer itself
            else:
                delta = req.detokenizer.flush() if req.is_finished else req.detokenizer.get_delta()
            completions.append(CompletionOutput(
                index=i,
                text=req.detokenizer.output_text,
                token_ids=list(req.output_token_ids),
                finish_reason=req.status.value if req.is_finished else None,
                stop_reason=req.stop_reason,
                logprobs=req.logprobs,
                cumulative_logprob=req.cumulative_logprob if req.logprobs is not None else None,
                delta_text=delta if group.stream else "",
            ))
        return RequestOutput(
            request_id=group.request_id,
            prompt=group.prompt,
            prompt_token_ids=first.prompt_token_ids,
            outputs=completions,
            finished=group.finished,
            prompt_logprobs=first.prompt_logprobs,
            metrics=RequestMetrics(first.arrival_time, first.first_scheduled_time,
                                   first.first_token_time, first.finished_time),
            error=group.error,
            num_cached_tokens=first.num_cached_tokens,
            spec_proposed_tokens=sum(r.spec_proposed for r in group.seqs),
            spec_accepted_tokens=sum(r.spec_accepted for r in group.seqs),
            spec_num_drafts=sum(r.spec_drafts for r in group.seqs),
        )

    # ---- introspection -----------------------------------------------------------------
    def get_metrics(self) -> dict[str, float]:
        return {
            "model_weight_bytes": self.runner.model.weight_bytes(),
            "kv_bytes_per_token": self.runner.kv_bytes_per_token,
            "kv_blocks_total": self.kv.num_blocks,
            "kv_blocks_free": self.kv.num_free_blocks,
            "kv_cache_usage": self.kv.usage,
            "num_preemptions": self.scheduler.num_preemptions,
            "num_policy_preemptions": self.scheduler.num_policy_preemptions,
            "prefix_cache_query_tokens": self.scheduler.prefix_cache_query_tokens,
            "prefix_cache_hit_tokens": self.scheduler.prefix_cache_hit_tokens,
            "num_requests_running": len(self.scheduler.running),
            "num_requests_waiting": len(self.scheduler.waiting),
            "num_requests_swapped": len(self.scheduler.swapped),
            "num_swapped_blocks": self.kv.num_swapped_blocks,
            "num_swap_out_blocks": self.kv.num_swap_outs,
            "num_cpu_cached_blocks": self.kv.num_cpu_cached_blocks,
            "num_offloaded_blocks": self.kv.num_offloaded_blocks,
            "num_restored_blocks": self.kv.num_restored_blocks,
            **self._counters,
            "spec_acceptance_rate": (self._counters["spec_accepted_tokens"]
                                     / max(1, self._counters["spec_proposed_tokens"])),
            "spec_mean_accepted_length": (self._counters["spec_accepted_tokens"]
                                          / max(1, self._counters["spec_num_drafts"])),
        }
