"""Turn a SchedulerOutput into the flat tensors of one forward pass.

Rows are ordered decodes (one new token) first, then prefill chunks, so attention can run
all decodes in one batched call. Everything here is built once per step and shared by
every layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from servelm.engine.request import Request
from servelm.ops.attention import AttentionMetadata, PrefillSlice


@dataclass
class StepBatch:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    attn: AttentionMetadata
    order: list[int]  # batch position -> index into SchedulerOutput.requests
    row_start: list[int]  # first flat row of each batch position


def _slots(table: torch.Tensor, positions: torch.Tensor, block_size: int) -> torch.Tensor:
    return table[positions // block_size] * block_size + positions % block_size


def build_step_batch(
    requests: list[Request],
    num_new: list[int],
    block_tables: list[list[int]],
    block_size: int,
    dtype: torch.dtype,
) -> StepBatch:
    decodes = [i for i, n in enumerate(num_new) if n == 1]
    prefills = [i for i, n in enumerate(num_new) if n != 1]
    order = decodes + prefills
    ids: list[int] = []
    positions: list[torch.Tensor] = []
    slots: list[torch.Tensor] = []
    row_start: list[int] = []

    d = len(decodes)
    decode_blocks = decode_mask = None
    if d:
        starts = [requests[i].num_computed_tokens for i in decodes]
        ids.extend(requests[i].all_token_ids[s] for i, s in zip(decodes, starts))
        pos = torch.tensor(starts, dtype=torch.long)
        max_blocks = max(len(block_tables[i]) for i in decodes)
        table = torch.zeros(d, max_blocks, dtype=torch.long)
        for row, i in enumerate(decodes):
            bt = block_tables[i]
            table[row, : len(bt)] = torch.tensor(bt, dtype=torch.long)
        blk = pos // block_size
        slots.append(table[torch.arange(d), blk] * block_size + pos % block_size)
        positions.append(pos)
        max_len = max_blocks * block_size
        decode_blocks = table.reshape(-1)
        # An additive mask in the model dtype: CPU SDPA converts a bool mask on every call.
        beyond = torch.arange(max_len).unsqueeze(0) > pos.unsqueeze(1)
        decode_mask = torch.zeros(d, 1, 1, max_len, dtype=dtype).masked_fill_(beyond.view(d, 1, 1, max_len), float("-inf"))
        row_start.extend(range(d))

    prefill_slices: list[PrefillSlice] = []
    row = d
    for i in prefills:
        req, n = requests[i], num_new[i]
        start = req.num_computed_tokens
        ids.extend(req.all_token_ids[start : start + n])
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
            num_decodes=d,
            block_size=block_size,
            decode_block_index=decode_blocks,
            decode_mask=decode_mask,
            prefills=prefill_slices,
        ),
        order=order,
        row_start=row_start,
    )
