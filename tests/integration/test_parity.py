"""Greedy tokens and logprobs match Hugging Face transformers on the same weights, for every
supported family, with many prompts of different lengths batched together, a small block
size, chunked prefill and forced recompute preemption."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from servelm import SamplingParams

FAMILIES = ["llama", "mistral", "qwen2", "qwen3"]
PROMPT_LENS = [3, 17, 40, 9, 25, 1, 33]
MAX_TOKENS = 24


def random_prompts(vocab: int, lens: list[int], seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lens]


def hf_reference(path, prompts: list[list[int]], max_tokens: int, dtype=torch.float32, prepare=None):
    """Greedy continuation and per-token logprobs from a transformers forward pass
    (`prepare(model)` may alter the loaded model first).

    A plain argmax loop rather than `generate`, whose `min_new_tokens` would mask EOS ids
    while servelm's `ignore_eos` only stops ending on them.
    """
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    if prepare is not None:
        prepare(model)
    refs = []
    with torch.no_grad():
        for p in prompts:
            ids, lps = list(p), []
            for _ in range(max_tokens):
                logprobs = model(torch.tensor([ids])).logits[0, -1].float().log_softmax(-1)
                token = int(logprobs.argmax())
                ids.append(token)
                lps.append(logprobs[token].item())
            refs.append((ids[len(p):], lps))
    return refs


def check_against(outputs, refs, lp_tol: float) -> None:
    for out, (ref_tokens, ref_lps) in zip(outputs, refs):
        comp = out.outputs[0]
        assert comp.token_ids == ref_tokens
        got = [lp[t].logprob for lp, t in zip(comp.logprobs, comp.token_ids)]
        assert max(abs(a - b) for a, b in zip(got, ref_lps)) < lp_tol


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_parity_batched_chunked_preempted(family, tiny_model_dir, make_llm):
    path = tiny_model_dir(family)
    llm = make_llm(path, block_size=4, num_kv_blocks=24, max_num_batched_tokens=16, max_num_seqs=8)
    prompts = random_prompts(llm.engine.arch.vocab_size, PROMPT_LENS)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True, logprobs=2)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    check_against(outputs, hf_reference(path, prompts, MAX_TOKENS), lp_tol=1e-4)
    metrics = llm.get_metrics()
    assert metrics["num_preemptions"] > 0, "the cache was sized to force preemption"
    assert metrics["generation_tokens_total"] == MAX_TOKENS * len(prompts)


@pytest.mark.parametrize("overrides", [
    {"tie_word_embeddings": True},
    {"rope_scaling": {"rope_type": "linear", "factor": 2.0}},
    {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64}},
])
def test_llama_variants(overrides, tiny_model_dir, make_llm):
    path = tiny_model_dir("llama", **overrides)
    llm = make_llm(path, block_size=8, max_num_batched_tokens=32)
    prompts = random_prompts(llm.engine.arch.vocab_size, [5, 70, 12], seed=3)
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, logprobs=0)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    check_against(outputs, hf_reference(path, prompts, 16), lp_tol=1e-4)


def test_prompt_logprobs_match_transformers(tiny_model_dir, make_llm):
    path = tiny_model_dir("qwen2")
    llm = make_llm(path, block_size=4, max_num_batched_tokens=8)  # prompt spans several chunks
    prompt = random_prompts(llm.engine.arch.vocab_size, [21], seed=5)[0]
    out = llm.generate({"prompt_token_ids": prompt}, SamplingParams(max_tokens=1, prompt_logprobs=3),
                       use_tqdm=False)[0]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        ref = model(torch.tensor([prompt])).logits[0].log_softmax(-1)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    for pos in range(1, len(prompt)):
        entry = out.prompt_logprobs[pos]
        assert abs(entry[prompt[pos]].logprob - ref[pos - 1, prompt[pos]].item()) < 1e-4
        top = ref[pos - 1].topk(3).indices.tolist()
        assert all(t in entry for t in top)


def test_bfloat16_runs_close_to_transformers(tiny_model_dir, make_llm):
    path = tiny_model_dir("llama")
    llm = make_llm(path, dtype="bfloat16", block_size=4, max_num_batched_tokens=16)
    prompts = random_prompts(llm.engine.arch.vocab_size, [8, 30], seed=7)
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=0)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    refs = hf_reference(path, prompts, 8, dtype=torch.bfloat16)
    # bf16 rounding differs between kernels, so compare the first tokens and loose logprobs.
    for out, (ref_tokens, ref_lps) in zip(outputs, refs):
        assert out.outputs[0].token_ids[:2] == ref_tokens[:2]
        lp = out.outputs[0].logprobs[0][ref_tokens[0]].logprob
        assert abs(lp - ref_lps[0]) < 0.1


def test_torch_attention_fallback_matches_transformers(tiny_model_dir, make_llm, monkeypatch):
    """The plain-torch backend (used when no C compiler is available) is exact too."""
    from servelm.ops import attention

    monkeypatch.setattr(attention.cpu_kernels, "supports", lambda *a, **k: False)
    path = tiny_model_dir("qwen2")
    llm = make_llm(path, block_size=4, num_kv_blocks=24, max_num_batched_tokens=16, max_num_seqs=8)
    assert type(llm.engine.executor.worker.runner.attention) is attention.TorchPagedAttention
    prompts = random_prompts(llm.engine.arch.vocab_size, PROMPT_LENS)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True, logprobs=0)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    check_against(outputs, hf_reference(path, prompts, MAX_TOKENS), lp_tol=1e-4)
    assert llm.get_metrics()["num_preemptions"] > 0
