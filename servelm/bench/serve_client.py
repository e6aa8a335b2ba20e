"""One streamed OpenAI request, timed chunk by chunk (aiohttp, no SDK overhead in the timings).

Works against any OpenAI-compatible server: /v1/completions or /v1/chat/completions, SSE
`data:` lines, `[DONE]` terminator. Token counts come from the server's `usage` (asked for
with stream_options.include_usage) and fall back to the client tokenizer when a server sends
none. A failure of any kind becomes a failed record with a reason, never an exception.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp

from servelm.bench.serve_metrics import RequestRecord


@dataclass(frozen=True)
class Target:
    """Where and how requests go."""

    base_url: str
    endpoint: str
    model: str
    api_key: str | None = None
    ignore_eos: bool = False
    timeout_s: float = 600.0
    banned_token_ids: tuple[int, ...] = ()  # sent as logit_bias -100 along with ignore_eos
    extra_body: tuple[tuple[str, Any], ...] = ()  # more fields for every request (--extra-body)

    @property
    def chat(self) -> bool:
        return self.endpoint.rstrip("/").endswith("/chat/completions")

    @property
    def url(self) -> str:
        return self.base_url.rstrip("/") + self.endpoint

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


def request_body(target: Target, prompt: str | list[dict[str, str]], max_tokens: int) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": target.model, "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
        "stream_options": {"include_usage": True},
    }
    body["messages" if target.chat else "prompt"] = prompt
    if target.ignore_eos:
        # `ignore_eos` is a vLLM/servelm extension; servers without it (llama.cpp) honour the
        # standard logit_bias instead, so both are sent and every server runs to max_tokens.
        body["ignore_eos"] = True
        if target.banned_token_ids:
            body["logit_bias"] = {str(i): -100 for i in target.banned_token_ids}
    body.update(target.extra_body)
    return body


def _chunk_text(chunk: dict[str, Any], chat: bool) -> str:
    choices = chunk.get("choices") or []
    if not choices:
        return ""
    c = choices[0]
    if chat:
        return (c.get("delta") or {}).get("content") or ""
    return c.get("text") or ""


def _error_text(payload: str, limit: int = 300) -> str:
    try:
        err = json.loads(payload).get("error")
        msg = err.get("message") if isinstance(err, dict) else err
        return str(msg)[:limit] if msg else payload[:limit]
    except (json.JSONDecodeError, AttributeError):
        return payload[:limit]


async def stream_request(session: aiohttp.ClientSession, target: Target,
                         prompt: str | list[dict[str, str]], max_tokens: int, t0: float,
                         count_prompt: Callable[[], int], count_output: Callable[[str], int],
                         ) -> tuple[RequestRecord, str]:
    """Send one request, read its stream; returns (record, generated text)."""
    body = request_body(target, prompt, max_tokens)
    rec = RequestRecord(success=False)
    text_parts: list[str] = []
    usage: dict[str, Any] | None = None
    finish: str | None = None
    sent = time.perf_counter()
    rec.start = sent - t0
    last = sent
    try:
        timeout = aiohttp.ClientTimeout(total=target.timeout_s)
        async with session.post(target.url, json=body, headers=target.headers(),
                                timeout=timeout) as resp:
            if resp.status != 200:
                rec.error = f"HTTP {resp.status}: {_error_text(await resp.text())}"
                rec.latency = time.perf_counter() - sent
                return rec, ""
            async for raw in resp.content:
                line = raw.decode("utf-8", "replace").strip()
                if not line.startswith("data:"):
                    continue  # blank separators, comments, `event:` lines
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                try:
                    chunk = json.loads(data)
                except json.JSONDecodeError:
                    rec.error = f"malformed stream chunk: {data[:200]}"
                    break
                if chunk.get("error"):
                    rec.error = f"error in stream: {_error_text(data)}"
                    break
                if chunk.get("usage"):
                    usage = chunk["usage"]
                for choice in chunk.get("choices") or []:
                    finish = choice.get("finish_reason") or finish
                piece = _chunk_text(chunk, target.chat)
                if piece:
                    now = time.perf_counter()
                    if not text_parts:
                        rec.ttft = now - sent
                    else:
                        rec.itl.append(now - last)
                    last = now
                    text_parts.append(piece)
        rec.latency = time.perf_counter() - sent
    except (aiohttp.ClientError, TimeoutError, OSError) as e:
        rec.latency = time.perf_counter() - sent
        rec.error = f"{type(e).__name__}: {e}"[:300] if str(e) else type(e).__name__
        return rec, "".join(text_parts)
    text = "".join(text_parts)
    if rec.error:
        return rec, text
    if not text_parts:
        rec.error = "stream ended without generated text"
        return rec, text
    rec.success = True
    rec.output_len = _output_tokens(usage, finish, max_tokens, len(text_parts), text, count_output)
    rec.prompt_len = int(usage["prompt_tokens"]) if usage and usage.get("prompt_tokens") \
        else count_prompt()
    return rec, text


def _output_tokens(usage: dict[str, Any] | None, finish: str | None, max_tokens: int,
                   chunks: int, text: str, count_output: Callable[[str], int]) -> int:
    """The server's count; else max_tokens for a length stop; else a re-tokenized estimate.

    Re-tokenizing generated text can merge tokens, so the estimate is never taken below the
    number of text chunks (each carries at least one token).
    """
    if usage and usage.get("completion_tokens"):
        return int(usage["completion_tokens"])
    if finish == "length":
        return max_tokens
    return max(chunks, count_output(text))
