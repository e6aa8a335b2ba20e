"""Routing policies and the approximate prefix tree behind prefix-aware routing."""

from __future__ import annotations

import random

import pytest

from servelm.cluster.radix import PrefixTree
from servelm.cluster.router import Router, RouterOptions


def test_prefix_tree_matches_splits_and_evicts_the_least_recent():
    tree = PrefixTree(max_tokens=12)
    tree.insert([1, 2, 3, 4, 5])
    tree.insert([1, 2, 3, 9])  # splits the edge after 1, 2, 3
    assert tree.match([1, 2, 3, 4, 5, 6]) == 5
    assert tree.match([1, 2, 3, 9]) == 4
    assert tree.match([1, 2, 7]) == 2 and tree.match([8]) == 0
    assert tree.num_tokens == 6
    tree.match([1, 2, 3, 9])  # the [9] branch is now the more recent
    tree.insert([20, 21, 22, 23, 24, 25, 26])  # 13 tokens: the oldest leaf ([4, 5]) goes
    assert tree.num_tokens == 11
    assert tree.match([1, 2, 3, 4, 5]) == 3 and tree.match([1, 2, 3, 9]) == 4
    assert tree.match([20, 21, 22, 23, 24, 25, 26]) == 7


def make(policy: str, n: int = 2, **options) -> Router:
    router = Router(policy, RouterOptions(**options))
    for i in range(n):
        router.add_replica(f"r{i}")
    return router


def test_round_robin_least_loaded_and_power_of_two():
    rr = make("round-robin", 3)
    assert [rr.route([1]) for _ in range(4)] == ["r0", "r1", "r2", "r0"]
    ll = make("least-loaded", 3)
    ll.report("r0", outstanding=5)
    ll.report("r1", outstanding=1, kv_usage=0.9)
    ll.report("r2", outstanding=1, kv_usage=0.1)
    assert ll.route([1]) == "r2"
    p2 = make("power-of-two", 2)
    p2.report("r0", outstanding=9)
    assert all(p2.route([1]) == "r1" for _ in range(5))  # both sampled: the idler wins
    p2.finished("r1")
    assert p2.replicas["r1"].outstanding == 4
    # only prefix-aware routing reads the prompt trees, so only it keeps them
    assert all(r.tree.num_tokens == 0 for router in (rr, ll, p2) for r in router.replicas.values())
    pa = make("prefix-aware", 1)
    pa.route([1, 2, 3])
    assert pa.replicas["r0"].tree.num_tokens == 3
    with pytest.raises(ValueError, match="router must be one of"):
        Router("random")


def test_speed_aware_sends_a_faster_replica_its_share():
    router = Router("speed-aware")
    router.add_replica("fast", speed=3.0)
    router.add_replica("slow", speed=1.0)
    picks = [router.route([1]) for _ in range(8)]  # nothing finishes: load builds up
    assert picks.count("fast") == 6 and picks.count("slow") == 2
    same = make("speed-aware", 3)  # equal speeds: least-loaded
    same.report("r0", outstanding=2)
    assert same.route([1]) == "r1"
    with pytest.raises(ValueError, match="speed must be > 0"):
        router.add_replica("broken", speed=0)


def test_prefix_aware_follows_the_prefix_spreads_new_ones_and_rebalances():
    router = make("prefix-aware", balance_abs=4, balance_rel=1.5)
    a, b = list(range(100, 160)), list(range(200, 260))
    first_a, first_b = router.route(a + [1]), router.route(b + [1])
    assert first_a != first_b  # a new prefix goes to the replica that has cached least
    assert all(router.route(a + [i, i]) == first_a for i in range(3))
    assert router.route(b + [7, 7]) == first_b
    router.report(first_a, outstanding=20)  # now far busier than the other
    assert router.route(a + [9]) == first_b


def test_sessions_stick_until_their_replica_leaves():
    router = make("round-robin", 2)
    home = router.route([1, 2], session="chat-1")
    assert all(router.route([1, 2, 3], session="chat-1") == home for _ in range(3))
    router.remove_replica(home)
    assert router.route([1, 2, 3, 4], session="chat-1") != home
    router.remove_replica("r0"), router.remove_replica("r1")
    with pytest.raises(RuntimeError, match="no replica"):
        router.route([1])


def test_prefix_aware_hits_more_of_each_replicas_cache_than_round_robin():
    """16 system prompts of 200 tokens, 320 requests in random order over 2 replicas whose
    caches, modelled as exact prefix trees, hold about 8 prompts each: prefix-aware routing
    splits the prompts between the caches, round-robin makes both hold all 16 and evict."""
    rng = random.Random(0)
    systems = [[rng.randrange(1000) for _ in range(200)] for _ in range(16)]
    requests = [systems[rng.randrange(16)] + [rng.randrange(1000) for _ in range(20)] for _ in range(320)]
    rates = {}
    for policy in ("round-robin", "prefix-aware"):
        router = make(policy, tree_tokens=2000)
        caches = {name: PrefixTree(max_tokens=2000) for name in router.replicas}
        hit = total = 0
        for ids in requests:
            name = router.route(ids)
            hit += caches[name].match(ids)
            total += len(ids)
            caches[name].insert(ids)
            router.finished(name)
        rates[policy] = hit / total
    assert rates["prefix-aware"] > rates["round-robin"] + 0.2, rates


def test_prefix_aware_spreads_a_prefix_several_replicas_hold_and_keeps_histories():
    router = make("prefix-aware")
    system = list(range(100, 200))
    for replica in router.replicas.values():
        replica.tree.insert(system)  # a tenant's system prompt cached on both
    history = [list(range(300 + 40 * i, 330 + 40 * i)) for i in range(2)]
    first, second = (router.route(system + h) for h in history)
    assert first != second  # both hold the prompt: the less loaded takes the next
    router.report(first, outstanding=3)
    assert router.route(system + history[0] + [7] * 5) == first  # its history is there only


def test_sessions_are_forgotten_least_recently_used_first():
    router = make("round-robin", max_sessions=2)
    homes = {s: router.route([1], session=s) for s in ("a", "b")}
    router.route([1], session="a")  # a used again: b is now the oldest
    router.route([1], session="c")
    assert set(router.sessions) == {"a", "c"} and router.sessions["a"] == homes["a"]
