"""Weight-only quantization: int8 per output channel and int4 in groups along the input.

Decode reads every weight once per step, so at small batch its time is the weight bytes
over memory bandwidth: half the bytes (int8) or a quarter (int4) make the matmuls faster,
provided the kernel dequantizes on the fly instead of materializing float weights. On CPU,
torch's packed weight-only kernels do that (`_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`);
activations stay in the model dtype. A GPU backend registers its own matmuls in
`KERNELS` under its device type.

- int8: w ~= q * s, q in [-127, 127], one scale per output channel (row): max |w| / 127.
- int4: asymmetric per group of `group_size` input columns: w ~= q * s + m with q in
  [0, 15], s = (max - min) / 15, m = min. The kernel computes (q - 8) * s + z, so it is
  given z = m + 8 s.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

logger = logging.getLogger("servelm")

METHODS = ("int8", "int4")
GROUP_SIZES = (32, 64, 128)


@dataclass
class Int8Weight:
    q: Tensor  # [N, K] int8
    scales: Tensor  # [N], the activation dtype

    @property
    def nbytes(self) -> int:
        return self.q.nbytes + self.scales.nbytes


@dataclass
class Int4Weight:
    packed: Tensor  # the kernel's packed layout of [N, K] 4-bit values
    group_size: int
    scales_and_zeros: Tensor  # [K / group_size, N, 2]: s and z = m + 8 s, activation dtype

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes + self.scales_and_zeros.nbytes


QuantWeight = Int8Weight | Int4Weight


@dataclass
class Int4Groups:
    """4-bit values before packing: w = q * s + m per group of input columns. A GGUF's
    Q4_0/Q4_1 tensors load as these, so int4 runs the file's exact values instead of
    rounding its dequantized floats a second time."""

    q: Tensor  # [N, K] uint8 in [0, 15]
    scales: Tensor  # [N, K / group_size] float32
    mins: Tensor  # [N, K / group_size] float32
    group_size: int = 32

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)

    def dequantize(self, dtype: torch.dtype) -> Tensor:
        g = self.q.float().reshape(self.q.shape[0], -1, self.group_size)
        return (g * self.scales[..., None] + self.mins[..., None]).reshape(self.q.shape).to(dtype)

    def pack(self, dtype: torch.dtype) -> Int4Weight:
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(self.q.to(torch.int32), 1)
        sz = torch.stack([self.scales.t(), (self.mins + 8 * self.scales).t()], dim=-1)
        return Int4Weight(packed, self.group_size, sz.to(dtype).contiguous())


def cat_rows(parts: list[Tensor | Int4Groups], dtype: torch.dtype) -> Tensor | Int4Groups:
    """Stack weights along their output rows (fusing q/k/v or gate/up); 4-bit groups stay
    4-bit only when every part is."""
    if all(isinstance(p, Int4Groups) for p in parts):
        return Int4Groups(*(torch.cat([getattr(p, f) for p in parts]) for f in ("q", "scales", "mins")),
                          group_size=parts[0].group_size)
    return torch.cat([p.dequantize(dtype) if isinstance(p, Int4Groups) else p for p in parts])


def quantize_int8(w: Tensor) -> Int8Weight:
    wf = w.float()
    scales = wf.abs().amax(dim=1).clamp_min(1e-8) / 127
    q = (wf / scales[:, None]).round().clamp(-127, 127).to(torch.int8)
    return Int8Weight(q.contiguous(), scales.to(w.dtype))


def int4_supported(w: Tensor, group_size: int) -> bool:
    n, k = w.shape
    return n % 16 == 0 and k % group_size == 0


def quantize_int4(w: Tensor, group_size: int) -> Int4Weight:
    n, k = w.shape
    if not int4_supported(w, group_size):
        raise ValueError(f"int4 needs rows divisible by 16 and columns by the group size "
                         f"{group_size}, got a {n} x {k} weight")
    groups = w.float().reshape(n, k // group_size, group_size)
    lo, hi = groups.amin(dim=-1), groups.amax(dim=-1)
    scales = ((hi - lo) / 15).clamp_min(1e-8)
    q = ((groups - lo[..., None]) / scales[..., None]).round().clamp(0, 15).to(torch.uint8)
    return Int4Groups(q.reshape(n, k), scales, lo, group_size).pack(w.dtype)


def quantize(w: Tensor | Int4Groups, method: str, group_size: int,
             dtype: torch.dtype | None = None) -> Tensor | QuantWeight:
    """`w` quantized by `method`; int4 falls back to the largest group size that divides the
    input dimension, and leaves a weight it cannot take (rows not a multiple of 16) as is.
    4-bit groups from a file are packed as they are under int4 (`dtype`: the scales')."""
    if isinstance(w, Int4Groups):
        if method == "int4" and w.shape[0] % 16 == 0:
            return w.pack(dtype)
        w = w.dequantize(dtype)
    if method == "int8":
        return quantize_int8(w)
    for g in (group_size, *sorted((s for s in GROUP_SIZES if s < group_size), reverse=True)):
        if int4_supported(w, g):
            if g != group_size:
                logger.info("int4: %s weight uses group size %d (%d does not divide %d)",
                            tuple(w.shape), g, group_size, w.shape[1])
            return quantize_int4(w, g)
    logger.warning("int4: %s weight left unquantized (rows must be a multiple of 16 and "
                   "columns of 32)", tuple(w.shape))
    return w


def _int8_mm(x: Tensor, w: Int8Weight) -> Tensor:
    return torch.ops.aten._weight_int8pack_mm(x, w.q, w.scales)


def _int4_mm(x: Tensor, w: Int4Weight) -> Tensor:
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x, w.packed, w.group_size, w.scales_and_zeros)


# (device type, weight class) -> matmul of a 2-D activation with that weight.
KERNELS: dict[tuple[str, type], Callable[[Tensor, QuantWeight], Tensor]] = {
    ("cpu", Int8Weight): _int8_mm,
    ("cpu", Int4Weight): _int4_mm,
}


def embedding(ids: Tensor, table: Tensor | Int8Weight) -> Tensor:
    """Rows of a float or int8 embedding table (an int8 one can double as a tied LM head)."""
    if isinstance(table, Tensor):
        return F.embedding(ids, table)
    return table.q[ids].to(table.scales.dtype) * table.scales[ids, None]


def linear(x: Tensor, w: Tensor | QuantWeight, bias: Tensor | None = None) -> Tensor:
    """F.linear for float and quantized weights alike."""
    if isinstance(w, Tensor):
        return F.linear(x, w, bias)
    kernel = KERNELS.get((x.device.type, type(w)))
    if kernel is None:
        raise NotImplementedError(f"no {type(w).__name__} matmul registered for {x.device.type}")
    out = kernel(x.reshape(-1, x.shape[-1]), w).reshape(*x.shape[:-1], -1)
    return out if bias is None else out + bias
