"""Engine fixtures: every LLM a test builds is checked for leaked KV blocks afterwards and
shut down, and no worker process may outlive a test."""

from __future__ import annotations

import multiprocessing
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
    try:
        for llm in built:
            assert_no_leaks(llm.engine)
    finally:
        for llm in built:
            llm.shutdown()


@pytest.fixture(autouse=True)
def no_workers_left() -> Iterator[None]:
    yield
    left = multiprocessing.active_children()
    assert not left, f"worker processes left running: {left}"
