"""Per-request block tables on top of the block pool, with automatic prefix caching.

The scheduler speaks to this class in paired calls — `find_cached` + `can_allocate` then
`allocate`, and `free` — and never sees a block's refcount; it sends the worker the block
ids `block_table` lists, and calls `cache_blocks` after each step so blocks that just
became full are findable by later requests. Requests are named by id and token ids only:
this module knows nothing of the engine.

A full block's identity is a hash chained over its parent's hash and its own token ids, so
equal hashes mean equal prefixes and equal KV (nothing else in servelm changes the KV of a
token: one model, one dtype per engine).

CPU offload (`num_offload_blocks` > 0) adds a second tier under the prefix cache: a cached
block evicted from the KV cache is copied into a host-memory pool (itself an LRU cache of
hashed blocks) instead of being lost, and a later prefix hit there is copied back into a
fresh cache block instead of recomputed. The copies are recorded here and carried out by the
worker at the start of the step (`take_tier_copies`): saves before restores, because a block
saved this step may be the one a restore (or a new request) writes.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence
from typing import NamedTuple

from servelm.kv.block_pool import BlockPool

ROOT_HASH = b"servelm-prefix-root"


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def block_hash(parent: bytes, token_ids: list[int]) -> bytes:
    return hashlib.sha256(parent + array("q", token_ids).tobytes()).digest()


class HostBlock(NamedTuple):
    """A prefix block found only in the CPU tier: `slot` in the host pool, its `hash`."""

    slot: int
    hash: bytes


CachedBlock = int | HostBlock  # a cache block id, or a block to restore from the CPU tier


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 num_swap_blocks: int = 0, num_offload_blocks: int = 0) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks)
        self.swap_pool = BlockPool(num_swap_blocks) if num_swap_blocks else None
        self.host_pool = None
        if enable_prefix_caching and num_offload_blocks:
            self.host_pool = BlockPool(num_offload_blocks)
            self.pool.on_evict = self._offload
        self._to_host: list[tuple[int, int]] = []  # (cache block, host slot) saves this step
        self._from_host: list[tuple[int, int]] = []  # (host slot, cache block) restores
        self._pinned: list[int] = []  # host slots read or written this step
        self.num_offloaded_blocks = 0  # cumulative saves to the CPU tier
        self.num_restored_blocks = 0  # cumulative restores from it
        self._tables: dict[str, list[int]] = {}
        self._hashes: dict[str, list[bytes]] = {}  # request -> hashes of its full blocks so far
        self._num_cached: dict[str, int] = {}  # leading blocks of a table already in the cache
        self._swapped: dict[str, list[int]] = {}  # request -> its blocks in swap space
        self.num_swap_outs = 0  # blocks copied out, cumulative

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    @property
    def usage(self) -> float:
        """Fraction of blocks held by requests, 0..1 (cached free blocks count as free)."""
        return 1.0 - self.pool.num_free / self.pool.num_blocks

    def block_hashes(self, request_id: str, token_ids: Sequence[int], num_blocks: int) -> list[bytes]:
        """Hashes of the request's first `num_blocks` full blocks, extended incrementally
        (kept until `forget`: a preempted request's tokens only grow, so they stay valid)."""
        hashes, bs = self._hashes.setdefault(request_id, []), self.block_size
        while len(hashes) < num_blocks:
            i = len(hashes)
            parent = hashes[-1] if hashes else ROOT_HASH
            hashes.append(block_hash(parent, token_ids[i * bs:(i + 1) * bs]))
        return hashes[:num_blocks]

    def find_cached(self, request_id: str, token_ids: Sequence[int]) -> list[CachedBlock]:
        """The request's longest cached prefix (full blocks only), each block found in the KV
        cache or, failing that, in the CPU tier. The last token is always left to compute,
        since its logits pick the next token."""
        if not self.enable_prefix_caching:
            return []
        blocks: list[CachedBlock] = []
        for h in self.block_hashes(request_id, token_ids, (len(token_ids) - 1) // self.block_size):
            b = self.pool.lookup(h)
            if b is None and self.host_pool is not None:
                slot = self.host_pool.lookup(h)
                b = None if slot is None else HostBlock(slot, h)
            if b is None:
                break
            blocks.append(b)
        return blocks

    def blocks_needed(self, request_id: str, num_tokens: int, cached: list[CachedBlock] = ()) -> int:
        """Free-list blocks a request consumes so that `num_tokens` tokens in total have a
        slot: new blocks, plus cached blocks revived from the free list or restored into one."""
        if not cached:  # every running request, every step
            return max(0, cdiv(num_tokens, self.block_size) - len(self._tables.get(request_id, ())))
        held = len(self._tables.get(request_id, ())) + len(cached)
        revived = sum(isinstance(b, HostBlock) or self.pool.is_free(b) for b in cached)
        return max(0, cdiv(num_tokens, self.block_size) - held) + revived

    def num_slots(self, request_id: str) -> int:
        """Tokens the request's block table has room for."""
        return len(self._tables.get(request_id, ())) * self.block_size

    def can_allocate(self, request_id: str, num_tokens: int, cached: list[CachedBlock] = ()) -> bool:
        return self.pool.can_allocate(self.blocks_needed(request_id, num_tokens, cached))

    def allocate(self, request_id: str, num_tokens: int, cached: list[CachedBlock] = ()) -> None:
        """Grow the request's block table to cover `num_tokens` tokens, starting with the
        `cached` prefix blocks when it is first admitted."""
        table = self._tables.setdefault(request_id, [])
        if cached:
            if table:
                raise RuntimeError(f"{request_id}: cached blocks can only start a block table")
            table.extend(self._take_cached(cached))
            self._num_cached[request_id] = len(cached)
        need = max(0, cdiv(num_tokens, self.block_size) - len(table))
        if need:
            table.extend(self.pool.allocate(need))

    def trim(self, request_id: str, num_tokens: int) -> None:
        """Free the table's blocks beyond those `num_tokens` tokens need (the slots of
        rejected draft tokens)."""
        table = self._tables.get(request_id)
        keep = cdiv(num_tokens, self.block_size)
        if table and len(table) > keep:
            self.pool.free(table[keep:][::-1])
            del table[keep:]

    def cache_blocks(self, request_id: str, token_ids: Sequence[int], num_computed: int) -> None:
        """Make the request's newly completed full blocks findable by later requests."""
        if (not self.enable_prefix_caching
                or num_computed // self.block_size <= self._num_cached.get(request_id, 0)):
            return  # no block newly full: most steps of most requests
        table = self._tables.get(request_id)
        if not table:
            return
        # Accepted draft tokens count as computed a moment before they are appended: hash
        # only blocks whose token ids are all known.
        full = min(min(num_computed, len(token_ids)) // self.block_size, len(table))
        done = self._num_cached.get(request_id, 0)
        if full > done:
            for b, h in zip(table[done:full], self.block_hashes(request_id, token_ids, full)[done:]):
                self.pool.cache(b, h)
            self._num_cached[request_id] = full

    # ---- the CPU tier under the prefix cache ----------------------------------------------
    def _take_cached(self, cached: list[CachedBlock]) -> list[int]:
        """Cache blocks for a found prefix: shared where already in the KV cache, fresh ones
        (filled from the CPU tier this step) for the rest."""
        resident = [b for b in cached if not isinstance(b, HostBlock)]
        self.pool.share(resident)  # first, so allocating below cannot evict them
        from_host = [b for b in cached if isinstance(b, HostBlock)]
        if not from_host:
            return resident
        self.host_pool.share([b.slot for b in from_host])  # pinned until copied
        self._pinned.extend(b.slot for b in from_host)
        fresh = iter(self.pool.allocate(len(from_host)))
        blocks = []
        for b in cached:
            if isinstance(b, HostBlock):
                block = next(fresh)
                self.pool.cache(block, b.hash)
                self._from_host.append((b.slot, block))
                b = block
            blocks.append(b)
        self.num_restored_blocks += len(from_host)
        return blocks

    def _offload(self, block: int, h: bytes) -> None:
        """Save an evicted cache block's contents to the CPU tier (skipped when already
        there, or when every host slot is in use this step)."""
        slot = self.host_pool.lookup(h)
        if slot is not None:
            self.host_pool.touch(slot)
            return
        if not self.host_pool.can_allocate(1):
            return
        slot = self.host_pool.allocate(1)[0]
        self.host_pool.cache(slot, h)
        self._pinned.append(slot)
        self._to_host.append((block, slot))
        self.num_offloaded_blocks += 1

    def take_tier_copies(self) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """This step's (cache block, host slot) saves and (host slot, cache block) restores,
        to be copied in that order before the forward pass; their host slots are released."""
        saves, restores = self._to_host, self._from_host
        self._to_host, self._from_host = [], []
        if self._pinned:
            self.host_pool.free(self._pinned)
            self._pinned = []
        return saves, restores

    @property
    def num_cpu_cached_blocks(self) -> int:
        return 0 if self.host_pool is None else len(self.host_pool.cached)

    # ---- preemption by swap: a victim's blocks move to swap space and back ---------------
    @property
    def num_swapped_blocks(self) -> int:
        return 0 if self.swap_pool is None else self.swap_pool.num_blocks - self.swap_pool.num_free

    def can_swap_out(self, request_id: str) -> bool:
        return self.swap_pool is not None and self.swap_pool.can_allocate(
            len(self._tables.get(request_id, ())))

    def swap_out(self, request_id: str) -> list[tuple[int, int]]:
        """Give up the request's cache blocks for swap blocks; returns the copies to make
        (cache block, swap block) before those cache blocks are written again."""
        table = self._tables.get(request_id, [])
        slots = self.swap_pool.allocate(len(table))
        self._swapped[request_id] = slots
        self.num_swap_outs += len(table)
        pairs = list(zip(table, slots))
        self._free_table(request_id)
        return pairs

    def can_swap_in(self, request_id: str, num_tokens: int) -> bool:
        return self.pool.can_allocate(cdiv(num_tokens, self.block_size))

    def swap_in(self, request_id: str, num_tokens: int) -> list[tuple[int, int]]:
        """New cache blocks for a swapped request (enough for `num_tokens`); returns the
        copies to make (swap block, cache block) before it runs."""
        slots = self._swapped.pop(request_id)
        table = self.pool.allocate(cdiv(num_tokens, self.block_size))
        self._tables[request_id] = table
        self.swap_pool.free(slots)
        return list(zip(slots, table))

    def free(self, request_id: str) -> None:
        """Release everything the request holds, in the cache and in swap space."""
        swapped = self._swapped.pop(request_id, None)
        if swapped:
            self.swap_pool.free(swapped)
        self._free_table(request_id)

    def forget(self, request_id: str) -> None:
        """The request is done: free what it holds and drop its block hashes."""
        self.free(request_id)
        self._hashes.pop(request_id, None)

    def _free_table(self, request_id: str) -> None:
        table = self._tables.pop(request_id, None)
        self._num_cached.pop(request_id, None)
        if table:
            # Free the tail first, so in eviction order it comes before the request's first
            # blocks, which other requests are likelier to share.
            self.pool.free(table[::-1])

    def block_table(self, request_id: str) -> list[int]:
        return self._tables.get(request_id, [])

    def check_invariants(self) -> None:
        self.pool.check_invariants()
        if self.host_pool is not None:
            self.host_pool.check_invariants()
            if self._pinned:
                raise AssertionError("CPU-tier copies recorded but never taken")
        if self.swap_pool is not None:
            self.swap_pool.check_invariants()
            held = sum(len(s) for s in self._swapped.values())
            if held != self.num_swapped_blocks:
                raise AssertionError(f"{held} swap blocks held but {self.num_swapped_blocks} in use")
        refs: dict[int, int] = {}
        for table in self._tables.values():
            for b in table:
                refs[b] = refs.get(b, 0) + 1
        for b in range(self.pool.num_blocks):
            if refs.get(b, 0) != self.pool.ref_count(b):
                raise AssertionError(f"KV block {b}: {refs.get(b, 0)} tables hold it but its "
                                     f"refcount is {self.pool.ref_count(b)}")
