"""Structured outputs: JSON (any object, or one schema), a regex, one of some strings, or an
EBNF grammar, enforced token by token with xgrammar.

The engine side owns it, as it owns every request's other state. A request's spec
(`SamplingParams.structured_outputs`) is compiled once when it arrives (an invalid schema
fails the request then, as a ValueError that becomes a 400) and each sample gets its own
matcher. Every step, before the worker runs, the matchers of the requests that sample in it
fill one row each of a token bitmask (which tokens keep the output valid), sent with the
step as plain data; the worker masks those rows' logits before sampling, and the sampled
token advances the matcher when the engine appends it. Requests without a spec cost
nothing, and one slow grammar never holds the others' rows back more than its own fill. A
request that may get speculative drafts also sends its compiled grammar to the worker,
which checks the drafts against it (worker/draft_grammar.py).

xgrammar is imported when the first such request arrives (it takes seconds). AsyncLLM
compiles each spec on a thread of its own before the request reaches the engine's loop, so
neither that nor a large schema stalls the running streams; the engine's own compile then
hits xgrammar's cache.
"""

from __future__ import annotations

import json
import re
import threading
from typing import Any

from servelm.engine.request import Request
from servelm.step_io import SchedulerOutput


class StructuredOutputs:
    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: tuple[int, ...]) -> None:
        self.tokenizer, self.vocab_size, self.stop_token_ids = tokenizer, vocab_size, list(stop_token_ids)
        self._compiler: Any = None
        self._xgr: Any = None
        self._info: Any = None
        self._setup = threading.Lock()  # the first compiles may come from several threads

    @property
    def used(self) -> bool:
        return self._compiler is not None

    def _compiler_once(self) -> Any:
        with self._setup:
            if self._compiler is None:
                import xgrammar

                info = xgrammar.TokenizerInfo.from_huggingface(
                    self.tokenizer, vocab_size=self.vocab_size, stop_token_ids=self.stop_token_ids)
                self._xgr, self._info = xgrammar, info
                self._compiler = xgrammar.GrammarCompiler(info)
        return self._compiler

    def _compile_spec(self, spec: dict[str, Any]) -> Any:
        c = self._compiler_once()
        if "json" in spec:  # compact separators: no run of whitespace can pad it forever
            schema = spec["json"] if isinstance(spec["json"], str) else json.dumps(spec["json"])
            return c.compile_json_schema(schema, any_whitespace=False)
        if "json_object" in spec:  # as OpenAI's json_object: an object, not any JSON value
            return c.compile_json_schema('{"type": "object"}', any_whitespace=False)
        if "regex" in spec:
            return c.compile_regex(spec["regex"])
        if "choice" in spec:
            return c.compile_grammar("root ::= " + " | ".join(json.dumps(s) for s in spec["choice"]))
        return c.compile_grammar(spec["grammar"])

    def compile(self, spec: dict[str, Any]) -> Any:
        """The compiled grammar of a request's spec; ValueError naming the field if xgrammar
        cannot compile it."""
        key = next(iter(spec))
        try:
            return self._compile_spec(spec)
        except (RuntimeError, ValueError, TypeError) as e:
            raise ValueError(f"structured_outputs.{key} cannot be compiled: {_reason(e)}") from None

    def matcher(self, compiled: Any) -> Any:
        return self._xgr.GrammarMatcher(compiled, override_stop_tokens=self.stop_token_ids)

    def attach(self, req: Request, compiled: Any, serialized: str | None) -> None:
        """Give a request its matcher, and when it may draft the compiled grammar
        `serialize`d, which the worker checks its drafts against (worker/draft_grammar.py)."""
        req.grammar = self.matcher(compiled)
        req.grammar_json = serialized

    @staticmethod
    def serialize(compiled: Any) -> str:
        return compiled.serialize_json()

    def tokenizer_info(self) -> str:
        """xgrammar's view of the vocabulary (JSON), which the worker's matchers need."""
        self._compiler_once()
        return self._info.serialize_json()

    def fill(self, step: SchedulerOutput, requests: dict[str, Request]) -> None:
        """The bitmask rows of the requests with a grammar that sample a token in `step`."""
        rows = [s.req_id for s in step.scheduled
                if (req := requests.get(s.req_id)) is not None and req.grammar is not None
                and s.num_computed_tokens + s.num_new_tokens >= len(req.all_token_ids)]
        if not rows:
            return
        bitmask = self._xgr.allocate_token_bitmask(len(rows), self.vocab_size)
        for i, req_id in enumerate(rows):
            requests[req_id].grammar.fill_next_token_bitmask(bitmask, i)
        step.grammar_req_ids, step.grammar_bitmask = rows, bitmask.numpy()


def _reason(exc: Exception) -> str:
    """xgrammar's message without its C++ log prefix ("[12:00:00] /project/cpp/x.cc:94: ")."""
    return re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", str(exc).strip())
