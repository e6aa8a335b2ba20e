"""Prefix caching changes how much is computed, never what comes out: outputs are identical
with it on and off, across shared prefixes, chunked prefill, preemption, n > 1 and
multi-turn chat, while the hit counters show the reuse actually happened."""

from __future__ import annotations

import torch

from servelm import SamplingParams

BS = 4


def prompts_with_shared_prefix(vocab: int, n: int, prefix_len: int = 37) -> list[list[int]]:
    g = torch.Generator().manual_seed(7)
    prefix = torch.randint(3, vocab, (prefix_len,), generator=g).tolist()
    return [prefix + torch.randint(3, vocab, (3 + 5 * i,), generator=g).tolist() for i in range(n)]


def run_both(make_llm, path, run, **options):
    """`run(llm)` on an engine with prefix caching on, then off; returns both results."""
    on = make_llm(path, enable_prefix_caching=True, **options)
    off = make_llm(path, enable_prefix_caching=False, **options)
    return (run(on), on.get_metrics()), (run(off), off.get_metrics())


def tokens_and_logprobs(outputs):
    return [[(c.token_ids, [lp[t].logprob for lp, t in zip(c.logprobs, c.token_ids)])
             for c in o.outputs] for o in outputs]


def same(a, b, tol=1e-4):
    for ra, rb in zip(a, b, strict=True):
        for (ta, la), (tb, lb) in zip(ra, rb, strict=True):
            assert ta == tb
            assert max((abs(x - y) for x, y in zip(la, lb)), default=0.0) < tol


def test_shared_prefix_chunked_and_preempted(tiny_model_dir, make_llm):
    path = tiny_model_dir("llama")
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, logprobs=1)

    def run(llm):
        prompts = prompts_with_shared_prefix(llm.engine.arch.vocab_size, 6)
        first = llm.generate([{"prompt_token_ids": p} for p in prompts[:2]], params, use_tqdm=False)
        rest = llm.generate([{"prompt_token_ids": p} for p in prompts[2:]], params, use_tqdm=False)
        return tokens_and_logprobs(first + rest)

    (out_on, m_on), (out_off, m_off) = run_both(
        make_llm, path, run, block_size=BS, num_kv_blocks=40, max_num_batched_tokens=16,
        max_num_seqs=4)
    same(out_on, out_off)
    assert m_on["num_preemptions"] > 0, "the cache was sized to force preemption"
    assert m_on["prefix_cache_hit_tokens"] >= 4 * (37 // BS) * BS  # the second call's prompts
    assert m_off["prefix_cache_hit_tokens"] == 0
    assert m_on["prefix_cache_query_tokens"] > 0 and m_off["prefix_cache_query_tokens"] > 0


def test_n_samples_share_prompt_blocks(tiny_model_dir, make_llm):
    path = tiny_model_dir("llama")
    prompt = prompts_with_shared_prefix(400, 1, prefix_len=30)[0]  # 33 tokens
    params = SamplingParams(n=3, max_tokens=12, temperature=0.9, seed=11, logprobs=1)

    def run(llm):
        return tokens_and_logprobs(llm.generate({"prompt_token_ids": prompt}, params,
                                                use_tqdm=False))

    (out_on, m_on), (out_off, _) = run_both(make_llm, path, run, block_size=BS)
    same(out_on, out_off)
    assert len({tuple(t) for t, _ in out_on[0]}) > 1  # really three different samples
    assert m_on["prefix_cache_hit_tokens"] == 2 * ((len(prompt) - 1) // BS) * BS


def test_next_chat_turn_reuses_the_previous_turn(tiny_model_dir, make_llm):
    path = tiny_model_dir("llama")
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, logprobs=1)
    turn1 = prompts_with_shared_prefix(400, 1, prefix_len=21)[0]

    def run(llm):
        a = llm.generate({"prompt_token_ids": turn1}, params, use_tqdm=False)[0]
        turn2 = turn1 + list(a.outputs[0].token_ids) + [5, 6, 7, 8, 9]
        b = llm.generate({"prompt_token_ids": turn2}, params, use_tqdm=False)[0]
        return tokens_and_logprobs([a, b])

    (out_on, m_on), (out_off, _) = run_both(make_llm, path, run, block_size=BS)
    same(out_on, out_off)
    # Turn 1 computed its prompt and all output tokens but the last (never fed back).
    assert m_on["prefix_cache_hit_tokens"] == ((len(turn1) + 10 - 1) // BS) * BS
