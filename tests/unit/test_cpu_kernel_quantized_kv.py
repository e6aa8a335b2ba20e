"""The C paged-attention kernel over a quantized KV cache (int8 / fp8 e4m3 bytes with a
float32 scale per (slot, KV head), or bfloat16 under float32 queries), against float32
attention over the dequantized cache."""

from __future__ import annotations

import pytest
import torch

from servelm.ops import cpu_kernels

if cpu_kernels.load() is None:
    pytest.skip("C attention kernel unavailable (no compiler)", allow_module_level=True)

FP8 = torch.float8_e4m3fn
BS = 16
NUM_BLOCKS = 40
# Rows 2-4 share request 2 (a prefill chunk: one row per new token, growing context).
ROW_REQ = [0, 1, 2, 2, 2, 3, 4]
ROW_CTX = [1, 37, 98, 99, 100, 16, 5]


def quantize(x: torch.Tensor, kv_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [2, slots, KV, D] float32 -> (bytes of kv_dtype, scales [2, slots, KV] float32)."""
    amax = x.abs().amax(-1).clamp_min(1e-8)
    if kv_dtype == torch.int8:
        scales = amax / 127
        data = (x / scales[..., None]).round().clamp(-127, 127).to(torch.int8)
    else:
        scales = amax / 448
        data = (x / scales[..., None]).to(FP8)
    return data, scales.contiguous()


def dequantize(data: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return data.float() * scales[..., None]


def make_inputs(num_heads, num_kv, head_dim, seed=0):
    g = torch.Generator().manual_seed(seed)
    slots = NUM_BLOCKS * BS
    # Per-(token, head) magnitudes spread over ~e^±2 so a misplaced scale shows up.
    mag = torch.randn(2, slots, num_kv, 1, generator=g).mul(0.7).exp()
    kv = torch.randn(2, slots, num_kv, head_dim, generator=g) * mag
    num_reqs = max(ROW_REQ) + 1
    max_blocks = -(-max(ROW_CTX) // BS) + 1  # one spare column: padding is never read
    # Non-contiguous, shuffled blocks per request.
    perm = torch.randperm(NUM_BLOCKS, generator=g)[: num_reqs * max_blocks]
    tables = perm.view(num_reqs, max_blocks).contiguous().to(torch.int64)
    q = torch.randn(len(ROW_REQ), num_heads, head_dim, generator=g) * 2
    row_req = torch.tensor(ROW_REQ, dtype=torch.int64)
    row_ctx = torch.tensor(ROW_CTX, dtype=torch.int64)
    return q, kv, tables, row_req, row_ctx


def reference(q, kv, tables, row_req, row_ctx, scale):
    """float32 attention of each row over positions [0, ctx) of its request; kv: [2, slots, KV, D]."""
    num_heads, num_kv = q.shape[1], kv.shape[2]
    out = []
    for r in range(q.shape[0]):
        pos = torch.arange(int(row_ctx[r]))
        slots = tables[row_req[r], pos // BS] * BS + pos % BS
        k = kv[0, slots].repeat_interleave(num_heads // num_kv, dim=1)  # [L, H, D]
        v = kv[1, slots].repeat_interleave(num_heads // num_kv, dim=1)
        scores = torch.einsum("hd,lhd->hl", q[r].float(), k) * scale
        out.append(torch.einsum("hl,lhd->hd", scores.softmax(-1), v))
    return torch.stack(out)


def assert_matches(out, expected, dtype):
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    atol = tol * max(1.0, expected.abs().max().item())
    torch.testing.assert_close(out.float(), expected, atol=atol, rtol=tol)


SHAPES = [(6, 2, 32), (6, 2, 64), (4, 4, 32), (8, 1, 64)]  # (heads, kv heads, head_dim)


@pytest.mark.parametrize("kv_dtype", [torch.int8, FP8], ids=["int8", "fp8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "h{}kv{}d{}".format(*s))
def test_quantized_kv_matches_dequantized_reference(shape, dtype, kv_dtype):
    num_heads, num_kv, head_dim = shape
    q, kv, tables, row_req, row_ctx = make_inputs(num_heads, num_kv, head_dim)
    data, scales = quantize(kv, kv_dtype)
    q = q.to(dtype)
    scale = head_dim**-0.5
    out = cpu_kernels.paged_attention(q, data, tables, row_req, row_ctx, BS, scale,
                                      kv_scales=scales)
    assert out.dtype == dtype and out.shape == q.shape
    expected = reference(q, dequantize(data, scales), tables, row_req, row_ctx, scale)
    assert_matches(out, expected, dtype)
    # The quantization itself is close to the float cache (sanity check of the test data).
    assert (dequantize(data, scales) - kv).abs().max() < 0.1 * kv.abs().max()


@pytest.mark.parametrize("kv_dtype", [torch.int8, FP8], ids=["int8", "fp8"])
def test_every_byte_value_decodes_exactly(kv_dtype):
    """With one context token the output is exactly that token's dequantized V row, so every
    byte value (bar fp8's two NaN encodings) must decode as `tensor.float()` does."""
    num_kv, head_dim = 2, 128  # 256 values per token
    byte_values = torch.arange(256, dtype=torch.uint8)
    if kv_dtype == FP8:
        byte_values[(byte_values & 0x7F) == 0x7F] = 0  # NaN encodings
    data = torch.zeros(2, BS, num_kv, head_dim, dtype=torch.uint8)
    data[:, 8] = byte_values.view(num_kv, head_dim)
    data = data.view(kv_dtype)
    scales = torch.rand(2, BS, num_kv, generator=torch.Generator().manual_seed(1)) + 0.5
    q = torch.randn(1, 4, head_dim)
    out = cpu_kernels.paged_attention(
        q, data, torch.tensor([[2]]), torch.zeros(1, dtype=torch.int64),
        torch.ones(1, dtype=torch.int64), 4, head_dim**-0.5, kv_scales=scales)  # block 2: slot 8
    expected = dequantize(data, scales)[1, 8].repeat_interleave(2, dim=0)  # [4 heads, D]
    assert torch.equal(out[0], expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_float_cache_path_unchanged(dtype):
    q, kv, tables, row_req, row_ctx = make_inputs(6, 2, 64, seed=2)
    q, cache = q.to(dtype), kv.to(dtype)
    scale = 64**-0.5
    out = cpu_kernels.paged_attention(q, cache, tables, row_req, row_ctx, BS, scale)
    assert out.dtype == dtype
    assert_matches(out, reference(q, cache.float(), tables, row_req, row_ctx, scale), dtype)


def test_float32_queries_over_a_bfloat16_cache():
    q, kv, tables, row_req, row_ctx = make_inputs(6, 2, 64, seed=3)
    cache = kv.to(torch.bfloat16)
    out = cpu_kernels.paged_attention(q, cache, tables, row_req, row_ctx, BS, 64**-0.5)
    assert out.dtype == torch.float32
    assert_matches(out, reference(q, cache.float(), tables, row_req, row_ctx, 64**-0.5), torch.float32)


def test_supports_quantized_kv_dtypes():
    for dtype in (torch.float32, torch.bfloat16):
        assert cpu_kernels.supports(dtype, 6, 2, 64)
        assert cpu_kernels.supports(dtype, 6, 2, 64, None)
        assert cpu_kernels.supports(dtype, 6, 2, 64, dtype)
        for kv_dtype in (torch.int8, FP8):
            assert cpu_kernels.supports(dtype, 6, 2, 64, kv_dtype)
            assert cpu_kernels.supports(dtype, 32, 8, 128, kv_dtype=kv_dtype)
            assert not cpu_kernels.supports(dtype, 65, 1, 64, kv_dtype)  # too many heads
            assert not cpu_kernels.supports(dtype, 64, 64, 128, kv_dtype)  # K/V row too long
    assert cpu_kernels.supports(torch.float32, 6, 2, 64, torch.bfloat16)  # 16-bit cache, float32 q
    # Compute dtypes without a kernel, and caches of no kernel's dtype.
    assert not cpu_kernels.supports(torch.float16, 6, 2, 64, torch.int8)
    assert not cpu_kernels.supports(torch.bfloat16, 6, 2, 64, torch.float32)
    assert not cpu_kernels.supports(torch.float32, 6, 2, 64, torch.float8_e5m2)
