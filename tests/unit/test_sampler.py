"""Sampler: filters, penalties, min_tokens, and seed reproducibility across batches."""

from __future__ import annotations

import pytest
import torch

from servelm.ops.sampler import (
    Sampler,
    SamplingMetadata,
    apply_min_tokens,
    apply_penalties,
)
from servelm.sampling_params import SamplingParams

EOS = 0


def meta_for(
    params: list[SamplingParams],
    prompt: list[list[int]] | None = None,
    output: list[list[int]] | None = None,
    gens: list[torch.Generator | None] | None = None,
) -> SamplingMetadata:
    b = len(params)
    return SamplingMetadata.build(
        params,
        prompt if prompt is not None else [[] for _ in range(b)],
        output if output is not None else [[] for _ in range(b)],
        gens if gens is not None else [None] * b,
        [set(p.stop_token_ids or ()) | (set() if p.ignore_eos else {EOS}) for p in params],
        "cpu",
    )


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def sample_many(logits_row: torch.Tensor, p: SamplingParams, times: int) -> torch.Tensor:
    """Sample one distribution `times` times at once, as a batch of identical rows."""
    torch.manual_seed(0)
    logits = logits_row.unsqueeze(0).expand(times, -1).contiguous()
    return Sampler()(logits, meta_for([p] * times))


def test_build_skips_unused_stages() -> None:
    m = meta_for([SamplingParams(), SamplingParams(temperature=0.0, top_p=0.5, top_k=3)])
    assert m.no_top_k and m.no_top_p and m.no_min_p  # greedy row's filters are irrelevant
    assert m.presence_penalties is None and m.frequency_penalties is None
    assert m.repetition_penalties is None and m.min_tokens_mask is None
    assert not m.all_greedy and not m.all_random
    m = meta_for([SamplingParams(top_k=5), SamplingParams(min_p=0.1)])
    assert not m.no_top_k and m.no_top_p and not m.no_min_p and m.all_random
    assert m.top_k.tolist() == [5, 0]


def test_build_drops_generators_of_greedy_rows() -> None:
    params = [SamplingParams(temperature=0.0, seed=1), SamplingParams(seed=2)]
    m = meta_for(params, gens=[seeded(1), seeded(2)])
    assert list(m.generators) == [1]


def test_greedy_is_argmax_also_in_mixed_batch() -> None:
    logits = torch.randn(6, 50, generator=seeded(1))
    params = [SamplingParams(temperature=0.0 if i % 2 == 0 else 1.0) for i in range(6)]
    out = Sampler()(logits, meta_for(params))
    assert out[0::2].tolist() == logits.argmax(-1)[0::2].tolist()
    all_greedy = Sampler()(logits, meta_for([SamplingParams(temperature=0.0)] * 6))
    assert all_greedy.tolist() == logits.argmax(-1).tolist()


def test_top_k_only_samples_among_k_largest() -> None:
    row = torch.randn(40, generator=seeded(2))
    tokens = sample_many(row, SamplingParams(top_k=3, temperature=2.0), 3000)
    assert set(tokens.tolist()) == set(row.topk(3).indices.tolist())


def test_top_k_mixed_with_unfiltered_rows() -> None:
    row = torch.randn(40, generator=seeded(3))
    logits = row.expand(400, -1).contiguous()
    params = [SamplingParams(top_k=2 if i % 2 else 0, temperature=2.0) for i in range(400)]
    tokens = Sampler()(logits, meta_for(params))
    assert set(tokens[1::2].tolist()) == set(row.topk(2).indices.tolist())
    assert len(set(tokens[0::2].tolist())) > 2


def probs_logits(probs: list[float]) -> torch.Tensor:
    return torch.tensor(probs).log()


@pytest.mark.parametrize("top_p,allowed", [(0.4, {0}), (0.75, {0, 1}), (0.85, {0, 1, 2})])
def test_top_p_keeps_the_nucleus(top_p: float, allowed: set[int]) -> None:
    row = probs_logits([0.5, 0.3, 0.15, 0.05])[[2, 0, 3, 1]]  # shuffled: ids 1, 3, 0, 2
    order = [1, 3, 0, 2]
    tokens = sample_many(row, SamplingParams(top_p=top_p), 3000)
    assert set(tokens.tolist()) == {order[i] for i in allowed}


def test_top_k_and_top_p_combined() -> None:
    row = probs_logits([0.4, 0.3, 0.2, 0.1])
    # top_k=3 renormalizes to [4/9, 3/9, 2/9]; top_p=0.7 then keeps ids 0 and 1.
    tokens = sample_many(row, SamplingParams(top_k=3, top_p=0.7), 3000)
    assert set(tokens.tolist()) == {0, 1}


def test_min_p_drops_unlikely_tokens() -> None:
    row = probs_logits([0.5, 0.3, 0.15, 0.05])
    tokens = sample_many(row, SamplingParams(min_p=0.2), 3000)  # threshold 0.1
    assert set(tokens.tolist()) == {0, 1, 2}


def test_frequencies_match_tempered_softmax() -> None:
    row = torch.tensor([1.0, 0.5, 0.0, -0.5, -1.0, 2.0])
    n = 20000
    tokens = sample_many(row, SamplingParams(temperature=0.7), n)
    freq = torch.bincount(tokens, minlength=6).double() / n
    expected = (row / 0.7).softmax(-1).double()
    chi2 = (n * (freq - expected) ** 2 / expected).sum().item()
    assert chi2 < 25.0, (freq, expected)  # 5 dof: p(chi2 > 25) ~ 1e-4


