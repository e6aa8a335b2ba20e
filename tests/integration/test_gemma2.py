"""Gemma 2 against transformers on tiny random configs: GELU-gated MLPs, norms after
attention and after the MLP with weights stored as w - 1, tied embeddings scaled by
sqrt(hidden), a query scale other than head_dim's, tanh soft-capping of attention scores
and of logits (caps set low enough here to bite), sliding-window layers (the context is
capped at the window, within which they equal full attention), through the CPU backends
and the Triton kernels (in Triton's interpreter). Split over ranks: test_parallel_parity.py."""

from __future__ import annotations

import pytest
from test_parity import check_against, hf_reference, random_prompts

from servelm import SamplingParams
from servelm.ops.gpu.backend import TritonPagedAttention
from servelm.worker import worker as worker_module

PARAMS = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, logprobs=1)


@pytest.mark.parametrize("overrides,lens", [({}, [3, 17, 40]), ({"sliding_window": 64}, [5, 50])])
def test_greedy_matches_transformers(overrides, lens, tiny_model_dir, make_llm):
    path = tiny_model_dir("gemma2", **overrides)
    llm = make_llm(path, block_size=4, max_num_batched_tokens=16)
    assert llm.engine.arch.family == "gemma2"
    if overrides:
        assert llm.engine.worker_info.max_model_len == 64  # capped at the window
    prompts = random_prompts(llm.engine.arch.vocab_size, lens)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], PARAMS, use_tqdm=False)
    check_against(outputs, hf_reference(path, prompts, 10), lp_tol=1e-4)


def test_triton_kernels_cap_scores_like_transformers(tiny_model_dir, make_llm, monkeypatch):
    path = tiny_model_dir("gemma2")
    monkeypatch.setattr(worker_module.Worker, "_attention",
                        lambda self, arch, dtype: TritonPagedAttention(arch.attn_logit_softcap))
    llm = make_llm(path, block_size=4, max_num_batched_tokens=16)
    prompts = random_prompts(llm.engine.arch.vocab_size, [5, 30])
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], PARAMS, use_tqdm=False)
    check_against(outputs, hf_reference(path, prompts, 10), lp_tol=1e-4)

