"""Drafts checked against a request's grammar: structured outputs with speculative decoding.

The engine owns each request's grammar and masks the token a request samples each step
(engine/structured.py). Drafts are made here, inside the step, after that mask, so the
worker keeps a matcher of its own for each constrained request that may draft: built from
the compiled grammar the engine sends with the request (serialized; xgrammar's tokenizer
info comes once, with the first), and caught up with the request's output each step.

For a step's draft it fills one mask per node: the tokens the grammar allows after the
root and after each draft node, walking the tree (accept a node's token, recurse, roll
back). Verification then sees the target's logits under those masks, so a draft token the
grammar forbids has probability zero and is rejected, and the token drawn in its place is
one the grammar allows: the output is distributed as constrained sampling one token at a
time, and greedy output is the constrained greedy output.
"""

from __future__ import annotations

from typing import Any

import torch

from servelm.speculative.proposer import Draft
from servelm.speculative.tree import DraftTree
from servelm.step_io import SchedulerOutput
from servelm.worker.request_state import RequestStates


class DraftGrammars:
    def __init__(self) -> None:
        self._xgr: Any = None  # xgrammar, imported with the first grammar
        self._info: Any = None

    def admit(self, step: SchedulerOutput, states: RequestStates) -> None:
        """Matchers for this step's new requests that came with a grammar."""
        if step.grammar_tokenizer_info is not None:
            import xgrammar

            self._xgr = xgrammar
            self._info = xgrammar.TokenizerInfo.deserialize_json(step.grammar_tokenizer_info)
        for new in step.new_requests:
            if new.grammar is not None:
                compiled = self._xgr.CompiledGrammar.deserialize_json(new.grammar, self._info)
                states[new.req_id].grammar = self._xgr.GrammarMatcher(compiled)

    def masks(self, state: Any, draft: Draft) -> torch.Tensor:
        """int32 [1 + drafts, ceil(vocab / 32)]: row 0 the tokens allowed after the root, row
        i those after draft node i (all allowed under a node the grammar forbids: it is
        never accepted, so its row is never used)."""
        matcher = state.grammar
        for token in state.output_token_ids[state.grammar_fed:]:  # the engine accepted these
            if not matcher.accept_token(token):
                raise RuntimeError(f"request {state.req_id!r}: the worker's grammar refused token "
                                   f"{token}, which the engine's accepted")
        state.grammar_fed = len(state.output_token_ids)
        tree = draft.tree or DraftTree(tuple(range(len(draft.token_ids))))
        bitmask = self._xgr.allocate_token_bitmask(len(draft.token_ids) + 1, self._info.vocab_size)
        _fill(matcher, 0, tree, draft.token_ids, bitmask)
        return bitmask


def _fill(matcher: Any, node: int, tree: DraftTree, tokens: list[int], bitmask: torch.Tensor) -> None:
    if matcher.is_terminated():  # a stop token ended it: the request ends there too
        return
    matcher.fill_next_token_bitmask(bitmask, node)
    for child in tree.children[node]:
        if matcher.accept_token(tokens[child - 1]):
            _fill(matcher, child, tree, tokens, bitmask)
            matcher.rollback(1)
