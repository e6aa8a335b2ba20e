"""A request's K/V as plain bytes, to move between engines (disaggregated prefill and
decode, live migration): read out of cache blocks as stored, written into other blocks of
a cache with the same layout.

Values travel as stored, so an 8-bit cache moves its int8/fp8 values with their per-(token,
head) scales, not a dequantized copy. A payload is bytes plus its layout; the receiving
side checks the layout against its own cache before writing anything.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from servelm.ops.kv_quant import as_bytes
from servelm.worker.kv_cache import KVTensors


@dataclass(frozen=True)
class KVLayout:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: str  # the stored values' dtype: float32, bfloat16, int8, float8_e4m3fn

    @classmethod
    def of(cls, kv: KVTensors, block_size: int) -> KVLayout:
        layers, _, _, heads, head_dim = kv.values.shape
        return cls(layers, heads, head_dim, block_size, str(kv.values.dtype).removeprefix("torch."))

    def check(self, other: KVLayout) -> None:
        """Refuse a payload whose K/V would not mean the same in this cache."""
        for f in dataclasses.fields(self):
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            if mine != theirs:
                raise ValueError(f"KV payload {f.name} is {theirs!r}, this cache's is {mine!r}")


@dataclass
class KVPayload:
    layout: KVLayout
    num_blocks: int
    values: torch.Tensor  # uint8: [layers, 2, blocks x block_size, KV heads, head_dim] as stored
    scales: torch.Tensor | None  # uint8 of float32 [layers, 2, slots, KV heads]; 8-bit caches only

    @property
    def nbytes(self) -> int:
        return self.values.numel() + (0 if self.scales is None else self.scales.numel())


def _slots(block_ids: list[int], block_size: int) -> torch.Tensor:
    blocks = torch.tensor(block_ids, dtype=torch.long)
    return (blocks[:, None] * block_size + torch.arange(block_size)).flatten()


def _raw(t: torch.Tensor) -> torch.Tensor:
    return as_bytes(t).contiguous().view(-1).view(torch.uint8)


@torch.inference_mode()
def read_blocks(kv: KVTensors, block_size: int, block_ids: list[int]) -> KVPayload:
    """A copy of these blocks' K/V (and scales), in block order."""
    slots = _slots(block_ids, block_size).to(kv.values.device)
    values = _raw(as_bytes(kv.values).index_select(2, slots)).cpu()
    scales = None if kv.scales is None else _raw(kv.scales.index_select(2, slots)).cpu()
    return KVPayload(KVLayout.of(kv, block_size), len(block_ids), values, scales)


@torch.inference_mode()
def write_blocks(kv: KVTensors, block_size: int, block_ids: list[int], payload: KVPayload) -> None:
    """Put a payload's blocks into `block_ids` of this cache (freshly allocated for it)."""
    KVLayout.of(kv, block_size).check(payload.layout)
    if len(block_ids) != payload.num_blocks:
        raise ValueError(f"KV payload holds {payload.num_blocks} blocks, {len(block_ids)} given")
    dst = as_bytes(kv.values)
    slots = _slots(block_ids, block_size).to(dst.device)
    shape = (*dst.shape[:2], len(slots), *dst.shape[3:])
    dst.index_copy_(2, slots, payload.values.view(dst.dtype).view(shape).to(dst.device))
    if kv.scales is not None:
        kv.scales.index_copy_(2, slots, payload.scales.view(torch.float32).view(shape[:4]).to(dst.device))
