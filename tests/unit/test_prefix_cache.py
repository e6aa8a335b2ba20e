"""Prefix caching bookkeeping: chained hashes, longest-prefix lookup, LRU eviction, revival."""

from __future__ import annotations

from dataclasses import dataclass

from servelm.kv.block_pool import BlockPool
from servelm.kv.manager import ROOT_HASH, KVCacheManager, block_hash

BS = 4


@dataclass
class Seq:
    """What the KV manager knows of a request: its id and token ids."""

    request_id: str
    token_ids: list[int]

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


def req(rid: str, tokens: list[int]) -> Seq:
    return Seq(rid, list(tokens))


def run_prefill(kv: KVCacheManager, r: Seq) -> int:
    """Admit `r` the way the scheduler does and pretend its whole prompt was computed."""
    cached = kv.find_cached(r.request_id, r.token_ids)
    assert kv.can_allocate(r.request_id, r.num_tokens, cached)
    kv.allocate(r.request_id, r.num_tokens, cached)
    kv.cache_blocks(r.request_id, r.token_ids, r.num_tokens)
    return len(cached)


def find(kv: KVCacheManager, r: Seq) -> list:
    return kv.find_cached(r.request_id, r.token_ids)


def test_hash_is_chained_over_the_prefix():
    a = block_hash(ROOT_HASH, [1, 2, 3, 4])
    assert a == block_hash(ROOT_HASH, [1, 2, 3, 4])
    assert block_hash(a, [5, 6, 7, 8]) != block_hash(ROOT_HASH, [5, 6, 7, 8])
    assert block_hash(ROOT_HASH, [1, 2, 3, 4]) != block_hash(ROOT_HASH, [1, 2, 3, 5])


def test_longest_cached_prefix_is_reused_and_last_token_recomputed():
    kv = KVCacheManager(16, BS)
    first = req("a", list(range(10)))  # 2 full blocks + 2 tokens
    assert run_prefill(kv, first) == 0
    same_start = req("b", list(range(8)) + [99, 98, 97])  # shares both full blocks
    assert run_prefill(kv, same_start) == 2
    assert kv.block_table("b")[:2] == kv.block_table("a")[:2]
    assert kv.pool.ref_count(kv.block_table("a")[0]) == 2
    exact = req("c", list(range(8)))  # fully cached: the last block is recomputed for logits
    assert run_prefill(kv, exact) == 1
    other = req("d", [7] + list(range(1, 10)))  # differs in the first token: nothing shared
    assert run_prefill(kv, other) == 0
    for rid in "abcd":
        kv.free(rid)
    kv.check_invariants()
    assert kv.num_free_blocks == 16


def test_freed_blocks_stay_cached_until_evicted_lru():
    kv = KVCacheManager(6, BS)
    old, new = req("old", list(range(9))), req("new", list(range(100, 109)))
    run_prefill(kv, old)
    run_prefill(kv, new)
    kv.free("old")
    kv.free("new")  # 6 free blocks, 4 of them holding cached content
    assert len(kv.pool.cached) == 4 and kv.num_free_blocks == 6
    # Revival takes a cached block out of the free list; can_allocate accounts for it.
    again = req("again", list(range(9)))
    cached = find(kv, again)
    assert len(cached) == 2 and kv.blocks_needed("again", 9, cached) == 3
    kv.allocate("again", 9, cached)
    assert kv.num_free_blocks == 3
    # New blocks come from the least recently freed end. Free list now: new's partial block,
    # new's 2nd block, new's 1st block (each request is freed tail first). Taking two evicts
    # the 2nd block's content and keeps the 1st: a request's prefix outlives its tail.
    kv.allocate("fresh", 8)
    assert kv.pool.num_evicted == 1
    assert len(find(kv, req("new-again", list(range(100, 109))))) == 1
    kv.free("again")
    kv.free("fresh")
    kv.check_invariants()


def test_disabled_cache_finds_nothing():
    kv = KVCacheManager(8, BS, enable_prefix_caching=False)
    run_prefill(kv, req("a", list(range(9))))
    assert find(kv, req("b", list(range(9)))) == [] and not kv.pool.cached
    on = KVCacheManager(8, BS)
    run_prefill(on, req("a", list(range(9))))
    assert len(find(on, req("c", list(range(9))))) == 2


def test_pool_revival_and_eviction_keep_invariants():
    pool = BlockPool(3)
    a = pool.allocate(2)
    pool.cache(a[0], b"h0")
    pool.cache(a[1], b"h0")  # same content in a second block: first one stays canonical
    assert pool.lookup(b"h0") == a[0]
    pool.free(a)
    pool.share([a[0]])  # revive
    assert pool.ref_count(a[0]) == 1 and not pool.is_free(a[0])
    pool.check_invariants()
    pool.free([a[0]])
    pool.allocate(3)  # evicts everything
    assert pool.lookup(b"h0") is None and pool.num_evicted == 1
    pool.check_invariants()


def test_blocks_are_hashed_only_once_all_their_tokens_are_known():
    """After a verification step the computed count runs ahead of the appended tokens."""
    kv = KVCacheManager(8, BS)
    tokens = list(range(6))
    kv.allocate("a", 10)
    kv.cache_blocks("a", tokens, 9)  # 6 known tokens + 3 accepted drafts not yet appended
    first = block_hash(ROOT_HASH, [0, 1, 2, 3])
    assert set(kv.pool.cached) == {first}  # block 1 (tokens 4..7) is not hashed from 2 tokens
    tokens += [6, 7, 8]
    kv.cache_blocks("a", tokens, 9)
    assert set(kv.pool.cached) == {first, block_hash(first, [4, 5, 6, 7])}
    kv.forget("a")
