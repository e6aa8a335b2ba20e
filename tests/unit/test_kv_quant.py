"""8-bit KV cache: quantize/dequantize round trips within their rounding bounds, and paged
attention over an int8 / fp8 cache within tolerance of the float cache."""

from __future__ import annotations

import pytest
import torch

from servelm.model.batch import SeqChunk, build_step_batch
from servelm.ops.attention import TorchPagedAttention
from servelm.ops.kv_quant import QuantizedKV, dequantize_kv, quantize_kv


def test_int8_round_trip_is_within_half_a_step():
    x = torch.randn(50, 3, 64) * torch.rand(50, 3, 1) * 10
    q, s = quantize_kv(x, torch.int8)
    assert q.dtype == torch.int8 and s.shape == (50, 3)
    err = (dequantize_kv(q, s, torch.float32) - x).abs()
    assert (err <= s.unsqueeze(-1) / 2 + 1e-6).all()
    assert (q.abs().amax(-1) == 127).all()  # the range is used in full


def test_fp8_round_trip_is_within_e4m3_precision():
    x = torch.randn(50, 3, 64) * 5
    q, s = quantize_kv(x, torch.float8_e4m3fn)
    back = dequantize_kv(q, s, torch.float32)
    # e4m3 keeps 3 mantissa bits: relative error <= 2^-4 for normal values; values far
    # below the row's maximum fall into subnormals, whose step is 2^-9 of the scale unit.
    bound = torch.maximum(x.abs() / 16, s.unsqueeze(-1) * 2.0**-10)
    assert ((back - x).abs() <= bound + 1e-6).all()


def test_zero_rows_stay_zero():
    q, s = quantize_kv(torch.zeros(2, 1, 8), torch.int8)
    assert torch.equal(dequantize_kv(q, s, torch.float32), torch.zeros(2, 1, 8))


@pytest.mark.parametrize("store", [torch.int8, torch.float8_e4m3fn])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_attention_over_an_8bit_cache_is_close_to_float(store, dtype):
    torch.manual_seed(0)
    heads, num_kv, dim, bs, blocks = 4, 2, 32, 4, 32
    lens = [9, 1, 13]  # cached tokens per sequence before this step
    tables = [[5, 2, 9, 30], [7, 8], [1, 3, 11, 20, 4]]
    float_cache = torch.zeros(2, blocks * bs, num_kv, dim, dtype=dtype)
    quant = QuantizedKV(torch.zeros(2, blocks * bs, num_kv, dim, dtype=store),
                        torch.zeros(2, blocks * bs, num_kv, dtype=torch.float32))
    backend = TorchPagedAttention()

    def run(chunks, cache):
        batch = build_step_batch(chunks, tables, bs, dtype)
        n = batch.input_ids.numel()
        g = torch.Generator().manual_seed(n)
        q, k, v = (torch.randn(n, h, dim, generator=g).to(dtype) for h in (heads, num_kv, num_kv))
        return backend.forward(q, k, v, cache, batch.attn, dim**-0.5)

    prefill = [SeqChunk(list(range(n)), 0) for n in lens]
    steps = [prefill, [SeqChunk([1], n) for n in lens], [SeqChunk([1, 2, 3], n + 1) for n in lens]]
    for chunks in steps:  # prefill, one decode, then a chunk over the cached context
        ref, out = run(chunks, float_cache), run(chunks, quant)
        tol = 0.03 if store == torch.int8 else 0.08
        assert (out.float() - ref.float()).abs().max() < tol * ref.float().abs().max()
