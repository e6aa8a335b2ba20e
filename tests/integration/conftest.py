"""Engine fixtures: every LLM a test builds is checked for leaked KV blocks afterwards."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from servelm import LLM


@pytest.fixture
def make_llm() -> Iterator[Callable[..., LLM]]:
    built: list[LLM] = []

    def make(model: Any, **options: Any) -> LLM:
        llm = LLM(str(model), **options)
        built.append(llm)
        return llm

    yield make
    for llm in built:
        kv = llm.engine.kv
        kv.check_invariants()
        assert kv.num_free_blocks == kv.num_blocks, "KV blocks leaked after the test"
        assert kv.num_swapped_blocks == 0, "swap blocks leaked after the test"
        assert not llm.engine.has_unfinished_requests()
