"""Attention over the paged KV cache, and the per-step metadata that drives it.

The model never sees requests: the model runner builds one `AttentionMetadata` per step
and installs it with `attention_context(...)`; each attention layer reads it from there.
A backend is anything with `forward(q, k, v, kv_cache, meta, scale)`; `kv_cache` is a
tensor, or a `QuantizedKV` for an 8-bit cache (ops/kv_quant.py). On CPU,
`CPUKernelPagedAttention` (C decode kernel) is used when a C compiler is available and
`TorchPagedAttention` (plain torch) otherwise; GPU kernels plug in behind the same call.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F

from servelm.ops import cpu_kernels
from servelm.ops.kv_quant import QuantizedKV, dequantize_kv, storage_dtype


@dataclass
class PrefillSlice:
    """One request's chunk of new tokens within the flat batch."""

    start: int  # first row in the flat token batch
    num_new: int  # tokens in this chunk
    context_len: int  # cached tokens before the chunk + num_new
    block_index: torch.Tensor | None  # cache blocks holding the context, None if nothing cached
    mask: torch.Tensor | None = None  # [num_new, context_len] bool (draft trees); None: causal


@dataclass
class DecodeGroup:
    """Consecutive decode rows (one new token each) of similar context length."""

    start: int  # first row in the flat token batch
    num: int  # rows in the group
    block_index: torch.Tensor  # [num * max_blocks] cache blocks to read, row-major
    context_lens: torch.Tensor  # [num] tokens each row attends to
    mask: torch.Tensor | None  # [num, 1, 1, max_blocks * block_size] additive: 0 or -inf
    max_len: int = 0  # a bound on context_lens (kernels size their grid by it)


@dataclass
class PagedPrefills:
    """Every prefill chunk without a tree mask, for kernels that run them all in one call,
    reading even the chunk's own K/V back through the block table."""

    block_tables: torch.Tensor  # [chunks, max_blocks]
    q_starts: torch.Tensor  # [chunks] first row of each chunk in the flat batch
    q_lens: torch.Tensor  # [chunks] new tokens
    context_lens: torch.Tensor  # [chunks] cached tokens before the chunk + new tokens
    max_q_len: int


@dataclass
class ScoredRows:
    """Consecutive rows of one request whose attention probabilities KV compression
    accumulates per cached token (ops/attention_scores.py)."""

    start: int  # first row in the flat token batch
    num: int
    first_index: int  # cache index of the first row; row i attends indices <= first_index + i
    block_table: torch.Tensor  # the request's blocks


@dataclass
class AttentionMetadata:
    """Built once per step. Rows are ordered decode groups first, then prefill chunks."""

    slot_mapping: torch.Tensor  # [num_tokens] cache slot each new token's K/V goes to
    block_size: int
    decodes: list[DecodeGroup]
    prefills: list[PrefillSlice]
    scored: list[ScoredRows] = field(default_factory=list)
    paged_prefills: PagedPrefills | None = None  # built for backends with `pages_prefills`


