"""The Triton kernels as torch operators (`torch.ops.servelm.*`).

Why operators rather than plain calls: each has a fake (shape-only) version, so the whole
CUDA forward pass can be traced with fake CUDA tensors on a machine without a GPU, which is
how the tests check that nothing in it stays on the CPU; and torch treats them as opaque
when capturing CUDA graphs. This module imports only torch: each operator loads its Triton
kernel on its first real call. Importing it registers the quantized matmuls for CUDA in
`ops.quant.KERNELS`.
"""

from typing import Optional

import torch
from torch import Tensor

from servelm.ops.quant import KERNELS, BlockBF16, BlockQ4, BlockQ8


@torch.library.custom_op("servelm::paged_decode", mutates_args=())
def paged_decode(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor,
                 context_lens: Tensor, block_size: int, scale: float, max_len: int,
                 k_scales: Optional[Tensor], v_scales: Optional[Tensor], softcap: float) -> Tensor:
    from servelm.ops.gpu import paged_attention

    return paged_attention.paged_decode(q, k_cache, v_cache, block_tables, context_lens,
                                        block_size, scale, max_len, k_scales, v_scales, softcap)


@paged_decode.register_fake
def _(q, k_cache, v_cache, block_tables, context_lens, block_size, scale, max_len, k_scales,
      v_scales, softcap):
    return torch.empty_like(q)


@torch.library.custom_op("servelm::paged_extend", mutates_args=("out",))
def paged_extend(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor,
                 q_starts: Tensor, q_lens: Tensor, context_lens: Tensor, block_size: int,
                 scale: float, max_q_len: int, k_scales: Optional[Tensor],
                 v_scales: Optional[Tensor], out: Tensor, softcap: float) -> None:
    from servelm.ops.gpu import paged_attention

    paged_attention.paged_extend(q, k_cache, v_cache, block_tables, q_starts, q_lens, context_lens,
                                 block_size, scale, max_q_len, k_scales, v_scales, out, softcap)


@paged_extend.register_fake
def _(q, k_cache, v_cache, block_tables, q_starts, q_lens, context_lens, block_size, scale,
      max_q_len, k_scales, v_scales, out, softcap):
    return None


@torch.library.custom_op("servelm::q8_linear", mutates_args=())
def q8_linear(x: Tensor, q: Tensor, d: Tensor, group_size: int) -> Tensor:
    from servelm.ops.gpu import qmatmul

    return qmatmul.q8_matmul(x, BlockQ8(q, d, group_size))


@q8_linear.register_fake
def _(x, q, d, group_size):
    return x.new_empty(x.shape[0], q.shape[0], dtype=torch.float32)


@torch.library.custom_op("servelm::q4_linear", mutates_args=())
def q4_linear(x: Tensor, packed: Tensor, d: Tensor, m: Tensor, group_size: int) -> Tensor:
    from servelm.ops.gpu import qmatmul

    return qmatmul.q4_matmul(x, BlockQ4(packed, d, m, group_size))


@q4_linear.register_fake
def _(x, packed, d, m, group_size):
    return x.new_empty(x.shape[0], packed.shape[0], dtype=torch.float32)


def _add(y: Tensor, out: Tensor | None) -> Tensor:
    return y if out is None else out.add_(y)


KERNELS[("cuda", BlockQ8)] = lambda x, w, out: _add(q8_linear(x, w.q, w.d, w.group_size), out)
KERNELS[("cuda", BlockQ4)] = lambda x, w, out: _add(
    q4_linear(x, w.packed, w.d, w.m, w.group_size), out)
# cuBLAS multiplies bfloat16 natively: a BF16 GGUF's rows need no kernel of servelm's.
KERNELS[("cuda", BlockBF16)] = lambda x, w, out: _add(
    torch.nn.functional.linear(x.to(torch.bfloat16), w.w).float(), out)
