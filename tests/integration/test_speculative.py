"""Speculative decoding inside continuous batching is lossless: greedy outputs and their
logprobs are those of plain decoding, in mixed batches with chunked prefill and
preemption, while the counters show drafts really were proposed and accepted."""

from __future__ import annotations

import pytest
import torch
from test_prefix_caching import same, tokens_and_logprobs

from servelm import SamplingParams

NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3}


def repetitive_prompts(n: int) -> list[list[int]]:
    """Prompts that repeat a phrase, so n-gram lookup finds drafts from the first step."""
    g = torch.Generator().manual_seed(11)
    prompts = []
    for i in range(n):
        phrase = torch.randint(3, 400, (5 + i,), generator=g).tolist()
        prompts.append(phrase * 3 + torch.randint(3, 400, (4,), generator=g).tolist())
    return prompts


@pytest.mark.parametrize("options", [
    dict(),  # one big batch
    dict(max_num_batched_tokens=16, num_kv_blocks=30, block_size=4),  # chunked, preempted
])
def test_greedy_outputs_identical_with_ngram_speculation(tiny_model_dir, make_llm, options):
    path = tiny_model_dir("llama")
    params = [SamplingParams(max_tokens=24 + 3 * i, temperature=0, ignore_eos=True, logprobs=2)
              for i in range(6)]
    prompts = [{"prompt_token_ids": p} for p in repetitive_prompts(6)]
    spec = make_llm(path, speculative_config=NGRAM, **options)
    plain = make_llm(path, **options)
    out_spec = spec.generate(prompts, params, use_tqdm=False)
    out_plain = plain.generate(prompts, params, use_tqdm=False)
    same(tokens_and_logprobs(out_spec), tokens_and_logprobs(out_plain))
    m = spec.get_metrics()
    assert m["spec_proposed_tokens"] > 0 and 0 < m["spec_accepted_tokens"] <= m["spec_proposed_tokens"]
    assert sum(o.spec_accepted_tokens for o in out_spec) == m["spec_accepted_tokens"]
    assert m["spec_acceptance_rate"] == m["spec_accepted_tokens"] / m["spec_proposed_tokens"]
    assert 0 < m["spec_mean_accepted_length"] <= NGRAM["num_speculative_tokens"]
    assert any(o.spec_mean_accepted_length for o in out_spec)
    if options:
        assert m["num_preemptions"] > 0


def test_requests_can_opt_out_and_penalties_opt_out(tiny_model_dir, make_llm):
    llm = make_llm(tiny_model_dir("llama"), speculative_config=NGRAM)
    accepted = 0
    for p in repetitive_prompts(6):  # alone, each accepted draft saves one forward pass
        before = llm.get_metrics()["num_steps"]
        out = llm.generate({"prompt_token_ids": p}, SamplingParams(
            max_tokens=30, temperature=0, ignore_eos=True), use_tqdm=False)[0]
        assert llm.get_metrics()["num_steps"] - before == 30 - out.spec_accepted_tokens
        accepted += out.spec_accepted_tokens
    assert accepted > 0
    prompt = {"prompt_token_ids": repetitive_prompts(1)[0]}
    for params in (SamplingParams(max_tokens=12, temperature=0, num_speculative_tokens=0),
                   SamplingParams(max_tokens=12, temperature=0, repetition_penalty=1.2)):
        out = llm.generate(prompt, params, use_tqdm=False)[0]
        assert out.spec_proposed_tokens == 0
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        SamplingParams(num_speculative_tokens=-1)


def test_sampled_requests_speculate_and_respect_max_tokens(tiny_model_dir, make_llm):
    llm = make_llm(tiny_model_dir("llama"), speculative_config=NGRAM)
    prompts = [{"prompt_token_ids": p} for p in repetitive_prompts(4)]
    params = SamplingParams(max_tokens=17, temperature=0.7, seed=3, ignore_eos=True)
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == 17 for o in outs)
    assert sum(o.spec_proposed_tokens for o in outs) > 0  # the sampled path really verified
    again = make_llm(tiny_model_dir("llama"), speculative_config=NGRAM).generate(
        prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in again]


def test_speculation_pauses_while_the_batch_is_large(tiny_model_dir, make_llm):
    prompts = [{"prompt_token_ids": p} for p in repetitive_prompts(6)]
    params = [SamplingParams(max_tokens=10 + 6 * i, temperature=0, ignore_eos=True)
              for i in range(6)]
    llm = make_llm(tiny_model_dir("llama"), speculative_config={**NGRAM, "disable_by_batch_size": 2})
    outs = llm.generate(prompts, params, use_tqdm=False)
    # Drafts only once the batch has drained to 2 running requests.
    assert llm.get_metrics()["spec_proposed_tokens"] > 0
    small = make_llm(tiny_model_dir("llama"), speculative_config=NGRAM)
    small.generate(prompts, params, use_tqdm=False)
    assert llm.get_metrics()["spec_proposed_tokens"] < small.get_metrics()["spec_proposed_tokens"]
    assert [len(o.outputs[0].token_ids) for o in outs] == [p.max_tokens for p in params]


def test_accepted_drafts_are_prefix_cached_like_decoded_tokens(tiny_model_dir, make_llm):
    """The next chat turn finds the blocks of an answer that was decoded speculatively."""
    llm = make_llm(tiny_model_dir("llama"), speculative_config=NGRAM, block_size=4)
    for p in repetitive_prompts(6):
        first = llm.generate({"prompt_token_ids": p}, SamplingParams(
            max_tokens=30, temperature=0, ignore_eos=True), use_tqdm=False)[0]
        if first.spec_accepted_tokens:
            break
    assert first.spec_accepted_tokens > 0
    turn2 = p + first.outputs[0].token_ids[:-1] + [7, 8, 9]
    again = llm.generate({"prompt_token_ids": turn2}, SamplingParams(max_tokens=1),
                         use_tqdm=False)[0]
    computed = len(p) + len(first.outputs[0].token_ids) - 1  # the last token never was
    assert again.num_cached_tokens == computed // 4 * 4
