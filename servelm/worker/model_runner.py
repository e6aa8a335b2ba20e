"""Owns the model and the KV tensors; runs one forward pass + sampling per step."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from servelm.config import EngineConfig
from servelm.engine.request import Request
from servelm.model.arch import ModelArch
from servelm.model.registry import build_model
from servelm.ops.attention import ScoredRows, attention_context, select_backend
from servelm.outputs import PositionLogprobs
from servelm.speculative.verify import verify
from servelm.worker.batch import SeqChunk, StepBatch, build_step_batch, slots_of
from servelm.worker.cpu_memory import keep_freed_memory_in_heap
from servelm.worker.kv_cache import KVTensors, kv_bytes_per_token
from servelm.worker.kv_selection import select_kept
from servelm.worker.logprobs import logprobs_for
from servelm.worker.sampler import Sampler, SamplingMetadata


@dataclass
class RunnerOutput:
    """Aligned with the scheduled requests. `sampled[i]` is request i's new tokens: one,
    or with draft tokens the accepted drafts plus one; None when its chunk did not reach
    the end of its tokens (a partial prefill). `logprobs[i]` has one entry per token."""

    sampled: list[list[int] | None]
    logprobs: list[list[PositionLogprobs] | None]
    prompt_logprobs: list[list[PositionLogprobs] | None]


def _chunk(req: Request, n: int) -> SeqChunk:
    """Request `req`'s `n` new tokens this step: after the K/V its cache holds, at their
    true positions when KV compression dropped some; a draft tree, when verified, with its
    positions and attention mask."""
    start = req.num_computed_tokens
    chunk = SeqChunk(req.step_token_ids(start, n), req.num_kv_tokens)
    if req.num_evicted_tokens:
        chunk.positions = list(range(start, start + n))
    tree = req.spec_tree
    if tree is not None and start + n == req.num_tokens + tree.size:
        nodes = range(tree.size + 1)  # the root (the last real token, at `start`) and the tree
        chunk.positions, chunk.tree_mask = tree.positions(start, nodes), tree.mask(start, nodes)
    return chunk


def kv_bytes_per_block(arch: ModelArch, block_size: int, dtype: torch.dtype, kv_cache_dtype: str = "auto") -> int:
    return block_size * kv_bytes_per_token(arch, dtype, kv_cache_dtype)


class ModelRunner:
    def __init__(self, config: EngineConfig, arch: ModelArch, weights: dict[str, torch.Tensor],
                 eos_token_ids: tuple[int, ...], draft_kv_bytes_per_block: int = 0) -> None:
        """`draft_kv_bytes_per_block`: a draft model's cache shares the block tables, so
        each block also costs that much of the KV memory budget."""
        self.config = config
        self.arch = arch
        keep_freed_memory_in_heap()
        self.block_size = config.block_size
        self.dtype = getattr(torch, config.dtype)
        per_block = kv_bytes_per_block(arch, config.block_size, self.dtype, config.kv_cache_dtype)
        self.num_kv_blocks = config.num_kv_blocks or max(
            1, int(config.kv_cache_memory_gb * 2**30) // (per_block + draft_kv_bytes_per_block))
        cache_tokens = self.num_kv_blocks * config.block_size
        if config.max_model_len is not None and config.max_model_len > cache_tokens:
            raise ValueError(
                f"max_model_len ({config.max_model_len}) is larger than the KV cache holds "
                f"({self.num_kv_blocks} blocks x {config.block_size} = {cache_tokens} tokens); "
                "raise num_kv_blocks / kv_cache_memory_gb or lower max_model_len"
            )
        # Within its sliding window, windowed attention equals full attention; servelm has
        # no windowed kernel, so the context is capped at the window instead.
        model_limit = min(arch.max_position_embeddings, arch.sliding_window or arch.max_position_embeddings)
        if config.max_model_len is not None and config.max_model_len > model_limit:
            raise ValueError(f"max_model_len ({config.max_model_len}) exceeds the model's context "
                             f"length ({model_limit})")
        self.max_model_len = min(config.max_model_len or model_limit, cache_tokens)
        self.attention = select_backend(self.dtype, arch.num_heads, arch.num_kv_heads, arch.head_dim,
                                        config.kv_cache_dtype)
        self.model = build_model(arch, weights, self.attention, self.dtype, self.max_model_len)
        if config.quantization:
            self.model.quantize(config.quantization, config.quantization_group_size)
        self.kv_bytes_per_token = per_block // config.block_size  # target model only
        self.compression = config.compression
        self.kv = self._kv_tensors(self.num_kv_blocks, host=False)
        for i, layer in enumerate(self.model.layers):
            layer.attn.kv_cache = self.kv.layer(i)
            if self.kv.scores is not None:
                layer.attn.scores = self.kv.scores[i, 0]
        # Host-memory pools in the same layout: swap space for preemption by swap, and the
        # CPU tier of the prefix cache. `empty`, so pages cost nothing until first written.
        self.num_swap_blocks = (int(config.swap_space_gb * 2**30) // per_block
                                if config.preemption_mode == "swap" else 0)
        self.num_offload_blocks = (int(config.cpu_offload_gb * 2**30) // per_block
                                   if config.enable_prefix_caching else 0)
        self.swap_space = self._kv_tensors(self.num_swap_blocks, host=True)
        self.offload_space = self._kv_tensors(self.num_offload_blocks, host=True)
        self.sampler = Sampler()
        self.eos_token_ids = set(eos_token_ids)  # for min_tokens masking

    def _kv_tensors(self, num_blocks: int, host: bool) -> KVTensors:
        return KVTensors(self.arch, num_blocks * self.block_size, self.dtype, self.config.kv_cache_dtype,
                         host, with_scores=self.compression is not None and self.compression.needs_scores)

    @torch.inference_mode()
    def move_kv(self, swap_out: list[tuple[int, int]], offload: list[tuple[int, int]],
                swap_in: list[tuple[int, int]], restore: list[tuple[int, int]]) -> None:
        """Copy KV blocks between the cache and host memory: (cache, host) pairs out to swap
        space and the CPU tier, then (host, cache) pairs back in.

        Out goes first: a cache block a victim just left, or whose evicted prefix is being
        saved, may be where blocks coming back in land in the same step.
        """
        for src, dst, pairs in ((self.kv, self.swap_space, swap_out),
                                (self.kv, self.offload_space, offload),
                                (self.swap_space, self.kv, swap_in),
                                (self.offload_space, self.kv, restore)):
            if pairs:
                offsets = torch.arange(self.block_size)
                src_slots = (torch.tensor([s for s, _ in pairs])[:, None] * self.block_size + offsets).flatten()
                dst_slots = (torch.tensor([d for _, d in pairs])[:, None] * self.block_size + offsets).flatten()
                src.copy_slots(dst, src_slots, dst_slots)

    @torch.inference_mode()
    def execute(self, requests: list[Request], num_new: list[int], block_tables: list[list[int]]) -> RunnerOutput:
        chunks = [_chunk(req, n) for req, n in zip(requests, num_new)]
        batch = build_step_batch(chunks, block_tables, self.block_size, self.dtype,
                                 split_decodes=self.attention.pads_decodes)
        if self.kv.scores is not None:
            self._mark_scored(batch, requests, num_new, block_tables)
        with attention_context(batch.attn):
            hidden = self.model(batch.input_ids, batch.positions)

        # Rows whose logits we need: the last token of every request that samples, then
        # every prompt position of requests collecting prompt logprobs.
        n = len(requests)
        sample_rows: list[int] = []
        samplers: list[int] = []
        spec_spans: list[tuple[int, int, int]] = []  # (request index, first row, count)
        plp_spans: list[tuple[int, int, int]] = []
        for b, i in enumerate(batch.order):
            req, start = requests[i], batch.row_start[b]
            drafts = len(req.spec_token_ids)
            if req.num_computed_tokens + num_new[i] == req.num_tokens + drafts:
                if drafts:  # verify: the last real token's row and every draft's
                    spec_spans.append((i, start + num_new[i] - drafts - 1, drafts + 1))
                else:
                    samplers.append(i)
                    sample_rows.append(start + num_new[i] - 1)
            if req.wants_prompt_logprobs:
                count = min(num_new[i], req.num_prompt_tokens - 1 - req.num_computed_tokens)
                if count > 0:
                    plp_spans.append((i, start, count))
        spec_rows = [r for _, s, c in spec_spans for r in range(s, s + c)]
        plp_rows = [r for _, s, c in plp_spans for r in range(s, s + c)]
        rows = sample_rows + spec_rows + plp_rows
        logits = self.model.compute_logits(hidden[rows]) if rows else None

        out = RunnerOutput([None] * n, [None] * n, [None] * n)
        if samplers:
            self._sample(logits[: len(samplers)], [requests[i] for i in samplers], samplers, out)
        offset = len(samplers)
        for i, _, count in spec_spans:
            req, rows_i = requests[i], logits[offset : offset + count]
            tokens, path = verify(rows_i, req.spec_token_ids, req.params, req.generator,
                                  req.spec_tree, req.spec_draft_probs)
            out.sampled[i] = tokens
            if req.spec_tree is not None:
                self._compact(block_tables[i], req.num_computed_tokens, path)
            if req.params.logprobs is not None:  # token j is scored by the row of its parent
                out.logprobs[i] = [logprobs_for(rows_i[r : r + 1], [t], req.params.logprobs)[0]
                                   for r, t in zip([0, *path], tokens)]
            offset += count
        for i, _, count in plp_spans:
            req = requests[i]
            first = req.num_computed_tokens + 1
            targets = req.all_token_ids[first : first + count]
            out.prompt_logprobs[i] = logprobs_for(
                logits[offset : offset + count], targets, req.params.prompt_logprobs
            )
            offset += count
        return out

    def _mark_scored(self, batch: StepBatch, requests: list[Request], num_new: list[int],
                     block_tables: list[list[int]]) -> None:
        """Reset the scores of the slots written this step, and name the rows whose
        attention the compression policy accumulates."""
        self.kv.scores.index_fill_(2, batch.attn.slot_mapping, 0.0)
        for b, i in enumerate(batch.order):
            req = requests[i]
            rows = self.compression.scored_rows(req.num_computed_tokens, num_new[i], req.num_prompt_tokens)
            if rows:
                offset, count = rows
                batch.attn.scored.append(ScoredRows(batch.row_start[b] + offset, count,
                                                    req.num_kv_tokens + offset, torch.tensor(block_tables[i])))

    @torch.inference_mode()
    def compress(self, table: list[int], kv_len: int) -> None:
        """Keep the compression budget's worth of a request's `kv_len` cached tokens, per
        layer and head as the policy picks, compacted into its first cache indices."""
        t, bs = torch.tensor(table), self.block_size
        scores = None
        if self.kv.scores is not None:
            scores = self.kv.scores[:, 0].index_select(1, slots_of(t, torch.arange(kv_len), bs))
        keep = select_kept(self.compression, kv_len, scores, self.arch.num_layers, self.arch.num_kv_heads)
        self.kv.gather_per_head(slots_of(t, keep, bs), slots_of(t, torch.arange(keep.shape[-1]), bs))

    def _compact(self, table: list[int], root: int, path: list[int]) -> None:
        """Move the K/V of accepted tree nodes from their node slots (root + node) to the
        slots of their positions (root + depth), so the sequence reads as a plain one.
        Every node index is at least its depth, so no move overwrites a later source."""
        moves = [(root + node, root + depth) for depth, node in enumerate(path, 1) if node != depth]
        if not moves:
            return
        t = torch.tensor(table)
        src, dst = (slots_of(t, torch.tensor(x), self.block_size) for x in zip(*moves))
        self.kv.copy_slots(self.kv, src, dst)

    def _sample(self, logits: torch.Tensor, reqs: list[Request], idx: list[int], out: RunnerOutput) -> None:
        meta = SamplingMetadata.build(
            [r.params for r in reqs],
            [r.prompt_token_ids for r in reqs],
            [r.output_token_ids for r in reqs],
            [r.generator for r in reqs],
            self.eos_token_ids,
            logits.device,
        )
        tokens = self.sampler(logits, meta).tolist()
        for row, (i, req) in enumerate(zip(idx, reqs)):
            out.sampled[i] = [tokens[row]]
            if req.params.logprobs is not None:
                out.logprobs[i] = logprobs_for(logits[row : row + 1], [tokens[row]], req.params.logprobs)

