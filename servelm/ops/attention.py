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
    gather_index: torch.Tensor | None  # flat cache slots [context_len], None if no cached prefix


@dataclass
class AttentionMetadata:
    """Built once per step. Rows are ordered decodes first, then prefill chunks."""

    slot_mapping: torch.Tensor  # [num_tokens] cache slot each new token's K/V goes to
    num_decodes: int
    decode_gather_index: torch.Tensor | None  # [num_decodes * max_len] cache slots to read
    decode_mask: torch.Tensor | None  # [num_decodes, 1, 1, max_len] True where attendable
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

    Decodes are batched into one SDPA call over K/V gathered from the cache (padded to the
    longest context, masked). Prefill chunks run one SDPA each: causal over the fresh
    K/V when nothing is cached yet, otherwise over the gathered context with an offset
    causal mask.
    """

    def forward(self, q, k, v, kv_cache, meta, scale):
        k_cache, v_cache = kv_cache[0], kv_cache[1]
        k_cache.index_copy_(0, meta.slot_mapping, k)
        v_cache.index_copy_(0, meta.slot_mapping, v)
        out = torch.empty_like(q)
        num_kv = k.shape[1]
        gqa = q.shape[1] != num_kv

        d = meta.num_decodes
        if d:
            head_dim = q.shape[2]
            kd = k_cache.index_select(0, meta.decode_gather_index).view(d, -1, num_kv, head_dim)
            vd = v_cache.index_select(0, meta.decode_gather_index).view(d, -1, num_kv, head_dim)
            o = F.scaled_dot_product_attention(
                q[:d].unsqueeze(2),  # [d, H, 1, D]
                kd.transpose(1, 2),
                vd.transpose(1, 2),
                attn_mask=meta.decode_mask,
                scale=scale,
                enable_gqa=gqa,
            )
            out[:d] = o.squeeze(2)

        for p in meta.prefills:
            rows = slice(p.start, p.start + p.num_new)
            qp = q[rows].transpose(0, 1).unsqueeze(0)  # [1, H, n, D]
            if p.gather_index is None:
                kp, vp = k[rows], v[rows]
                mask, causal = None, True
            else:
                kp = k_cache.index_select(0, p.gather_index)
                vp = v_cache.index_select(0, p.gather_index)
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
                enable_gqa=gqa,
            )
            out[rows] = o.squeeze(0).transpose(0, 1)
        return out


def _offset_causal_mask(num_q: int, num_k: int, offset: int, device: torch.device) -> torch.Tensor:
    """Query i (absolute position offset+i) may attend keys 0..offset+i."""
    qpos = torch.arange(num_q, device=device).unsqueeze(1) + offset
    kpos = torch.arange(num_k, device=device).unsqueeze(0)
    return kpos <= qpos
