"""Preemption by swap: a victim's KV goes to CPU swap space and comes back, so it resumes
where it stopped; outputs are identical to a run that never preempted, and a swap space too
small for a victim falls back to recompute."""

from __future__ import annotations

import torch

from servelm import SamplingParams

PROMPT_LENS = [3, 17, 40, 9, 25, 1, 33]
BS = 4


def prompts(vocab: int) -> list[dict]:
    g = torch.Generator().manual_seed(3)
    return [{"prompt_token_ids": torch.randint(3, vocab, (n,), generator=g).tolist()}
            for n in PROMPT_LENS]


def run(llm):
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, logprobs=1)
    outs = llm.generate(prompts(llm.engine.arch.vocab_size), params, use_tqdm=False)
    return [(o.outputs[0].token_ids, [lp[t].logprob for lp, t in zip(o.outputs[0].logprobs,
                                                                   o.outputs[0].token_ids)])
            for o in outs], llm.get_metrics()


def assert_same(a, b):
    for (ta, la), (tb, lb) in zip(a, b, strict=True):
        assert ta == tb
        assert max(abs(x - y) for x, y in zip(la, lb)) < 1e-4


def swap_gb(llm, blocks: int) -> float:
    per_block = BS * llm.get_metrics()["kv_bytes_per_token"]
    return blocks * per_block / 2**30


def test_swap_preemption_matches_a_run_without_preemption(tiny_model_dir, make_llm):
    path = tiny_model_dir("llama")
    roomy = make_llm(path, block_size=BS, num_kv_blocks=256, max_num_batched_tokens=16)
    ref, ref_m = run(roomy)
    assert ref_m["num_preemptions"] == 0
    tight = make_llm(path, block_size=BS, num_kv_blocks=24, max_num_batched_tokens=16,
                     preemption_mode="swap", swap_space_gb=swap_gb(roomy, 64))
    got, m = run(tight)
    assert_same(got, ref)
    assert m["num_preemptions"] > 0 and m["num_swap_out_blocks"] > 0
    assert m["num_swapped_blocks"] == 0 and m["num_requests_swapped"] == 0


def test_small_swap_space_falls_back_to_recompute(tiny_model_dir, make_llm):
    path = tiny_model_dir("llama")
    roomy = make_llm(path, block_size=BS, num_kv_blocks=256, max_num_batched_tokens=16)
    ref, _ = run(roomy)
    tight = make_llm(path, block_size=BS, num_kv_blocks=24, max_num_batched_tokens=16,
                     preemption_mode="swap", swap_space_gb=swap_gb(roomy, 3))
    assert tight.engine.scheduler.kv.swap_pool.num_blocks == 3
    got, m = run(tight)
    assert_same(got, ref)
    assert m["num_preemptions"] > 0