class AttentionBackend(Protocol):
    def forward(
        self,
        q: torch.Tensor,  # [T, H, D]
        k: torch.Tensor,  # [T, KV, D]
        v: torch.Tensor,  # [T, KV, D]
        kv_cache: torch.Tensor | QuantizedKV,  # [2, num_slots, KV, D]
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
    call). Each group of decodes runs as one SDPA call with the GQA group folded into the
    query length: a [G, L] problem per KV head instead of G separate [1, L] ones, which CPU
    kernels run several times faster. Prefill chunks run one SDPA each: causal over the fresh K/V when
    nothing is cached yet, otherwise over the gathered context with an offset causal mask.
    """

    pads_decodes = True  # decode groups are padded to their longest context
    pages_prefills = False  # reads prefill chunks' metadata from `prefills`, not `paged_prefills`

    def __init__(self, softcap: float | None = None) -> None:
        """`softcap`: scores become softcap * tanh(scores / softcap) before the softmax
        (Gemma 2), computed here since SDPA has no such option."""
        self.softcap = softcap
        self._k_ws = torch.empty(0)
        self._v_ws = torch.empty(0)

    def _gather(self, kv_cache: torch.Tensor | QuantizedKV, blocks: torch.Tensor, block_size: int,
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of `blocks`, as [len(blocks) * block_size, KV, D] in `dtype`: views into
        the workspace, or for an 8-bit cache freshly dequantized tensors."""
        if isinstance(kv_cache, QuantizedKV):
            return self._gather_quantized(kv_cache, blocks, block_size, dtype)
        _, slots, num_kv, head_dim = kv_cache.shape
        row = block_size * num_kv * head_dim
        n = blocks.numel()
        if self._k_ws.numel() < n * row or self._k_ws.dtype != kv_cache.dtype:
            self._k_ws = torch.empty(n * row, dtype=kv_cache.dtype, device=kv_cache.device)
            self._v_ws = torch.empty(n * row, dtype=kv_cache.dtype, device=kv_cache.device)
        k = torch.index_select(kv_cache[0].view(-1, row), 0, blocks, out=self._k_ws[: n * row].view(n, row))
        v = torch.index_select(kv_cache[1].view(-1, row), 0, blocks, out=self._v_ws[: n * row].view(n, row))
        shape = (n * block_size, num_kv, head_dim)
        return k.view(shape).to(dtype), v.view(shape).to(dtype)  # a 16-bit cache under float32

    @staticmethod
    def _gather_quantized(kv: QuantizedKV, blocks: torch.Tensor, block_size: int,
                          dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        _, _, num_kv, head_dim = kv.data.shape
        out = []
        for c in range(2):
            data = kv.data[c].view(-1, block_size * num_kv * head_dim).index_select(0, blocks)
            scales = kv.scales[c].view(-1, block_size * num_kv).index_select(0, blocks)
            out.append(dequantize_kv(data.view(-1, num_kv, head_dim), scales.view(-1, num_kv), dtype))
        return out[0], out[1]

    def forward(self, q, k, v, kv_cache, meta, scale):
        if isinstance(kv_cache, QuantizedKV):
            stored, scales = kv_cache.write(meta.slot_mapping, k, v)
            if any(p.block_index is None for p in meta.prefills):  # they attend the fresh K/V
                k, v = dequantize_kv(stored, scales, k.dtype).unbind(0)
        else:
            if kv_cache.dtype != k.dtype:  # a 16-bit cache: attend to the values as stored
                k, v = k.to(kv_cache.dtype), v.to(kv_cache.dtype)
            kv_cache[0].index_copy_(0, meta.slot_mapping, k)
            kv_cache[1].index_copy_(0, meta.slot_mapping, v)
            k, v = k.to(q.dtype), v.to(q.dtype)
        out = torch.empty_like(q)
        for g in meta.decodes:
            rows = slice(g.start, g.start + g.num)
            out[rows] = self._decode(q[rows], kv_cache, g, meta.block_size, scale)
        for p in meta.prefills:
            rows = slice(p.start, p.start + p.num_new)
            out[rows] = self._prefill(q[rows], k[rows], v[rows], kv_cache, p, meta.block_size, scale)
        return out

    def _decode(self, q: torch.Tensor, kv_cache: torch.Tensor, g: DecodeGroup, block_size: int,
                scale: float) -> torch.Tensor:
        kd, vd = self._gather(kv_cache, g.block_index, block_size, q.dtype)
        num_kv, head_dim = kd.shape[1], kd.shape[2]
        o = self._sdpa(
            q.view(g.num, num_kv, -1, head_dim),
            kd.view(g.num, -1, num_kv, head_dim).transpose(1, 2),
            vd.view(g.num, -1, num_kv, head_dim).transpose(1, 2),
            g.mask, False, scale,
        )
        return o.reshape(q.shape)

    def _prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                 p: PrefillSlice, block_size: int, scale: float) -> torch.Tensor:
        if p.block_index is not None:
            k, v = self._gather(kv_cache, p.block_index, block_size, q.dtype)
            k, v = k[: p.context_len], v[: p.context_len]
        if p.mask is not None:
            mask, causal = p.mask, False
        elif p.block_index is None:
            mask, causal = None, True
        else:
            mask = _offset_causal_mask(p.num_new, p.context_len, p.context_len - p.num_new, q.device)
            causal = False
        o = self._sdpa(
            q.transpose(0, 1).unsqueeze(0),  # [1, H, n, D]
            k.transpose(0, 1).unsqueeze(0),
            v.transpose(0, 1).unsqueeze(0),
            mask, causal, scale,
        )
        return o.squeeze(0).transpose(0, 1)

    def _sdpa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
              causal: bool, scale: float) -> torch.Tensor:
        """SDPA over [B, H, n, D] queries and [B, KV, L, D] keys and values (KV dividing H);
        `mask` bool (True: attend) or additive; `causal` aligns the queries to the last keys."""
        if self.softcap is None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale,
                                                  enable_gqa=q.shape[1] != k.shape[1])
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        s = (q.float() @ k.float().transpose(-1, -2)) * scale
        s = torch.tanh(s / self.softcap) * self.softcap
        if causal:
            n, length = s.shape[-2:]
            mask = torch.ones(n, length, dtype=torch.bool, device=s.device).tril(length - n)
        if mask is not None:
            s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask
        return s.softmax(-1).to(q.dtype) @ v


class CPUKernelPagedAttention(TorchPagedAttention):
    """Decodes through the C kernel (ops/csrc), which reads K/V in place via the block
    table: no gather, no padding. Prefill chunks stay on SDPA, whose GEMM-based kernel is
    faster when many query rows share one context."""

    pads_decodes = False

    def _decode(self, q, kv_cache, g, block_size, scale):
        tables = g.block_index.view(g.num, -1)
        if isinstance(kv_cache, QuantizedKV):
            return cpu_kernels.paged_attention(q, kv_cache.data, tables, torch.arange(g.num), g.context_lens,
                                               block_size, scale, kv_scales=kv_cache.scales)
        return cpu_kernels.paged_attention(q, kv_cache, tables, torch.arange(g.num), g.context_lens,
                                           block_size, scale)


def select_backend(dtype: torch.dtype, num_heads: int, num_kv_heads: int, head_dim: int,
                   kv_cache_dtype: str = "auto", softcap: float | None = None) -> AttentionBackend:
    """The CPU backend; kv_cache_dtype as resolved by the worker (float32, bfloat16, int8,
    fp8, or auto for the compute dtype). The C kernel has no score soft-capping. CUDA's
    backend is ops/gpu/backend.py."""
    if softcap is not None:
        return TorchPagedAttention(softcap)
    store = storage_dtype(kv_cache_dtype, dtype)
    if cpu_kernels.supports(dtype, num_heads, num_kv_heads, head_dim, None if store == dtype else store):
        return CPUKernelPagedAttention()
    return TorchPagedAttention()


def _offset_causal_mask(num_q: int, num_k: int, offset: int, device: torch.device) -> torch.Tensor:
    """Query i (absolute position offset+i) may attend keys 0..offset+i."""
    qpos = torch.arange(num_q, device=device).unsqueeze(1) + offset
    kpos = torch.arange(num_k, device=device).unsqueeze(0)
    return kpos <= qpos
