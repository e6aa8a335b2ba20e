"""Attention probabilities accumulated per cached token, for the KV compression policies
that rank tokens by how much attention they draw (H2O, SnapKV).

The fast attention kernels never materialize probabilities, so the scored rows run a
second, plain softmax(q·k) here, after the layer's attention has written this step's K/V.
Scores live in a slot-indexed tensor beside the KV cache ([slots, KV heads] per layer) and
are summed over the query heads that share a KV head; they move with their tokens when
the cache is compacted, swapped or offloaded.
"""

from __future__ import annotations

import torch

from servelm.ops.attention import AttentionMetadata
from servelm.ops.kv_quant import QuantizedKV, dequantize_kv


def _keys(kv_cache: torch.Tensor | QuantizedKV, slots: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if isinstance(kv_cache, QuantizedKV):
        return dequantize_kv(kv_cache.data[0].index_select(0, slots), kv_cache.scales[0].index_select(0, slots),
                             dtype)
    return kv_cache[0].index_select(0, slots)


def accumulate_attention(q: torch.Tensor, kv_cache: torch.Tensor | QuantizedKV, scores: torch.Tensor,
                         meta: AttentionMetadata, scale: float) -> None:
    """q [T, H, D]; scores [slots, KV] float32, added to in place."""
    bs = meta.block_size
    for r in meta.scored:
        ctx = r.first_index + r.num
        idx = torch.arange(ctx, device=q.device)
        slots = r.block_table[idx // bs] * bs + idx % bs
        k = _keys(kv_cache, slots, q.dtype).float()  # [ctx, KV, D]
        num_kv = k.shape[1]
        qr = q[r.start:r.start + r.num].float().view(r.num, num_kv, -1, k.shape[2])  # [n, KV, G, D]
        logits = torch.einsum("nkgd,ckd->kgnc", qr, k) * scale
        causal = idx[None, :] > (r.first_index + torch.arange(r.num, device=q.device))[:, None]  # [n, ctx]
        probs = logits.masked_fill_(causal, float("-inf")).softmax(-1)
        scores.index_add_(0, slots, probs.sum(dim=(1, 2)).T)
