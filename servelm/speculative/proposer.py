"""The one interface every way of drafting tokens implements.

Each step the scheduler grants a decoding request a number of draft tokens; the worker asks
its proposer for at most that many, verifies them against the target in the same forward
pass (speculative/verify.py), and tells the proposer which were accepted. n-gram lookup,
a draft model, the target's own first layers, and token trees of either model are all
proposers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from servelm.sampling_params import SamplingParams
from servelm.speculative.tree import DraftTree


@dataclass
class DraftRequest:
    """What a proposer sees of one request."""

    req_id: str
    token_ids: list[int]  # prompt and output so far; the last is the root the drafts follow
    num_computed_tokens: int  # tokens whose K/V the target's cache holds (num_tokens - 1)
    params: SamplingParams
    generator: torch.Generator | None
    block_table: list[int]  # covers every slot the drafts may use
    max_drafts: int  # at most this many draft tokens (tree nodes)


@dataclass
class Draft:
    token_ids: list[int]  # level order for a tree
    tree: DraftTree | None = None  # their shape; None: a chain
    probs: torch.Tensor | None = None  # [drafts, vocab]: the q each was drawn from; None: one-hot

    def __post_init__(self) -> None:
        if self.tree is not None and self.tree.is_chain:
            self.tree = None


class Proposer(Protocol):
    def propose(self, requests: list[DraftRequest]) -> list[Draft]:
        """At most `max_drafts` draft tokens for each request (possibly none)."""
        ...

    def accepted(self, req_id: str, path: list[int]) -> None:
        """Feedback after verification: the accepted draft nodes (1-based, root to leaf)."""
        ...

    def reset(self, req_id: str) -> None:
        """Forget what the proposer keeps for a request: it finished, or its blocks changed."""
        ...
