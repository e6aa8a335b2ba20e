"""Lossless verification of draft tokens against the target model's logits.

The target scores the last real token (the root) and every draft node in one pass: one
row of logits each. Drafts form a chain or a tree (speculative/tree.py); a chain is the tree
whose every node has one child. Verification walks down from the root:

- Greedy requests follow the child whose token is the target's argmax and stop at the
  first node without one, appending the argmax there: exactly the tokens that decoding one
  at a time would produce.
- Sampled requests use speculative rejection sampling (Leviathan et al., Chen et al.), in
  SpecInfer's multi-candidate form: a child with token d, drawn from the draft's
  distribution q, is kept with probability min(1, p(d) / q(d)); when rejected, p becomes
  the residual max(0, p - q) renormalized and the next child is tried; when every child is
  rejected, the token is drawn from what p has become. The output is distributed exactly
  as sampling from the target token by token, provided the children of a node are
  independent draws from q. Proposers without a distribution (n-gram lookup) propose with
  certainty, q = one-hot(d), so the test is a draw u < p(d) and the residual is p with d
  removed.
"""

from __future__ import annotations

import torch
from torch import Tensor

from servelm.ops.sampler import SamplingMetadata, target_probs
from servelm.sampling_params import SamplingParams
from servelm.speculative.tree import DraftTree


def distribution(logits: Tensor, params: SamplingParams) -> Tensor:
    """Each row's sampling distribution under `params` (temperature, top-k/p, min-p)."""
    rows = logits.shape[0]
    meta = SamplingMetadata.build([params] * rows, [[]] * rows, [[]] * rows, [None] * rows,
                                  [()] * rows, logits.device)
    probs = target_probs(logits.float(), meta)
    return probs / probs.sum(dim=-1, keepdim=True)


def verify(logits: Tensor, draft: list[int], params: SamplingParams,
           generator: torch.Generator | None, tree: DraftTree | None = None,
           draft_probs: Tensor | None = None) -> tuple[list[int], list[int]]:
    """The tokens to append for one request (the accepted drafts and one token of the
    target's) and the accepted nodes (1-based). `logits` is [len(draft) + 1, vocab]: row 0
    scores the token after the root, row i the token after node i. `tree` None means a
    chain; `draft_probs[i - 1]` is the distribution node i was drawn from (None: one-hot)."""
    tree = tree or DraftTree(tuple(range(len(draft))))
    out: list[int] = []
    path: list[int] = []
    node = 0
    if params.greedy:
        target = logits.argmax(dim=-1).tolist()
        while True:
            t = target[node]
            out.append(t)
            node = next((c for c in tree.children[node] if draft[c - 1] == t), 0)
            if not node:
                return out, path
            path.append(node)
    probs = distribution(logits, params)
    while True:
        p = probs[node]
        for child in tree.children[node]:
            d = draft[child - 1]
            q = None if draft_probs is None else draft_probs[child - 1]
            q_d = 1.0 if q is None else float(q[d])
            if float(torch.rand(1, generator=generator, device=p.device)) * q_d < float(p[d]):
                break
            if q is None:
                p = p.clone()
                p[d] = 0.0
            else:
                p = (p - q).clamp_min_(0.0)
            total = float(p.sum())
            # p == q exactly leaves nothing, but then d was accepted with probability 1.
            p = p / total if total > 0 else probs[node]
        else:
            out.append(_draw(p, generator))
            return out, path
        out.append(d)
        path.append(child)
        node = child


def _draw(probs: Tensor, generator: torch.Generator | None) -> int:
    return int(torch.multinomial(probs, 1, generator=generator))
