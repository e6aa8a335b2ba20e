"""Medusa heads (speculative/medusa.py) and `servelm train-draft --method medusa`: drafts from
heads on the target's hidden state stay lossless (greedy output identical to decoding
without them, in one batch and under preemption; sampled tokens follow transformers'
exact distribution), training lowers the held-out loss, and heads trained on a target's
own greedy output get most of their drafts accepted."""

from __future__ import annotations

import json

import pytest
import torch
from test_spec_distribution import VOCAB, assert_follows_target, sample_with
from trained_drafts import (
    ENGINE_OPTIONS,
    acceptance_on_rows,
    assert_greedy_is_the_target_s,
    train_on_rows,
)

from servelm.speculative.config import SpecConfig
from servelm.speculative.medusa import MedusaHeads, save_heads


def random_heads(folder, hidden: int, num_heads: int = 3, seed: int = 0):
    """Heads with random weights: drafts that are sometimes right, sometimes wrong."""
    torch.manual_seed(seed)
    heads = MedusaHeads(hidden, num_heads)
    for p in heads.parameters():
        torch.nn.init.normal_(p, std=1.0 / hidden ** 0.5)
    save_heads(heads, folder, {"target": "test"})
    return str(folder)


@pytest.mark.parametrize("options", ENGINE_OPTIONS.values(), ids=ENGINE_OPTIONS.keys())
@pytest.mark.parametrize("shape", [{"num_speculative_tokens": 3}, {"tree": [3, 2, 1]}],
                         ids=["chain", "tree"])
def test_greedy_output_is_the_target_s(tiny_model_dir, make_llm, tmp_path, shape, options):
    path = tiny_model_dir("llama")
    heads = random_heads(tmp_path / "heads", 64)
    assert_greedy_is_the_target_s(make_llm, path, {"method": "medusa", "model": heads, **shape},
                                  options)


def test_sampled_tokens_follow_the_target_distribution(tiny_model_dir, make_llm, tmp_path):
    target = tiny_model_dir("llama", vocab_size=VOCAB)
    heads = random_heads(tmp_path / "heads", 64, num_heads=2, seed=3)
    outs, m = sample_with(make_llm, target, {"method": "medusa", "model": heads, "tree": [2, 1]})
    assert 0 < m["spec_accepted_tokens"] < m["spec_proposed_tokens"]  # both outcomes happen
    assert_follows_target(outs, target)


def test_trained_heads_learn_the_target_and_get_accepted(tiny_model_dir, make_llm, tmp_path):
    """A tiny target over 8 tokens is deterministic (greedy) but chaotic: heads trained on
    its outputs for 40 prompts learn them (the training loss falls to a fraction), and on
    those prompts most of their drafts are accepted, far more than the untrained heads'
    (each the LM head's own next-token guess). Output stays the target's."""
    path = tiny_model_dir("llama", vocab_size=VOCAB)
    out, summary = train_on_rows(tmp_path, path, "medusa", "--num-heads", "2", "--epochs", "20",
                                 "--batch-size", "64", "--lr", "3e-2")
    assert len(summary["per_epoch"][-1]["head_accuracy"]) == 2
    assert json.loads((out / "medusa_config.json").read_text())["num_heads"] == 2
    save_heads(MedusaHeads(64, 2), tmp_path / "untrained", {"target": "test"})
    rates = acceptance_on_rows(make_llm, path, {
        name: {"method": "medusa", "num_speculative_tokens": 2, "model": str(tmp_path / name)}
        for name in ("medusa", "untrained")})
    assert rates["medusa"] > 0.8 and rates["medusa"] > rates["untrained"] + 0.1, rates


def test_bad_medusa_configs_name_the_problem(tiny_model_dir, tmp_path):
    from servelm import LLM

    with pytest.raises(ValueError, match="speculative_config.model .*Medusa heads"):
        SpecConfig.parse({"method": "medusa", "num_speculative_tokens": 2})
    path = tiny_model_dir("llama")
    with pytest.raises(ValueError, match="no medusa_config.json"):
        LLM(str(path), speculative_config={"method": "medusa", "model": str(tmp_path),
                                           "num_speculative_tokens": 2})
    wrong = random_heads(tmp_path / "wrong", 32)
    with pytest.raises(ValueError, match="hidden size 32, the target's is 64"):
        LLM(str(path), speculative_config={"method": "medusa", "model": wrong,
                                           "num_speculative_tokens": 2})
    two = random_heads(tmp_path / "two", 64, num_heads=2)
    with pytest.raises(ValueError, match="3 draft levels; the Medusa model has 2 heads"):
        LLM(str(path), speculative_config={"method": "medusa", "model": two,
                                           "num_speculative_tokens": 3})
