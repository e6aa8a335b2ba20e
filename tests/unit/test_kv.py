"""Block pool and KV manager: refcounts, paired calls, invariants."""

import pytest

from servelm.kv.block_pool import BlockPool
from servelm.kv.manager import KVCacheManager


def test_pool_allocate_share_free_cycle():
    pool = BlockPool(4)
    a = pool.allocate(3)
    assert pool.num_free == 1 and not pool.can_allocate(2)
    pool.share(a[:1])
    pool.free(a)
    assert pool.num_free == 3 and pool.ref_count(a[0]) == 1
    pool.free(a[:1])
    assert pool.num_free == 4
    pool.check_invariants()


def test_pool_refuses_misuse():
    pool = BlockPool(2)
    with pytest.raises(RuntimeError, match="asked for 3"):
        pool.allocate(3)
    b = pool.allocate(1)
    pool.free(b)
    with pytest.raises(RuntimeError, match="double free"):
        pool.free(b)
    with pytest.raises(RuntimeError, match="cannot share free"):
        pool.share(b)
    with pytest.raises(ValueError, match="num_kv_blocks"):
        BlockPool(0)


def test_empty_blocks_are_taken_before_cached_ones_are_evicted():
    pool = BlockPool(4)
    cached, empty = pool.allocate(2)
    pool.cache(cached, b"h")
    pool.free([cached, empty])
    pool.check_invariants()
    assert pool.allocate(1) == [empty]  # freed holding nothing: first
    assert pool.allocate(2) == [2, 3]  # then never used
    assert pool.lookup(b"h") == cached and pool.num_evicted == 0
    assert pool.allocate(1) == [cached]  # only now evicted
    assert pool.lookup(b"h") is None and pool.num_evicted == 1
    pool.check_invariants()


def test_manager_grows_tables_by_block():
    kv = KVCacheManager(num_blocks=5, block_size=4)
    assert kv.blocks_needed("a", 9) == 3
    kv.allocate("a", 9)
    assert len(kv.block_table("a")) == 3
    assert kv.blocks_needed("a", 12) == 0 and kv.blocks_needed("a", 13) == 1
    assert kv.can_allocate("a", 20) and not kv.can_allocate("a", 21)
    kv.allocate("b", 8)
    assert kv.num_free_blocks == 0 and kv.usage == 1.0
    kv.free("a")
    kv.free("a")  # freeing an unknown/finished request is a no-op
    kv.check_invariants()
    assert kv.num_free_blocks == 3
    kv.free("b")
    assert kv.num_free_blocks == 5


def test_swap_out_and_in_move_blocks_between_pools():
    kv = KVCacheManager(8, 4, num_swap_blocks=4)
    kv.allocate("a", 10)  # 3 blocks
    table = list(kv.block_table("a"))
    assert kv.can_swap_out("a")
    out = kv.swap_out("a")
    assert [c for c, _ in out] == table and kv.num_free_blocks == 8
    assert kv.num_swapped_blocks == 3
    back = kv.swap_in("a", 11)  # one more token: still 3 blocks
    assert [s for s, _ in back] == [s for _, s in out] and len(kv.block_table("a")) == 3
    assert kv.num_swapped_blocks == 0
    kv.check_invariants()
    kv.swap_out("a")
    kv.free("a")  # a request aborted while swapped frees its swap blocks
    assert kv.num_swapped_blocks == 0 and kv.num_free_blocks == 8
    kv.check_invariants()
    assert not KVCacheManager(8, 4).can_swap_out("a")  # no swap space configured
