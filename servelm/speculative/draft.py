"""Drafting with a model: a smaller model that shares the target's tokenizer (method
"draft_model"), or the target's own first layers and LM head (method "layer_skip").

The draft writes K/V through the target's block tables: a draft model into a cache of its
own with the same block layout, the layer-skip draft straight into the target's cache for
its layers, where verification computes the very same values again. Rejected drafts need
no undo either way: their slots are written again later. A step first catches the draft
up on the tokens it has not seen (the prompt, then the tokens accepted at each step),
which gives its distribution after the root, the last real token; then it grows the tree
one level per forward pass, each level's nodes attending to the context and their own
ancestors. Greedy requests take the top-b tokens as a node's b children; sampled ones draw
them independently from the draft's distribution q, which verification needs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from servelm.model.batch import SeqChunk, build_step_batch
from servelm.model.loader import LoadedModel, load_model, load_tokenizer
from servelm.ops.attention import attention_context
from servelm.speculative.config import SpecConfig
from servelm.speculative.proposer import Draft, DraftRequest
from servelm.speculative.tree import DraftTree, static_tree_for
from servelm.speculative.verify import distribution


def load_draft(spec: SpecConfig, target: LoadedModel, dtype: torch.dtype) -> LoadedModel | None:
    """The draft model of method "draft_model", checked against the target: verification
    compares the two models' distributions token id by token id."""
    if spec.method != "draft_model":
        return None
    draft = load_model(spec.model, dtype)
    target_tokenizer = target.tokenizer or load_tokenizer(target.source)
    vocab = target.arch.vocab_size
    if draft.arch.vocab_size != vocab:
        raise ValueError(f"speculative_config.model {spec.model!r} must share the target's "
                         f"vocabulary of {vocab} tokens, got {draft.arch.vocab_size}")
    # Tokens past the model's vocab (some converted tokenizers add one) are never sampled.
    theirs = {t: i for t, i in draft.tokenizer.get_vocab().items() if i < vocab}
    mismatch = [(t, i) for t, i in target_tokenizer.get_vocab().items()
                if i < vocab and theirs.get(t) != i]
    if mismatch:
        t, i = mismatch[0]
        raise ValueError(f"speculative_config.model {spec.model!r} must use the target's "
                         f"tokenizer: {len(mismatch)} token ids differ, e.g. {t!r} is {i} in "
                         f"the target and {theirs.get(t)} in the draft")
    return draft


