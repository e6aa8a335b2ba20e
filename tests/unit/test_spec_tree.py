"""Draft trees: layout and attention mask, and verification over several candidates per node
(greedy follows the target's argmax; sampled keeps the target distribution whatever q is)."""

from __future__ import annotations

import torch

from servelm.sampling_params import SamplingParams
from servelm.speculative.tree import DraftTree
from servelm.speculative.verify import distribution, verify


def test_static_tree_layout():
    t = DraftTree.static([2, 2, 1], 3)
    # depth 1: 1, 2; depth 2: 3, 4 under 1 and 5, 6 under 2; depth 3: one under each
    assert t.parents == (0, 0, 1, 1, 2, 2, 3, 4, 5, 6)
    assert t.levels == [range(1, 3), range(3, 7), range(7, 11)]
    assert t.depths == [0, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3]
    assert t.children[0] == [1, 2] and t.children[4] == [8] and t.children[10] == []
    assert DraftTree.static([2, 2, 1], 1).parents == (0, 0)
    assert DraftTree.static([1, 1, 1], 3).is_chain and not t.is_chain
    assert t.truncated(4).parents == (0, 0, 1, 1)


def test_mask_sees_the_context_the_root_and_ancestors_only():
    t = DraftTree.static([2, 1], 2)  # 1, 2 at depth 1; 3 under 1, 4 under 2
    root = 5
    mask = t.mask(root, range(0, 5))
    assert mask.shape == (5, root + 5)
    assert mask[:, : root + 1].all()  # context and root, for everyone
    nodes = mask[:, root + 1:].int().tolist()
    assert nodes == [[0, 0, 0, 0], [1, 0, 0, 0], [0, 1, 0, 0], [1, 0, 1, 0], [0, 1, 0, 1]]
    assert t.positions(root, range(0, 5)) == [5, 6, 6, 7, 7]
    level2 = t.mask(root, t.levels[1])  # a draft pass feeding depth 2 only
    assert level2.shape == (2, root + 5) and level2[:, root + 1:].int().tolist() == nodes[3:]


def test_greedy_tree_verification_follows_the_argmax():
    t = DraftTree.static([3, 1], 2)  # 1, 2, 3; 4 under 1, 5 under 2, 6 under 3
    draft = [7, 4, 9, 1, 2, 3]
    logits = torch.full((7, 10), -5.0)
    for row, best in enumerate([4, 8, 2, 8, 8, 8, 8]):  # row i: after node i
        logits[row, best] = 5.0
    greedy = SamplingParams(temperature=0)
    assert verify(logits, draft, greedy, None, t) == ([4, 2, 8], [2, 5])
    assert verify(logits, [1, 1, 1, 0, 0, 0], greedy, None, t) == ([4], [])


def test_multi_candidate_rejection_sampling_keeps_the_target_distribution():
    """Three children drawn from a q far from p, then verified: the emitted first token is
    distributed as p (SpecInfer's multi-step speculative sampling is lossless)."""
    torch.manual_seed(0)
    vocab, n = 6, 30000
    params = SamplingParams(temperature=1.0)
    p_logits, q_logits = torch.randn(4, vocab) * 1.5, torch.randn(1, vocab) * 1.5
    q = distribution(q_logits, params)[0]
    t = DraftTree.static([3], 1)
    gen = torch.Generator().manual_seed(2)
    counts = torch.zeros(vocab)
    accepted = 0
    for _ in range(n):
        children = torch.multinomial(q, 3, replacement=True, generator=gen).tolist()
        out, path = verify(p_logits, children, params, gen, t, q.expand(3, vocab))
        counts[out[0]] += 1
        accepted += bool(path)
    p = distribution(p_logits[:1], params)[0]
    expected = p * n
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 20.5, chi2  # chi-square, 5 degrees of freedom, p = 0.001
    assert 0.2 < accepted / n < 0.95  # both outcomes happen
