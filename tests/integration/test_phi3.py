"""Phi-3 against transformers on tiny random configs: fused q/k/v and gate/up tensors cut at
load, LongRoPE with its short factors inside the trained context and its long ones beyond
it (cos/sin scaled by the attention factor), partial rotary embeddings (Phi-4-mini).
Split over ranks: test_parallel_parity.py."""

from __future__ import annotations

import pytest
from test_parity import check_against, hf_reference, random_prompts

from servelm import SamplingParams

PARAMS = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, logprobs=1)
LONGROPE = dict(max_position_embeddings=256, original_max_position_embeddings=64,
                rope_scaling={"rope_type": "longrope", "short_factor": [1.0 + 0.1 * i for i in range(8)],
                              "long_factor": [2.0 + 0.3 * i for i in range(8)]})


@pytest.mark.parametrize("overrides,max_model_len,lens", [
    ({}, None, [3, 17, 40]),
    (LONGROPE, 64, [5, 30]),  # served within the trained context: short factors
    (LONGROPE, None, [70, 90]),  # a 256-token context: long factors, and so transformers past 64
    ({"partial_rotary_factor": 0.5}, None, [5, 30]),
])
def test_greedy_matches_transformers(overrides, max_model_len, lens, tiny_model_dir, make_llm):
    path = tiny_model_dir("phi3", **overrides)
    llm = make_llm(path, max_model_len=max_model_len, block_size=4, max_num_batched_tokens=32)
    assert llm.engine.arch.family == "phi3"
    prompts = random_prompts(llm.engine.arch.vocab_size, lens)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], PARAMS, use_tqdm=False)
    check_against(outputs, hf_reference(path, prompts, 10), lp_tol=1e-4)

