"""The target model's KV tensors and the host-memory pools beside them, and every move of K/V
between or within them: swap and CPU-tier copies, draft-tree compaction, KV compression.

The KV manager (kv/) decides which block holds what; this class only carries its decisions
out on the tensors.
"""

from __future__ import annotations

import torch

from servelm.kv.compression import CompressionConfig
from servelm.model.arch import ModelArch
from servelm.model.batch import slots_of
from servelm.step_io import BlockCopy, SchedulerOutput
from servelm.worker.kv_cache import KVTensors
from servelm.worker.kv_selection import select_kept


class CacheEngine:
    def __init__(self, arch: ModelArch, block_size: int, dtype: torch.dtype, kv_cache_dtype: str,
                 num_kv_blocks: int, num_swap_blocks: int, num_offload_blocks: int,
                 compression: CompressionConfig | None, device: torch.device | str = "cpu") -> None:
        self.arch, self.block_size, self.compression = arch, block_size, compression
        with_scores = compression is not None and compression.needs_scores

        def tensors(num_blocks: int, host: bool) -> KVTensors:
            return KVTensors(arch, num_blocks * block_size, dtype, kv_cache_dtype, host, with_scores, device)

        self.kv = tensors(num_kv_blocks, host=False)
        # Host-memory pools in the same layout: swap space for preemption by swap, and the
        # CPU tier of the prefix cache. `empty`, so pages cost nothing until first written.
        self.swap_space = tensors(num_swap_blocks, host=True)
        self.offload_space = tensors(num_offload_blocks, host=True)

    @torch.inference_mode()
    def move_kv(self, step: SchedulerOutput) -> None:
        """Copy KV blocks between the cache and host memory: out to swap space and the CPU
        tier first, then back in. A cache block a victim just left, or whose evicted prefix
        is being saved, may be where blocks coming back in land in the same step."""
        for src, dst, pairs in ((self.kv, self.swap_space, step.swap_out),
                                (self.kv, self.offload_space, step.offload),
                                (self.swap_space, self.kv, step.swap_in),
                                (self.offload_space, self.kv, step.restore)):
            if pairs:
                src.copy_slots(dst, self._block_slots(pairs, 0), self._block_slots(pairs, 1))

    def _block_slots(self, pairs: list[BlockCopy], side: int) -> torch.Tensor:
        blocks = torch.tensor([p[side] for p in pairs])
        return (blocks[:, None] * self.block_size + torch.arange(self.block_size)).flatten()

    @torch.inference_mode()
    def compact_tree(self, table: list[int], root: int, path: list[int]) -> None:
        """Move the K/V of accepted tree nodes from their node slots (root + node) to the
        slots of their positions (root + depth), so the sequence reads as a plain one.
        Every node index is at least its depth, so no move overwrites a later source."""
        moves = [(root + node, root + depth) for depth, node in enumerate(path, 1) if node != depth]
        if not moves:
            return
        t = torch.tensor(table).cpu()
        src, dst = (slots_of(t, torch.tensor(x), self.block_size) for x in zip(*moves))
        self.kv.copy_slots(self.kv, src, dst)

    @torch.inference_mode()
    def compress(self, table: list[int], kv_len: int) -> None:
        """Keep the compression budget's worth of a request's `kv_len` cached tokens, per
        layer and head as the policy picks, compacted into its first cache indices."""
        device, bs = self.kv.values.device, self.block_size
        t = torch.tensor(table, device=device)
        scores = None
        if self.kv.scores is not None:
            scores = self.kv.scores[:, 0].index_select(1, slots_of(t, torch.arange(kv_len, device=device), bs))
        keep = select_kept(self.compression, kv_len, scores, self.arch.num_layers,
                           self.arch.num_kv_heads).to(device)
        self.kv.gather_per_head(slots_of(t, keep, bs),
                                slots_of(t, torch.arange(keep.shape[-1], device=device), bs))
