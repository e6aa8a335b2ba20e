"""The CPU tier under the prefix cache: evicted cached blocks are saved to host slots and
restored into fresh cache blocks on a later hit, with the copies ordered saves-first."""

from __future__ import annotations

from test_prefix_cache import BS, Seq, find, req, run_prefill

from servelm.kv.manager import HostBlock, KVCacheManager


def prefill(kv: KVCacheManager, r: Seq) -> list:
    """Admit `r` as the scheduler does, pretend its prompt was computed; its cached prefix."""
    cached = find(kv, r)
    run_prefill(kv, r)
    return cached


def test_evicted_prefix_is_saved_and_restored_instead_of_lost():
    kv = KVCacheManager(3, BS, num_offload_blocks=8)
    a = req("a", list(range(9)))  # 2 full blocks + 1 token
    prefill(kv, a)
    a_blocks = kv.block_table("a")[:2]
    assert kv.take_tier_copies() == ([], [])
    kv.free("a")
    prefill(kv, req("b", list(range(100, 109))))  # takes all 3 blocks: evicts a's 2 cached
    saves, restores = kv.take_tier_copies()
    assert sorted(b for b, _ in saves) == sorted(a_blocks) and restores == []
    assert kv.num_cpu_cached_blocks == 2 and kv.num_offloaded_blocks == 2
    kv.free("b")

    again = req("a2", list(range(9)))
    cached = find(kv, again)
    assert [type(b) for b in cached] == [HostBlock, HostBlock]
    assert kv.blocks_needed("a2", 9, cached) == 3  # two restored, one new
    kv.allocate("a2", 9, cached)
    saves, restores = kv.take_tier_copies()
    assert len(saves) == 2  # restoring evicted b's two cached blocks, which are saved first
    assert [s for s, _ in restores] == [b.slot for b in cached]
    assert [blk for _, blk in restores] == kv.block_table("a2")[:2]
    assert not set(s for s, _ in restores) & set(s for _, s in saves)  # pinned
    assert kv.num_restored_blocks == 2
    # Restored blocks are back in the KV cache: the next request shares them directly.
    third = req("a3", list(range(8)) + [55])
    assert find(kv, third) == kv.block_table("a2")[:2]
    kv.free("a2")
    kv.check_invariants()
    assert kv.num_free_blocks == 3


def test_cpu_tier_is_lru_and_saves_each_content_once():
    kv = KVCacheManager(2, BS, num_offload_blocks=2)
    for i in range(4):  # each prompt fills one cached block and evicts the previous one's
        prefill(kv, req(f"r{i}", [i] * BS + [9]))
        kv.free(f"r{i}")
        kv.take_tier_copies()
    # The tier holds 2 blocks: the two most recently evicted prompts (r1, r2; r3 still on
    # the KV cache); r0's was evicted from the tier too.
    assert find(kv, req("x", [0] * BS + [9])) == []
    assert isinstance(find(kv, req("y", [1] * BS + [9]))[0], HostBlock)
    assert isinstance(find(kv, req("z", [2] * BS + [9]))[0], HostBlock)
    assert isinstance(find(kv, req("w", [3] * BS + [9]))[0], int)
    saved_before = kv.num_offloaded_blocks
    prefill(kv, req("r1b", [1] * BS + [9]))  # restore r1 (evicting r3's block to the tier)
    kv.free("r1b")
    kv.take_tier_copies()
    prefill(kv, req("r3b", [3] * BS + [9]))  # restore r3: evicts r1's block, already in the tier
    kv.free("r3b")
    saves, _ = kv.take_tier_copies()
    assert saves == [] and kv.num_offloaded_blocks == saved_before + 1
    kv.check_invariants()


def test_no_tier_without_prefix_caching():
    kv = KVCacheManager(3, BS, enable_prefix_caching=False, num_offload_blocks=4)
    assert kv.host_pool is None
    prefill(kv, req("a", list(range(9))))
    kv.free("a")
    assert kv.take_tier_copies() == ([], [])
