"""Model-based drafting (a draft model, the target's own first layers, token trees) is
lossless: greedy outputs and logprobs are those of plain decoding in mixed batches with
chunked prefill and preemption; a draft equal to the target is always accepted, a random
one almost never, and the output is the same either way."""

from __future__ import annotations

import pytest
import torch
from test_prefix_caching import same, tokens_and_logprobs

from servelm import SamplingParams


def random_prompts(n: int) -> list[dict]:
    g = torch.Generator().manual_seed(5)
    return [{"prompt_token_ids": torch.randint(3, 400, (9 + 7 * i,), generator=g).tolist()}
            for i in range(n)]


def greedy(n: int) -> list[SamplingParams]:
    return [SamplingParams(max_tokens=20 + 3 * i, temperature=0, ignore_eos=True, logprobs=2)
            for i in range(n)]


def other_model(tiny_model_dir):
    """A random model unrelated to the target, with the same tokenizer."""
    return tiny_model_dir("llama", hidden_size=32, head_dim=8, num_hidden_layers=1)


SPECS = {
    "draft_model": lambda dirs: {"method": "draft_model", "model": str(dirs("llama")),
                                 "num_speculative_tokens": 3},
    "layer_skip": lambda dirs: {"method": "layer_skip", "num_layers": 2, "num_speculative_tokens": 3},
    "draft_tree": lambda dirs: {"method": "draft_model", "model": str(dirs("llama")), "tree": [3, 2, 1]},
    "layer_skip_tree": lambda dirs: {"method": "layer_skip", "num_layers": 1, "tree": [2, 2]},
}


@pytest.mark.parametrize("options", [
    dict(),  # one big batch
    dict(max_num_batched_tokens=24, num_kv_blocks=26, block_size=4),  # chunked, preempted
    dict(max_num_batched_tokens=24, num_kv_blocks=26, block_size=4, preemption_mode="swap"),
], ids=["batch", "recompute", "swap"])
@pytest.mark.parametrize("name", SPECS)
def test_greedy_outputs_identical_with_each_draft_proposer(tiny_model_dir, make_llm, name, options):
    path = tiny_model_dir("llama")
    prompts, params = random_prompts(6), greedy(6)
    spec = make_llm(path, speculative_config=SPECS[name](tiny_model_dir), **options)
    plain = make_llm(path, **options)
    out_spec = spec.generate(prompts, params, use_tqdm=False)
    same(tokens_and_logprobs(out_spec), tokens_and_logprobs(plain.generate(prompts, params, use_tqdm=False)))
    m = spec.get_metrics()
    assert m["spec_accepted_tokens"] > 0
    if options:
        assert m["num_preemptions"] > 0


def test_a_draft_equal_to_the_target_is_always_accepted(tiny_model_dir, make_llm):
    path = tiny_model_dir("llama")
    k = 4
    llm = make_llm(path, speculative_config={"method": "draft_model", "model": str(path),
                                             "num_speculative_tokens": k}, block_size=4)
    prompt = random_prompts(1)[0]
    out = llm.generate(prompt, SamplingParams(max_tokens=21, temperature=0, ignore_eos=True),
                       use_tqdm=False)[0]
    assert out.spec_acceptance_rate == 1.0
    assert llm.get_metrics()["num_steps"] == 1 + 20 // (k + 1)  # prompt, then k + 1 per step
    # The next request over the same prompt finds its blocks cached, and the draft's K/V
    # for them too.
    again = llm.generate(prompt, SamplingParams(max_tokens=21, temperature=0, ignore_eos=True),
                         use_tqdm=False)[0]
    assert again.num_cached_tokens > 0 and again.spec_acceptance_rate == 1.0
    # Sampled: p and q are the same distribution, so min(1, p/q) accepts every draft.
    sampled = llm.generate(prompt, SamplingParams(max_tokens=21, temperature=1.0, seed=0,
                                                  ignore_eos=True), use_tqdm=False)[0]
    assert sampled.spec_acceptance_rate > 0.99


def test_a_random_draft_is_rarely_accepted_and_changes_nothing(tiny_model_dir, make_llm):
    path = tiny_model_dir("llama")
    llm = make_llm(path, speculative_config={"method": "draft_model",
                                             "model": str(other_model(tiny_model_dir)),
                                             "num_speculative_tokens": 3})
    prompts, params = random_prompts(4), greedy(4)
    outs = llm.generate(prompts, params, use_tqdm=False)
    same(tokens_and_logprobs(outs), tokens_and_logprobs(
        make_llm(path).generate(prompts, params, use_tqdm=False)))
    m = llm.get_metrics()
    assert m["spec_proposed_tokens"] > 50 and m["spec_acceptance_rate"] < 0.1


