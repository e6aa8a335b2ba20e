"""Logprobs from raw logits (before penalties and temperature), as vLLM reports them."""

from __future__ import annotations

import torch

from servelm.outputs import Logprob, PositionLogprobs


def logprobs_for(logits: torch.Tensor, targets: list[int], k: int) -> list[PositionLogprobs]:
    """Per row of `logits`: the target token's logprob and rank, plus the top-k tokens."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    tgt = torch.tensor(targets, dtype=torch.long, device=logits.device)
    tgt_lp = logprobs.gather(1, tgt.unsqueeze(1)).squeeze(1)
    ranks = ((logprobs > tgt_lp.unsqueeze(1)).sum(1) + 1).tolist()
    tgt_lp = tgt_lp.tolist()
    if k:
        top_vals, top_ids = logprobs.topk(k, dim=-1)
        top_vals, top_ids = top_vals.tolist(), top_ids.tolist()
    result: list[PositionLogprobs] = []
    for r, t in enumerate(targets):
        entry: PositionLogprobs = {t: Logprob(tgt_lp[r], ranks[r])}
        if k:
            for rank, (tid, val) in enumerate(zip(top_ids[r], top_vals[r]), 1):
                entry.setdefault(tid, Logprob(val, rank))
        result.append(entry)
    return result
