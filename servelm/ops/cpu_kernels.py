"""The C paged-attention kernel for CPU, compiled on first use and called through ctypes.

Why C: on CPU, attention over a paged cache in plain torch must first gather every
request's K/V into a padded tensor, and the SDPA kernels are slow for decode-shaped
problems (a few query rows per KV head). The kernel in csrc/ reads K/V in place through
the block table, each token's K and V row once. It needs only a C compiler with OpenMP (gcc); without
one, `load()` returns None and the engine keeps the torch path (ops/c_build.py).

The cache is either in q's dtype (float32 / bfloat16) or quantized to one byte per value
(int8 or fp8 e4m3) with a float32 scale per (slot, KV head), one kernel per (compute,
cache) dtype pair.
"""

from __future__ import annotations

import ctypes
from functools import lru_cache

import torch

from servelm.ops import c_build

# (compute dtype, cache dtype) -> kernel, for a cache of floats.
_FUNCTIONS = {(torch.float32, torch.float32): "paged_attention_f32",
              (torch.bfloat16, torch.bfloat16): "paged_attention_bf16",
              (torch.float32, torch.bfloat16): "paged_attention_bf16kv_f32"}
_QUANT_FUNCTIONS = {(q, kv): f"paged_attention_{kv_name}_{q_name}"
                    for q, q_name in ((torch.float32, "f32"), (torch.bfloat16, "bf16"))
                    for kv, kv_name in ((torch.int8, "i8"), (torch.float8_e4m3fn, "fp8"))}
_ARGTYPES = [ctypes.c_void_p] * 5 + [ctypes.c_int64] + [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 5 + [ctypes.c_float]
_QUANT_ARGTYPES = _ARGTYPES + [ctypes.c_void_p] * 2  # + k_scales, v_scales


@lru_cache(maxsize=1)
def load() -> ctypes.CDLL | None:
    lib = c_build.load("paged_attention")
    if lib is None:
        return None
    for functions, argtypes in ((_FUNCTIONS, _ARGTYPES), (_QUANT_FUNCTIONS, _QUANT_ARGTYPES)):
        for name in functions.values():
            fn = getattr(lib, name)
            fn.argtypes = argtypes
            fn.restype = ctypes.c_int
    return lib


def paged_attention(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                    row_req: torch.Tensor, row_ctx: torch.Tensor, block_size: int,
                    scale: float, kv_scales: torch.Tensor | None = None) -> torch.Tensor:
    """q: [T, H, D]; kv_cache: [2, slots, KV, D]; block_tables: [R, max_blocks] int64;
    row_req / row_ctx: [T] int64 (request row in block_tables, context length).

    Without kv_scales the cache holds floats: q's dtype, or bfloat16 under float32 q. With
    kv_scales ([2, slots, KV] float32) the cache is int8 or float8_e4m3fn and holds
    kv_cache.float() * kv_scales[..., None]. The output has q's dtype either way."""
    lib = load()
    assert lib is not None
    q = q.contiguous()
    out = torch.empty_like(q)
    num_rows, num_heads, head_dim = q.shape
    num_kv = kv_cache.shape[2]
    args = (block_tables.data_ptr(), block_tables.shape[1], row_req.data_ptr(), row_ctx.data_ptr(),
            num_rows, num_heads, num_kv, head_dim, block_size, scale)
    if kv_scales is None:
        rc = getattr(lib, _FUNCTIONS[q.dtype, kv_cache.dtype])(
            q.data_ptr(), kv_cache[0].data_ptr(), kv_cache[1].data_ptr(), out.data_ptr(), *args)
    else:
        assert (q.dtype, kv_cache.dtype) in _QUANT_FUNCTIONS and kv_cache.is_contiguous(), kv_cache.dtype
        assert kv_scales.dtype == torch.float32 and kv_scales.is_contiguous()
        assert kv_scales.shape == kv_cache.shape[:3], (kv_scales.shape, kv_cache.shape)
        rc = getattr(lib, _QUANT_FUNCTIONS[q.dtype, kv_cache.dtype])(
            q.data_ptr(), kv_cache[0].data_ptr(), kv_cache[1].data_ptr(), out.data_ptr(), *args,
            kv_scales[0].data_ptr(), kv_scales[1].data_ptr())
    if rc != 0:
        raise ValueError(f"C attention kernel supports up to 64 heads and 4096 K/V values per "
                         f"token, got {num_heads} heads and {num_kv * head_dim}")
    return out


def supports(dtype: torch.dtype, num_heads: int, num_kv_heads: int, head_dim: int,
             kv_dtype: torch.dtype | None = None) -> bool:
    """Whether the kernel runs with compute dtype `dtype` over a cache of `kv_dtype` (None:
    the cache has `dtype`; bfloat16 under float32; int8 / float8_e4m3fn: the quantized
    kernel)."""
    cache = dtype if kv_dtype is None else kv_dtype
    known = (dtype, cache) in _FUNCTIONS or (dtype, cache) in _QUANT_FUNCTIONS
    return (known and num_heads <= 64 and num_kv_heads * head_dim <= 4096
            and num_heads * head_dim <= 8192 and load() is not None)
