"""n-gram drafting and lossless verification, checked against the definitions."""

from __future__ import annotations

import pytest
import torch

from servelm.sampling_params import SamplingParams
from servelm.speculative.config import SpecConfig
from servelm.speculative.ngram import NgramProposer
from servelm.speculative.verify import verify


def test_ngram_copies_the_continuation_of_the_latest_longest_match():
    p = NgramProposer(1, 3)
    assert p.lookup([1, 2, 3, 9, 9, 1, 2, 3, 7, 7, 1, 2, 3], 2) == [7, 7]  # latest of two
    assert p.lookup([5, 1, 2, 6, 2], 3) == [6, 2]  # only the 1-gram [2] matches
    assert p.lookup([4, 5, 6], 3) == []  # nothing repeats
    assert p.lookup([1, 2, 1, 2], 10) == [1, 2]  # stops at the end of the text


def test_greedy_keeps_the_matching_prefix_then_the_targets_token():
    logits = torch.full((4, 8), -5.0)
    for row, best in enumerate([3, 4, 6, 1]):
        logits[row, best] = 5.0
    greedy = SamplingParams(temperature=0)
    assert verify(logits, [3, 4, 5], greedy, None)[0] == [3, 4, 6]
    assert verify(logits, [3, 4, 6], greedy, None)[0] == [3, 4, 6, 1]  # all kept, plus a bonus
    assert verify(logits, [0, 4, 6], greedy, None)[0] == [3]


def test_rejection_sampling_reproduces_the_target_distribution():
    """Draws of the first two tokens with a fixed one-hot draft match p exactly: the first
    token ~ p_0 whatever the draft, the second ~ p_1 given the first was the draft."""
    torch.manual_seed(0)
    vocab, n = 6, 40000
    logits = torch.randn(3, vocab)
    params = SamplingParams(temperature=0.8, top_p=0.95)
    gen = torch.Generator().manual_seed(1)
    first, second = torch.zeros(vocab), torch.zeros(vocab)
    for _ in range(n):
        out, _ = verify(logits, [2, 4], params, gen)
        first[out[0]] += 1
        if out[0] == 2:
            second[out[1]] += 1

    def target(row: int) -> torch.Tensor:
        z = logits[row] / 0.8
        srt, idx = z.softmax(-1).sort(descending=True)
        keep = (srt.cumsum(-1) - srt) < 0.95
        p = torch.zeros(vocab).scatter_(0, idx, srt * keep)
        return p / p.sum()

    for counts, p in ((first, target(0)), (second, target(1))):
        expected = p * counts.sum()
        chi2 = float(((counts - expected) ** 2 / expected.clamp_min(1e-9))[expected > 0].sum())
        assert chi2 < 20.5, chi2  # chi-square, 5 degrees of freedom, p = 0.001
        assert counts[expected == 0].sum() == 0  # nothing outside the nucleus, ever


@pytest.mark.parametrize("bad, field", [
    ({"method": "medusa", "num_speculative_tokens": 2}, "method"),
    ({"method": "ngram"}, "num_speculative_tokens"),
    ({"method": "ngram", "num_speculative_tokens": 2, "lookup": 3}, "unknown keys"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 5}, "prompt_lookup_min"),
    ("{not json", "JSON"),
])
def test_bad_speculative_config_names_the_field(bad, field):
    with pytest.raises(ValueError, match=field):
        SpecConfig.parse(bad)
