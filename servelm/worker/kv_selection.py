"""Which cached tokens a KV compression policy keeps (kv/compression.py says when).

Selection is per layer and KV head: keys carry their RoPE positions, so heads may keep
different tokens at the same cache index.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from servelm.kv.compression import CompressionConfig


def select_kept(cfg: CompressionConfig, kv_len: int, scores: torch.Tensor | None, num_layers: int,
                num_kv_heads: int) -> torch.Tensor:
    """Cache indices to keep, [layers, KV heads, budget], ascending per head.
    `scores` [layers, kv_len, KV heads]: accumulated attention (h2o, snapkv)."""
    b = cfg.budget
    if cfg.method == "streamingllm":
        kept = torch.cat([torch.arange(cfg.sink_tokens), torch.arange(kv_len - (b - cfg.sink_tokens), kv_len)])
        return kept.expand(num_layers, num_kv_heads, b)
    recent = cfg.recent if cfg.method == "h2o" else cfg.window
    s = scores.permute(0, 2, 1)[..., : kv_len - recent].float()  # [L, KV, candidates]
    if cfg.method == "snapkv":  # a kept token brings its neighbours' context along
        pad = cfg.pool_kernel // 2
        s = F.max_pool1d(s.reshape(-1, 1, s.shape[-1]), cfg.pool_kernel, 1, pad).view_as(s)
    hitters = s.topk(b - recent, dim=-1).indices
    tail = torch.arange(kv_len - recent, kv_len, device=s.device).expand(num_layers, num_kv_heads, recent)
    return torch.cat([hitters.sort(-1).values, tail], dim=-1)
