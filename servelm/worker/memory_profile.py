"""How much GPU memory a step needs besides the KV cache, measured by running the largest one.

Before the KV cache exists the worker runs one forward pass of `max_num_batched_tokens`
prompt tokens (the biggest step the scheduler can send) against a throwaway cache just big
enough for it, then the logits and the sampler's sort for `max_num_seqs` rows. The peak
torch allocation of that, less the throwaway cache, plus what other than torch holds GPU
memory (the CUDA context, NCCL, other processes), is what the cache must leave free.
"""

from __future__ import annotations

import torch

from servelm.distributed.parallel import ParallelContext
from servelm.model.arch import ModelArch
from servelm.model.batch import SeqChunk, build_step_batch
from servelm.model.llama import LlamaForCausalLM
from servelm.ops.attention import AttentionBackend, attention_context
from servelm.worker.kv_cache import KVTensors


@torch.inference_mode()
def peak_step_bytes(model: LlamaForCausalLM, backend: AttentionBackend, arch: ModelArch,
                    block_size: int, dtype: torch.dtype, kv_cache_dtype: str, num_tokens: int,
                    num_logit_rows: int, parallel: ParallelContext, device: torch.device) -> int:
    """Device bytes in use at the peak of the largest step, the cache left out (weights
    included)."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    blocks = -(-num_tokens // block_size)
    cache = KVTensors(arch, blocks * block_size, dtype, kv_cache_dtype, device=device)
    cache_bytes = sum(t.nbytes for t in cache.tensors)
    for i, layer in enumerate(model.layers):
        layer.attn.kv_cache = cache.layer(i)
    batch = build_step_batch([SeqChunk([0] * num_tokens, 0)], [list(range(blocks))], block_size, dtype,
                             backend.pads_decodes, backend.pages_prefills, device)
    residual = None if parallel.is_first_stage else torch.zeros(
        num_tokens, model.arch.hidden_size, dtype=dtype, device=device)
    with attention_context(batch.attn):
        hidden = model(batch.input_ids, batch.positions, residual=residual)
    if parallel.is_last_stage:
        logits = model.compute_logits(hidden[: min(num_logit_rows, num_tokens)])
        logits.softmax(-1).sort(-1, descending=True)  # top-p's copies of the logits
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    for layer in model.layers:
        layer.attn.kv_cache = None
    del cache, batch, hidden
    torch.cuda.empty_cache()
    return peak - cache_bytes


def non_torch_bytes(device: torch.device) -> int:
    """GPU memory in use that torch's allocator does not hold: the CUDA context, NCCL's
    buffers, other processes."""
    free, total = torch.cuda.mem_get_info(device)
    return max(0, total - free - torch.cuda.memory_reserved(device))
