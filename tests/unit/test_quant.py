"""Block-quantized and bfloat16 weights (ops/quant.py) and their C matmuls (csrc/qgemm.c,
csrc/bgemm.c): rounding stays within half a step of each group's scale, and every matmul
path (SIMD build, portable C build, pure-torch fallback) stays within the bound that
rounding the activations to int8 implies, computed here from the definition, against a
float matmul of the same weights; bfloat16 weights match a float matmul of the bfloat16-
rounded activations."""

from __future__ import annotations

import shutil

import pytest
import torch

from servelm.ops import c_build, qgemm, quant
from servelm.ops.quant import BlockBF16, BlockQ4, BlockQ8, embedding, linear, linear_add, quantize


def weights(n: int = 64, k: int = 128) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(n, k, generator=g)
    w[3] *= 20  # a row with a far larger range must not hurt the others
    return w


def activations(m: int, k: int) -> torch.Tensor:
    return torch.randn(m, k, generator=torch.Generator().manual_seed(1))


def activation_rounding_bound(x: torch.Tensor, w_deq: torch.Tensor) -> torch.Tensor:
    """|(x - round(x)) w^T| <= sum_k |w_k| step_k / 2, step = max |x| / 127 per 32 columns;
    plus float32 slack."""
    step = x.abs().view(x.shape[0], -1, 32).amax(-1) / 127
    half_step = step.repeat_interleave(32, dim=1) / 2
    return half_step @ w_deq.abs().t() * 1.01 + 1e-4


@pytest.mark.parametrize("group", [32, 64, 128])
def test_q8_and_q4_round_trips_are_within_half_a_step(group):
    w = weights()
    q8, q4 = quant.quantize_q8(w, group), quant.quantize_q4(w, group)
    d8 = q8.d.float().repeat_interleave(group, dim=1)
    slack = w.abs().amax() * 2e-3  # the scales are stored in fp16
    assert ((q8.dequantize(torch.float32) - w).abs() <= d8 / 2 + slack).all()
    d4 = q4.d.float().repeat_interleave(group, dim=1)
    assert ((q4.dequantize(torch.float32) - w).abs() <= d4 / 2 + slack).all()
    assert q8.nbytes < w.nbytes / 3.5 and q4.nbytes < w.nbytes / 6


def test_q4_packing_is_gguf_order():
    """Low nibbles hold columns 0-15 of each 32, high nibbles 16-31."""
    q = torch.arange(64).remainder(16).view(1, 64).repeat(16, 1)
    packed = quant.pack_q4(q, torch.ones(16, 2), torch.zeros(16, 2))
    assert packed.packed[0, 0] == (0 | 16 << 4) and packed.packed[0, 16] == 0 | (0 << 4)
    assert torch.equal(packed.values(), q.to(torch.uint8))


@pytest.mark.skipif(shutil.which("gcc") is None or c_build.disabled(), reason="no C compiler here, or kernels off")
def test_every_kernel_builds_ahead_of_time():
    """`make setup` builds them all, so a user never waits for gcc at the first request."""
    assert c_build.build_all() == []


def _paths(monkeypatch, path: str) -> None:
    if path == "torch":
        monkeypatch.setattr(qgemm, "load", lambda: None)
        monkeypatch.setattr(qgemm, "load_bf16", lambda: None)
    elif path == "portable C":
        lib, bf16 = c_build.load("qgemm", native=False), c_build.load("bgemm", native=False)
        assert lib is not None and bf16 is not None
        monkeypatch.setattr(qgemm, "load", lambda: qgemm.bind(lib))
        bf16.bgemm_bf16.argtypes = qgemm.load_bf16().bgemm_bf16.argtypes
        monkeypatch.setattr(qgemm, "load_bf16", lambda: bf16)


@pytest.mark.parametrize("path", ["native C", "portable C", "torch"])
@pytest.mark.parametrize("fmt,group", [("int8", 32), ("int8", 128), ("int4", 32), ("int4", 64)])
@pytest.mark.parametrize("rows", [1, 3, 6, 9])  # 9: tiles of 4 activation rows and a remainder
def test_matmul_paths_agree_within_the_activation_rounding_bound(monkeypatch, path, fmt, group, rows):
    _paths(monkeypatch, path)
    w = quantize(weights(n=52, k=256), fmt, group, torch.float32)  # 52: 6 groups of 8 rows + 4
    deq = w.dequantize(torch.float32)
    x = activations(rows, 256)
    exact = x @ deq.t()
    bound = 1e-4 if path == "torch" else activation_rounding_bound(x, deq)
    out = linear(x, w, torch.ones(52))
    assert ((out - 1 - exact).abs() <= bound).all()
    residual = torch.randn(rows, 52)
    start = residual.clone()
    added = linear_add(x, w, residual)
    assert ((added - start - exact).abs() <= bound).all()


@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("n", [48, 52, 56])  # groups of 8 rows: 6 in pairs, + 4 rows, 7
def test_a_row_gets_the_same_bits_alone_and_in_a_batch(fmt, n):
    """Speculative chains are verified as a batch of rows; greedy output matches plain
    decoding only if the kernels give each row the same bits whatever runs beside it."""
    w = quantize(weights(n=n, k=256), fmt, 32, torch.float32)
    x = activations(9, 256)
    alone = torch.cat([linear(x[i : i + 1], w) for i in range(9)])
    for rows in (2, 3, 4, 5, 9):
        assert torch.equal(linear(x[:rows], w), alone[:rows])


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_many_rows_take_the_exact_float_gemm(monkeypatch, fmt):
    """A long prefill chunk multiplies the dequantized weight in float32 (no activation
    rounding), into the residual too; fewer rows keep the block kernel."""
    monkeypatch.setattr(quant, "FLOAT_GEMM_ROWS", 6)
    w = quantize(weights(n=52, k=256), fmt, 32, torch.float32)
    deq = w.dequantize(torch.float32)
    assert ((linear(activations(6, 256), w) - activations(6, 256) @ deq.t()).abs() <= 1e-4).all()
    if qgemm.load() is not None:  # five rows stay on the kernel, which rounds x to int8
        assert (linear(activations(5, 256), w) - activations(5, 256) @ deq.t()).abs().max() > 1e-4
    x, residual = activations(6, 256), torch.randn(6, 52)
    assert torch.allclose(linear_add(x, w, residual.clone()), residual + x @ deq.t(), atol=1e-4)