class ModelDrafter:
    """A `Proposer` that runs a model: `forward(ids, positions) -> hidden` over the paged
    cache the draft writes, `compute_logits(hidden)`. `shares_target_cache`: the layer-skip
    draft, whose cache the target's verification brings up to date."""

    def __init__(self, forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 compute_logits: Callable[[torch.Tensor], torch.Tensor], block_size: int,
                 dtype: torch.dtype, branching: tuple[int, ...], shares_target_cache: bool,
                 split_decodes: bool, paged_prefills: bool = False,
                 device: torch.device | str = "cpu") -> None:
        self.forward, self.compute_logits = forward, compute_logits
        self.block_size, self.dtype = block_size, dtype
        self.branching = branching
        self.shares_target_cache = shares_target_cache
        self.split_decodes, self.paged_prefills, self.device = split_decodes, paged_prefills, device
        self._seen: dict[str, int] = {}  # tokens whose K/V the draft's own cache holds
        self._fed_levels: dict[str, int] = {}  # tree levels the last step wrote K/V for

    def reset(self, req_id: str) -> None:
        self._seen.pop(req_id, None)
        self._fed_levels.pop(req_id, None)

    def accepted(self, req_id: str, path: list[int]) -> None:
        """A draft model's K/V of accepted nodes already sits at the right slots when they
        form the tree's first chain (node i at depth i) and were fed: no need to feed
        those tokens again next step."""
        if self.shares_target_cache or req_id not in self._seen:
            return
        valid = 0
        while valid < min(len(path), self._fed_levels[req_id]) and path[valid] == valid + 1:
            valid += 1
        self._seen[req_id] += valid

    @torch.inference_mode()
    def propose(self, requests: list[DraftRequest]) -> list[Draft]:
        """A tree of up to `max_drafts` nodes for each request; its block table covers the
        slots of every node."""
        trees = [static_tree_for(self.branching, r.max_drafts) for r in requests]
        chunks = []
        for req, tree in zip(requests, trees):
            root = len(req.token_ids) - 1
            seen = req.num_computed_tokens if self.shares_target_cache else self._seen.get(req.req_id, 0)
            start = min(seen, root)  # the root at least, for its logits
            chunks.append(SeqChunk(req.token_ids[start:], start))
            self._seen[req.req_id] = root + 1
            self._fed_levels[req.req_id] = len(tree.levels) - 1  # the last level is not fed
        tables = [r.block_table for r in requests]
        parent_logits = self._run(chunks, tables, last_only=True)
        tokens: list[list[int]] = [[] for _ in requests]
        probs: list[list[torch.Tensor]] = [[] for _ in requests]
        for depth in range(1, max(len(t.levels) for t in trees) + 1):
            active = [i for i, t in enumerate(trees) if len(t.levels) >= depth]
            for i in active:
                self._grow(requests[i], parent_logits[i], self.branching[depth - 1], tokens[i], probs[i])
            fed = [i for i in active if len(trees[i].levels) > depth]
            if not fed:
                break
            chunks = [self._level(requests[i], trees[i], depth, tokens[i]) for i in fed]
            for i, rows in zip(fed, self._run(chunks, [tables[i] for i in fed])):
                parent_logits[i] = rows
        drafts = []
        for req, tree, toks, q in zip(requests, trees, tokens, probs):
            n = req.max_drafts
            drafts.append(Draft(toks[:n], tree.truncated(n), torch.stack(q[:n]) if q else None))
        return drafts

    @staticmethod
    def _grow(req: DraftRequest, logits: torch.Tensor, b: int, tokens: list[int],
              probs: list[torch.Tensor]) -> None:
        """`b` children for each parent row of `logits`, appended in level order."""
        if req.params.greedy:
            tokens.extend(logits.topk(b, dim=-1).indices.flatten().tolist())
            return
        q = distribution(logits, req.params)
        tokens.extend(torch.multinomial(q, b, replacement=True, generator=req.generator).flatten().tolist())
        probs.extend(row for row in q for _ in range(b))

    @staticmethod
    def _level(req: DraftRequest, tree: DraftTree, depth: int, tokens: list[int]) -> SeqChunk:
        """The nodes of one depth as a chunk: each at slot root + node, position root + depth."""
        nodes, root = tree.levels[depth - 1], len(req.token_ids) - 1
        ids = [tokens[n - 1] for n in nodes]
        if tree.is_chain:  # one node per level: slot and position agree, a plain decode
            return SeqChunk(ids, root + nodes.start)
        return SeqChunk(ids, root + nodes.start, tree.positions(root, nodes), tree.mask(root, nodes))

    def _run(self, chunks: list[SeqChunk], tables: list[list[int]],
             last_only: bool = False) -> list[torch.Tensor]:
        """Logits of every row of each chunk, or of its last row only."""
        batch = build_step_batch(chunks, tables, self.block_size, self.dtype, self.split_decodes,
                                 self.paged_prefills, self.device)
        with attention_context(batch.attn):
            hidden = self.forward(batch.input_ids, batch.positions)
        spans = [(0, 0)] * len(chunks)
        for b, i in enumerate(batch.order):
            n = len(chunks[i].token_ids)
            spans[i] = (batch.row_start[b] + n - 1, 1) if last_only else (batch.row_start[b], n)
        rows = [r for start, n in spans for r in range(start, start + n)]
        logits = self.compute_logits(hidden[rows])
        return list(logits.split([n for _, n in spans]))
