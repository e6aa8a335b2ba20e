"""Engine fixtures: every LLM a test builds is checked for leaked KV blocks afterwards."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from leaks import assert_no_leaks

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
        assert_no_leaks(llm.engine)
