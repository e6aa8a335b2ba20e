"""When the front end moves running requests (issue 19), without Ray: the balancer picks the
cheapest decoding request of the busiest replica once replicas are out of balance, and a
replica drained before scale-in has each of its requests moved before it stops."""

from __future__ import annotations

import asyncio

from test_replica_pool import StandIn, make_pool

from servelm.cluster.migration import Flight, pick_to_balance


def test_balancer_moves_the_cheapest_decoding_request_of_the_busiest():
    a, b = StandIn("a"), StandIn("b")
    flights = [Flight("long", True, a, tokens=90), Flight("short", True, a, tokens=3),
               Flight("waiting", True, a, tokens=0), Flight("pair", False, a, tokens=1),
               Flight("elsewhere", True, b, tokens=1)]
    flight, to = pick_to_balance({"a": 6, "b": 1}, flights, imbalance=4)
    assert (flight.request_id, to) == ("short", "b")
    assert pick_to_balance({"a": 6, "b": 3}, flights, imbalance=4) is None  # within the bound
    assert pick_to_balance({"a": 20, "b": 14}, flights, imbalance=4) is None  # under half the busiest
    assert pick_to_balance({"a": 6, "b": 1}, flights, imbalance=0) is None  # off
    assert pick_to_balance({"a": 6, "b": 1}, flights[2:4], imbalance=4) is None  # none movable


def test_drained_replica_moves_its_requests_then_stops(tiny_model_dir):
    a, b = StandIn("a"), StandIn("b")
    pool = make_pool(tiny_model_dir, a, b)
    group = pool.groups[0]
    moved = []

    async def migrate(request_id, to=None, reason="operator"):
        moved.append((request_id, reason))
        pool.flights[request_id].replica.in_flight -= 1  # gone from `a`

    pool.migrate = migrate
    pool.flights = {"x": Flight("x", True, a, tokens=2), "y": Flight("y", True, b, tokens=2)}
    a.in_flight = 1
    group.take_out(a, "scaling down")
    asyncio.run(group._drain(a))
    assert moved == [("x", "drain")] and a.state == "stopped" and "a" not in group.replicas
