"""Attention over the paged KV cache, and the per-step metadata that drives it.

The model never sees requests: the model runner builds one `AttentionMetadata` per step
and installs it with `attention_context(...)`; each attention layer reads it from there.
A backend is anything with `forward(q, k, v, kv_cache, meta, scale)`; `TorchPagedAttention`
is the plain-torch reference used on CPU, and GPU kernels plug in behind the same call.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F


@dataclass
class PrefillSlice:
    """One request's chunk of new tokens within the flat batch."""

    start: int  # first row in the flat token batch
    num_new: int  # tokens in this chunk
    context_len: int  # cached tokens before the chunk + num_new
    block_index: torch.Tensor | None  # cache blocks holding the context, None if nothing cached


@dataclass
class DecodeGroup:
    """Consecutive decode rows (one new token each) of similar context length."""

    start: int  # first row in the flat token batch
    num: int  # rows in the group
    block_index: torch.Tensor  # [num * max_blocks] cache blocks to read, row-major
    mask: torch.Tensor  # [num, 1, 1, max_blocks * block_size] additive: 0 or -inf


@dataclass
class AttentionMetadata:
    """Built once per step. Rows are ordered decode groups first, then prefill chunks."""

    slot_mapping: torch.Tensor  # [num_tokens] cache slot each new token's K/V goes to
    block_size: int
    decodes: list[DecodeGroup]
    prefills: list[PrefillSlice]


class AttentionBackend(Protocol):
    def forward(
        self,
        q: torch.Tensor,  # [T, H, D]
        k: torch.Tensor,  # [T, KV, D]
        v: torch.Tensor,  # [T, KV, D]
        kv_cache: torch.Tensor,  # [2, num_slots, KV, D]
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor: ...  # [T, H, D]


_current: AttentionMetadata | None = None


@contextlib.contextmanager
def attention_context(meta: AttentionMetadata) -> Iterator[None]:
    global _current
    prev, _current = _current, meta
    try:
        yield
    finally:
        _current = prev


def current_attention_metadata() -> AttentionMetadata:
    if _current is None:
        raise RuntimeError("attention called outside attention_context()")
    return _current


class TorchPagedAttention:
    """Reference paged attention in plain torch.

    K/V are gathered from the cache a whole block at a time into workspace buffers that
    are reused by every layer and step (fresh multi-MB tensors cost page faults on every
    call). Each group of decodes runs as one SDPA call with the GQA group folded into the query length:
    a [G, L] problem per KV head instead of G separate [1, L] ones, which CPU kernels run
    several times faster. Prefill chunks run one SDPA each: causal over the fresh K/V when
    nothing is cached yet, otherwise over the gathered context with an offset causal mask.
    """

    def __init__(self) -> None:
        self._k_ws = torch.empty(0)
        self._v_ws = torch.empty(0)

    def _gather(self, kv_cache: torch.Tensor, blocks: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of `blocks`, as [len(blocks) * block_size, KV, D] views into the workspace."""
        _, slots, num_kv, head_dim = kv_cache.shape
        row = block_size * num_kv * head_dim
        n = blocks.numel()
        if self._k_ws.numel() < n * row or self._k_ws.dtype != kv_cache.dtype:
            self._k_ws = torch.empty(n * row, dtype=kv_cache.dtype)
            self._v_ws = torch.empty(n * row, dtype=kv_cache.dtype)
        k = torch.index_select(kv_cache[0].view(-1, row), 0, blocks, out=self._k_ws[: n * row].view(n, row))
        v = torch.index_select(kv_cache[1].view(-1, row), 0, blocks, out=self._v_ws[: n * row].view(n, row))
        shape = (n * block_size, num_kv, head_dim)
        return k.view(shape), v.view(shape)

    def forward(self, q, k, v, kv_cache, meta, scale):
        kv_cache[0].index_copy_(0, meta.slot_mapping, k)
        kv_cache[1].index_copy_(0, meta.slot_mapping, v)
        out = torch.empty_like(q)
        num_heads, num_kv, head_dim = q.shape[1], k.shape[1], q.shape[2]
        group = num_heads // num_kv

        for g in meta.decodes:
            rows = slice(g.start, g.start + g.num)
            kd, vd = self._gather(kv_cache, g.block_index, meta.block_size)
            o = F.scaled_dot_product_attention(
                q[rows].view(g.num, num_kv, group, head_dim),
                kd.view(g.num, -1, num_kv, head_dim).transpose(1, 2),
                vd.view(g.num, -1, num_kv, head_dim).transpose(1, 2),
                attn_mask=g.mask,
                scale=scale,
            )
            out[rows] = o.reshape(g.num, num_heads, head_dim)

        for p in meta.prefills:
            rows = slice(p.start, p.start + p.num_new)
            qp = q[rows].transpose(0, 1).unsqueeze(0)  # [1, H, n, D]
            if p.block_index is None:
                kp, vp = k[rows], v[rows]
                mask, causal = None, True
            else:
                kp, vp = self._gather(kv_cache, p.block_index, meta.block_size)
                kp, vp = kp[: p.context_len], vp[: p.context_len]
                offset = p.context_len - p.num_new
                mask = _offset_causal_mask(p.num_new, p.context_len, offset, q.device)
                causal = False
            o = F.scaled_dot_product_attention(
                qp,
                kp.transpose(0, 1).unsqueeze(0),
                vp.transpose(0, 1).unsqueeze(0),
                attn_mask=mask,
                is_causal=causal,
                scale=scale,
                enable_gqa=group > 1,
            )
            out[rows] = o.squeeze(0).transpose(0, 1)
        return out


def _offset_causal_mask(num_q: int, num_k: int, offset: int, device: torch.device) -> torch.Tensor:
    """Query i (absolute position offset+i) may attend keys 0..offset+i."""
    qpos = torch.arange(num_q, device=device).unsqueeze(1) + offset
    kpos = torch.arange(num_k, device=device).unsqueeze(0)
    return kpos <= qpos
