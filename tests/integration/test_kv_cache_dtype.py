"""`kv_cache_dtype="int8" | "fp8" | "bfloat16"`: more blocks in the same memory, logits
close to transformers, and the stored values (8-bit ones with their scales) survive every
way KV moves: chunked prefill, prefix-cache hits, the CPU tier, swap and recompute
preemption. "auto" means bfloat16 under quantized block weights, else the compute dtype."""

from __future__ import annotations

import pytest
import torch
from test_swap import prompts, run, swap_gb

from servelm import SamplingParams

BS = 4


@pytest.mark.parametrize("kv_dtype, ratio", [("int8", 64 * 4 / (16 + 4)), ("fp8", 64 * 4 / (16 + 4))])
def test_an_8bit_cache_holds_more_blocks_in_the_same_memory(tiny_model_dir, make_llm, kv_dtype, ratio):
    path = tiny_model_dir("llama")  # float32, 3 layers, 2 KV heads of 16: 768 bytes a token
    full = make_llm(path, block_size=BS, kv_cache_memory_gb=0.001)
    small = make_llm(path, block_size=BS, kv_cache_memory_gb=0.001, kv_cache_dtype=kv_dtype)
    assert full.get_metrics()["kv_bytes_per_token"] == 2 * 3 * 2 * 16 * 4
    assert small.get_metrics()["kv_bytes_per_token"] == 2 * 3 * 2 * (16 + 4)  # values + a scale per head
    assert small.engine.scheduler.kv.num_blocks / full.engine.scheduler.kv.num_blocks == pytest.approx(ratio / 4, rel=0.01)


def test_a_16bit_cache_halves_the_bytes_and_is_the_default_under_block_weights(tiny_model_dir, make_llm):
    path = tiny_model_dir("llama")
    full = make_llm(path, block_size=BS, kv_cache_memory_gb=0.001)
    half = make_llm(path, block_size=BS, kv_cache_memory_gb=0.001, kv_cache_dtype="bfloat16")
    blocks = make_llm(path, block_size=BS, kv_cache_memory_gb=0.001, quantization="int8")
    assert full.get_metrics()["kv_bytes_per_token"] == 2 * 3 * 2 * 16 * 4
    assert half.get_metrics()["kv_bytes_per_token"] == 2 * 3 * 2 * 16 * 2  # no scales
    assert blocks.get_metrics()["kv_bytes_per_token"] == 2 * 3 * 2 * 16 * 2
    assert half.engine.scheduler.kv.num_blocks >= 2 * full.engine.scheduler.kv.num_blocks - 1


@pytest.mark.parametrize("kv_dtype, tol", [("int8", 0.05), ("fp8", 0.2), ("bfloat16", 0.02)])
def test_logprobs_stay_close_to_transformers(tiny_model_dir, make_llm, kv_dtype, tol):
    from transformers import AutoModelForCausalLM

    path = tiny_model_dir("llama")
    ids = prompts(300)[4]["prompt_token_ids"] * 3
    llm = make_llm(path, block_size=BS, num_kv_blocks=64, kv_cache_dtype=kv_dtype, max_num_batched_tokens=16)
    out = llm.generate([{"prompt_token_ids": ids}], SamplingParams(max_tokens=1, prompt_logprobs=0),
                       use_tqdm=False)[0]
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.inference_mode():
        ref = hf(torch.tensor([ids])).logits[0].log_softmax(-1)
    got = torch.tensor([lp[t].logprob for lp, t in zip(out.prompt_logprobs[1:], ids[1:])])
    want = ref[torch.arange(len(ids) - 1), ids[1:]]
    err = (got - want).abs()
    assert err.mean() < tol and err.max() < 10 * tol  # a random tiny model's attention is sharp
    assert err.max() > 0  # the cache really is rounded


def assert_same(a, b):
    """Same tokens, logprobs equal up to float noise; a value that float noise moves across
    a rounding boundary moves by a whole 8-bit step, hence the looser bound than float's."""
    for (ta, la), (tb, lb) in zip(a, b, strict=True):
        assert ta == tb
        assert max(abs(x - y) for x, y in zip(la, lb)) < 5e-3


@pytest.mark.parametrize("kv_dtype", ["int8", "fp8", "bfloat16"])
def test_8bit_kv_moves_with_its_scales(tiny_model_dir, make_llm, kv_dtype):
    path = tiny_model_dir("llama")
    opts = dict(block_size=BS, kv_cache_dtype=kv_dtype)
    ref, _ = run(make_llm(path, num_kv_blocks=256, max_num_batched_tokens=512, **opts))
    chunked, _ = run(make_llm(path, num_kv_blocks=256, max_num_batched_tokens=8, **opts))
    assert_same(chunked, ref)
    swapped, m = run(make_llm(path, num_kv_blocks=24, max_num_batched_tokens=16, preemption_mode="swap",
                              swap_space_gb=swap_gb(make_llm(path, num_kv_blocks=8, **opts), 64), **opts))
    assert m["num_swap_out_blocks"] > 0
    assert_same(swapped, ref)
    recomputed, m = run(make_llm(path, num_kv_blocks=24, max_num_batched_tokens=16, **opts))
    assert m["num_preemptions"] > 0
    assert_same(recomputed, ref)
    tiered = make_llm(path, num_kv_blocks=40, max_num_batched_tokens=16, cpu_offload_gb=0.001, **opts)
    run(tiered)
    again, m = run(tiered)  # the same prompts: prefix hits, some restored from the CPU tier
    assert m["num_restored_blocks"] > 0 and m["prefix_cache_hit_tokens"] > 0
    assert_same(again, ref)