@pytest.mark.parametrize("path", ["native C", "portable C", "torch"])
@pytest.mark.parametrize("rows", [1, 6])
def test_bf16_weights_match_a_float_matmul_of_rounded_activations(monkeypatch, path, rows):
    _paths(monkeypatch, path)
    w = BlockBF16(weights(n=38, k=200).bfloat16())  # 38 rows: tiles of 4 + 2; 200 columns: 6 x 32 + 8
    x = activations(rows, 200)
    exact = x.bfloat16().float() @ w.w.float().t()
    tol = {"rtol": 1e-2, "atol": 1e-1} if path == "torch" else {"rtol": 1e-5, "atol": 1e-4}  # torch: bf16 out
    torch.testing.assert_close(linear(x, w), exact, **tol)
    residual = torch.randn(rows, 38)
    torch.testing.assert_close(linear_add(x, w, residual.clone()), residual + exact, **tol)


def test_bfloat16_activations_run_through_the_kernel():
    w = quantize(weights(), "int8", 32, torch.bfloat16)
    x = activations(2, 128).bfloat16()
    out = linear(x.view(1, 2, 128), w)
    assert out.dtype == torch.bfloat16 and out.shape == (1, 2, 64)
    ref = x.float() @ w.dequantize(torch.float32).t()
    torch.testing.assert_close(out.float().view(2, 64), ref, rtol=3e-2, atol=0.5)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_embedding_lookup_dequantizes_only_its_rows(fmt):
    w = quantize(weights(), fmt, 32, torch.float32)
    ids = torch.tensor([3, 0, 3])
    torch.testing.assert_close(embedding(ids, w, torch.float32), w.dequantize(torch.float32)[ids])


def test_group_falls_back_to_a_size_that_divides_and_skips_odd_shapes():
    w = weights(k=96)  # 96 = 3 x 32: 128 and 64 do not divide it
    assert quantize(w, "int4", 128, torch.float32).group_size == 32
    odd = weights(k=40)  # columns not a multiple of 32
    kept = quantize(odd, "int8", 32, torch.bfloat16)
    assert isinstance(kept, torch.Tensor) and kept.dtype == torch.bfloat16


def test_cat_rows_keeps_blocks_of_one_format_only():
    a, b = quant.quantize_q4(weights(n=32)), quant.quantize_q4(weights(n=16))
    both = quant.cat_rows([a, b], torch.float32)
    assert isinstance(both, BlockQ4) and both.shape == (48, 128)
    torch.testing.assert_close(both.dequantize(torch.float32)[32:], b.dequantize(torch.float32))
    mixed = quant.cat_rows([a, quant.quantize_q8(weights(n=16))], torch.float32)
    assert isinstance(mixed, torch.Tensor) and mixed.shape == (48, 128)


def test_gguf_blocks_are_kept_as_stored(tiny_gguf_path):
    """A GGUF's Q8_0/Q4_0/Q4_1 tensors load as blocks holding exactly the file's values (the
    same floats the dequantizing load gives), run as they are, and stay as they are under
    the matching quantization instead of being rounded again."""
    from servelm.model.gguf_loader import load_gguf

    _, kept, _ = load_gguf(tiny_gguf_path, torch.float32, keep_blocks=True)
    _, floats, _ = load_gguf(tiny_gguf_path, torch.float32)
    blocks = {k: v for k, v in kept.items() if isinstance(v, (BlockQ8, BlockQ4))}
    assert {type(b) for b in blocks.values()} == {BlockQ8, BlockQ4}, "the fixture has Q8_0 and Q4 tensors"
    rows = {k: v for k, v in kept.items() if isinstance(v, BlockBF16)}
    assert rows, "the fixture has BF16 tensors"
    for name, r in rows.items():
        assert torch.equal(r.w.float(), floats[name])
    _, as_bf16, _ = load_gguf(tiny_gguf_path, torch.bfloat16, keep_blocks=True)
    assert not any(isinstance(as_bf16[name], BlockBF16) for name in rows), "bf16 compute takes plain tensors"
    for name, b in blocks.items():
        deq = b.dequantize(torch.float32)
        torch.testing.assert_close(deq, floats[name], rtol=0, atol=1e-6)
        assert quantize(b, "int8" if isinstance(b, BlockQ8) else "int4", 128, torch.float32) is b
        x = activations(3, b.shape[1])
        assert ((linear(x, b) - x @ deq.t()).abs() <= activation_rounding_bound(x, deq)).all()


def test_weights_wider_than_the_kernel_takes_use_the_torch_path(monkeypatch):
    monkeypatch.setattr(qgemm, "MAX_COLUMNS", 64)  # the kernel's limit is 32768 columns
    w = quantize(weights(n=16, k=128), "int8", 32, torch.float32)
    x = activations(2, 128)
    torch.testing.assert_close(linear(x, w), x @ w.dequantize(torch.float32).t(), rtol=1e-5, atol=1e-4)
