"""Mixtures of experts against transformers on tiny random configs: greedy tokens and
logprobs through batching, chunked prefill and preemption, for Mixtral (renormalized top-2),
Qwen2-MoE (a shared expert, a dense layer between sparse ones, with and without
renormalization) and Qwen3-MoE (q/k norms); and split over two tensor-parallel ranks, by columns or by whole
experts."""

from __future__ import annotations

import pytest
from test_parity import check_against, hf_reference, random_prompts

from servelm import SamplingParams
from servelm.ops.quant import BlockQ4, BlockQ8

PARAMS = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=1)


@pytest.mark.parametrize("family,overrides", [
    ("mixtral", {}),
    ("qwen2_moe", {}),
    ("qwen2_moe", {"norm_topk_prob": False, "num_experts_per_tok": 3}),
    ("qwen3_moe", {}),
])
def test_greedy_matches_transformers(family, overrides, tiny_model_dir, make_llm):
    path = tiny_model_dir(family, **overrides)
    llm = make_llm(path, block_size=4, num_kv_blocks=24, max_num_batched_tokens=16, max_num_seqs=8)
    prompts = random_prompts(llm.engine.arch.vocab_size, [3, 17, 40, 9, 25, 1, 33])
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], PARAMS, use_tqdm=False)
    check_against(outputs, hf_reference(path, prompts, 12), lp_tol=1e-4)
    assert llm.get_metrics()["num_preemptions"] > 0


@pytest.mark.parametrize("method,cls,bound", [("int8", BlockQ8, 0.15), ("int4", BlockQ4, 1.0)])
def test_quantized_experts_stay_blocks_and_stay_close(method, cls, bound, tiny_model_dir, make_llm):
    """Every expert (and the shared one) quantized on its own; the prompt tokens' logprobs
    stay near the float model's. The bounds are about twice what this tiny random model
    shows, dense (qwen2: 0.073 int8, 0.52 int4) and MoE (0.086, 0.68) alike."""
    path = tiny_model_dir("qwen2_moe")
    prompts = [{"prompt_token_ids": p} for p in random_prompts(400, [20, 30])]
    scored = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True, prompt_logprobs=0)

    def prompt_logprobs(llm):
        return [lp[t].logprob for out, p in zip(llm.generate(prompts, scored, use_tqdm=False), prompts)
                for lp, t in zip(out.prompt_logprobs[1:], p["prompt_token_ids"][1:])]

    exact = prompt_logprobs(make_llm(path))
    llm = make_llm(path, quantization=method, quantization_group_size=32)
    moe = llm.engine.executor.worker.runner.model.layers[0].moe
    assert all(isinstance(w, cls) for w in [*moe.gate_up, *moe.down, *moe.shared])
    rounded = prompt_logprobs(llm)
    assert sum(abs(a - b) for a, b in zip(exact, rounded)) / len(exact) < bound


@pytest.mark.multiprocess
@pytest.mark.parametrize("family,pp,ep", [("mixtral", 1, False), ("qwen2_moe", 2, False),
                                          ("mixtral", 1, True), ("qwen2_moe", 1, True)])
def test_experts_split_over_ranks_match_transformers(family, pp, ep, tiny_model_dir, make_llm):
    """Every expert's columns split over 2 ranks (the shared expert's too), or with expert
    parallelism two whole experts on each rank; the router whole on both. With pp=2 the
    dense middle layer of qwen2_moe falls on a stage boundary."""
    path = tiny_model_dir(family)
    prompts = random_prompts(400, [7, 30])
    llm = make_llm(path, tensor_parallel_size=2, pipeline_parallel_size=pp, dtype="float32",
                   enable_expert_parallel=ep)
    check_against(llm.generate(prompts, PARAMS, use_tqdm=False), hf_reference(path, prompts, 12), 1e-3)


GGUF_ARCH = {"mixtral": "llama", "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe"}


def _gguf(family, tiny_model_dir, tiny_tokenizer, tmp_path, qtype):
    import gguf
    from fixtures_models import write_tiny_llama_gguf

    types = [getattr(gguf.GGMLQuantizationType, qtype)]
    return write_tiny_llama_gguf(tiny_model_dir(family), tmp_path / f"{family}-{qtype}.gguf", tiny_tokenizer,
                                 matrix_types=types, arch=GGUF_ARCH[family])


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_gguf_export_loads_to_the_same_model(family, tiny_model_dir, tiny_tokenizer, make_llm, tmp_path):
    """A float32 GGUF written as llama.cpp's converter does (experts stacked per projection,
    Mixtral as "llama" with q/k permuted, the shared expert's gate a vector) gives
    transformers' tokens on the original folder; a Q8_0 one keeps every expert's blocks."""
    path = tiny_model_dir(family)
    llm = make_llm(_gguf(family, tiny_model_dir, tiny_tokenizer, tmp_path, "F32"), dtype="float32")
    assert llm.engine.arch.family == family and llm.engine.arch.num_experts == 4
    prompts = random_prompts(llm.engine.arch.vocab_size, [5, 23])
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], PARAMS, use_tqdm=False)
    check_against(outputs, hf_reference(path, prompts, 12), lp_tol=1e-4)
    blocks = make_llm(_gguf(family, tiny_model_dir, tiny_tokenizer, tmp_path, "Q8_0"))
    moe = blocks.engine.executor.worker.runner.model.layers[0].moe
    assert all(isinstance(w, BlockQ8) for w in [*moe.gate_up, *moe.down])
    assert len(blocks.generate([{"prompt_token_ids": p} for p in prompts], PARAMS, use_tqdm=False)) == 2


@pytest.mark.multiprocess
def test_gguf_blocks_split_over_ranks(tiny_model_dir, tiny_tokenizer, make_llm, tmp_path):
    """Q8_0 expert blocks read as per-rank slices of the stacked tensors: one process's tokens."""
    file = _gguf("qwen2_moe", tiny_model_dir, tiny_tokenizer, tmp_path, "Q8_0")
    prompts = [{"prompt_token_ids": p} for p in random_prompts(400, [7, 30])]
    one = make_llm(file).generate(prompts, PARAMS, use_tqdm=False)
    two = make_llm(file, tensor_parallel_size=2).generate(prompts, PARAMS, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in one] == [o.outputs[0].token_ids for o in two]
