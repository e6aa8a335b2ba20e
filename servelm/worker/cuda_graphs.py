"""Decode steps replayed from captured CUDA graphs, one graph per padded batch size.

A decode step of a small model launches a few hundred kernels, and on a GPU Python takes
longer to launch them than the GPU takes to run them. A CUDA graph records the launches of
one forward pass once and replays them with a single call. A graph's shapes and addresses
are fixed, so each captured size has static input buffers: a step of n decode rows copies
its inputs into those of the smallest size >= n and replays it. The rows past n are padding:
token 0 at position 0, writing its K/V to a scratch slot no request owns (the cache has one
block more than the engine hands out) and attending to that one slot. The attention kernel
sizes its grid by `max_len` (the longest context servelm admits), not by the batch, so one
graph serves every mix of lengths.

Steps with prefill chunks, draft trees, KV-compression scoring, or more rows than the
largest size run eagerly. `capture` makes the graphs: `CudaGraph` on a GPU; the tests pass
`EagerGraph`, which re-runs the function on the same buffers, to check this bookkeeping on
a CPU.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from servelm.model.batch import StepBatch
from servelm.ops.attention import AttentionMetadata, DecodeGroup, attention_context

Forward = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (input ids, positions) -> hidden


class CudaGraph:
    """One captured forward pass; `replay()` refreshes `out` in place."""

    def __init__(self, run: Callable[[], torch.Tensor], pool: object) -> None:
        run()  # warm-up outside the capture: Triton compiles, cuBLAS picks its kernels
        torch.cuda.synchronize()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.out = run()

    def replay(self) -> None:
        self.graph.replay()


class EagerGraph:
    """Stands in for CudaGraph where there is no GPU: `replay()` runs the function again on
    the same static buffers."""

    def __init__(self, run: Callable[[], torch.Tensor], pool: object) -> None:
        self.run = run
        self.out = run()

    def replay(self) -> None:
        self.out = self.run()


def graph_capture(device: torch.device) -> type[CudaGraph] | None:
    """How decode graphs are made on `device`: captured on CUDA; none elsewhere."""
    return CudaGraph if device.type == "cuda" else None


def capture_sizes(max_num_seqs: int) -> list[int]:
    """Batch sizes to capture: 1, 2, 4, then every multiple of 8 up to max_num_seqs (at most
    256); padding wastes at most 7 rows and a graph costs little memory."""
    limit = min(max_num_seqs, 256)
    sizes = [s for s in (1, 2, 4) if s <= limit] + list(range(8, limit + 1, 8))
    return sizes if sizes[-1] == limit else [*sizes, limit]


class DecodeGraphs:
    def __init__(self, forward: Forward, sizes: list[int], max_len: int, block_size: int,
                 scratch_block: int, device: torch.device,
                 capture: type[CudaGraph] | type[EagerGraph] = CudaGraph) -> None:
        """`scratch_block`: a cache block the engine never allocates, for padding rows."""
        self.sizes, self.max_len, self.block_size = sorted(sizes), max_len, block_size
        self.scratch_slot = scratch_block * block_size
        largest, max_blocks = self.sizes[-1], -(-max_len // block_size)
        self.input_ids = torch.zeros(largest, dtype=torch.long, device=device)
        self.positions = torch.zeros(largest, dtype=torch.long, device=device)
        self.slots = torch.full((largest,), self.scratch_slot, dtype=torch.long, device=device)
        self.tables = torch.full((largest, max_blocks), scratch_block, dtype=torch.long, device=device)
        self.context_lens = torch.ones(largest, dtype=torch.long, device=device)
        pool = torch.cuda.graph_pool_handle() if capture is CudaGraph else None
        self.graphs = {}
        for size in reversed(self.sizes):  # the largest first: later ones reuse its memory
            meta = AttentionMetadata(self.slots[:size], block_size, [DecodeGroup(
                0, size, self.tables[:size].view(-1), self.context_lens[:size], None, max_len)], [])

            def run(size: int = size, meta: AttentionMetadata = meta) -> torch.Tensor:
                with attention_context(meta):
                    return forward(self.input_ids[:size], self.positions[:size])

            self.graphs[size] = capture(run, pool)

    def bucket(self, rows: int) -> int | None:
        """The smallest captured size that holds `rows`, or None."""
        return next((s for s in self.sizes if s >= rows), None)

    def run(self, batch: StepBatch) -> torch.Tensor | None:
        """The step's hidden states from a graph, or None when it must run eagerly."""
        meta = batch.attn
        if meta.prefills or meta.scored or len(meta.decodes) != 1:
            return None
        rows = len(batch.input_ids)
        size = self.bucket(rows)
        group = meta.decodes[0]
        table = group.block_index.view(rows, -1)
        if size is None or group.max_len > self.max_len:
            return None
        self.input_ids[:rows].copy_(batch.input_ids)
        self.positions[:rows].copy_(batch.positions)
        self.slots[:rows].copy_(meta.slot_mapping)
        self.tables[:rows, : table.shape[1]].copy_(table)  # entries past a row's length go unread
        self.context_lens[:rows].copy_(group.context_lens)
        # Padding rows: whatever an earlier, larger step left there is reset.
        self.input_ids[rows:size].zero_()
        self.positions[rows:size].zero_()
        self.slots[rows:size].fill_(self.scratch_slot)
        self.tables[rows:size, 0].fill_(self.scratch_slot // self.block_size)
        self.context_lens[rows:size].fill_(1)
        graph = self.graphs[size]
        graph.replay()
        return graph.out[:rows]
