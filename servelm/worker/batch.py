"""Turn a SchedulerOutput into the flat tensors of one forward pass.

Rows are ordered decodes (one new token) first, sorted by context length, then prefill
chunks, so attention can run the decodes in a few batched calls of similar lengths. Everything here is built once per step and shared by
every layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from servelm.engine.request import Request
from servelm.ops.attention import AttentionMetadata, DecodeGroup, PrefillSlice


@dataclass
class StepBatch:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    attn: AttentionMetadata
    order: list[int]  # batch position -> index into SchedulerOutput.requests
    row_start: list[int]  # first flat row of each batch position


def _slots(table: torch.Tensor, positions: torch.Tensor, block_size: int) -> torch.Tensor:
    return table[positions // block_size] * block_size + positions % block_size


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
    return DecodeGroup(start, d, table.reshape(-1), pos + 1, mask)


def build_step_batch(
    requests: list[Request],
    num_new: list[int],
    block_tables: list[list[int]],
    block_size: int,
    dtype: torch.dtype,
    split_decodes: bool = True,
) -> StepBatch:
    """`split_decodes`: group decodes by context length and build padding masks (for
    backends that pad each group to its longest context); False: one group, no mask."""
    decodes = sorted((i for i, n in enumerate(num_new) if n == 1), key=lambda i: requests[i].num_computed_tokens)
    prefills = [i for i, n in enumerate(num_new) if n != 1]
    order = decodes + prefills
    ids: list[int] = []
    positions: list[torch.Tensor] = []
    slots: list[torch.Tensor] = []
    row_start: list[int] = list(range(len(decodes)))

    decode_groups: list[DecodeGroup] = []
    if decodes:
        starts = [requests[i].num_computed_tokens for i in decodes]
        ids.extend(requests[i].all_token_ids[s] for i, s in zip(decodes, starts))
        pos = torch.tensor(starts, dtype=torch.long)
        positions.append(pos)
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
        req, n = requests[i], num_new[i]
        start = req.num_computed_tokens
        ids.extend(req.step_token_ids(start, n))
        table = torch.tensor(block_tables[i], dtype=torch.long)
        pos = torch.arange(start, start + n)
        positions.append(pos)
        slots.append(_slots(table, pos, block_size))
        prefill_slices.append(PrefillSlice(row, n, start + n, table if start else None))
        row_start.append(row)
        row += n

    return StepBatch(
        input_ids=torch.tensor(ids, dtype=torch.long),
        positions=torch.cat(positions),
        attn=AttentionMetadata(
            slot_mapping=torch.cat(slots),
            block_size=block_size,
            decodes=decode_groups,
            prefills=prefill_slices,
        ),
        order=order,
        row_start=row_start,
    )
