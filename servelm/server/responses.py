"""Shape engine outputs into OpenAI response fields (usage, logprobs)."""

from __future__ import annotations

from typing import Any

from servelm.outputs import CompletionOutput, PositionLogprobs, RequestOutput


def usage(outputs: list[RequestOutput]) -> dict[str, Any]:
    prompt = sum(len(o.prompt_token_ids) for o in outputs)
    completion = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    cached = sum(o.num_cached_tokens for o in outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}  # OpenAI's field for cache hits


def _top(entry: PositionLogprobs, k: int) -> list[tuple[int, float]]:
    """The k most likely tokens at a position, best first."""
    ranked = sorted((lp.rank, t, lp.logprob) for t, lp in entry.items() if lp.rank and lp.rank <= k)
    return [(t, v) for _, t, v in ranked]


def completion_logprobs(c: CompletionOutput, tok, k: int, start: int = 0) -> dict[str, Any]:
    """The completions format: parallel lists, one item per generated token from `start`
    (a stream sends each chunk's own; offsets count from the chunk's text)."""
    tokens, token_lps, tops, offsets = [], [], [], []
    offset = 0
    for token_id, entry in zip(c.token_ids[start:], (c.logprobs or [])[start:]):
        text = tok.decode([token_id])
        tokens.append(text)
        token_lps.append(entry[token_id].logprob)
        tops.append({tok.decode([t]): v for t, v in _top(entry, k)})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops,
            "text_offset": offsets}


def chat_logprobs(c: CompletionOutput, tok, k: int, start: int = 0) -> dict[str, Any]:
    """The chat format: one object per generated token from `start` with its top
    alternatives."""
    def item(token_id: int, logprob: float) -> dict[str, Any]:
        text = tok.decode([token_id])
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    content = [{**item(t, entry[t].logprob), "top_logprobs": [item(a, v) for a, v in _top(entry, k)]}
               for t, entry in zip(c.token_ids[start:], (c.logprobs or [])[start:])]
    return {"content": content}
