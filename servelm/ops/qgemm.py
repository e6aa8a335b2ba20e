"""Matmuls that read block-quantized weights directly (csrc/qgemm.c), called through ctypes.

The kernel takes float32 activations and writes float32 rows, optionally adding into the
output (a residual stream updated in place). It quantizes the activations to int8 per 32
columns itself, as llama.cpp does, so its result differs from a float matmul with the
dequantized weight by about that rounding: a relative error near 1e-2 per output.
"""

from __future__ import annotations

import ctypes
from functools import lru_cache

import torch
from torch import Tensor

from servelm.ops import c_build

_P, _I = ctypes.c_void_p, ctypes.c_int64
_SIGNATURES = {
    "qgemm_q8": [_P, _I, _I, _P, _P, _P, _P, _I, _I, _P, _I, ctypes.c_int],
    "qgemm_q4": [_P, _I, _I, _P, _P, _P, _P, _P, _I, _I, _P, _I, ctypes.c_int],
}


@lru_cache(maxsize=1)
def load() -> ctypes.CDLL | None:
    lib = c_build.load("qgemm")
    return None if lib is None else bind(lib)


def bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    """Declare the kernels' signatures on a loaded build."""
    for name, argtypes in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes = argtypes
        fn.restype = ctypes.c_int
    return lib


def _run(name: str, x: Tensor, weight_ptrs: tuple[int, ...], n: int, group_size: int,
         out: Tensor | None) -> Tensor:
    lib = load()
    assert lib is not None
    m, k = x.shape
    x = x.contiguous()
    accumulate = out is not None
    if out is None:
        out = torch.empty(m, n, dtype=torch.float32)
    assert out.dtype == torch.float32 and out.shape == (m, n) and out.stride(1) == 1
    rc = getattr(lib, name)(x.data_ptr(), m, k, *weight_ptrs, n, group_size, out.data_ptr(),
                            out.stride(0), int(accumulate))
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


def ptr(t: Tensor | None) -> int | None:
    """A tensor's address for a C pointer argument, NULL for None."""
    return None if t is None else t.data_ptr()


def q8(x: Tensor, q: Tensor, d: Tensor, d8: Tensor | None, s8: Tensor | None, group_size: int,
       out: Tensor | None = None) -> Tensor:
    """x [M, K] float32 times w [N, K] = q * d (d per group): [M, N], or added into `out`.
    d8 = by_eight(d) and s8 = by_eight(block_sums(q)), for the eight-rows-at-a-time kernel."""
    return _run("qgemm_q8", x, (q.data_ptr(), d.data_ptr(), ptr(d8), ptr(s8)), q.shape[0], group_size, out)


def block_sums(q: Tensor) -> Tensor:
    """Sum of each row's 32-value blocks of int8 q, [N, K / 32] float32."""
    return q.view(q.shape[0], -1, 32).sum(-1, dtype=torch.int32).float()


def q4(x: Tensor, packed: Tensor, d: Tensor, m: Tensor, d8: Tensor | None, m8: Tensor | None,
       group_size: int, out: Tensor | None = None) -> Tensor:
    """As `q8` for w = q * d + m with q packed two per byte."""
    return _run("qgemm_q4", x, (packed.data_ptr(), d.data_ptr(), m.data_ptr(), ptr(d8), ptr(m8)),
                packed.shape[0], group_size, out)