def test_a_tree_accepts_more_per_step_than_its_first_chain(tiny_model_dir, make_llm):
    """With a draft that is often wrong, extra candidates per node find more of the
    target's tokens: the greedy top-3 tree accepts more than the top-1 chain of its depth."""
    path = tiny_model_dir("llama")
    base = {"method": "layer_skip", "num_layers": 1}
    chain = make_llm(path, speculative_config={**base, "num_speculative_tokens": 2})
    tree = make_llm(path, speculative_config={**base, "tree": [3, 2]})
    prompts, params = random_prompts(4), greedy(4)
    chain.generate(prompts, params, use_tqdm=False)
    tree.generate(prompts, params, use_tqdm=False)
    assert (tree.get_metrics()["spec_mean_accepted_length"]
            > chain.get_metrics()["spec_mean_accepted_length"])


def test_a_gguf_target_takes_the_hf_draft_it_was_converted_from(tiny_gguf_path, tiny_model_dir,
                                                               make_llm):
    """The GGUF's rebuilt tokenizer has an extra token past the vocabulary; the ids that
    can be sampled agree, so the draft is accepted, and the output is unchanged. (Dequantized:
    with the GGUF's blocks kept, verification and plain decode round activations in different
    orders, which on random weights flips near-tied tokens.)"""
    spec = {"method": "draft_model", "model": str(tiny_model_dir("llama")),
            "num_speculative_tokens": 3}
    prompts, params = random_prompts(3), greedy(3)
    outs = make_llm(tiny_gguf_path, speculative_config=spec, quantization="none").generate(
        prompts, params, use_tqdm=False)
    same(tokens_and_logprobs(outs), tokens_and_logprobs(
        make_llm(tiny_gguf_path, quantization="none").generate(prompts, params, use_tqdm=False)))


def test_bad_draft_configs_are_rejected_naming_the_key(tiny_model_dir, make_llm):
    path = tiny_model_dir("llama")
    other_vocab = tiny_model_dir("llama", vocab_size=300)
    cases = [
        ({"method": "draft_model", "num_speculative_tokens": 2}, "speculative_config.model"),
        ({"method": "draft_model", "model": str(other_vocab), "num_speculative_tokens": 2},
         "vocabulary"),
        ({"method": "layer_skip", "num_layers": 3, "num_speculative_tokens": 2}, "num_layers"),
        ({"method": "layer_skip", "num_speculative_tokens": 2}, "num_layers"),
        ({"method": "ngram", "tree": [2, 1]}, "tree"),
        ({"method": "layer_skip", "num_layers": 1, "tree": [2, 0]}, "tree"),
        ({"method": "layer_skip", "num_layers": 1, "tree": [2, 2], "num_speculative_tokens": 3},
         "num_speculative_tokens"),
        ({"method": "layer_skip", "num_layers": 1, "tree": [8, 8]}, "at most"),
    ]
    for spec, match in cases:
        with pytest.raises(ValueError, match=match):
            make_llm(path, speculative_config=spec)


@pytest.mark.parametrize("shape", [{"num_speculative_tokens": 3}, {"tree": [2, 2, 1]}],
                         ids=["chain", "tree"])
def test_draft_feedback_skips_feeding_what_the_draft_already_holds(tiny_model_dir, make_llm,
                                                                   tmp_path, monkeypatch, shape):
    """After verification a draft model keeps the K/V of the accepted nodes it fed where
    they lie on its first chain, so it feeds fewer tokens the next step. Its drafts, and so
    every acceptance, are exactly those it makes when it feeds everything again."""
    from servelm.bench.spec_drafts import write_pruned_draft
    from servelm.speculative.draft import ModelDrafter

    path = tiny_model_dir("llama")
    spec = {"method": "draft_model", "model": str(write_pruned_draft(str(path), 2, tmp_path)), **shape}
    fed: list[int] = []
    run = ModelDrafter._run

    def counting(self, chunks, tables, last_only=False):
        fed.append(sum(len(c.token_ids) for c in chunks))
        return run(self, chunks, tables, last_only)

    monkeypatch.setattr(ModelDrafter, "_run", counting)
    prompts, params = random_prompts(4), greedy(4)

    def go():
        fed.clear()
        llm = make_llm(path, speculative_config=spec)
        outs = llm.generate(prompts, params, use_tqdm=False)
        m = llm.get_metrics()
        return outs, (m["spec_proposed_tokens"], m["spec_accepted_tokens"]), sum(fed)

    outs, counts, fed_with = go()
    monkeypatch.setattr(ModelDrafter, "accepted", lambda self, req_id, accepted_path: None)
    outs_without, counts_without, fed_without = go()
    assert counts == counts_without and 0 < counts[1] < counts[0]  # some drafts rejected
    assert fed_with < fed_without
    same(tokens_and_logprobs(outs), tokens_and_logprobs(outs_without))
