"""Matmuls that read block-quantized (csrc/qgemm.c) or bfloat16 (csrc/bgemm.c) weights
directly, called through ctypes.

The kernels take float32 activations and write float32 rows, optionally adding into the
output (a residual stream updated in place). They round the activations as llama.cpp does:
to int8 per 32 columns for blocks, so the result differs from a float matmul with the
dequantized weight by a relative error near 1e-2 per output; to bfloat16 for bf16 weights.
"""

from __future__ import annotations

import ctypes
from functools import lru_cache

import torch
from torch import Tensor

from servelm.ops import c_build

_P, _I = ctypes.c_void_p, ctypes.c_int64
_SIGNATURES = {
    "qgemm_q8": [_P, _I, _I, _P, _P, _P, _P, _P, _I, _I, _P, _I, ctypes.c_int],
    "qgemm_q4": [_P, _I, _I, _P, _P, _P, _P, _P, _P, _I, _I, _P, _I, ctypes.c_int],
}


@lru_cache(maxsize=1)
def load() -> ctypes.CDLL | None:
    lib = c_build.load("qgemm")
    return None if lib is None else bind(lib)


@lru_cache(maxsize=1)
def load_bf16() -> ctypes.CDLL | None:
    lib = c_build.load("bgemm")
    if lib is not None:
        lib.bgemm_bf16.argtypes = [_P, _I, _I, _P, _I, _P, _I, ctypes.c_int]
        lib.bgemm_bf16.restype = ctypes.c_int
    return lib


def bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    """Declare the kernels' signatures on a loaded build."""
    for name, argtypes in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes = argtypes
        fn.restype = ctypes.c_int
    return lib


def _run(name: str, x: Tensor, weight_ptrs: tuple[int, ...], n: int, group_size: int | None,
         out: Tensor | None) -> Tensor:
    lib = load_bf16() if group_size is None else load()
    assert lib is not None
    m, k = x.shape
    x = x.contiguous()
    accumulate = out is not None
    if out is None:
        out = torch.empty(m, n, dtype=torch.float32)
    assert out.dtype == torch.float32 and out.shape == (m, n) and out.stride(1) == 1
    sizes = (n,) if group_size is None else (n, group_size)
    rc = getattr(lib, name)(x.data_ptr(), m, k, *weight_ptrs, *sizes, out.data_ptr(), out.stride(0),
                            int(accumulate))
    if rc != 0:
        raise ValueError(f"{name}: {'out of memory' if rc == -2 else 'bad shape'} "
                         f"(x {tuple(x.shape)}, group {group_size})")
    return out


MAX_COLUMNS = 32768  # qgemm.c's MAX_BLOCKS blocks of 32


def fits(columns: int) -> bool:
    """Whether the kernel takes a weight with this many input columns."""
    return columns <= MAX_COLUMNS


def by_eight(t: Tensor) -> Tensor | None:
    """Per-row values [N, ns] of the first N - N % 8 rows regrouped as [N / 8, ns, 8], so the
    kernel reads eight rows' scales of one block with one load (None when N < 8)."""
    n = t.shape[0] - t.shape[0] % 8
    return t[:n].view(n // 8, 8, -1).transpose(1, 2).contiguous() if n else None


def interleave(q: Tensor) -> Tensor | None:
    """The first N - N % 8 rows of q ([N, K] int8 or [N, K / 2] packed 4-bit bytes) in
    qgemm.c's interleaved layout: per group of eight rows and block of 32 columns, the rows'
    bytes in 4-byte pieces, piece-major (None when N < 8)."""
    n = q.shape[0] - q.shape[0] % 8
    if not n:
        return None
    per_block = 32 if q.dtype == torch.int8 else 16  # bytes of one row's block
    pieces = q[:n].view(torch.uint8).view(n // 8, 8, -1, per_block // 4, 4)  # g, row, block, piece, byte
    return pieces.permute(0, 2, 3, 1, 4).contiguous()


def ptr(t: Tensor | None) -> int | None:
    """A tensor's address for a C pointer argument, NULL for None."""
    return None if t is None else t.data_ptr()


def q8(x: Tensor, q: Tensor, d: Tensor, d8: Tensor | None, s8: Tensor | None, qi: Tensor | None,
       group_size: int, out: Tensor | None = None) -> Tensor:
    """x [M, K] float32 times w [N, K] = q * d (d per group): [M, N], or added into `out`.
    d8 = by_eight(d), s8 = by_eight(block_sums(q)) and qi = interleave(q), for the
    eight-rows-at-a-time kernels (qi None: the older row-major one)."""
    return _run("qgemm_q8", x, (q.data_ptr(), d.data_ptr(), ptr(d8), ptr(s8), ptr(qi)), q.shape[0],
                group_size, out)


def block_sums(q: Tensor) -> Tensor:
    """Sum of each row's 32-value blocks of int8 q, [N, K / 32] float32."""
    return q.view(q.shape[0], -1, 32).sum(-1, dtype=torch.int32).float()


def q4(x: Tensor, packed: Tensor, d: Tensor, m: Tensor, d8: Tensor | None, m8: Tensor | None,
       qi: Tensor | None, group_size: int, out: Tensor | None = None) -> Tensor:
    """As `q8` for w = q * d + m with q packed two per byte."""
    return _run("qgemm_q4", x, (packed.data_ptr(), d.data_ptr(), m.data_ptr(), ptr(d8), ptr(m8), ptr(qi)),
                packed.shape[0], group_size, out)


def bf16(x: Tensor, w: Tensor, out: Tensor | None = None) -> Tensor:
    """x [M, K] float32 times bfloat16 w [N, K] (csrc/bgemm.c: x rounded to bfloat16, sums in
    float32): [M, N], or added into `out`."""
    assert w.dtype == torch.bfloat16 and w.is_contiguous()
    return _run("bgemm_bf16", x, (w.data_ptr(),), w.shape[0], None, out)
