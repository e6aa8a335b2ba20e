"""A worker: the model, its KV cache and the proposer, on one device, driven by plain data.

It loads the weights onto its device (worker/device.py), sizes the KV cache from the memory
budget (on CUDA: what a profiled step leaves of --gpu-memory-utilization), captures the
decode graphs (worker/cuda_graphs.py), and then runs whatever
`SchedulerOutput` it is handed. An executor owns one (in this process) or several (in
others); the engine only ever sees the `WorkerInfo` and the `ModelRunnerOutput`s. As one
rank of tensor/pipeline parallelism it loads and caches only its part of the model
(model/sharding.py); every rank then holds as many KV blocks as the tightest one, so the
engine's block ids mean the same slots everywhere.
"""

from __future__ import annotations

import os

import torch

from servelm.config import EngineConfig
from servelm.distributed.parallel import SINGLE, ParallelContext
from servelm.model.arch import ModelArch
from servelm.model.llama import LlamaForCausalLM
from servelm.model.loader import LoadedModel, block_weights, compute_dtype, kv_storage, load_model
from servelm.model.registry import build_model
from servelm.model.sharding import Shard
from servelm.ops.attention import AttentionBackend, select_backend
from servelm.ops.gpu.backend import TritonPagedAttention
from servelm.ops.quant import METHODS
from servelm.speculative.config import MAX_TREE_NODES, SpecConfig
from servelm.speculative.draft import ModelDrafter, load_draft
from servelm.speculative.eagle import SHAPE_KEYS, load_eagle, target_lm_head
from servelm.speculative.eagle_proposer import EagleProposer
from servelm.speculative.medusa import MedusaProposer, load_heads
from servelm.speculative.ngram import NgramProposer
from servelm.speculative.proposer import Proposer
from servelm.step_io import ModelRunnerOutput, SchedulerOutput, WorkerInfo
from servelm.worker.cache_engine import CacheEngine
from servelm.worker.cpu_memory import keep_freed_memory_in_heap
from servelm.worker.cuda_graphs import DecodeGraphs, capture_sizes, graph_capture
from servelm.worker.device import kv_blocks_for_memory, resolve_device, weights_to
from servelm.worker.kv_cache import KVTensors, kv_bytes_per_token
from servelm.worker.kv_payload import KVPayload, read_blocks, write_blocks
from servelm.worker.memory_profile import non_torch_bytes, peak_step_bytes
from servelm.worker.model_runner import ModelRunner


