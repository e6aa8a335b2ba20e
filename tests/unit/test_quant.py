"""Weight-only int8/int4: the rounding error stays within half a step of each scale, and
the packed kernels' matmuls stay within the bound that rounding implies against the float
weights they came from."""

from __future__ import annotations

import pytest
import torch

from servelm.ops.quant import embedding, linear, quantize, quantize_int4, quantize_int8


def weights(n: int = 64, k: int = 128) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(n, k, generator=g)
    w[3] *= 20  # a row with a far larger range must not hurt the others
    return w


def test_int8_round_trip_is_within_half_a_step():
    w = weights()
    q = quantize_int8(w)
    step = q.scales[:, None]
    assert ((q.q.float() * step - w).abs() <= step / 2 + 1e-6).all()
    assert q.q.dtype == torch.int8 and q.nbytes < w.nbytes / 3.5


@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_matmul_is_within_the_rounding_bound(group):
    """|x (w - w_q)^T| <= sum_k |x_k| s_k / 2 for every row: a bound from the float weights,
    independent of the packed layout."""
    w = weights()
    q = quantize_int4(w, group)
    x = torch.randn(5, w.shape[1], generator=torch.Generator().manual_seed(1))
    scales = q.scales_and_zeros[..., 0].t().float()  # [N, K / group]
    half_step = scales.repeat_interleave(group, dim=1) / 2  # [N, K]
    bound = x.abs() @ half_step.t() + 1e-4
    assert ((linear(x, q) - x @ w.t()).abs() <= bound).all()
    assert q.nbytes < w.nbytes / 5  # 4 bits of 32, plus a scale and zero per group


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_matmul_and_lookup_match_the_dequantized_weights(dtype):
    w = weights().to(dtype)
    q = quantize_int8(w)
    deq = q.q.float() * q.scales.float()[:, None]
    x = torch.randn(2, 3, w.shape[1]).to(dtype)
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    out = linear(x, q, torch.ones(w.shape[0], dtype=dtype))
    assert out.shape == (2, 3, w.shape[0])
    torch.testing.assert_close(out.float(), x.float() @ deq.t() + 1, rtol=tol, atol=tol * 20)
    ids = torch.tensor([3, 0, 3])
    torch.testing.assert_close(embedding(ids, q).float(), deq[ids], rtol=tol, atol=tol)


def test_int4_falls_back_to_a_group_that_divides_and_skips_odd_shapes():
    w = weights(k=96)  # 96 = 3 x 32: 128 and 64 do not divide it
    q = quantize(w, "int4", 128)
    assert q.group_size == 32
    odd = weights(n=40)  # rows not a multiple of 16
    assert quantize(odd, "int4", 32) is odd


def test_gguf_q4_tensors_keep_their_own_4bit_values(tiny_gguf_path):
    """Under int4 a GGUF's Q4_0/Q4_1 weights are packed as stored, not rounded again: the
    kernel's matmul equals one with the file's dequantized weights."""
    from servelm.model.gguf_loader import load_gguf
    from servelm.ops.quant import Int4Groups

    _, kept, _ = load_gguf(tiny_gguf_path, torch.float32, keep_int4=True)
    _, floats, _ = load_gguf(tiny_gguf_path, torch.float32)
    groups = {k: v for k, v in kept.items() if isinstance(v, Int4Groups)}
    assert groups, "the fixture stores some tensors as Q4_0/Q4_1"
    for name, g in groups.items():
        torch.testing.assert_close(g.dequantize(torch.float32), floats[name], rtol=0, atol=1e-6)
        packed = quantize(g, "int4", 128, torch.float32)
        if g.shape[0] % 16 == 0:
            assert packed.group_size == 32
        x = torch.randn(3, g.shape[1])
        torch.testing.assert_close(linear(x, packed), x @ floats[name].t(), rtol=1e-5, atol=1e-5)
