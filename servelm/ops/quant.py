"""Block-quantized weights: 8 or 4 bits per weight with an fp16 scale per group of input
columns, the layouts of GGUF's Q8_0 and Q4_1.

Decode reads every weight once per step, so at small batch its time is the weight bytes
over memory bandwidth: a quarter (8-bit) or about a sixth (4-bit) of float32's bytes make
it that much faster, provided the matmul reads the blocks as they are instead of
materializing float weights. On CPU the C kernel in csrc/qgemm.c does (ops/qgemm.py);
without a compiler the same weights run through a dequantize-then-matmul fallback. A GGUF's
Q8_0, Q4_0 and Q4_1 tensors load straight into these classes, so the file's own values run.

- BlockQ8: w = q * d, q in [-127, 127], d = max |w| / 127 over the group.
- BlockQ4: w = q * d + m, q in [0, 15], d = (max - min) / 15, m = min over the group.
- BlockBF16: bfloat16 rows as a BF16 GGUF stores them, run against float32 activations
  (csrc/bgemm.c), so a float32 model reads half the weight bytes.

A GPU backend registers its own matmuls in `KERNELS` under its device type.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor

from servelm.ops import qgemm

logger = logging.getLogger("servelm")

METHODS = ("int8", "int4")
GROUP_SIZES = (32, 64, 128)
BLOCK = 32  # columns whose 4-bit values share 16 bytes


@dataclass
class BlockQ8:
    q: Tensor  # [N, K] int8
    d: Tensor  # [N, K / group_size] float16
    group_size: int = BLOCK

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)

    @property
    def nbytes(self) -> int:
        return self.q.nbytes + self.d.nbytes

    def dequantize(self, dtype: torch.dtype) -> Tensor:
        g = self.q.float().view(self.q.shape[0], -1, self.group_size) * self.d.float()[..., None]
        return g.view(self.q.shape).to(dtype)


@dataclass
class BlockQ4:
    packed: Tensor  # [N, K / 2] uint8: per 32 columns, low nibbles hold 0-15, high 16-31
    d: Tensor  # [N, K / group_size] float16
    m: Tensor  # [N, K / group_size] float16
    group_size: int = BLOCK

    @property
    def shape(self) -> tuple[int, int]:
        return self.packed.shape[0], self.packed.shape[1] * 2

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes + self.d.nbytes + self.m.nbytes

    def values(self) -> Tensor:
        """The 4-bit values, [N, K] uint8."""
        b = self.packed.view(self.packed.shape[0], -1, BLOCK // 2)
        return torch.cat([b & 0x0F, b >> 4], dim=-1).view(self.shape)

    def dequantize(self, dtype: torch.dtype) -> Tensor:
        n, k = self.shape
        g = self.values().float().view(n, -1, self.group_size)
        return (g * self.d.float()[..., None] + self.m.float()[..., None]).view(n, k).to(dtype)


@dataclass
class BlockBF16:
    w: Tensor  # [N, K] bfloat16

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.w.shape)

    @property
    def nbytes(self) -> int:
        return self.w.nbytes

    def dequantize(self, dtype: torch.dtype) -> Tensor:
        return self.w.to(dtype)


QuantWeight = BlockQ8 | BlockQ4 | BlockBF16


def pack_q4(q: Tensor, d: Tensor, m: Tensor, group_size: int = BLOCK) -> BlockQ4:
    """4-bit values [N, K] (0-15) and per-group scales and mins into a BlockQ4."""
    n, k = q.shape
    b = q.to(torch.uint8).view(n, k // BLOCK, BLOCK)
    packed = (b[..., : BLOCK // 2] | (b[..., BLOCK // 2:] << 4)).reshape(n, k // 2)
    return BlockQ4(packed.contiguous(), d.to(torch.float16).contiguous(),
                   m.to(torch.float16).contiguous(), group_size)


def map_rows(w: QuantWeight, fn: Callable[[Tensor], Tensor]) -> QuantWeight:
    """`w` with `fn` (a reordering of rows, say) applied to each of its per-row tensors."""
    return type(w)(**{f.name: fn(v) if isinstance(v := getattr(w, f.name), Tensor) else v for f in fields(w)})


def _settings(w: QuantWeight) -> tuple:
    """The format: class and non-tensor fields (group size)."""
    return type(w), *(v for f in fields(w) if not isinstance(v := getattr(w, f.name), Tensor))


def cat_rows(parts: list[Tensor | QuantWeight], dtype: torch.dtype) -> Tensor | QuantWeight:
    """Stack weights along their output rows (fusing q/k/v or gate/up); blocks stay blocks
    only when every part has the same format and group size."""
    first = parts[0]
    if all(not isinstance(p, Tensor) and _settings(p) == _settings(first) for p in parts):
        return type(first)(**{f.name: torch.cat([getattr(p, f.name) for p in parts])
                              if isinstance(getattr(first, f.name), Tensor) else getattr(first, f.name)
                              for f in fields(first)})
    return torch.cat([p if isinstance(p, Tensor) else p.dequantize(dtype) for p in parts])


def quantize_q8(w: Tensor, group_size: int = BLOCK) -> BlockQ8:
    n, k = w.shape
    groups = w.float().reshape(n, k // group_size, group_size)
    d = (groups.abs().amax(dim=-1) / 127).to(torch.float16).float()
    q = (groups / d.clamp_min(1e-12)[..., None]).round().clamp(-127, 127).to(torch.int8)
    return BlockQ8(q.reshape(n, k).contiguous(), d.to(torch.float16), group_size)


def quantize_q4(w: Tensor, group_size: int = BLOCK) -> BlockQ4:
    n, k = w.shape
    groups = w.float().reshape(n, k // group_size, group_size)
    lo = groups.amin(dim=-1).to(torch.float16).float()
    d = ((groups.amax(dim=-1) - lo) / 15).to(torch.float16).float()
    q = ((groups - lo[..., None]) / d.clamp_min(1e-12)[..., None]).round().clamp(0, 15)
    return pack_q4(q.reshape(n, k), d, lo, group_size)


def quantize(w: Tensor | QuantWeight, method: str, group_size: int,
             dtype: torch.dtype) -> Tensor | QuantWeight:
    """`w` as `method` ("int8" or "int4") blocks. Blocks already in that format stay as they
    are (a GGUF's own values, not rounded twice); others are dequantized and requantized.
    The group shrinks to the largest size that divides the input dimension; a weight with no
    such size (columns not a multiple of 32) stays in `dtype`."""
    cls = BlockQ8 if method == "int8" else BlockQ4
    if isinstance(w, cls):
        return w
    if not isinstance(w, Tensor):
        w = w.dequantize(dtype)
    for g in sorted((s for s in GROUP_SIZES if s <= group_size), reverse=True):
        if w.shape[1] % g == 0:
            if g != group_size:
                logger.info("%s: %s weight uses group size %d (%d does not divide %d)",
                            method, tuple(w.shape), g, group_size, w.shape[1])
            return quantize_q8(w, g) if method == "int8" else quantize_q4(w, g)
    logger.warning("%s: %s weight left unquantized (columns must be a multiple of 32)",
                   method, tuple(w.shape))
    return w.to(dtype)


# From this many float32 activation rows on (long prefill chunks), the weight dequantized once
# and torch's float32 GEMM beat the block kernels, which are built for few rows: 1.15-1.45x
# at 1,024-2,048 rows, the dequantization included (Ice Lake host, 2 threads).
FLOAT_GEMM_ROWS = 1024


def _cpu_matmul(x: Tensor, w: QuantWeight, out: Tensor | None) -> Tensor:
    if isinstance(w, BlockBF16):
        if qgemm.load_bf16() is None:
            y = F.linear(x.to(torch.bfloat16), w.w).float()  # as the kernel, but rounds its output too
            return y if out is None else out.add_(y)
        return qgemm.bf16(x.float(), w.w, out)
    many_rows = x.dtype == torch.float32 and x.shape[0] >= FLOAT_GEMM_ROWS
    if many_rows or qgemm.load() is None or not qgemm.fits(w.shape[1]):
        y = F.linear(x, w.dequantize(x.dtype))
        return y if out is None else out.add_(y)
    x = x.float()
    if isinstance(w, BlockQ8):
        return qgemm.q8(x, w.q, w.d, *kernel_layout(w), w.group_size, out)
    return qgemm.q4(x, w.packed, w.d, w.m, *kernel_layout(w), w.group_size, out)


def kernel_layout(w: QuantWeight) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """The weight as the C kernel reads it eight rows at a time: the scales and, for 4-bit,
    the mins (8-bit: each block's sum of q) regrouped by eight, and the values interleaved
    (qgemm.interleave). Made on first use and kept with the weight, beside the row-major
    tensors that lookups and the torch fallback read."""
    cached = w.__dict__.get("_kernel_layout")
    if cached is None:
        values = w.q if isinstance(w, BlockQ8) else w.packed
        second = qgemm.block_sums(w.q) if isinstance(w, BlockQ8) else w.m
        cached = (qgemm.by_eight(w.d), qgemm.by_eight(second), qgemm.interleave(values))
        w.__dict__["_kernel_layout"] = cached
    return cached


# (device type, weight class) -> 2-D activation times that weight, added into `out` if given.
KERNELS: dict[tuple[str, type], Callable[[Tensor, QuantWeight, Tensor | None], Tensor]] = {
    ("cpu", BlockQ8): _cpu_matmul,
    ("cpu", BlockQ4): _cpu_matmul,
    ("cpu", BlockBF16): _cpu_matmul,
}


def embedding(ids: Tensor, table: Tensor | QuantWeight, dtype: torch.dtype) -> Tensor:
    """Rows of a float or quantized embedding table (a quantized one can double as a tied
    LM head): only the looked-up rows are dequantized."""
    if isinstance(table, Tensor):
        return F.embedding(ids, table)
    return map_rows(table, lambda t: t[ids]).dequantize(dtype)


def linear(x: Tensor, w: Tensor | QuantWeight, bias: Tensor | None = None) -> Tensor:
    """F.linear for float and quantized weights alike."""
    if isinstance(w, Tensor):
        return F.linear(x, w, bias)
    out = _kernel(x, w)(x.reshape(-1, x.shape[-1]), w, None).reshape(*x.shape[:-1], -1)
    out = out.to(x.dtype)
    return out if bias is None else out + bias


def linear_add(x: Tensor, w: Tensor | QuantWeight, residual: Tensor) -> Tensor:
    """residual + x @ w.T for 2-D x; the quantized kernel adds in place into `residual`."""
    if isinstance(w, Tensor) or residual.dtype != torch.float32 or not residual.is_contiguous():
        return residual + linear(x, w)
    return _kernel(x, w)(x, w, residual)


def _kernel(x: Tensor, w: QuantWeight) -> Callable[[Tensor, QuantWeight, Tensor | None], Tensor]:
    kernel = KERNELS.get((x.device.type, type(w)))
    if kernel is None:
        raise NotImplementedError(f"no {type(w).__name__} matmul registered for {x.device.type}")
    return kernel
