"""Drafting with an EAGLE draft (speculative/eagle.py) on the target's own hidden states.

The model runner hands the proposer the final hidden state of every position the target
computes for good (`observe`: prompt chunks, decodes, accepted drafts), so the draft's
slots always hold the target's true features. Each request keeps the draft layer's keys
and values for those slots, as a draft model keeps its KV cache. A step's drafting first
runs the slots the target added since the last step (one pass), then drafts token by
token from its own guesses; those guesses' keys and values are dropped afterwards, since
the target's states of the accepted tokens replace them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from servelm.ops.quant import linear, quantize
from servelm.speculative.eagle import EagleDraft
from servelm.speculative.proposer import Draft, DraftRequest
from servelm.speculative.verify import distribution


class _Slots:
    """One request's target features from position `base` on, and the draft's keys and
    values for the first `cached` of them (grown by doubling)."""

    def __init__(self, base: int, hidden: int, kv_heads: int, head_dim: int) -> None:
        self.base, self.count, self.cached = base, 0, 0
        self.feats = torch.empty(64, hidden)
        self.keys = torch.empty(64, kv_heads, head_dim)
        self.values = torch.empty(64, kv_heads, head_dim)

    def add(self, first: int, rows: torch.Tensor) -> None:
        end = first - self.base + len(rows)
        if end > len(self.feats):
            self.feats = _grown(self.feats, end)
        self.feats[first - self.base : end] = rows
        self.count = end
        self.cached = min(self.cached, first - self.base)  # a recompute rewrites what follows

    def write(self, at: int, keys: torch.Tensor, values: torch.Tensor) -> int:
        """Keys and values of slots from index `at` on (growing the buffers); returns the end.
        Past `cached` they are scratch: the next write there replaces them."""
        end = at + len(keys)
        if end > len(self.keys):
            self.keys, self.values = _grown(self.keys, end), _grown(self.values, end)
        self.keys[at:end], self.values[at:end] = keys, values
        return end

    def cache(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Keep the keys and values of the slots after the cached ones."""
        self.cached = self.write(self.cached, keys, values)


def _grown(t: torch.Tensor, need: int) -> torch.Tensor:
    bigger = torch.empty(max(need, 2 * len(t)), *t.shape[1:], dtype=t.dtype)
    bigger[: len(t)] = t
    return bigger


class EagleProposer:
    """A `Proposer` from an EAGLE draft. `embed` is the target's token embedding, and
    `lm_head` [hidden, vocab] its LM head as floats (only the draft vocabulary's columns are
    kept). The draft runs on the CPU in 8-bit blocks, wherever the target runs (`device`)."""

    def __init__(self, draft: EagleDraft, embed: Callable[[torch.Tensor], torch.Tensor],
                 lm_head: torch.Tensor, device: torch.device) -> None:
        self.draft, self.embed, self.device = draft, embed, device
        draft.quantize_blocks()
        self.vocab = draft.vocab
        # the LM head's draft-vocabulary rows, [draft vocab, hidden], as 8-bit blocks
        self.head = quantize(lm_head[:, self.vocab].T.contiguous(), "int8", 32, torch.float32)
        self.vocab_size = lm_head.shape[1]
        self._slots: dict[str, _Slots] = {}

    def observe(self, req_id: str, first: int, hidden: torch.Tensor) -> None:
        slots = self._slots.get(req_id)
        if slots is None or not slots.base <= first <= slots.base + slots.count:
            # first sight, or a gap (a prefix-cache hit after a reset): start over here
            slots = self._slots[req_id] = _Slots(first, hidden.shape[-1], self.draft.num_kv_heads,
                                                 self.draft.head_dim)
        slots.add(first, hidden.detach().float().cpu())

    def reset(self, req_id: str) -> None:
        self._slots.pop(req_id, None)

    def accepted(self, req_id: str, path: list[int]) -> None:
        """Nothing to do: the accepted tokens' true states come through `observe`."""

    @torch.inference_mode()
    def propose(self, requests: list[DraftRequest]) -> list[Draft]:
        return [self._propose_one(r) for r in requests]

    def _propose_one(self, req: DraftRequest) -> Draft:
        slots = self._slots.get(req.req_id)
        last = len(req.token_ids) - 2  # the position whose state produced the root
        if slots is None or req.max_drafts < 1 or slots.base + slots.count - 1 != last:
            return Draft([])  # no state for the root yet (it was never computed for good)
        first = slots.base + slots.cached  # slots the draft has not run yet: first .. last
        ids = torch.tensor(req.token_ids[first + 1 : last + 2])
        guess, (k, v) = self.draft(self._embed(ids), slots.feats[slots.cached : slots.count],
                                   torch.arange(first, last + 1),
                                   (slots.keys[: slots.cached], slots.values[: slots.cached]))
        slots.cache(k, v)
        end = slots.cached  # the drafts' own slots follow, as scratch
        g = guess[-1:]
        tokens: list[int] = []
        probs: list[torch.Tensor] = []
        for j in range(req.max_drafts):
            token, q = self._choose(linear(g, self.head), req)
            tokens.append(token)
            if q is not None:
                probs.append(q)
            if j + 1 == req.max_drafts:
                break
            g, (k, v) = self.draft(self._embed(torch.tensor([token])), g,
                                   torch.tensor([last + 1 + j]), (slots.keys[:end], slots.values[:end]))
            end = slots.write(end, k, v)
        return Draft(tokens, None, torch.stack(probs) if probs else None)

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embed(ids.to(self.device)).float().cpu()

    def _choose(self, logits: torch.Tensor, req: DraftRequest) -> tuple[int, torch.Tensor | None]:
        """The draft token from draft-vocabulary logits [1, V']: the best (greedy), or a
        draw from q over the whole vocabulary (zero outside the draft's), returned with q."""
        if req.params.greedy:
            return int(self.vocab[int(logits.argmax())]), None
        full = torch.full((1, self.vocab_size), float("-inf"))
        full[0, self.vocab] = logits[0]
        q = distribution(full, req.params)[0]
        return int(torch.multinomial(q, 1, generator=req.generator)), q
