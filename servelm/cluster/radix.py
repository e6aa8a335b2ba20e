"""An approximate record of which token prefixes one replica has cached: a radix tree over
token ids with a size cap, least recently matched leaves evicted first.

It is approximate by design, as SGLang's cache-aware router's is: the router never asks
the replica what its prefix cache holds (that would cost a round trip per request); it
remembers what it sent there, and forgets the oldest once the tree passes `max_tokens`,
roughly as the replica's own cache evicts.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Sequence


class _Node:
    __slots__ = ("edge", "children", "parent", "last_used")

    def __init__(self, edge: tuple[int, ...], parent: _Node | None, last_used: int) -> None:
        self.edge, self.parent, self.last_used = edge, parent, last_used
        self.children: dict[int, _Node] = {}


class PrefixTree:
    def __init__(self, max_tokens: int = 1 << 20) -> None:
        self.root = _Node((), None, 0)
        self.max_tokens = max_tokens
        self.num_tokens = 0
        self._clock = itertools.count(1)

    def match(self, tokens: Sequence[int]) -> int:
        """How many leading tokens of `tokens` the tree holds (marks them recently used)."""
        node, matched, now = self.root, 0, next(self._clock)
        while matched < len(tokens):
            child = node.children.get(tokens[matched])
            if child is None:
                break
            n = _common(child.edge, tokens, matched)
            matched += n
            child.last_used = now
            if n < len(child.edge):
                break
            node = child
        return matched

    def insert(self, tokens: Sequence[int]) -> None:
        """Record `tokens` as cached, then evict down to `max_tokens`."""
        node, i, now = self.root, 0, next(self._clock)
        while i < len(tokens):
            child = node.children.get(tokens[i])
            if child is None:
                node.children[tokens[i]] = _Node(tuple(tokens[i:]), node, now)
                self.num_tokens += len(tokens) - i
                break
            n = _common(child.edge, tokens, i)
            if n < len(child.edge):  # split the edge where the new tokens leave it
                head = _Node(child.edge[:n], node, now)
                child.edge, child.parent = child.edge[n:], head
                head.children[child.edge[0]] = child
                node.children[tokens[i]] = head
                child = head
            child.last_used = now
            node, i = child, i + n
        self._evict()

    def _evict(self) -> None:
        if self.num_tokens <= self.max_tokens:
            return
        leaves = [(n.last_used, id(n), n) for n in self._nodes() if not n.children and n is not self.root]
        heapq.heapify(leaves)
        while self.num_tokens > self.max_tokens and leaves:
            _, _, leaf = heapq.heappop(leaves)
            parent = leaf.parent
            del parent.children[leaf.edge[0]]
            self.num_tokens -= len(leaf.edge)
            if parent is not self.root and not parent.children:
                heapq.heappush(leaves, (parent.last_used, id(parent), parent))

    def _nodes(self) -> list[_Node]:
        out, stack = [], [self.root]
        while stack:
            node = stack.pop()
            out.append(node)
            stack.extend(node.children.values())
        return out


def _common(edge: tuple[int, ...], tokens: Sequence[int], start: int) -> int:
    n = 0
    while n < len(edge) and start + n < len(tokens) and edge[n] == tokens[start + n]:
        n += 1
    return n
