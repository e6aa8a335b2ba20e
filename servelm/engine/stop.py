"""Appending a step's tokens to a request, one at a time, and deciding when it is done.

A verified draft brings several tokens in one step, and a stop can come at any of them: a
stop token id or EOS (after `min_tokens`), `max_tokens` or the context window, or a stop
string, which only the detokenized text shows. Tokens after the stop are dropped.
"""

from __future__ import annotations

from servelm.engine.request import Request, RequestStatus
from servelm.outputs import PositionLogprobs


def append_tokens(req: Request, tokens: list[int], logprobs: list[PositionLogprobs] | None) -> int:
    """Append `tokens` up to the first that stops `req`; how many were appended."""
    if logprobs is None and req.detokenizer is None and req.grammar is None and len(tokens) == 1:
        req.append_token(tokens[0])
        req.check_stop()
        return 1
    for j, token in enumerate(tokens):
        req.append_token(token)
        if logprobs is not None:
            req.logprobs.append(logprobs[j])
            req.cumulative_logprob += logprobs[j][token].logprob
        req.check_stop()
        if req.grammar is not None and not req.status.finished:
            _advance_grammar(req, token)
        # A stop token adds no text; the detokenizer sees every other token.
        if req.status is not RequestStatus.FINISHED_STOPPED and req.detokenizer is not None:
            stop_str = req.detokenizer.update([token])
            if stop_str is not None:
                req.status, req.stop_reason = RequestStatus.FINISHED_STOPPED, stop_str
        if req.status.finished:
            return j + 1
    return len(tokens)


def _advance_grammar(req: Request, token: int) -> None:
    """Feed the token to the request's grammar; a grammar that has ended (it accepted a stop
    token the request itself ignores) ends the request."""
    if not req.grammar.accept_token(token):
        raise ValueError(f"token {token} does not follow the request's structured_outputs grammar")
    if req.grammar.is_terminated():
        req.status = RequestStatus.FINISHED_STOPPED
