"""64 concurrent streaming clients, a third of which hang up mid-stream: every other client
gets its whole answer, and afterwards every KV block is free."""

from __future__ import annotations

import asyncio
import time

import openai
from leaks import assert_no_leaks


async def _client_run(client: openai.AsyncOpenAI, i: int, disconnect: bool) -> tuple[str, str | None]:
    # Clients that hang up ask for far more tokens than they wait for, so only an abort
    # can free their blocks before the end of the test.
    stream = await client.completions.create(model="tiny", prompt=f"Story {i}:",
                                             max_tokens=400 if disconnect else 24,
                                             temperature=0.8, seed=i, stream=True,
                                             extra_body={"ignore_eos": True})
    text, reason, chunks = "", None, 0
    async for chunk in stream:
        chunks += 1
        text += chunk.choices[0].text
        reason = chunk.choices[0].finish_reason or reason
        if disconnect and chunks == 3:
            await stream.close()
            return text, "disconnected"
    return text, reason


def test_concurrent_streams_with_disconnects(server):
    url, llm = server.url, server.llm

    async def main():
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        jobs = [_client_run(client, i, disconnect=(i % 3 == 0)) for i in range(64)]
        results = await asyncio.gather(*jobs)
        expected = await asyncio.gather(*[
            client.completions.create(model="tiny", prompt=f"Story {i}:", max_tokens=24,
                                      temperature=0.8, seed=i, extra_body={"ignore_eos": True})
            for i in range(64) if i % 3])
        await client.close()
        return results, expected

    results, expected = asyncio.run(main())
    completed = [r for i, r in enumerate(results) if i % 3]
    assert all(reason == "length" for _, reason in completed)
    assert [t for t, _ in completed] == [e.choices[0].text for e in expected]
    deadline = time.monotonic() + 5  # aborts land within a step or two
    while llm.engine.has_unfinished_requests() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert_no_leaks(llm.engine)


def test_event_loop_never_waits_for_an_engine_step(server, monkeypatch):
    """Adding a request while a step runs must not block the event loop: with a lock held
    across steps it did, and under CPU load the loop then starved for whole batches while
    every stream stalled (seen as 100 s latencies for 4-token requests in bench serve)."""
    import threading

    from servelm.sampling_params import SamplingParams

    llm = server.llm
    step, in_step, release = llm.engine.step, threading.Event(), threading.Event()

    def held_step():
        in_step.set()
        release.wait(timeout=5)
        return step()

    monkeypatch.setattr(llm.engine, "step", held_step)
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)

    async def drain(rid: str) -> int:
        return len([o async for o in llm.generate(rid, {"prompt_token_ids": [5, 6, 7]}, params)])

    async def scenario() -> float:
        first = asyncio.ensure_future(drain("held-1"))
        while not in_step.is_set():
            await asyncio.sleep(0.01)
        second = asyncio.ensure_future(drain("held-2"))  # added while the step is held
        start = time.monotonic()
        await asyncio.sleep(0.05)
        stalled = time.monotonic() - start
        release.set()
        assert await first > 0 and await second > 0
        return stalled

    assert asyncio.run(scenario()) < 1.0
