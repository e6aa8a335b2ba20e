"""Autoscaling decisions: from demand and KV usage to a replica count, within the bounds,
up after a sustained rise (at once from zero), down only after a quiet spell."""

from __future__ import annotations

import pytest

from servelm.cluster.autoscale import AutoscaleOptions, Autoscaler


def scaler(**kw) -> Autoscaler:
    base = {"min_replicas": 0, "max_replicas": 4, "target_requests": 4,
            "upscale_delay_s": 2, "downscale_delay_s": 10}
    return Autoscaler(AutoscaleOptions(**{**base, **kw}))


def test_desired_follows_demand_and_kv_within_bounds():
    a = scaler(min_replicas=1)
    assert a.desired(demand=0, kv_usage=0, current=1) == 1  # the floor
    assert a.desired(demand=9, kv_usage=0, current=1) == 3  # ceil(9 / 4)
    assert a.desired(demand=100, kv_usage=0, current=1) == 4  # the ceiling
    assert a.desired(demand=2, kv_usage=0.95, current=2) == 3  # caches nearly full: one more


def test_up_from_zero_at_once_otherwise_after_the_delay():
    a = scaler()
    assert a.decide(now=0, demand=1, kv_usage=0, current=0) == 1  # a cold start: no wait
    assert a.decide(now=10, demand=8, kv_usage=0, current=1) == 1
    assert a.decide(now=11, demand=8, kv_usage=0, current=1) == 1
    assert a.decide(now=12, demand=8, kv_usage=0, current=1) == 2  # sustained for 2 s
    assert a.decide(now=13, demand=0, kv_usage=0, current=2) == 2  # a lull starts the clock
    assert a.decide(now=14, demand=8, kv_usage=0, current=2) == 2  # load again: clock reset
    assert a.decide(now=15, demand=0, kv_usage=0, current=2) == 2
    assert a.decide(now=24, demand=0, kv_usage=0, current=2) == 2
    assert a.decide(now=25, demand=0, kv_usage=0, current=2) == 0  # quiet 10 s: to zero


def test_min_equal_max_is_a_fixed_count():
    a = scaler(min_replicas=2, max_replicas=2)
    assert [a.decide(t, d, 0, 2) for t, d in ((0, 0), (100, 50), (200, 0))] == [2, 2, 2]


@pytest.mark.parametrize("kw, field", [({"min_replicas": -1}, "min_replicas"),
                                       ({"min_replicas": 3, "max_replicas": 2}, "max_replicas"),
                                       ({"max_replicas": 0}, "max_replicas"),
                                       ({"target_requests": 0}, "target_requests")])
def test_bad_bounds_are_refused_by_name(kw, field):
    with pytest.raises(ValueError, match=field):
        scaler(**kw)
