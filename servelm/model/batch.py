"""Turn one step's chunks of new tokens into the flat tensors of one forward pass.

Rows are ordered decodes (one new token) first, sorted by context length, then prefill
chunks, so attention can run the decodes in a few batched calls of similar lengths.
Everything here is built once per step and shared by every layer. The target model and
draft models build their batches here alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from servelm.ops.attention import AttentionMetadata, DecodeGroup, PagedPrefills, PrefillSlice


@dataclass
class SeqChunk:
    """One sequence's new tokens this pass. Row j's K/V goes to cache index `start + j` and
    attends to every earlier index, unless `tree_mask` says otherwise."""

    token_ids: list[int]
    start: int  # tokens of this sequence whose K/V is already in the cache
    # RoPE positions when they differ from the cache indices: draft-tree rows (a node sits
    # at its depth, not at its slot) and requests whose KV compression dropped tokens.
    positions: list[int] | None = None
    # Draft-tree rows: which of the `start + len(token_ids)` slots each row may attend to.
    tree_mask: torch.Tensor | None = None  # [len(token_ids), start + len(token_ids)] bool

    @property
    def is_decode(self) -> bool:
        return len(self.token_ids) == 1 and self.tree_mask is None


@dataclass
class StepBatch:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    attn: AttentionMetadata
    order: list[int]  # batch position -> index into the chunks
    row_start: list[int]  # first flat row of each batch position


def slots_of(table: torch.Tensor, indices: torch.Tensor, block_size: int) -> torch.Tensor:
    """Cache slots of a sequence's cache indices, through its block table."""
    return table[indices // block_size] * block_size + indices % block_size


def _split_by_length(lengths: list[int]) -> list[int]:
    """Group sizes for decodes sorted by context length: a new group starts when the length
    passes 1.5x the group's shortest, so padding to the group's longest wastes little."""
    sizes: list[int] = []
    first = None
    for n in lengths:
        if first is None or n > 1.5 * first + 16:
            sizes.append(0)
            first = n
        sizes[-1] += 1
    return sizes


def _decode_group(start: int, pos: torch.Tensor, tables: list[list[int]], block_size: int,
                  dtype: torch.dtype, with_mask: bool) -> DecodeGroup:
    d = len(tables)
    max_blocks = max(len(bt) for bt in tables)
    table = torch.zeros(d, max_blocks, dtype=torch.long)
    for row, bt in enumerate(tables):
        table[row, : len(bt)] = torch.tensor(bt, dtype=torch.long)
    mask = None
    if with_mask:  # additive, in the model dtype: CPU SDPA converts a bool mask on every call
        max_len = max_blocks * block_size
        beyond = (torch.arange(max_len).unsqueeze(0) > pos.unsqueeze(1)).view(d, 1, 1, max_len)
        mask = torch.zeros(d, 1, 1, max_len, dtype=dtype).masked_fill_(beyond, float("-inf"))
    return DecodeGroup(start, d, table.reshape(-1), pos + 1, mask, int(pos.max()) + 1)


def build_step_batch(
    chunks: list[SeqChunk],
    block_tables: list[list[int]],
    block_size: int,
    dtype: torch.dtype,
    split_decodes: bool = True,
    paged_prefills: bool = False,
    device: torch.device | str = "cpu",
) -> StepBatch:
    """`split_decodes`: group decodes by context length and build padding masks (for
    backends that pad each group to its longest context); False: one group, no mask.
    `paged_prefills`: also describe the untreed prefill chunks as one `PagedPrefills`.
    Built on the CPU and then copied to `device`."""
    decodes = sorted((i for i, c in enumerate(chunks) if c.is_decode), key=lambda i: chunks[i].start)
    prefills = [i for i, c in enumerate(chunks) if not c.is_decode]
    order = decodes + prefills
    ids: list[int] = []
    positions: list[torch.Tensor] = []
    slots: list[torch.Tensor] = []
    row_start: list[int] = list(range(len(decodes)))

    decode_groups: list[DecodeGroup] = []
    if decodes:
        starts = [chunks[i].start for i in decodes]
        ids.extend(chunks[i].token_ids[0] for i in decodes)
        pos = torch.tensor(starts, dtype=torch.long)
        positions.append(torch.tensor([chunks[i].positions[0] if chunks[i].positions else chunks[i].start
                                       for i in decodes], dtype=torch.long))
        first = 0
        for size in _split_by_length(starts) if split_decodes else [len(decodes)]:
            rows = slice(first, first + size)
            group = _decode_group(first, pos[rows], [block_tables[i] for i in decodes[rows]], block_size,
                                  dtype, split_decodes)
            table = group.block_index.view(size, -1)
            slots.append(table[torch.arange(size), pos[rows] // block_size] * block_size + pos[rows] % block_size)
            decode_groups.append(group)
            first += size

    prefill_slices: list[PrefillSlice] = []
    row = len(decodes)
    for i in prefills:
        chunk = chunks[i]
        start, n = chunk.start, len(chunk.token_ids)
        ids.extend(chunk.token_ids)
        table = torch.tensor(block_tables[i], dtype=torch.long)
        slot_pos = torch.arange(start, start + n)
        positions.append(slot_pos if chunk.positions is None else torch.tensor(chunk.positions, dtype=torch.long))
        slots.append(slots_of(table, slot_pos, block_size))
        prefill_slices.append(PrefillSlice(row, n, start + n, table if start else None, chunk.tree_mask))
        row_start.append(row)
        row += n

    attn = AttentionMetadata(torch.cat(slots), block_size, decode_groups, prefill_slices)
    if paged_prefills:
        attn.paged_prefills = _paged(prefill_slices, [block_tables[i] for i in prefills])
    batch = StepBatch(torch.tensor(ids, dtype=torch.long), torch.cat(positions), attn, order, row_start)
    return batch if torch.device(device).type == "cpu" else _to_device(batch, device)


def _paged(slices: list[PrefillSlice], tables: list[list[int]]) -> PagedPrefills | None:
    chunks = [(s, t) for s, t in zip(slices, tables) if s.mask is None]
    if not chunks:
        return None
    table = torch.zeros(len(chunks), max(len(t) for _, t in chunks), dtype=torch.long)
    for row, (_, t) in enumerate(chunks):
        table[row, : len(t)] = torch.tensor(t, dtype=torch.long)
    ints = lambda xs: torch.tensor(xs, dtype=torch.long)  # noqa: E731
    return PagedPrefills(table, ints([s.start for s, _ in chunks]), ints([s.num_new for s, _ in chunks]),
                         ints([s.context_len for s, _ in chunks]), max(s.num_new for s, _ in chunks))


def _to_device(batch: StepBatch, device: torch.device | str) -> StepBatch:
    """Every tensor of the batch moved to `device`: the integer ones in one copy (each copy
    from host memory costs a round of driver work, and a step has a dozen such tensors),
    the masks one each."""
    meta = batch.attn
    ints = [(batch, "input_ids"), (batch, "positions"), (meta, "slot_mapping")]
    masks = []
    for g in meta.decodes:
        ints += [(g, "block_index"), (g, "context_lens")]
        masks.append((g, "mask"))
    for p in meta.prefills:
        ints.append((p, "block_index"))
        masks.append((p, "mask"))
    if meta.paged_prefills is not None:
        ints += [(meta.paged_prefills, f) for f in ("block_tables", "q_starts", "q_lens", "context_lens")]
    ints = [(o, f) for o, f in ints if getattr(o, f) is not None]
    host = [getattr(o, f) for o, f in ints]
    flat = torch.cat([t.reshape(-1) for t in host]).to(device, non_blocking=True)
    for (o, f), t, part in zip(ints, host, flat.split([t.numel() for t in host])):
        setattr(o, f, part.view(t.shape))
    for o, f in masks:
        if getattr(o, f) is not None:
            setattr(o, f, getattr(o, f).to(device, non_blocking=True))
    return batch
