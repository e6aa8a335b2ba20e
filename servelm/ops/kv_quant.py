"""A KV cache stored in 8 bits: int8 or fp8 (e4m3) values with one float32 scale per
token and KV head.

Why per token and head rather than per block: a block fills one token at a time, so a
block-wide scale would be fixed before the block's largest value arrives, and a later
outlier would force requantizing every earlier token. A per-(token, head) scale is set
once, when that token's K/V is written. With head_dim 64 it costs 4 bytes per 64 values
(6%), and K's outlier channels stay confined to their own token's row.

Every reader sees the dequantized values, including the chunk that wrote them: attention
over freshly computed K/V first rounds them the way the cache stores them, so the output
does not depend on how a prompt was chunked or whether it hit the prefix cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

STORAGE_DTYPES = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}
_QMAX = {torch.int8: 127.0, torch.float8_e4m3fn: 448.0}
_TINY = 1e-12  # scale floor, so an all-zero row quantizes to zeros instead of NaN


@dataclass
class QuantizedKV:
    """One layer's cache: `data` [2, slots, KV, D] int8/fp8, `scales` [2, slots, KV] float32
    (index 0 is K, 1 is V)."""

    data: torch.Tensor
    scales: torch.Tensor

    def write(self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store K/V [T, KV, D] at `slots`, K and V in one pass; returns what was stored,
        ([2, T, KV, D] values, [2, T, KV] scales), for a caller that reads them back."""
        q, s = quantize_kv(torch.stack((k, v)), self.data.dtype)
        as_bytes(self.data).index_copy_(1, slots, as_bytes(q))
        self.scales.index_copy_(1, slots, s)
        return q, s


def quantize_kv(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] float -> (values [..., D] in `dtype`, scales [...] float32)."""
    xf = x.float()
    scales = (xf.abs().amax(-1) / _QMAX[dtype]).clamp_min_(_TINY)
    scaled = xf / scales.unsqueeze(-1)
    if dtype == torch.int8:
        return scaled.round_().clamp_(-127, 127).to(torch.int8), scales
    return scaled.to(dtype), scales


def dequantize_kv(q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q.float() * scales.unsqueeze(-1)).to(dtype)


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """A view that CPU copy kernels accept: several (index_copy_, index_put_) have no fp8
    version, and copying bytes is the same thing."""
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


FLOAT_STORAGE = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def storage_dtype(kv_cache_dtype: str, compute_dtype: torch.dtype) -> torch.dtype:
    """What the cache holds for a resolved kv_cache_dtype ("auto": the compute dtype)."""
    return STORAGE_DTYPES.get(kv_cache_dtype) or FLOAT_STORAGE.get(kv_cache_dtype, compute_dtype)


def is_8bit(store: torch.dtype) -> bool:
    """Whether a cache of `store` values keeps a scale per (token, head) (QuantizedKV)."""
    return store in _QMAX
