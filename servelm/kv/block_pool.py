"""A fixed pool of KV-cache blocks with reference counts and a content-addressed cache.

`kv/` is pure bookkeeping: a block is an integer id into the KV tensors that the worker
owns. Reference counts let several requests hold the same physical block (a shared prefix,
the prompt of n > 1 samples); a block returns to the free list only at refcount 0.

Prefix caching: a full block may carry a hash of its contents (chained over every token
before it). Freed hashed blocks keep their KV and their entry in `cached` while they sit in
the free list, so a later request with the same prefix revives them instead of recomputing.
Allocation takes blocks that hold nothing first (freed ones, most recently freed first,
then never-used ones), and only then evicts cached blocks, least recently freed first, so
cached contents live as long as the pool allows. Revival and eviction are O(1) (an ordered
dict). An `on_evict(block, hash)` hook sees each eviction before the block is handed out,
so the contents can be saved to a second tier first. A pool costs memory for the blocks it
has used, not for all of them (a simulated cluster holds a thousand pools).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable


class BlockPool:
    def __init__(self, num_blocks: int,
                 on_evict: Callable[[int, bytes], None] | None = None) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        # Free blocks in three sets: never handed out ([_next_fresh, num_blocks)), freed
        # holding nothing (a stack), and freed holding cached contents (oldest first).
        # Per-block state covers the blocks handed out so far.
        self._next_fresh = 0
        self._empty: list[int] = []
        self._free: OrderedDict[int, None] = OrderedDict()
        self._ref_counts: list[int] = []
        self._hash_of: list[bytes | None] = []
        self.cached: dict[bytes, int] = {}  # block hash -> block holding that content
        self.num_evicted = 0
        self.on_evict = on_evict

    @property
    def num_free(self) -> int:
        return len(self._empty) + len(self._free) + self.num_blocks - self._next_fresh

    def can_allocate(self, n: int) -> bool:
        return n <= self.num_free

    def allocate(self, n: int) -> list[int]:
        """Take `n` blocks (refcount 1 each): empty ones first, then the least recently freed
        cached ones, evicting their contents. Caller must check `can_allocate` first."""
        if n > self.num_free:
            raise RuntimeError(f"asked for {n} KV blocks, only {self.num_free} free")
        blocks = []
        for _ in range(n):
            if self._empty:
                b = self._empty.pop()
            elif self._next_fresh < self.num_blocks:
                b = self._next_fresh
                self._next_fresh += 1
                self._ref_counts.append(0)
                self._hash_of.append(None)
            else:
                b, _ = self._free.popitem(last=False)
                self._evict(b)
            self._ref_counts[b] = 1
            blocks.append(b)
        return blocks

    def share(self, blocks: list[int]) -> None:
        """Add a reference to each block; a free (cached) block is revived from the free list."""
        for b in blocks:
            if self._ref_counts[b] == 0:
                if self._hash_of[b] is None:
                    raise RuntimeError(f"cannot share free KV block {b}: it holds no cached content")
                del self._free[b]
            self._ref_counts[b] += 1

    def free(self, blocks: list[int]) -> None:
        """Drop one reference from each block; a block reaching 0 is free, and one holding
        cached contents keeps them (most recently freed: evicted last) until evicted."""
        for b in blocks:
            rc = self._ref_counts[b] - 1
            if rc < 0:
                raise RuntimeError(f"double free of KV block {b}")
            self._ref_counts[b] = rc
            if rc == 0:
                if self._hash_of[b] is None:
                    self._empty.append(b)
                else:
                    self._free[b] = None

    def cache(self, block: int, block_hash: bytes) -> None:
        """Record that `block` (held by a request) now holds the content `block_hash`."""
        if self._hash_of[block] is not None or block_hash in self.cached:
            return  # already cached, or the same content already lives in another block
        self._hash_of[block] = block_hash
        self.cached[block_hash] = block

    def lookup(self, block_hash: bytes) -> int | None:
        return self.cached.get(block_hash)

    def touch(self, block: int) -> None:
        """Mark a free cached block most recently used, so it is evicted last."""
        if self._ref_counts[block] == 0 and block in self._free:  # never-used blocks hold nothing
            self._free.move_to_end(block)

    def is_free(self, block: int) -> bool:
        return self.ref_count(block) == 0

    def ref_count(self, block: int) -> int:
        return self._ref_counts[block] if block < self._next_fresh else 0

    def _evict(self, block: int) -> None:
        h = self._hash_of[block]
        if h is not None:
            self._hash_of[block] = None
            del self.cached[h]
            self.num_evicted += 1
            if self.on_evict is not None:
                self.on_evict(block, h)

    def check_invariants(self) -> None:
        """Raise if refcounts, the free lists and the cache disagree (tests call this)."""
        empty = set(self._empty)
        if len(empty) != len(self._empty):
            raise AssertionError("a KV block is on the empty free list twice")
        if not len(self._ref_counts) == len(self._hash_of) == self._next_fresh:
            raise AssertionError(f"state for {len(self._ref_counts)} KV blocks, {self._next_fresh} used")
        for b, rc in enumerate(self._ref_counts):
            where = (b in self._free) + (b in empty)
            if rc < 0 or where > 1 or (rc == 0) != (where == 1):
                raise AssertionError(f"KV block {b}: refcount {rc} but on {where} free lists")
            if (b in empty or b in self._free) and (b in empty) != (self._hash_of[b] is None):
                raise AssertionError(f"KV block {b} is on the wrong free list for its contents")
        for h, b in self.cached.items():
            if self._hash_of[b] != h:
                raise AssertionError(f"cache maps a hash to KV block {b}, which holds another")
        if sum(h is not None for h in self._hash_of) != len(self.cached):
            raise AssertionError("a KV block carries a hash the cache does not know")
