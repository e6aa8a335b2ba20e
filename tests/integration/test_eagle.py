"""EAGLE drafts (speculative/eagle.py) and `servelm train-draft --method eagle`: drafts from a
one-layer draft on the target's hidden states stay lossless (greedy output identical to
decoding without them, in one batch, under preemption and with prefix-cache hits; sampled
tokens follow transformers' exact distribution), and a draft trained on a target's own
greedy output gets most of its drafts accepted."""

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
from servelm.speculative.eagle import EagleDraft, save_eagle


def random_draft(folder, vocab: list[int], seed: int = 0, hidden: int = 64):
    """A draft with random weights (the tiny fixture's shapes): drafts sometimes right."""
    torch.manual_seed(seed)
    draft = EagleDraft(hidden, 4, 2, 16, 128, torch.tensor(vocab))
    for p in draft.parameters():
        torch.nn.init.normal_(p, std=0.3)
    save_eagle(draft, folder, {"target": "test"})
    return str(folder)


@pytest.mark.parametrize("options", ENGINE_OPTIONS.values(), ids=ENGINE_OPTIONS.keys())
def test_greedy_output_is_the_target_s(tiny_model_dir, make_llm, tmp_path, options):
    path = tiny_model_dir("llama")
    draft = random_draft(tmp_path / "eagle", list(range(0, 256, 2)))
    assert_greedy_is_the_target_s(make_llm, path, {"method": "eagle", "model": draft,
                                                   "num_speculative_tokens": 3}, options, rounds=2)


def test_sampled_tokens_follow_the_target_distribution(tiny_model_dir, make_llm, tmp_path):
    target = tiny_model_dir("llama", vocab_size=VOCAB)
    draft = random_draft(tmp_path / "eagle", list(range(VOCAB)), seed=3)
    outs, m = sample_with(make_llm, target, {"method": "eagle", "model": draft, "num_speculative_tokens": 2})
    assert 0 < m["spec_accepted_tokens"] < m["spec_proposed_tokens"]  # both outcomes happen
    assert_follows_target(outs, target)


def test_trained_draft_learns_the_target_and_gets_accepted(tiny_model_dir, make_llm, tmp_path):
    """A tiny target over 8 tokens is deterministic (greedy) but chaotic: a draft trained on
    its outputs for 40 prompts learns them (the training loss falls to a fraction), and on
    those prompts most of its drafts are accepted, far more than the untrained draft's
    (which guesses that the last token repeats). Output stays the target's."""
    path = tiny_model_dir("llama", vocab_size=VOCAB)
    out, summary = train_on_rows(tmp_path, path, "eagle", "--num-heads", "2", "--epochs", "30",
                                 "--batch-size", "4", "--lr", "3e-3")
    assert len(summary["per_epoch"][-1]["pass_accuracy"]) == 2
    config = json.loads((out / "eagle_config.json").read_text())
    assert config["method"] == "eagle" and config["draft_vocab_size"] <= VOCAB
    save_eagle(EagleDraft(64, 4, 2, 16, 128, torch.arange(VOCAB)), tmp_path / "untrained", {})
    rates = acceptance_on_rows(make_llm, path, {
        name: {"method": "eagle", "num_speculative_tokens": 2, "model": str(tmp_path / name)}
        for name in ("eagle", "untrained")})
    assert rates["eagle"] > 0.8 and rates["eagle"] > rates["untrained"] + 0.1, rates


def test_bad_eagle_configs_name_the_problem(tiny_model_dir, tmp_path):
    from servelm import LLM

    with pytest.raises(ValueError, match="speculative_config.model .*EAGLE draft"):
        SpecConfig.parse({"method": "eagle", "num_speculative_tokens": 2})
    with pytest.raises(ValueError, match="method 'eagle' drafts a chain"):
        SpecConfig.parse({"method": "eagle", "model": "x", "tree": [2, 1]})
    path = tiny_model_dir("llama")
    with pytest.raises(ValueError, match="no eagle_config.json"):
        LLM(str(path), speculative_config={"method": "eagle", "model": str(tmp_path),
                                           "num_speculative_tokens": 2})
    wrong = tmp_path / "wrong"
    save_eagle(EagleDraft(32, 4, 2, 8, 64, torch.arange(10)), wrong, {})
    with pytest.raises(ValueError, match="EAGLE draft for hidden_size 32, the target's is 64"):
        LLM(str(path), speculative_config={"method": "eagle", "model": str(wrong),
                                           "num_speculative_tokens": 2})
