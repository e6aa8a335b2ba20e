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

from servelm.engine.request import Request
from servelm.model.loader import LoadedModel, load_model
from servelm.model.registry import build_model
from servelm.ops.attention import attention_context, select_backend
from servelm.speculative.config import SpecConfig
from servelm.speculative.tree import DraftTree
from servelm.speculative.verify import distribution
from servelm.worker.batch import SeqChunk, build_step_batch
from servelm.worker.kv_cache import KVTensors
from servelm.worker.model_runner import ModelRunner


def load_draft(spec: SpecConfig, target: LoadedModel, dtype: torch.dtype) -> LoadedModel | None:
    """The draft model of method "draft_model", checked against the target: verification
    compares the two models' distributions token id by token id."""
    if spec.method != "draft_model":
        return None
    draft = load_model(spec.model, dtype)
    vocab = target.arch.vocab_size
    if draft.arch.vocab_size != vocab:
        raise ValueError(f"speculative_config.model {spec.model!r} must share the target's "
                         f"vocabulary of {vocab} tokens, got {draft.arch.vocab_size}")
    # Tokens past the model's vocab (some converted tokenizers add one) are never sampled.
    theirs = {t: i for t, i in draft.tokenizer.get_vocab().items() if i < vocab}
    mismatch = [(t, i) for t, i in target.tokenizer.get_vocab().items()
                if i < vocab and theirs.get(t) != i]
    if mismatch:
        t, i = mismatch[0]
        raise ValueError(f"speculative_config.model {spec.model!r} must use the target's "
                         f"tokenizer: {len(mismatch)} token ids differ, e.g. {t!r} is {i} in "
                         f"the target and {theirs.get(t)} in the draft")
    return draft


class DraftProposer:
    def __init__(self, forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 compute_logits: Callable[[torch.Tensor], torch.Tensor], runner: ModelRunner,
                 branching: tuple[int, ...], shares_target_cache: bool,
                 split_decodes: bool) -> None:
        self.forward, self.compute_logits = forward, compute_logits
        self.block_size, self.dtype = runner.block_size, runner.dtype
        self.branching = branching
        self.shares_target_cache = shares_target_cache
        self.split_decodes = split_decodes
        self._trees: dict[int, DraftTree] = {}

    @classmethod
    def build(cls, spec: SpecConfig, runner: ModelRunner, draft: LoadedModel | None) -> DraftProposer:
        branching = spec.tree or (1,) * spec.num_speculative_tokens
        if spec.method == "layer_skip":
            model = runner.model
            if spec.num_layers >= len(model.layers):
                raise ValueError(f"speculative_config.num_layers must be below the target's "
                                 f"{len(model.layers)} layers, got {spec.num_layers}")

            def forward(ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
                return model(ids, pos, num_layers=spec.num_layers)

            return cls(forward, model.compute_logits, runner, branching, True,
                       runner.attention.pads_decodes)
        arch = draft.arch
        backend = select_backend(runner.dtype, arch.num_heads, arch.num_kv_heads, arch.head_dim,
                                 runner.config.kv_cache_dtype)
        model = build_model(arch, draft.weights, backend, runner.dtype, runner.max_model_len)
        if runner.config.quantization:
            model.quantize(runner.config.quantization, runner.config.quantization_group_size)
        slots = runner.num_kv_blocks * runner.block_size
        cache = KVTensors(arch, slots, runner.dtype, runner.config.kv_cache_dtype)
        for i, layer in enumerate(model.layers):
            layer.attn.kv_cache = cache.layer(i)
        return cls(model, model.compute_logits, runner, branching, False, backend.pads_decodes)

    def tree(self, depth: int) -> DraftTree:
        if depth not in self._trees:
            self._trees[depth] = DraftTree.static(self.branching, depth)
        return self._trees[depth]

    def slots_written(self, depth: int) -> int:
        """Slots past the root that drafting `depth` levels writes (the last level is not fed)."""
        return self.tree(depth - 1).size

    @torch.inference_mode()
    def propose(self, reqs: list[Request], depths: list[int], tables: list[list[int]]) -> None:
        """Draft a tree of `depths[i]` levels for each request; its block table must already
        cover `slots_written` slots past the root."""
        trees = [self.tree(d) for d in depths]
        chunks = []
        for req in reqs:
            seen = req.num_computed_tokens if self.shares_target_cache else req.draft_num_computed
            start = min(seen, req.num_tokens - 1)  # the root at least, for its logits
            chunks.append(SeqChunk(req.all_token_ids[start:], start))
            req.draft_num_computed = req.num_tokens
        parent_logits = self._run(chunks, tables, last_only=True)
        tokens: list[list[int]] = [[] for _ in reqs]
        probs: list[list[torch.Tensor]] = [[] for _ in reqs]
        for depth in range(1, max(depths) + 1):
            active = [i for i, t in enumerate(trees) if len(t.levels) >= depth]
            for i in active:
                self._grow(reqs[i], parent_logits[i], self.branching[depth - 1], tokens[i], probs[i])
            fed = [i for i in active if len(trees[i].levels) > depth]
            if not fed:
                break
            chunks = [self._level(reqs[i], trees[i], depth, tokens[i]) for i in fed]
            for i, rows in zip(fed, self._run(chunks, [tables[i] for i in fed])):
                parent_logits[i] = rows
        for req, tree, toks, q in zip(reqs, trees, tokens, probs):
            req.set_drafts(toks, tree, torch.stack(q) if q else None)

    @staticmethod
    def _grow(req: Request, logits: torch.Tensor, b: int, tokens: list[int], probs: list[torch.Tensor]) -> None:
        """`b` children for each parent row of `logits`, appended in level order."""
        if req.params.greedy:
            tokens.extend(logits.topk(b, dim=-1).indices.flatten().tolist())
            return
        q = distribution(logits, req.params)
        tokens.extend(torch.multinomial(q, b, replacement=True, generator=req.generator).flatten().tolist())
        probs.extend(row for row in q for _ in range(b))

    @staticmethod
    def _level(req: Request, tree: DraftTree, depth: int, tokens: list[int]) -> SeqChunk:
        """The nodes of one depth as a chunk: each at slot root + node, position root + depth."""
        nodes, root = tree.levels[depth - 1], req.num_tokens - 1
        ids = [tokens[n - 1] for n in nodes]
        if tree.is_chain:  # one node per level: slot and position agree, a plain decode
            return SeqChunk(ids, root + nodes.start)
        return SeqChunk(ids, root + nodes.start, tree.positions(root, nodes), tree.mask(root, nodes))

    def _run(self, chunks: list[SeqChunk], tables: list[list[int]],
             last_only: bool = False) -> list[torch.Tensor]:
        """Logits of every row of each chunk, or of its last row only."""
        batch = build_step_batch(chunks, tables, self.block_size, self.dtype, self.split_decodes)
        with attention_context(batch.attn):
            hidden = self.forward(batch.input_ids, batch.positions)
        spans = [(0, 0)] * len(chunks)
        for b, i in enumerate(batch.order):
            n = len(chunks[i].token_ids)
            spans[i] = (batch.row_start[b] + n - 1, 1) if last_only else (batch.row_start[b], n)
        rows = [r for start, n in spans for r in range(start, start + n)]
        logits = self.compute_logits(hidden[rows])
        return list(logits.split([n for _, n in spans]))
