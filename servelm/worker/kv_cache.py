"""The KV tensors of one model: values, per-(token, head) scales when 8-bit, and the
accumulated attention per token when a KV compression policy ranks by it.

Every tensor here is [layers, K/V (or 1), slots, KV heads, ...], so one index op per
tensor moves blocks between the cache, swap space and the CPU tier, compacts a draft tree
or a compressed request, whatever the storage dtype.
"""

from __future__ import annotations

import torch

from servelm.model.arch import ModelArch
from servelm.ops.kv_quant import QuantizedKV, as_bytes, is_8bit, storage_dtype


def kv_bytes_per_token(arch: ModelArch, dtype: torch.dtype, kv_cache_dtype: str = "auto") -> int:
    """Cache bytes per token over all layers: K and V values, plus one float32 scale per
    head for an 8-bit cache."""
    store = storage_dtype(kv_cache_dtype, dtype)
    per_head = arch.head_dim * store.itemsize + (4 if is_8bit(store) else 0)
    return 2 * arch.num_layers * arch.num_kv_heads * per_head


class KVTensors:
    def __init__(self, arch: ModelArch, num_slots: int, dtype: torch.dtype, kv_cache_dtype: str,
                 host: bool = False, with_scores: bool = False,
                 device: torch.device | str = "cpu") -> None:
        """`host`: swap or CPU-tier space, `empty` (pages cost nothing until written) and
        pinned when a GPU will copy from it; otherwise zeros on `device`."""
        store = storage_dtype(kv_cache_dtype, dtype)
        shape = (arch.num_layers, 2, num_slots, arch.num_kv_heads)
        make = (lambda *s, dtype: torch.empty(*s, dtype=dtype, pin_memory=torch.cuda.is_available())
                ) if host else (lambda *s, dtype: torch.zeros(*s, dtype=dtype, device=device))
        self.values = make(*shape, arch.head_dim, dtype=store)
        self.scales = make(*shape, dtype=torch.float32) if is_8bit(store) else None
        self.scores = (make(arch.num_layers, 1, num_slots, arch.num_kv_heads, dtype=torch.float32)
                       if with_scores else None)

    @property
    def tensors(self) -> tuple[torch.Tensor, ...]:
        return tuple(as_bytes(t) for t in (self.values, self.scales, self.scores) if t is not None)

    def layer(self, i: int) -> torch.Tensor | QuantizedKV:
        """What layer i's attention reads and writes."""
        return self.values[i] if self.scales is None else QuantizedKV(self.values[i], self.scales[i])

    def copy_slots(self, dst: KVTensors, src_slots: torch.Tensor, dst_slots: torch.Tensor) -> None:
        """Slots of this cache into slots of `dst`, which may be on another device."""
        for s, d in zip(self.tensors, dst.tensors):
            moved = s.index_select(2, src_slots.to(s.device)).to(d.device, non_blocking=True)
            d.index_copy_(2, dst_slots.to(d.device), moved)

    def gather_per_head(self, src_slots: torch.Tensor, dst_slots: torch.Tensor) -> None:
        """Layer l, head h of slot dst_slots[j] takes its contents from src_slots[l, h, j]
        ([layers, KV heads, n]): each head keeps its own tokens."""
        num_layers, num_kv, n = src_slots.shape
        device = self.values.device
        layer = torch.arange(num_layers, device=device)[:, None, None]
        head = torch.arange(num_kv, device=device)[None, :, None]
        src_slots, dst = src_slots.to(device), dst_slots.to(device).expand(num_layers, num_kv, n)
        for t in self.tensors:
            t[layer, :, dst, head] = t[layer, :, src_slots, head]
