"""Fused dequantize-matmul Triton kernels for BlockQ8 and BlockQ4 weights (ops/quant.py).

Decode reads every weight once per step, so at small batch a matmul's time is the weight
bytes over memory bandwidth. These kernels read the 8- or 4-bit blocks and their fp16
scales as they are stored and dequantize in registers, never materializing float weights:
about a half (8-bit) or under a third (4-bit) of the bytes of bfloat16 weights.

Each program computes a [BLOCK_M, BLOCK_N] tile of x @ w.T, stepping over K by 32 columns
(one 4-bit packing block; a group of 32, 64 or 128 columns shares one scale). The product is
taken on the integer values and scaled afterwards, with the 4-bit min folded in through the
activations' row sums:

    sum_k x[k] * (q[k] * d + m) = d * sum_k x[k] * q[k] + m * sum_k x[k]

q (at most 127 in magnitude) is exact in bfloat16 and float16, so the tensor-core dot rounds
nothing on the weight side; float32 activations use an IEEE float32 dot (not TF32).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from servelm.ops.quant import BLOCK, BlockQ4, BlockQ8

BLOCK_N = 64
# The interpreter (TRITON_INTERPRET=1) multiplies bfloat16 dot operands as their raw uint16
# bits (triton-lang/triton#11584), so there the dot runs in float32.
_INTERPRET = triton.knobs.runtime.interpret


@triton.jit
def _qmatmul_kernel(x_ptr, w_ptr, d_ptr, m_ptr, out_ptr, M, N, K,
                    GROUP: tl.constexpr, IS_Q4: tl.constexpr, ACCUMULATE: tl.constexpr,
                    DOT_F32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr):
    """out[M, N] (=|+=) x[M, K] @ dequant(w)[N, K].T; one program per output tile."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_K)
    m_mask = rm < M
    n_mask = rn < N
    x_rows = x_ptr + rm.to(tl.int64)[:, None] * K + cols[None, :]
    if IS_Q4:  # byte c % 16 of the block; columns 16-31 sit in the high nibbles
        w_rows = w_ptr + rn.to(tl.int64)[:, None] * (K // 2) + (cols % 16)[None, :]
        shift = (cols // 16 * 4)[None, :]
    else:
        w_rows = w_ptr + rn.to(tl.int64)[:, None] * K + cols[None, :]
    scale_rows = rn.to(tl.int64) * (K // GROUP)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(x_rows + k0, mask=m_mask[:, None], other=0.0)
        if IS_Q4:
            byte = tl.load(w_rows + k0 // 2, mask=n_mask[:, None], other=0)
            q = (byte >> shift) & 0xF
        else:
            q = tl.load(w_rows + k0, mask=n_mask[:, None], other=0)
        if DOT_F32:
            x = x.to(tl.float32)
            part = tl.dot(x, tl.trans(q.to(tl.float32)), input_precision="ieee")
        else:  # bfloat16 or float16 tensor cores, float32 accumulation
            part = tl.dot(x, tl.trans(q.to(x.dtype)))
        d = tl.load(d_ptr + scale_rows + k0 // GROUP, mask=n_mask, other=0.0).to(tl.float32)
        acc += part * d[None, :]
        if IS_Q4:
            mins = tl.load(m_ptr + scale_rows + k0 // GROUP, mask=n_mask, other=0.0)
            row_sums = tl.sum(x.to(tl.float32), axis=1)
            acc += row_sums[:, None] * mins.to(tl.float32)[None, :]

    out_ptrs = out_ptr + rm.to(tl.int64)[:, None] * N + rn[None, :]
    mask = m_mask[:, None] & n_mask[None, :]
    if ACCUMULATE:
        acc += tl.load(out_ptrs, mask=mask, other=0.0)
    tl.store(out_ptrs, acc, mask=mask)


def _block_m(m: int) -> int:
    """Rows per tile: 16 (tl.dot's least) for decode, wider for prefill."""
    return 16 if m <= 16 else 32 if m <= 32 else 64


def _launch(x: Tensor, values: Tensor, d: Tensor, mins: Tensor | None, group_size: int,
            n: int, k: int, out: Tensor | None) -> Tensor:
    if x.dim() != 2 or x.shape[1] != k:
        raise ValueError(f"x must be [M, {k}], got {tuple(x.shape)}")
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"x must be float32, bfloat16 or float16, got {x.dtype}")
    if k % BLOCK or k % group_size:
        raise ValueError(f"K={k} must be a multiple of {BLOCK} and of group size {group_size}")
    m = x.shape[0]
    if out is None:
        out, accumulate = torch.empty(m, n, dtype=torch.float32, device=x.device), False
    else:
        if out.shape != (m, n) or out.dtype != torch.float32 or not out.is_contiguous():
            raise ValueError(f"out must be contiguous float32 [{m}, {n}]")
        accumulate = True
    if m == 0 or n == 0:
        return out
    block_m = _block_m(m)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, BLOCK_N))
    _qmatmul_kernel[grid](
        x.contiguous(), values.contiguous(), d.contiguous(),
        d if mins is None else mins.contiguous(), out, m, n, k,
        GROUP=group_size, IS_Q4=mins is not None, ACCUMULATE=accumulate,
        DOT_F32=x.dtype == torch.float32 or _INTERPRET,
        BLOCK_M=block_m, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK)
    return out


def q8_matmul(x: Tensor, w: BlockQ8, out: Tensor | None = None) -> Tensor:
    """x [M, K] @ dequant(w).T as float32 [M, N]; added into `out` (float32 [M, N]) in
    place, and `out` returned, when given."""
    n, k = w.shape
    return _launch(x, w.q, w.d, None, w.group_size, n, k, out)


def q4_matmul(x: Tensor, w: BlockQ4, out: Tensor | None = None) -> Tensor:
    """x [M, K] @ dequant(w).T as float32 [M, N]; added into `out` (float32 [M, N]) in
    place, and `out` returned, when given."""
    n, k = w.shape
    return _launch(x, w.packed, w.d, w.m, w.group_size, n, k, out)
