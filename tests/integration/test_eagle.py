"""EAGLE drafts (speculative/eagle.py) and `servelm train-draft --method eagle`: drafts from a
one-layer draft on the target's hidden states stay lossless (greedy output identical to
decoding without them, in one batch, under preemption and with prefix-cache hits; sampled
tokens follow transformers' exact distribution), and a draft trained on a target's own
greedy output gets most of its drafts accepted."""

from __future__ import annotations

import json

import pytest
import torch
from test_spec_distribution import PROMPT, SAMPLES, TEMPERATURE, VOCAB, assert_follows_target
from trained_drafts import acceptance_on_rows, train_on_rows

from servelm import SamplingParams
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


def prompts(n: int) -> list[dict]:
    return [{"prompt_token_ids": [1 + (7 * i + j) % 50 for j in range(5 + i % 4)]} for i in range(n)]


@pytest.mark.parametrize("options", [
    dict(),
    dict(max_num_batched_tokens=24, num_kv_blocks=16, block_size=4),  # chunked, preempted
], ids=["batch", "recompute"])
def test_greedy_output_is_the_target_s(tiny_model_dir, make_llm, tmp_path, options):
    path = tiny_model_dir("llama")
    draft = random_draft(tmp_path / "eagle", list(range(0, 256, 2)))
    spec = make_llm(path, speculative_config={"method": "eagle", "model": draft,
                                              "num_speculative_tokens": 3}, **options)
    plain = make_llm(path, **options)
    params = [SamplingParams(max_tokens=20 + 3 * i, temperature=0, ignore_eos=True)
              for i in range(6)]
    for _ in range(2):  # the second time, prompts hit the prefix cache
        got = spec.generate(prompts(6), params, use_tqdm=False)
        want = plain.generate(prompts(6), params, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
    m = spec.get_metrics()
    assert m["spec_proposed_tokens"] > 0
    if options:
        assert m["num_preemptions"] > 0


def test_sampled_tokens_follow_the_target_distribution(tiny_model_dir, make_llm, tmp_path):
    target = tiny_model_dir("llama", vocab_size=VOCAB)
    draft = random_draft(tmp_path / "eagle", list(range(VOCAB)), seed=3)
    llm = make_llm(target, speculative_config={"method": "eagle", "model": draft,
                                               "num_speculative_tokens": 2,
                                               "disable_by_batch_size": 10_000})
    params = [SamplingParams(max_tokens=3, temperature=TEMPERATURE, seed=s, ignore_eos=True)
              for s in range(SAMPLES)]
    outs = llm.generate([{"prompt_token_ids": PROMPT}] * SAMPLES, params, use_tqdm=False)
    m = llm.get_metrics()
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
