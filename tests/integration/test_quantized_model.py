"""A model quantized at load runs like transformers on the same weights rounded the same
way: each linear weight (and the embedding table) replaced by its int8 or int4 values,
computed here from the quantization's definition, not by servelm's code."""

from __future__ import annotations

import pytest
import torch
from test_parity import check_against, hf_reference, random_prompts
from transformers import AutoModelForCausalLM

from servelm import SamplingParams


def int8_rows(w: torch.Tensor) -> torch.Tensor:
    step = (w.abs().amax(dim=1, keepdim=True) / 127).clamp_min(1e-8)  # all-zero rows stay 0
    return (w / step).round().clamp(-127, 127) * step


def int4_groups(w: torch.Tensor, group: int) -> torch.Tensor:
    g = w.reshape(w.shape[0], -1, group)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    step = ((hi - lo) / 15).clamp_min(1e-8)
    return (((g - lo) / step).round().clamp(0, 15) * step + lo).reshape(w.shape)


def rounded_copy(path, out, method: str, group: int):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                w = module.weight
                w.copy_(int8_rows(w) if method == "int8" else int4_groups(w, group))
        emb = model.get_input_embeddings().weight
        emb.copy_(int8_rows(emb))  # the lookup table is int8 under both methods
    model.save_pretrained(out)
    return out


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_quantized_greedy_matches_transformers_on_rounded_weights(method, tiny_model_dir,
                                                                  make_llm, tmp_path):
    path = tiny_model_dir("llama")
    llm = make_llm(path, quantization=method, quantization_group_size=32, block_size=4,
                   max_num_batched_tokens=16)
    prompts = random_prompts(llm.engine.arch.vocab_size, [5, 17, 30])
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=1)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    reference = rounded_copy(path, tmp_path / method, method, 32)
    check_against(outputs, hf_reference(reference, prompts, 12), lp_tol=2e-3)


def test_weight_bytes_drop_with_quantization(tiny_model_dir, make_llm):
    path = tiny_model_dir("llama", hidden_size=128, intermediate_size=512)
    sizes = {q: make_llm(path, dtype="bfloat16", quantization=q).get_metrics()["model_weight_bytes"]
             for q in (None, "int8", "int4")}
    assert sizes[None] / sizes["int8"] > 1.8
    assert sizes[None] / sizes["int4"] > 2.4
    with pytest.raises(ValueError, match="quantization"):
        make_llm(path, quantization="int3")
    with pytest.raises(ValueError, match="quantization_group_size"):
        make_llm(path, quantization="int4", quantization_group_size=48)
