"""Prompt-lookup (n-gram) drafting: copy what followed the last n tokens the previous time
they occurred in the prompt or the output so far.

Input-grounded tasks (editing, summarizing, code changes, extraction) repeat long spans of
their input, so the continuation of the latest matching n-gram is often exactly what the
model will write next, at no model cost ("Inference with Reference", prompt-lookup
decoding). Longer n-grams are tried first: they are more specific, so their continuation
is likelier to be right.
"""

from __future__ import annotations

import numpy as np

from servelm.speculative.proposer import Draft, DraftRequest


class NgramProposer:
    """A `Proposer` that keeps no per-request state: the token ids are all it reads."""

    def __init__(self, min_n: int, max_n: int) -> None:
        self.min_n, self.max_n = min_n, max_n

    def propose(self, requests: list[DraftRequest]) -> list[Draft]:
        return [Draft(self.lookup(r.token_ids, r.max_drafts)) for r in requests]

    def accepted(self, req_id: str, path: list[int]) -> None:
        pass  # lookup depends on the tokens only

    def reset(self, req_id: str) -> None:
        pass

    def lookup(self, token_ids: list[int], k: int) -> list[int]:
        """Up to `k` draft tokens following the latest earlier match of the longest suffix
        n-gram (max_n down to min_n); [] when nothing matches."""
        if k < 1 or len(token_ids) < self.min_n + 1:
            return []
        ids = np.asarray(token_ids, dtype=np.int64)
        total = len(ids)
        for n in range(min(self.max_n, total - 1), self.min_n - 1, -1):
            suffix = ids[total - n:]
            # Start positions of every earlier window equal to the suffix (the suffix itself,
            # at total - n, is excluded: it has no continuation yet).
            windows = np.lib.stride_tricks.sliding_window_view(ids[:total - 1], n)
            hits = np.flatnonzero((windows == suffix).all(axis=1))
            if len(hits):
                start = int(hits[-1]) + n
                return ids[start:start + k].tolist()
        return []
