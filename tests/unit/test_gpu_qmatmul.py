"""Fused dequantize-matmul Triton kernels (ops/gpu/qmatmul.py) against a float matmul of the
dequantized weights, over ragged M and N, every group size, both formats, float32 and bfloat16
activations, and the accumulate-into-`out` path. Without a GPU the kernels run in Triton's
interpreter (tests/conftest.py turns it on)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from servelm.ops.gpu.qmatmul import q4_matmul, q8_matmul
from servelm.ops.quant import map_rows, pack_q4, quantize_q4, quantize_q8

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FORMATS = {"q8": (quantize_q8, q8_matmul), "q4": (quantize_q4, q4_matmul)}
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 1e-3}
KG = [(32, 32), (96, 32), (128, 32), (128, 64), (128, 128), (256, 64), (256, 128)]


def make(fmt: str, m: int, n: int, k: int, group: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    w[n // 2] *= 30  # a row with a far larger range must not leak into the others
    w[:, :group] += 2.0  # an offset group: the 4-bit min is far from zero
    x = torch.randn(m, k, generator=g).to(dtype)
    qw = FORMATS[fmt][0](w, group)
    qw = map_rows(qw, lambda t: t.to(DEVICE))
    return x.to(DEVICE), qw


def check(y: torch.Tensor, x: torch.Tensor, qw, expect: torch.Tensor) -> None:
    """y is float32 and within TOLERANCE of `expect`, relative to the sum of |x| |w| terms."""
    assert y.dtype == torch.float32 and y.shape == expect.shape
    scale = F.linear(x.float().abs(), qw.dequantize(torch.float32).abs()).clamp_min(1.0)
    err = ((y - expect).abs() / scale).max().item()
    assert err < TOLERANCE[x.dtype], err


@pytest.mark.parametrize("fmt", ["q8", "q4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("k,group", KG, ids=[f"k{k}g{g}" for k, g in KG])
@pytest.mark.parametrize("m,n", [(1, 8), (3, 40), (17, 72), (17, 8), (1, 72)])
def test_matches_float_matmul(fmt, dtype, k, group, m, n):
    x, qw = make(fmt, m, n, k, group, dtype)
    expect = F.linear(x.float(), qw.dequantize(torch.float32))
    y = FORMATS[fmt][1](x, qw)
    check(y, x, qw, expect)
    assert expect.abs().max() > 1.0  # a real product, not zeros on both sides


@pytest.mark.parametrize("fmt", ["q8", "q4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("m,n,k,group", [(3, 40, 128, 64), (17, 72, 96, 32), (40, 8, 64, 32)])
def test_adds_into_out(fmt, dtype, m, n, k, group):
    x, qw = make(fmt, m, n, k, group, dtype, seed=1)
    residual = torch.randn(m, n, generator=torch.Generator().manual_seed(2)).to(DEVICE) * 10
    out = residual.clone()
    y = FORMATS[fmt][1](x, qw, out)
    assert y is out
    check(out, x, qw, residual + F.linear(x.float(), qw.dequantize(torch.float32)))


def test_q4_nibble_layout():
    """Exact values put each nibble at its column: low nibbles 0-15, high nibbles 16-31."""
    q = torch.arange(64).remainder(16).view(1, 64).repeat(2, 1)  # column c holds c % 16
    q[1] = q[1].flip(0)
    d = torch.tensor([[1.0, 2.0], [0.5, 4.0]])
    mins = torch.tensor([[0.0, -1.0], [3.0, 0.0]])
    qw = pack_q4(q, d, mins)
    qw = map_rows(qw, lambda t: t.to(DEVICE))
    x = torch.eye(64, device=DEVICE)  # row j picks out column j of the weight
    y = q4_matmul(x, qw)
    assert torch.equal(y.T.cpu(), qw.dequantize(torch.float32).cpu())


def test_rejects_bad_shapes():
    x, qw = make("q8", 2, 8, 64, 32, torch.float32)
    with pytest.raises(ValueError):
        q8_matmul(x[:, :32].contiguous(), qw)
    with pytest.raises(ValueError):
        q8_matmul(x, qw, torch.zeros(2, 9, device=DEVICE))
