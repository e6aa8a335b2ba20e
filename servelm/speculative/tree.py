"""Draft token trees (SpecInfer): several candidate continuations verified in one pass.

A tree is a flat list of nodes in level order; node i (1-based) has parent `parents[i-1]`,
0 being the root, the last real token. Level order keeps every prefix of the list a tree
(so the scheduler can drop nodes from the end) and lays a chain out exactly like plain
drafts. Node i's K/V goes to slot root + i, but its RoPE position is root + its depth, and
it attends to the context, the root and its own ancestors only: the tree attention mask.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property, lru_cache

import torch


@dataclass(frozen=True)
class DraftTree:
    parents: tuple[int, ...]

    @classmethod
    def static(cls, branching: Sequence[int], depth: int) -> DraftTree:
        """The tree with `branching[d]` children under every node of depth d, `depth` levels deep."""
        parents: list[int] = []
        level = [0]
        for b in branching[:depth]:
            nxt = []
            for node in level:
                for _ in range(b):
                    parents.append(node)
                    nxt.append(len(parents))
            level = nxt
        return cls(tuple(parents))

    @property
    def size(self) -> int:
        return len(self.parents)

    @property
    def is_chain(self) -> bool:
        return all(p == i for i, p in enumerate(self.parents))

    @cached_property
    def depths(self) -> list[int]:
        """Depth of every node, the root's (0) first."""
        d = [0]
        for p in self.parents:
            d.append(d[p] + 1)
        return d

    @cached_property
    def children(self) -> list[list[int]]:
        kids: list[list[int]] = [[] for _ in range(self.size + 1)]
        for i, p in enumerate(self.parents, 1):
            kids[p].append(i)
        return kids

    @cached_property
    def levels(self) -> list[range]:
        """Node indices at each depth 1, 2, ... (contiguous: level order)."""
        out: list[range] = []
        for i, d in enumerate(self.depths[1:], 1):
            if d > len(out):
                out.append(range(i, i + 1))
            else:
                out[-1] = range(out[-1].start, i + 1)
        return out

    @cached_property
    def _ancestors(self) -> torch.Tensor:
        """[size+1, size+1] bool: row i is True at node i's ancestors and i itself."""
        a = torch.zeros(self.size + 1, self.size + 1, dtype=torch.bool)
        a[0, 0] = True
        for i, p in enumerate(self.parents, 1):
            a[i] = a[p]
            a[i, i] = True
        return a

    def truncated(self, n: int) -> DraftTree:
        return DraftTree(self.parents[:n])

    def positions(self, root: int, nodes: range) -> list[int]:
        return [root + self.depths[i] for i in nodes]

    def mask(self, root: int, nodes: range) -> torch.Tensor:
        """Attention mask of `nodes` (0 is the root) over slots 0 .. root + nodes[-1]: all
        the context up to and including the root, then their ancestors among the nodes."""
        last = nodes[-1]
        mask = torch.ones(len(nodes), root + 1 + last, dtype=torch.bool)
        mask[:, root + 1:] = self._ancestors[nodes.start:last + 1, 1:last + 1]
        return mask


@lru_cache(maxsize=256)
def static_tree_for(branching: tuple[int, ...], max_drafts: int) -> DraftTree:
    """The shallowest static tree of `branching` with at least `max_drafts` nodes (the whole
    tree when none has): what a proposer drafts, then cuts to `max_drafts` nodes."""
    depth = 1
    while depth < len(branching) and DraftTree.static(branching, depth).size < max_drafts:
        depth += 1
    return DraftTree.static(branching, depth)