class Worker:
    def __init__(self, config: EngineConfig, parallel: ParallelContext = SINGLE) -> None:
        torch.set_num_threads(config.num_threads or os.cpu_count() or 1)
        torch.manual_seed(config.seed)
        self.config = config
        self.device = device = resolve_device(config.device, parallel.rank)
        dtype = compute_dtype(config.dtype, config.model, config.quantization, device.type)
        self.kv_dtype = kv = kv_storage(config.kv_cache_dtype, dtype, config.model, config.quantization)
        shard = Shard(parallel.tp_size, parallel.tp_rank, parallel.pp_size, parallel.pp_rank,
                      config.enable_expert_parallel)
        # The tokenizer is the engine's: the worker sees token ids only.
        loaded = load_model(config.model, dtype, keep_blocks=config.quantization != "none",
                            with_tokenizer=False, shard=shard)
        arch, spec = loaded.arch, config.spec
        local = shard.local_arch(arch)  # this rank's heads and layers
        draft = load_draft(spec, loaded, dtype) if spec else None
        for part in (loaded, draft):
            if part is not None:
                part.weights = weights_to(part.weights, device)
        per_block = config.block_size * kv_bytes_per_token(local, dtype, kv)
        # A draft model's cache shares the block tables, so each block also costs its bytes.
        draft_per_block = (config.block_size * kv_bytes_per_token(draft.arch, dtype, kv)
                           if draft else 0)
        attention = self._attention(local, dtype)
        model = self._build_model(loaded, local, attention, dtype, _context_limit(config, arch), parallel)
        num_blocks = parallel.all_reduce_min(config.num_kv_blocks or self._fitting_blocks(
            model, attention, local, dtype, per_block + draft_per_block, parallel))
        max_model_len = _max_model_len(config, arch, num_blocks)
        model.rope.truncate(max_model_len)
        num_swap = int(config.swap_space_gb * 2**30) // per_block if config.preemption_mode == "swap" else 0
        num_offload = int(config.cpu_offload_gb * 2**30) // per_block if config.enable_prefix_caching else 0
        # MoE layers count tokens per expert on the host: no graph can hold that.
        eager = config.enforce_eager or parallel.pp_size > 1 or arch.num_experts > 0
        capture = None if eager else graph_capture(device)
        # With graphs, one block more than the engine gets: the padding rows' scratch space.
        cache = CacheEngine(local, config.block_size, dtype, kv, num_blocks + (capture is not None),
                            num_swap, num_offload, config.compression, device)
        for i, layer in enumerate(model.layers):
            layer.attn.kv_cache = cache.kv.layer(i)
            if cache.kv.scores is not None:
                layer.attn.scores = cache.kv.scores[i, 0]
        proposer = (self._proposer(spec, model, attention, draft, dtype, max_model_len, num_blocks)
                    if spec else None)
        keep_freed_memory_in_heap()  # for the steps; loading gave its temporaries back to the OS
        self.runner = ModelRunner(model, attention, cache, proposer, config.block_size, dtype,
                                  config.compression, device)
        if capture is not None:
            self.runner.graphs = DecodeGraphs(model, capture_sizes(config.max_num_seqs), max_model_len,
                                              config.block_size, num_blocks, device, capture)
        total = parallel.all_reduce_sum  # the figures of all ranks together
        self.info = WorkerInfo(
            arch=arch, model_source=loaded.source,
            max_model_len=max_model_len, num_kv_blocks=num_blocks, num_swap_blocks=num_swap,
            num_offload_blocks=num_offload, kv_bytes_per_token=total(per_block // config.block_size),
            model_weight_bytes=total(model.weight_bytes()),
            decode_weight_bytes=total(model.decode_weight_bytes()))

    def export_request(self, req_id: str, block_ids: list[int]) -> tuple[KVPayload, bytes | None]:
        """A request's K/V in `block_ids` and its generator's state, for another engine."""
        gen = self.runner.states[req_id].generator
        state = None if gen is None else gen.get_state().numpy().tobytes()
        return read_blocks(self.runner.cache.kv, self.runner.block_size, block_ids), state

    def import_kv(self, block_ids: list[int], payload: KVPayload) -> None:
        write_blocks(self.runner.cache.kv, self.runner.block_size, block_ids, payload)

    def execute_model(self, step: SchedulerOutput) -> ModelRunnerOutput:
        return self.runner.execute_model(step)

    def _attention(self, arch: ModelArch, dtype: torch.dtype) -> AttentionBackend:
        """The attention kernels for this device: Triton on CUDA; C or plain torch on CPU."""
        if self.device.type == "cuda":
            return TritonPagedAttention(arch.attn_logit_softcap)
        return select_backend(dtype, arch.num_heads, arch.num_kv_heads, arch.head_dim, self.kv_dtype,
                              arch.attn_logit_softcap)

    def _fitting_blocks(self, model: LlamaForCausalLM, attention: AttentionBackend, arch: ModelArch,
                        dtype: torch.dtype, block_bytes: int, parallel: ParallelContext) -> int:
        """KV blocks the memory budget holds: --kv-cache-memory-gb on CPU; on CUDA what the
        largest step leaves of --gpu-memory-utilization."""
        config = self.config
        if self.device.type == "cpu":
            return max(1, int(config.kv_cache_memory_gb * 2**30) // block_bytes)
        peak = peak_step_bytes(model, attention, arch, config.block_size, dtype, self.kv_dtype,
                               config.max_num_batched_tokens, config.max_num_seqs, parallel, self.device)
        total = torch.cuda.get_device_properties(self.device).total_memory
        return kv_blocks_for_memory(total, config.gpu_memory_utilization,
                                    peak + non_torch_bytes(self.device), block_bytes)

    def _build_model(self, loaded: LoadedModel, arch: ModelArch, attention: AttentionBackend,
                     dtype: torch.dtype, max_model_len: int,
                     parallel: ParallelContext = SINGLE) -> LlamaForCausalLM:
        model = build_model(arch, loaded.weights, attention, dtype, max_model_len, parallel, self.device)
        if self.config.quantization in METHODS:
            model.quantize(self.config.quantization, self.config.quantization_group_size)
        return model

    def _proposer(self, spec: SpecConfig, target: LlamaForCausalLM, attention: AttentionBackend,
                  draft: LoadedModel | None, dtype: torch.dtype, max_model_len: int,
                  num_blocks: int) -> Proposer:
        """The proposer `speculative_config` names; a draft model gets a KV cache of its own
        with the target's block layout."""
        if spec.method == "ngram":
            return NgramProposer(spec.prompt_lookup_min, spec.prompt_lookup_max)
        branching = spec.tree or (1,) * spec.num_speculative_tokens
        if spec.method in ("medusa", "eagle") and not (target.parallel.is_last_stage
                                                      and target.parallel.is_first_stage):
            raise ValueError(f"speculative_config method {spec.method!r} reads the last stage's "
                             "hidden states; it does not run with pipeline_parallel_size > 1")
        if spec.method == "medusa":
            heads = load_heads(spec.model, target.arch.hidden_size, dtype, self.device)
            return MedusaProposer(heads, target.compute_logits, branching)
        if spec.method == "eagle":
            a = target.arch
            shape = dict(zip(SHAPE_KEYS, (a.hidden_size, a.num_heads, a.num_kv_heads, a.head_dim,
                                          a.intermediate_size)))
            eagle = load_eagle(spec.model, shape, a.vocab_size, max_model_len + MAX_TREE_NODES)
            return EagleProposer(eagle, target.embed_tokens, target_lm_head(target), self.device)
        bs = self.config.block_size
        if spec.method == "layer_skip":
            if spec.num_layers >= len(target.layers):
                raise ValueError(f"speculative_config.num_layers must be below the target's "
                                 f"{len(target.layers)} layers, got {spec.num_layers}")

            def forward(ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
                return target(ids, pos, num_layers=spec.num_layers)

            return ModelDrafter(forward, target.compute_logits, bs, dtype, branching, True,
                                attention.pads_decodes, attention.pages_prefills, self.device)
        arch = draft.arch
        backend = self._attention(arch, dtype)
        # A draft model runs whole on every rank: small, and identical on each.
        model = self._build_model(draft, arch, backend, dtype, max_model_len)
        if (self.device.type == "cpu" and self.config.quantization not in METHODS
                and block_weights(self.config.model, self.config.quantization)
                and not block_weights(draft.source, self.config.quantization)):
            # A float draft beside a block-quantized target (a GGUF) would read 4 bytes a
            # weight per drafted token, more than the target's whole step: 8-bit blocks.
            model.quantize("int8", self.config.quantization_group_size)
        cache = KVTensors(arch, num_blocks * bs, dtype, self.kv_dtype, device=self.device)
        for i, layer in enumerate(model.layers):
            layer.attn.kv_cache = cache.layer(i)
        return ModelDrafter(model, model.compute_logits, bs, dtype, branching, False, backend.pads_decodes,
                            backend.pages_prefills, self.device)


def _context_limit(config: EngineConfig, arch: ModelArch) -> int:
    """The longest context the model and config allow, before the KV cache's size caps it."""
    model_limit = min(arch.max_position_embeddings, arch.sliding_window or arch.max_position_embeddings)
    return min(config.max_model_len or model_limit, model_limit)


def _max_model_len(config: EngineConfig, arch: ModelArch, num_blocks: int) -> int:
    """The context window: the model's, capped by what the KV cache holds."""
    cache_tokens = num_blocks * config.block_size
    if config.max_model_len is not None and config.max_model_len > cache_tokens:
        raise ValueError(
            f"max_model_len ({config.max_model_len}) is larger than the KV cache holds "
            f"({num_blocks} blocks x {config.block_size} = {cache_tokens} tokens); "
            "raise num_kv_blocks / kv_cache_memory_gb or lower max_model_len")
    # Within its sliding window, windowed attention equals full attention; servelm has no
    # windowed kernel, so the context is capped at the window instead.
    model_limit = min(arch.max_position_embeddings, arch.sliding_window or arch.max_position_embeddings)
    if config.max_model_len is not None and config.max_model_len > model_limit:
        raise ValueError(f"max_model_len ({config.max_model_len}) exceeds the model's context "
                         f"length ({model_limit})")
    return min(config.max_model_len or model_limit, cache_tokens)
