"""The check every engine test ends with: nothing the engine handed out is left behind."""

from __future__ import annotations

from typing import Any


def assert_no_leaks(engine: Any) -> None:
    """Every KV block and swap block is back in its pool, no request is left anywhere, and
    the worker holds only requests whose finish it hears of with the next step."""
    kv = engine.scheduler.kv
    kv.check_invariants()
    assert kv.num_free_blocks == kv.num_blocks, "KV blocks leaked after the test"
    assert kv.num_swapped_blocks == 0, "swap blocks leaked after the test"
    assert not engine.scheduler.requests and not engine.has_unfinished_requests()
    worker = getattr(engine.executor, "worker", None)
    if worker is not None:
        pending = set(engine.scheduler.builder.pending_finished)
        assert set(worker.runner.states) <= pending, "the worker kept finished requests"
