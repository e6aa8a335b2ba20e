"""The prefix cache's CPU tier: a prefix evicted from the KV cache comes back from CPU memory
instead of being recomputed, and outputs stay identical to running without any caching."""

from __future__ import annotations

import pytest
import torch
from test_prefix_caching import same, tokens_and_logprobs

from servelm import SamplingParams

BS = 4


def run_rounds(llm, prompts, params):
    """Each prompt alone, then all again: with a small KV cache the second round's prefixes
    have been evicted by the later prompts of the first."""
    outs = []
    for _ in range(2):
        for p in prompts:
            outs += llm.generate({"prompt_token_ids": p}, params, use_tqdm=False)
    return tokens_and_logprobs(outs), [o.num_cached_tokens for o in outs]


@pytest.mark.parametrize("chunk", [2048, 8])
def test_evicted_prefixes_are_restored_from_cpu(tiny_model_dir, make_llm, chunk):
    path = tiny_model_dir("llama")
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=1)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 400, (33 + i,), generator=g).tolist() for i in range(3)]
    options = dict(block_size=BS, num_kv_blocks=16, max_num_batched_tokens=chunk)

    tiered = make_llm(path, cpu_offload_gb=0.001, **options)
    gpu_only = make_llm(path, **options)
    reference = make_llm(path, enable_prefix_caching=False, **options)
    out_tiered, cached_tiered = run_rounds(tiered, prompts, params)
    out_gpu_only, cached_gpu_only = run_rounds(gpu_only, prompts, params)
    out_ref, _ = run_rounds(reference, prompts, params)
    same(out_tiered, out_ref)
    same(out_gpu_only, out_ref)

    m = tiered.get_metrics()
    assert m["num_offloaded_blocks"] > 0 and m["num_restored_blocks"] > 0
    assert m["num_cpu_cached_blocks"] > 0
    # Second round: the whole prompt but its last partial block comes from a cache, which
    # without the CPU tier was evicted.
    for p, n in zip(prompts, cached_tiered[3:]):
        assert n == (len(p) - 1) // BS * BS
    assert sum(cached_gpu_only[3:]) < sum(cached_tiered[3:])
    assert gpu_only.get_metrics()["num_restored_blocks"] == 0


def test_cpu_offload_option_is_validated(tiny_model_dir, make_llm):
    with pytest.raises(ValueError, match="cpu_offload_gb must be a number >= 0"):
        make_llm(tiny_model_dir("llama"), cpu_offload_gb=-1)


def test_tier_under_preemption_by_swap_and_recompute(tiny_model_dir, make_llm):
    """A batch too big for the KV cache: preemption, swaps, saves and restores all happen in
    the same steps, and the outputs still match an engine without caching."""
    path = tiny_model_dir("llama")
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=1)
    g = torch.Generator().manual_seed(5)
    prefix = torch.randint(3, 400, (12,), generator=g).tolist()
    prompts = [prefix + torch.randint(3, 400, (9 + 2 * i,), generator=g).tolist()
               for i in range(6)]
    options = dict(block_size=BS, num_kv_blocks=24, max_num_batched_tokens=16)

    def run(llm):
        outs = []
        for _ in range(2):
            outs += llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return tokens_and_logprobs(outs)

    reference = run(make_llm(path, enable_prefix_caching=False, **options))
    for mode in ("swap", "recompute"):
        llm = make_llm(path, cpu_offload_gb=0.001, preemption_mode=mode, **options)
        same(run(llm), reference)
        m = llm.get_metrics()
        assert m["num_preemptions"] > 0 and m["num_restored_blocks"] > 0
