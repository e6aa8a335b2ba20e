"""LLMEngine: add requests, call `step()` until done. The synchronous core of servelm.

It only wires four parts together, each the owner of its own state:
input processing (tokenize, validate, one `Request` per sample), the `Scheduler` (request
state and the KV cache manager), the `Executor` (the workers: model, KV tensors), and the
`OutputProcessor` (samples grouped back into `RequestOutput`s).
"""

from __future__ import annotations

import gc
import logging
import time
from collections import deque
from collections.abc import Sequence

from servelm.config import EngineConfig
from servelm.engine.detokenizer import IncrementalDetokenizer
from servelm.engine.handoff import RequestHandoff, export_request, import_request
from servelm.engine.length_predictor import LengthPredictor
from servelm.engine.output_processor import OutputProcessor, RequestGroup
from servelm.engine.policies import Policy
from servelm.engine.request import Request, RequestStatus
from servelm.engine.scheduler import Scheduler
from servelm.engine.structured import StructuredOutputs
from servelm.executor import Executor, make_executor
from servelm.kv.manager import KVCacheManager, cdiv
from servelm.model.loader import load_tokenizer
from servelm.outputs import RequestOutput
from servelm.sampling_params import SamplingParams
from servelm.step_io import SchedulerOutput

logger = logging.getLogger("servelm")

PromptInput = str | list[int] | dict


