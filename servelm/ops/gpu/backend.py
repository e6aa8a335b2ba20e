"""The attention backend on CUDA: K/V written with one indexed copy per layer, then the
decode rows and the prefill chunks each in one Triton launch (ops/gpu/paged_attention.py).

Draft-tree chunks (speculative decoding with trees), whose rows attend through a mask
rather than causally, go through the torch reference on the device; they are a few rows.
"""

from __future__ import annotations

import torch

import servelm.ops.gpu.custom_ops  # noqa: F401  (registers torch.ops.servelm.*)
from servelm.ops.attention import AttentionMetadata, TorchPagedAttention
from servelm.ops.kv_quant import QuantizedKV


class TritonPagedAttention:
    pads_decodes = False  # the kernel reads each row's own length
    pages_prefills = True  # chunks arrive as `meta.paged_prefills`

    def __init__(self, softcap: float | None = None) -> None:
        """`softcap`: Gemma 2's cap on attention scores (softcap * tanh(s / softcap))."""
        self.softcap = softcap or 0.0
        self._masked = TorchPagedAttention(softcap)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_cache: torch.Tensor | QuantizedKV, meta: AttentionMetadata,
                scale: float) -> torch.Tensor:
        if isinstance(kv_cache, QuantizedKV):
            kv_cache.write(meta.slot_mapping, k, v)
            (kc, vc), (ks, vs) = kv_cache.data, kv_cache.scales
        else:
            kv_cache[0].index_copy_(0, meta.slot_mapping, k.to(kv_cache.dtype))
            kv_cache[1].index_copy_(0, meta.slot_mapping, v.to(kv_cache.dtype))
            (kc, vc), ks, vs = kv_cache, None, None
        ops = torch.ops.servelm
        out = torch.empty_like(q)
        bs = meta.block_size
        for g in meta.decodes:
            rows = slice(g.start, g.start + g.num)
            out[rows] = ops.paged_decode(q[rows], kc, vc, g.block_index.view(g.num, -1),
                                         g.context_lens, bs, scale, g.max_len, ks, vs, self.softcap)
        p = meta.paged_prefills
        if p is not None:
            ops.paged_extend(q, kc, vc, p.block_tables, p.q_starts, p.q_lens, p.context_lens, bs,
                             scale, p.max_q_len, ks, vs, out, self.softcap)
        for s in meta.prefills:
            if s.mask is not None:  # K/V are in the cache already: read them from there
                rows = slice(s.start, s.start + s.num_new)
                out[rows] = self._masked._prefill(q[rows], k[rows], v[rows], kv_cache, s, bs, scale)
        return out
