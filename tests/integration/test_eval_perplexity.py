"""`servelm eval perplexity`: the reference perplexity equals transformers' on the same
windows, and a quantized setting is reported against it."""

from __future__ import annotations

import json
import math
import sys

import pytest

from servelm.cli import main

TEXT = " ".join(f"word{i % 37} and then {i % 11} more." for i in range(400))


def _windows(model, context_len: int, n: int) -> list[list[int]]:
    from servelm.model.loader import load_tokenizer

    ids = load_tokenizer(str(model)).encode(TEXT)
    return [ids[i: i + context_len] for i in range(0, n * context_len, context_len)]


def _hf_log_likelihoods(model, wins: list[list[int]]) -> list[float]:
    """log p(token | the window before it) of every token after the first, by transformers."""
    import torch
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32).eval()
    lls = []
    with torch.inference_mode():
        for w in wins:
            logp = torch.log_softmax(hf(torch.tensor([w])).logits[0].double(), -1)
            lls += [logp[j - 1, w[j]].item() for j in range(1, len(w))]
    return lls


def _servelm_run(model, wins: list[list[int]], greedy_tokens: int = 0,
                 **options) -> tuple[list[float], list[int], list[list[int]]]:
    """What one setting does on the windows, as the eval runs it: prompt logprobs (each
    token's log-likelihood, and the top-1 token at each position), then greedy continuations."""
    from servelm.llm import LLM
    from servelm.sampling_params import SamplingParams

    llm = LLM(str(model), **options)
    prompts = [{"prompt_token_ids": w} for w in wins]
    outs = llm.generate(prompts, SamplingParams(max_tokens=1, prompt_logprobs=1), use_tqdm=False)
    lls, top = [], []
    for w, out in zip(wins, outs):
        for token, position in zip(w[1:], out.prompt_logprobs[1:]):
            lls.append(position[token].logprob)
            top.append(max(position.items(), key=lambda kv: kv[1].logprob)[0])
    cont = []
    if greedy_tokens:
        params = SamplingParams(max_tokens=greedy_tokens, temperature=0.0, ignore_eos=True)
        cont = [list(o.outputs[0].token_ids)
                for o in llm.generate(prompts, params, use_tqdm=False)]
    return lls, top, cont


def _perplexity(lls: list[float]) -> float:
    return math.exp(-sum(lls) / len(lls))


def test_perplexity_of_a_quantized_setting_against_the_reference(tiny_model_dir, tmp_path):
    model = tiny_model_dir("llama")
    text = tmp_path / "held-out.txt"
    text.write_text(TEXT)
    out = tmp_path / "ppl.json"
    rc = main(["eval", "perplexity", "--model", str(model), "--dataset-path",
               str(text), "--context-len", "48", "--num-windows", "3", "--quantization", "int8",
               "--result-file", str(out)])
    assert rc == 0
    r = json.loads(out.read_text())["results"]
    ref, q = r["reference (no quantization)"], r["quantization=int8"]
    assert ref["tokens"] == q["tokens"] == 3 * 47
    # The reference perplexity from transformers' logits, computed here.
    wins = _windows(model, 48, 3)
    assert ref["perplexity"] == pytest.approx(_perplexity(_hf_log_likelihoods(model, wins)),
                                              rel=1e-4)
    assert r["transformers (no quantization)"]["perplexity_vs_reference"] == pytest.approx(1, abs=1e-4)
    # The int8 figures from servelm's per-token log-likelihoods and top-1 tokens.
    _, ref_top, _ = _servelm_run(model, wins)
    q_lls, q_top, _ = _servelm_run(model, wins, quantization="int8")
    assert ref["top1_agreement_with_reference"] == 1.0
    assert q["top1_agreement_with_reference"] == pytest.approx(
        sum(a == b for a, b in zip(q_top, ref_top)) / len(ref_top))
    assert q["perplexity"] == pytest.approx(_perplexity(q_lls))
    assert q["perplexity_vs_reference"] == pytest.approx(q["perplexity"] / ref["perplexity"])
    assert q["perplexity_vs_reference"] == pytest.approx(1, abs=0.05)
    assert q["model_weight_bytes"] < ref["model_weight_bytes"] / 2.5
    short = tmp_path / "short.txt"
    short.write_text("too short")
    assert main(["eval", "perplexity", "--model", str(model), "--dataset-path",
                 str(short), "--context-len", "48"]) == 2


def test_kv_settings_are_scored_by_perplexity_and_greedy_agreement(tiny_model_dir, tmp_path,
                                                                   monkeypatch):
    model = tiny_model_dir("llama")
    text = tmp_path / "held-out.txt"
    text.write_text(TEXT)
    out = tmp_path / "kv.json"
    with monkeypatch.context() as m:  # no plots, no HTTP client: runs without the bench extra
        m.setitem(sys.modules, "aiohttp", None)
        m.setitem(sys.modules, "matplotlib", None)
        rc = main(["eval", "perplexity", "--model", str(model), "--dataset-path", str(text),
                   "--context-len", "64", "--num-windows", "2", "--skip-hf",
                   "--kv-cache-dtype", "int8", "--max-num-batched-tokens", "16",
                   "--greedy-tokens", "8", "--kv-compression",
                   '{"method": "streamingllm", "budget": 24}', "--result-file", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    assert result["prefill_chunk"] == 16 and result["greedy_tokens"] == 8
    r = result["results"]
    ref, kv = r["reference (no quantization)"], r["kv_cache_dtype=int8, kv_compression=streamingllm/24"]
    assert ref["greedy_agreement_with_reference"] == 1.0 and ref["kv_evicted_tokens"] == 0
    assert kv["kv_evicted_tokens"] > 0
    assert kv["kv_bytes_per_token"] < ref["kv_bytes_per_token"] / 3  # float32 -> int8 + scales
    assert kv["perplexity_vs_reference"] != 1.0
    # Both settings run again here; the figures follow from their per-token values.
    wins = _windows(model, 64, 2)
    _, _, ref_cont = _servelm_run(model, wins, 8, max_num_batched_tokens=16)
    kv_lls, _, kv_cont = _servelm_run(model, wins, 8, max_num_batched_tokens=16,
                                      kv_cache_dtype="int8",
                                      kv_compression={"method": "streamingllm", "budget": 24})
    same = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), 8)
            for a, b in zip(kv_cont, ref_cont)]
    assert kv["greedy_agreement_with_reference"] == pytest.approx(sum(same) / (8 * len(wins)))
    past = [j > 24 for _ in wins for j in range(1, 64)]  # predicted from a compressed cache
    assert kv["perplexity_past_budget"] == pytest.approx(
        _perplexity([x for x, p in zip(kv_lls, past) if p]))
    hf_lls = _hf_log_likelihoods(model, wins)
    assert kv["reference_perplexity_past_budget"] == pytest.approx(
        _perplexity([x for x, p in zip(hf_lls, past) if p]), rel=1e-4)
