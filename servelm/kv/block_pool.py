"""A fixed pool of KV-cache blocks with reference counts.

`kv/` is pure bookkeeping: a block is an integer id into the KV tensors that the worker
owns. Reference counts let later features (prefix caching, n > 1 sharing) hand the same
physical block to several requests; a block returns to the free list only at refcount 0.
"""

from __future__ import annotations

from collections import deque


class BlockPool:
    """Free list plus refcounts. All operations are O(number of blocks touched).

    The free list is a deque used FIFO: freed blocks go to the back, so a block that was
    just released is the last to be reused (which is what prefix caching will want).
    """

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self._ref_counts = [0] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free)

    def allocate(self, n: int) -> list[int]:
        """Take `n` free blocks (refcount 1 each). Caller must check `can_allocate` first."""
        if n > len(self._free):
            raise RuntimeError(f"asked for {n} KV blocks, only {len(self._free)} free")
        blocks = [self._free.popleft() for _ in range(n)]
        for b in blocks:
            self._ref_counts[b] = 1
        return blocks

    def share(self, blocks: list[int]) -> None:
        """Add a reference to blocks already held by someone else."""
        for b in blocks:
            if self._ref_counts[b] <= 0:
                raise RuntimeError(f"cannot share free KV block {b}")
            self._ref_counts[b] += 1

    def free(self, blocks: list[int]) -> None:
        """Drop one reference from each block; blocks reaching 0 return to the free list."""
        for b in blocks:
            rc = self._ref_counts[b] - 1
            if rc < 0:
                raise RuntimeError(f"double free of KV block {b}")
            self._ref_counts[b] = rc
            if rc == 0:
                self._free.append(b)

    def ref_count(self, block: int) -> int:
        return self._ref_counts[block]

    def check_invariants(self) -> None:
        """Raise if refcounts and the free list disagree (used by tests after every run)."""
        free = set(self._free)
        if len(free) != len(self._free):
            raise AssertionError("a KV block appears twice in the free list")
        for b, rc in enumerate(self._ref_counts):
            if rc < 0:
                raise AssertionError(f"KV block {b} has negative refcount {rc}")
            if (rc == 0) != (b in free):
                raise AssertionError(f"KV block {b}: refcount {rc} but free={b in free}")
