"""Per-request block tables on top of the block pool.

The scheduler speaks to this class only in paired calls — `can_allocate` then `allocate`,
and `free` — and never sees a block's refcount. The worker reads `block_table` to build
slot mappings.
"""

from __future__ import annotations

from servelm.kv.block_pool import BlockPool


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)
        self._tables: dict[str, list[int]] = {}

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    @property
    def usage(self) -> float:
        """Fraction of blocks in use, 0..1."""
        return 1.0 - self.pool.num_free / self.pool.num_blocks

    def blocks_needed(self, request_id: str, num_tokens: int) -> int:
        """New blocks a request needs so that `num_tokens` tokens in total have a slot."""
        held = len(self._tables.get(request_id, ()))
        return max(0, cdiv(num_tokens, self.block_size) - held)

    def can_allocate(self, request_id: str, num_tokens: int) -> bool:
        return self.pool.can_allocate(self.blocks_needed(request_id, num_tokens))

    def allocate(self, request_id: str, num_tokens: int) -> None:
        """Grow the request's block table to cover `num_tokens` tokens."""
        need = self.blocks_needed(request_id, num_tokens)
        table = self._tables.setdefault(request_id, [])
        if need:
            table.extend(self.pool.allocate(need))

    def free(self, request_id: str) -> None:
        table = self._tables.pop(request_id, None)
        if table:
            # Free the tail first so, under FIFO reuse, a request's first blocks stay
            # untouched the longest (prefix caching revives from the front).
            self.pool.free(table[::-1])

    def block_table(self, request_id: str) -> list[int]:
        return self._tables.get(request_id, [])

    def check_invariants(self) -> None:
        self.pool.check_invariants()
        held = sum(len(t) for t in self._tables.values())
        if held != self.pool.num_blocks - self.pool.num_free:
            raise AssertionError(f"{held} blocks in tables but {self.pool.num_blocks - self.pool.num_free} in use")
