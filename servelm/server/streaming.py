"""Responses as the engine's outputs arrive: whole answers collected, or server-sent
events for `stream: true` (text deltas, logprobs, tool-call deltas, usage)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi.responses import StreamingResponse

from servelm.outputs import CompletionOutput, RequestOutput
from servelm.server import tools as tools_module
from servelm.server.protocol import ChatCompletionRequest, CompletionRequest
from servelm.server.responses import chat_logprobs, completion_logprobs, usage


async def collect(streams: list[AsyncIterator[RequestOutput]]) -> list[RequestOutput]:
    async def last(stream: AsyncIterator[RequestOutput]) -> RequestOutput:
        final = None
        async for out in stream:
            final = out
        return final

    tasks = [asyncio.ensure_future(last(s)) for s in streams]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for t in tasks:
            t.cancel()


async def merge(streams: list[AsyncIterator[RequestOutput]]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Interleave several request streams as their outputs arrive."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream: AsyncIterator[RequestOutput]) -> None:
        try:
            async for out in stream:
                await queue.put((i, out))
        except Exception as exc:  # surface in the consumer
            await queue.put((i, exc))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            i, item = await queue.get()
            if isinstance(item, Exception):
                raise item
            if item.finished:
                remaining -= 1
            yield i, item
    finally:
        for t in tasks:
            t.cancel()


def sse(events: AsyncIterator[dict[str, Any]]) -> StreamingResponse:
    async def body() -> AsyncIterator[str]:
        try:
            async for event in events:
                yield f"data: {json.dumps(event)}\n\n"
        except Exception as exc:
            yield f"data: {json.dumps({'error': {'message': str(exc), 'type': 'server_error'}})}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream")


def choice_deltas(out: RequestOutput, reported: set[int]) -> list[tuple[CompletionOutput, bool]]:
    """Completions with new text or a new finish; marks finishes as reported."""
    result = []
    for c in out.outputs:
        newly_finished = c.finished and c.index not in reported
        if newly_finished:
            reported.add(c.index)
        if c.delta_text or newly_finished:
            result.append((c, newly_finished))
    return result


async def stream_completions(streams, base: dict, body: CompletionRequest, n: int, tok):
    reported: dict[int, set[int]] = {}
    finals: dict[int, RequestOutput] = {}
    echoed: set[int] = set()
    sent: dict[tuple[int, int], int] = {}  # tokens whose logprobs went out, per choice
    async for pi, out in merge(streams):
        for c, finished in choice_deltas(out, reported.setdefault(pi, set())):
            text = c.delta_text
            if body.echo and (pi, c.index) not in echoed:
                echoed.add((pi, c.index))
                text = out.prompt + text if out.prompt is not None else text
            lps = None
            if body.logprobs is not None:
                lps = completion_logprobs(c, tok, body.logprobs, sent.get((pi, c.index), 0))
                sent[(pi, c.index)] = len(c.token_ids)
            yield {**base, "choices": [{"index": pi * n + c.index, "text": text, "logprobs": lps,
                                        "finish_reason": c.finish_reason if finished else None}]}
        if out.finished:
            finals[pi] = out
    if body.include_usage:
        yield {**base, "choices": [], "usage": usage(list(finals.values()))}


def chat_message(c: CompletionOutput, mode: str) -> dict[str, Any]:
    """A finished choice's message and finish reason, its tool calls parsed out."""
    message: dict[str, Any] = {"role": "assistant", "content": c.text}
    finish = c.finish_reason
    if mode != "none" and c.finish_reason == "stop":
        content, calls = tools_module.parse(c.text, mode)
        if calls:
            message = {"role": "assistant", "content": content, "tool_calls": calls}
            finish = "tool_calls"
    return {"message": message, "finish_reason": finish}


async def stream_chat(stream, base: dict, body: ChatCompletionRequest, tok, k: int | None,
                       mode: str = "none"):
    """Content deltas as they come. With tools, text that is (or may begin) a tool call is
    held back; when the choice finishes, the calls go out as `tool_calls` deltas (the rest
    of the text as content if there were none)."""
    reported: set[int] = set()
    started: set[int] = set()
    sent: dict[int, int] = {}  # tokens whose logprobs went out, per choice
    shown: dict[int, int] = {}  # characters of text sent as content, per choice (with tools)
    final = None
    async for out in stream:
        for c, finished in choice_deltas(out, reported):
            delta: dict[str, Any] = {}
            finish = c.finish_reason if finished else None
            text = c.delta_text
            if mode != "none":
                start, end = shown.get(c.index, 0), len(c.text)
                calls = None
                if finished:
                    msg = chat_message(c, mode)
                    finish, calls = msg["finish_reason"], msg["message"].get("tool_calls")
                    if calls:  # the text before the first call
                        end = c.text.find(tools_module.OPEN_TAG) if mode == "auto" else 0
                elif mode == "auto":
                    end -= tools_module.held_back(c.text)
                else:
                    end = 0  # a required call: the output is its JSON
                text = c.text[start:end] if end > start else ""
                shown[c.index] = max(start, end)
                if calls:
                    delta["tool_calls"] = [{"index": i, **call} for i, call in enumerate(calls)]
            if text:
                delta = {"content": text, **delta}
            if c.index not in started:
                started.add(c.index)
                delta = {"role": "assistant", **delta}
            lps = None
            if body.logprobs:
                lps = chat_logprobs(c, tok, k, sent.get(c.index, 0))
                sent[c.index] = len(c.token_ids)
            yield {**base, "choices": [{"index": c.index, "delta": delta, "logprobs": lps,
                                        "finish_reason": finish}]}
        final = out
    if body.include_usage and final is not None:
        yield {**base, "choices": [], "usage": usage([final])}
