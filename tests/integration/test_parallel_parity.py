"""Tensor and pipeline parallelism give what one process gives, and what transformers gives:
greedy tokens identical and logprobs within float32 noise, for HF float32 folders (GQA, KV
heads replicated when fewer than ranks, biases, tied embeddings), a GGUF kept quantized,
and int8 weights; sampled tokens with a seed identical across tensor-parallel sizes."""

from __future__ import annotations

import pytest
from test_parity import check_against, hf_reference, random_prompts

from servelm import SamplingParams

# Workers are separate processes: they do not see the test process's float32 patch.
pytestmark = pytest.mark.multiprocess
F32 = {"dtype": "float32"}
GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=0)


def tokens(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2), (2, 2)])
def test_greedy_matches_transformers(tp, pp, tiny_model_dir, make_llm):
    path = tiny_model_dir("llama")
    prompts = random_prompts(300, [5, 23, 41])
    llm = make_llm(path, tensor_parallel_size=tp, pipeline_parallel_size=pp,
                   max_num_batched_tokens=16, **F32)  # chunked prefill beside decodes
    check_against(llm.generate(prompts, GREEDY, use_tqdm=False), hf_reference(path, prompts, 12), 1e-3)


@pytest.mark.parametrize("family,overrides,tp,pp", [
    ("llama", {"num_attention_heads": 4, "num_key_value_heads": 2}, 4, 1),  # 2 KV heads, 4 ranks
    # q/k/v biases split; a tied vocab-parallel table on the first stage and, as the LM
    # head, on the last
    ("qwen2", {"tie_word_embeddings": True}, 2, 2),
    ("qwen3", {"num_key_value_heads": 1}, 2, 1),  # q/k norms, one KV head for both ranks
    ("phi3", {}, 2, 1),  # fused q/k/v and gate/up: each rank's slice taken after the cut
    ("gemma2", {}, 2, 2),  # sandwich norms, soft caps; a tied, scaled table on both stages
])
def test_split_heads_match_transformers(family, overrides, tp, pp, tiny_model_dir, make_llm):
    path = tiny_model_dir(family, **overrides)
    prompts = random_prompts(300, [7, 30])
    refs = hf_reference(path, prompts, 12)
    llm = make_llm(path, tensor_parallel_size=tp, pipeline_parallel_size=pp, **F32)
    check_against(llm.generate(prompts, GREEDY, use_tqdm=False), refs, 1e-3)


@pytest.mark.parametrize("tp,pp", [(2, 1), (2, 2)])
def test_gguf_blocks_split_like_one_process(tp, pp, tiny_gguf_path, make_llm):
    """Q8_0/Q4_0/Q4_1/BF16 blocks read as slices of the file (row-parallel ones by whole
    blocks of columns) and run by the same kernels: the same tokens as one process. With a
    float32 cache: the ranks' partial sums add in another order, and K/V within float error
    of a bfloat16 rounding boundary can round either way (this model's second prompt has
    two first tokens 0.002 apart, which that tips); test_kv_cache_dtype.py covers that cache."""
    prompts = random_prompts(300, [9, 33])
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    f32_cache = {"kv_cache_dtype": "float32"}
    one = tokens(make_llm(tiny_gguf_path, **f32_cache).generate(prompts, params, use_tqdm=False))
    split = make_llm(tiny_gguf_path, tensor_parallel_size=tp, pipeline_parallel_size=pp, **f32_cache)
    assert tokens(split.generate(prompts, params, use_tqdm=False)) == one


@pytest.mark.parametrize("method,allreduce", [("int8", "gloo"), ("int4", "shm")])
def test_quantized_weights_and_seeded_sampling_match_across_tp(method, allreduce, tiny_model_dir,
                                                               make_llm):
    """int8/int4 groups fall on the same columns in a shard as in the whole matrix, so the
    quantized values are the same; every rank samples from the same gathered logits with
    the request's own generator, so a seeded sample is too. Both all-reduces."""
    path = tiny_model_dir("llama")
    prompts = random_prompts(300, [6, 19])
    sampled = SamplingParams(max_tokens=12, temperature=0.8, top_p=0.9, seed=7, n=2, ignore_eos=True)
    runs = []
    for tp in (1, 2):
        llm = make_llm(path, tensor_parallel_size=tp, quantization=method, allreduce=allreduce,
                       kv_cache_dtype="float32", **F32)
        runs.append((tokens(llm.generate(prompts, GREEDY, use_tqdm=False)),
                     [[c.token_ids for c in o.outputs]
                      for o in llm.generate(prompts, sampled, use_tqdm=False)]))
        llm.shutdown()
    assert runs[0] == runs[1]


def test_kv_capacity_grows_with_tp(tiny_model_dir, make_llm):
    """Each rank caches only its KV heads: the same memory per rank holds twice the blocks."""
    path = tiny_model_dir("llama")
    one = make_llm(path, kv_cache_memory_gb=0.001, **F32)
    two = make_llm(path, kv_cache_memory_gb=0.001, tensor_parallel_size=2, **F32)
    assert two.engine.scheduler.kv.num_blocks == 2 * one.engine.scheduler.kv.num_blocks