def test_seeded_row_frequencies_match_softmax() -> None:
    row = torch.tensor([[0.0, 1.0, 2.0]])
    meta = meta_for([SamplingParams(seed=3)], gens=[seeded(3)])
    tokens = torch.tensor([Sampler()(row, meta).item() for _ in range(2000)])
    freq = torch.bincount(tokens, minlength=3).double() / 2000
    assert torch.allclose(freq, row[0].softmax(-1).double(), atol=0.04)


def run_steps(logits_steps: list[torch.Tensor], params: list[SamplingParams], seeds: list) -> list:
    gens = [seeded(s) if s is not None else None for s in seeds]
    sampler = Sampler()
    out = []
    for logits in logits_steps:
        out.append(sampler(logits, meta_for(params, gens=gens)).tolist())
    return out


def test_seed_reproducible_alone_or_batched() -> None:
    vocab, steps = 64, 8
    target = SamplingParams(seed=1234, temperature=0.9, top_k=20)
    rows = [torch.randn(steps, vocab, generator=seeded(10 + i)) for i in range(4)]
    alone = run_steps([rows[0][s : s + 1] for s in range(steps)], [target], [1234])

    others = [
        SamplingParams(top_p=0.5),
        SamplingParams(seed=7, min_p=0.1, frequency_penalty=0.5),
        SamplingParams(temperature=0.0, repetition_penalty=1.3),
    ]
    for position in range(4):
        params = others[:position] + [target] + others[position:]
        seeds: list = [None, 7, None][:position] + [1234] + [None, 7, None][position:]
        order = [1, 2, 3][:position] + [0] + [1, 2, 3][position:]
        torch.manual_seed(position)  # unseeded rows differ between runs
        steps_logits = [torch.stack([rows[r][s] for r in order]) for s in range(steps)]
        batched = run_steps(steps_logits, params, seeds)
        assert [t[position] for t in batched] == [t[0] for t in alone]


def test_different_seeds_differ() -> None:
    logits = torch.zeros(1, 1000)
    a = run_steps([logits] * 5, [SamplingParams(seed=1)], [1])
    b = run_steps([logits] * 5, [SamplingParams(seed=2)], [2])
    assert a != b


def test_penalties_hand_computed() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0], [1.0, 1.0, 1.0, 1.0, 1.0]])
    params = [
        SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25),
        SamplingParams(),
    ]
    prompt = [[4, 4], [0, 1, 2]]
    output = [[1, 2, 2], [3, 3]]
    got = apply_penalties(logits, meta_for(params, prompt, output))
    # Row 0: seen = {1, 2, 4}; out counts: 1 -> 1, 2 -> 2.
    # token 1: -1 * 2 = -2, -0.5 * 1 freq, -0.25 presence -> -2.75
    # token 2: 0.5 / 2 = 0.25, -0.5 * 2 freq, -0.25 presence -> -1.0
    # token 4: -2 * 2 = -4 (prompt only: no frequency/presence penalty)
    expected0 = [2.0, -2.75, -1.0, 3.0, -4.0]
    assert torch.allclose(got[0], torch.tensor(expected0))
    assert torch.equal(got[1], logits[1])  # neutral row untouched


def test_penalties_noop_when_unused() -> None:
    logits = torch.randn(2, 5)
    m = meta_for([SamplingParams()] * 2, output=[[1, 1], [2]])
    assert apply_penalties(logits, m) is logits


def test_penalty_ignores_ids_outside_vocab() -> None:
    logits = torch.ones(1, 4)
    m = meta_for([SamplingParams(presence_penalty=1.0)], prompt=[[9]], output=[[2, 7]])
    assert apply_penalties(logits, m).tolist() == [[1.0, 1.0, 0.0, 1.0]]


def test_min_tokens_forbids_eos_and_stop_ids() -> None:
    logits = torch.tensor([[5.0, 4.0, 3.0, 0.0]] * 3)
    params = [
        SamplingParams(min_tokens=2, stop_token_ids=[1], temperature=0.0),
        SamplingParams(min_tokens=2, stop_token_ids=[1], temperature=0.0),
        SamplingParams(min_tokens=2, ignore_eos=True, temperature=0.0),
    ]
    m = meta_for(params, output=[[3], [3, 3], []])
    masked = apply_min_tokens(logits, m)
    assert masked[0, 0] == float("-inf") and masked[0, 1] == float("-inf")
    assert torch.equal(masked[1], logits[1])  # min_tokens reached
    assert masked[2, 0] == 5.0  # ignore_eos: eos is an ordinary token
    assert Sampler()(logits, m).tolist() == [2, 0, 0]
    assert logits[0, 0] == 5.0  # caller's tensor not modified


def test_half_precision_logits_accepted() -> None:
    logits = torch.randn(2, 10).to(torch.bfloat16)
    tokens = Sampler()(logits, meta_for([SamplingParams(top_p=0.9), SamplingParams(temperature=0)]))
    assert tokens.dtype == torch.int64
    assert tokens[1] == logits[1].float().argmax()
