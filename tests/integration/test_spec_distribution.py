"""Sampling through the engine with a draft model keeps the target's distribution.

A tiny-vocabulary target and a different random draft (so drafts are both accepted and
rejected) generate many short samples; the histograms of the first tokens must match the
exact distribution computed with Hugging Face transformers on the target's weights. The
first token comes from the prompt step; the second and third pass through verification
(a draft accepted, or the residual's token, then the bonus token or a plain step).
"""

from __future__ import annotations

import pytest
import torch

from servelm import SamplingParams

VOCAB, TEMPERATURE, SAMPLES = 8, 0.9, 1500
PROMPT = [1, 5, 3, 6]


def reference(model_dir) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact P(t1, t2) [V, V] and P(t3) [V] at TEMPERATURE, from transformers."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)

    def next_probs(prefixes: list[list[int]]) -> torch.Tensor:
        with torch.no_grad():
            logits = model(torch.tensor(prefixes)).logits[:, -1]
        return (logits / TEMPERATURE).softmax(-1)

    p1 = next_probs([PROMPT])[0]
    p2 = next_probs([PROMPT + [a] for a in range(VOCAB)])  # [t1, t2]
    p3 = next_probs([PROMPT + [a, b] for a in range(VOCAB) for b in range(VOCAB)])
    joint12 = p1[:, None] * p2
    marginal3 = (joint12.reshape(-1, 1) * p3).sum(0)
    return joint12, marginal3


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    """Statistic and degrees of freedom, cells with expected count below 5 pooled."""
    expected = probs.flatten() * counts.sum()
    counts = counts.flatten().double()
    small = expected < 5
    obs = torch.cat([counts[~small], counts[small].sum().view(1)])
    exp = torch.cat([expected[~small], expected[small].sum().view(1)])
    keep = exp > 0
    return float(((obs - exp) ** 2 / exp)[keep].sum()), int(keep.sum()) - 1


@pytest.mark.parametrize("spec", [
    {"method": "draft_model", "num_speculative_tokens": 2},
    {"method": "draft_model", "tree": [3, 1]},  # several candidates per node (SpecInfer)
])
def test_sampled_tokens_follow_the_target_distribution(tiny_model_dir, make_llm, spec):
    target = tiny_model_dir("llama", vocab_size=VOCAB)
    draft = tiny_model_dir("llama", vocab_size=VOCAB, hidden_size=32, head_dim=8,
                           num_hidden_layers=1)
    outs, m = sample_with(make_llm, target, {**spec, "model": str(draft)})
    # One level of drafts fits max_tokens; it is accepted about half the time, so both
    # verification outcomes are exercised.
    assert 0.3 < m["spec_mean_accepted_length"] < 0.8
    assert_follows_target(outs, target)


def sample_with(make_llm, target, speculative_config: dict) -> tuple[list, dict]:
    """SAMPLES seeded samples of 3 tokens after PROMPT from `target` speculating with
    `speculative_config` (whatever the batch size), and the engine's metrics after."""
    llm = make_llm(target, speculative_config={**speculative_config, "disable_by_batch_size": 10_000})
    params = [SamplingParams(max_tokens=3, temperature=TEMPERATURE, seed=s, ignore_eos=True)
              for s in range(SAMPLES)]
    outs = llm.generate([{"prompt_token_ids": PROMPT}] * SAMPLES, params, use_tqdm=False)
    return outs, llm.get_metrics()


def assert_follows_target(outs, target) -> None:
    """The first token pairs and third tokens of `outs` pass a chi-square test (p = 0.001)
    against the target's exact distribution."""
    joint12 = torch.zeros(VOCAB, VOCAB)
    third = torch.zeros(VOCAB)
    for o in outs:
        t1, t2, t3 = o.outputs[0].token_ids
        joint12[t1, t2] += 1
        third[t3] += 1
    ref12, ref3 = reference(target)
    for counts, probs in ((joint12, ref12), (third, ref3)):
        stat, dof = chi_square(counts, probs)
        # p = 0.001 critical value, Wilson-Hilferty approximation
        critical = dof * (1 - 2 / (9 * dof) + 3.09 * (2 / (9 * dof)) ** 0.5) ** 3
        assert stat < critical, (stat, dof, critical)