class LLMEngine:
    def __init__(self, config: EngineConfig, executor: Executor | None = None) -> None:
        self.config = config
        t0 = time.monotonic()
        self.executor = executor or make_executor(config)
        # After the weights: loaded first, the tokenizer left ~70 MB more resident on the
        # default model (glibc kept the heap pages the weights' load freed above it).
        self.tokenizer = None if config.skip_tokenizer_init else load_tokenizer(config.tokenizer or config.model)
        info = self.worker_info = self.executor.info
        self.arch, self.model_source, self.max_model_len = info.arch, info.model_source, info.max_model_len
        eos = None if self.tokenizer is None else self.tokenizer.eos_token_id
        self.eos_token_ids = info.arch.eos_token_ids or (() if eos is None else (int(eos),))
        self.structured = StructuredOutputs(self.tokenizer, info.arch.vocab_size, self.eos_token_ids)
        kv = KVCacheManager(info.num_kv_blocks, config.block_size, config.enable_prefix_caching,
                            info.num_swap_blocks, info.num_offload_blocks)
        self.scheduler = Scheduler(kv, config.max_num_batched_tokens, config.max_num_seqs,
                                   config.preemption_mode,
                                   Policy(config.scheduling_policy, predictor=self._predictor()),
                                   config.spec, self.max_model_len,
                                   num_micro_batches=config.pipeline_parallel_size)
        self.scheduler.builder.grammar_info = self.structured.tokenizer_info
        self._in_flight: deque[SchedulerOutput] = deque()  # submitted, output not collected
        self.outputs = OutputProcessor()
        self.last_step: SchedulerOutput | None = None  # the step the last step() applied
        self.staged_kv: dict[str, int] = {}  # request id -> blocks staged for a migration in
        self.num_steps = 0
        self.allreduce_totals = [0, 0, 0.0]  # tensor parallelism: calls, bytes, seconds
        # Everything made so far (weights' wrappers, tokenizer and GGUF tables) lives as long
        # as the engine: frozen, it is no longer walked by every full garbage collection,
        # which otherwise cost ~15% of batch-1 decode time.
        gc.collect()
        gc.freeze()
        logger.info("servelm engine ready in %.1fs: %s, %d KV blocks of %d tokens, max_model_len %d",
                    time.monotonic() - t0, info.model_source, info.num_kv_blocks, config.block_size,
                    self.max_model_len)

    def _predictor(self) -> LengthPredictor | None:
        """sjf's learned output-length predictor, when one is configured."""
        if self.config.length_predictor is None:
            return None
        predictor = LengthPredictor.load(self.config.length_predictor)
        predictor.check_vocab(self.arch.vocab_size if self.tokenizer is None else len(self.tokenizer))
        return predictor

    # ---- requests in -------------------------------------------------------------------
    def tokenize_prompt(self, prompt: PromptInput) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("prompt: this engine has no tokenizer (skip_tokenizer_init); "
                                 "send prompt_token_ids")
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
        kv = self.scheduler.kv
        if cdiv(len(token_ids) + 1, kv.block_size) > kv.num_blocks:
            raise ValueError(f"prompt of {len(token_ids)} tokens can never fit in the KV cache "
                             f"({kv.num_blocks} blocks of {kv.block_size} tokens)")

    def add_request(self, request_id: str, prompt: PromptInput, params: SamplingParams | None = None,
                    arrival_time: float | None = None, stream: bool = False,
                    priority: int = 0) -> None:
        if not isinstance(priority, int) or isinstance(priority, bool):
            raise ValueError(f"priority must be an integer (lower runs first), got {priority!r}")
        if request_id in self.outputs.groups:
            raise ValueError(f"request_id {request_id!r} is already in use")
        params = params or SamplingParams()
        text, token_ids = self.tokenize_prompt(prompt)
        self.validate_prompt(token_ids)
        if self.tokenizer is None and (params.stop or params.structured_outputs is not None):
            raise ValueError("stop strings and structured_outputs need a tokenizer; this engine "
                             "was started with skip_tokenizer_init")
        grammar = None
        if params.structured_outputs is not None:
            grammar = self.structured.compile(params.structured_outputs)
        if params.logit_bias and max(params.logit_bias) >= self.arch.vocab_size:
            raise ValueError(f"logit_bias token id {max(params.logit_bias)} is out of the vocabulary "
                             f"[0, {self.arch.vocab_size})")
        if params.logit_bias and self.config.spec is not None:
            params = params.clone(num_speculative_tokens=0)  # drafts would be verified without it
        arrival = arrival_time if arrival_time is not None else time.monotonic()
        serialized = (self.structured.serialize(grammar)  # one copy for the n samples
                      if grammar is not None and self.may_draft(params) else None)
        seqs = []
        for i in range(params.n):
            child = params if i == 0 else params.clone(prompt_logprobs=None)
            seed = None if params.seed is None else params.seed + i
            req = Request(f"{request_id}#{i}", token_ids, child, self.eos_token_ids,
                          self.max_model_len, arrival, seed)
            req.detokenizer = IncrementalDetokenizer(self.tokenizer, token_ids, child)
            req.priority, req.sample_index = priority, i
            if grammar is not None:
                self.structured.attach(req, grammar, serialized)
            if seqs and self.config.enable_prefix_caching:
                req.wait_for = seqs[0]  # reuse the first sample's prompt blocks
            seqs.append(req)
        self.outputs.add(RequestGroup(request_id, text, seqs, stream))
        for req in seqs:
            self.scheduler.add(req)

    def may_draft(self, params: SamplingParams) -> bool:
        """Whether a request with these settings may get speculative drafts."""
        return self.config.spec is not None and params.num_speculative_tokens != 0

    def abort_request(self, request_id: str) -> None:
        group = self.outputs.pop(request_id)
        for req in group.seqs if group else ():
            self.scheduler.finish(req, RequestStatus.FINISHED_ABORTED)

    @property
    def num_steps_in_flight(self) -> int:
        """Steps submitted to the workers whose output is not back (pipeline parallelism)."""
        return len(self._in_flight)

    def export_request(self, request_id: str, first_block: int = 0) -> RequestHandoff:
        """Take a decoding request out of this engine, K/V included, to go on elsewhere."""
        return export_request(self, request_id, first_block)

    def import_request(self, handoff: RequestHandoff, stream: bool = True) -> bool:
        """Go on with a request exported by another engine; False: its K/V was recomputed."""
        return import_request(self, handoff, stream)

    # ---- the loop ----------------------------------------------------------------------
    def has_unfinished_requests(self) -> bool:
        return bool(self.outputs.groups)

    def step(self) -> list[RequestOutput]:
        """Schedule, run one forward pass, apply its tokens. Returns outputs for finished
        requests, and for streaming requests that produced something this step.

        With P pipeline stages it first fills the pipeline with up to P micro-batches (each
        of requests not already in flight), then applies the oldest one's output."""
        while len(self._in_flight) < self.config.pipeline_parallel_size:
            step = self.scheduler.schedule()
            if step.is_empty:
                break
            if self.structured.used:
                self.structured.fill(step, self.scheduler.requests)
            self.executor.submit(step)
            self._in_flight.append(step)
            if not step.scheduled:
                break
        if not self._in_flight:
            return []
        step = self.last_step = self._in_flight.popleft()
        try:
            result = self.executor.collect()
        except Exception:  # the workers failed: the other steps in flight are lost too
            self._in_flight.clear()
            self.scheduler.abandon_in_flight()
            raise
        if not step.scheduled:
            return []
        self.num_steps += 1
        for i, value in enumerate(result.allreduce):
            self.allreduce_totals[i] += value
        progressed = self.scheduler.update_from_output(step, result)
        for seq in self.outputs.failed_siblings(progressed):
            self.scheduler.finish(seq, RequestStatus.FINISHED_ERROR)
        return self.outputs.process(progressed)

    def shutdown(self) -> None:
        self.executor.shutdown()

    # ---- introspection -----------------------------------------------------------------
    def get_metrics(self) -> dict[str, float]:
        s, kv, info = self.scheduler, self.scheduler.kv, self.worker_info
        calls, nbytes, seconds = self.allreduce_totals
        counters = {**s.counters, "num_steps": self.num_steps, "allreduce_calls_total": calls,
                    "allreduce_bytes_total": nbytes, "allreduce_seconds_total": seconds,
                    "requests_finished_total": self.outputs.num_finished}
        return {
            "model_weight_bytes": info.model_weight_bytes,
            "kv_bytes_per_token": info.kv_bytes_per_token,
            "kv_blocks_total": kv.num_blocks,
            "kv_blocks_free": kv.num_free_blocks,
            "kv_cache_usage": kv.usage,
            "num_preemptions": s.num_preemptions,
            "num_policy_preemptions": s.num_policy_preemptions,
            "prefix_cache_query_tokens": s.prefix_cache_query_tokens,
            "prefix_cache_hit_tokens": s.prefix_cache_hit_tokens,
            "num_requests_running": len(s.running),
            "num_requests_waiting": len(s.waiting),
            "num_requests_swapped": len(s.swapped),
            "num_swapped_blocks": kv.num_swapped_blocks,
            "num_swap_out_blocks": kv.num_swap_outs,
            "num_cpu_cached_blocks": kv.num_cpu_cached_blocks,
            "num_offloaded_blocks": kv.num_offloaded_blocks,
            "num_restored_blocks": kv.num_restored_blocks,
            **counters,
            "spec_acceptance_rate": counters["spec_accepted_tokens"] / max(1, counters["spec_proposed_tokens"]),
            "spec_mean_accepted_length": counters["spec_accepted_tokens"] / max(1, counters["spec_num_drafts"]),
        }
