"""`servelm eval perplexity`: the reference perplexity equals transformers' on the same
windows, and a quantized setting is reported against it."""

from __future__ import annotations

import json

import pytest

from servelm.cli import main

TEXT = " ".join(f"word{i % 37} and then {i % 11} more." for i in range(400))


def test_perplexity_of_a_quantized_setting_against_the_reference(tiny_model_dir, tmp_path):
    text = tmp_path / "held-out.txt"
    text.write_text(TEXT)
    out = tmp_path / "ppl.json"
    rc = main(["eval", "perplexity", "--model", str(tiny_model_dir("llama")), "--dataset-path",
               str(text), "--context-len", "48", "--num-windows", "3", "--quantization", "int8",
               "--result-file", str(out)])
    assert rc == 0
    r = json.loads(out.read_text())["results"]
    ref, q = r["reference (no quantization)"], r["quantization=int8"]
    assert ref["tokens"] == q["tokens"] == 3 * 47
    assert r["transformers (no quantization)"]["perplexity_vs_reference"] == pytest.approx(1, abs=1e-4)
    assert ref["top1_agreement_with_reference"] == 1.0
    assert 0.5 < q["top1_agreement_with_reference"] <= 1.0
    assert q["perplexity_vs_reference"] == pytest.approx(1, abs=0.05)
    assert q["model_weight_bytes"] < ref["model_weight_bytes"] / 2.5
    short = tmp_path / "short.txt"
    short.write_text("too short")
    assert main(["eval", "perplexity", "--model", str(tiny_model_dir("llama")), "--dataset-path",
                 str(short), "--context-len", "48"]) == 2


def test_kv_settings_are_scored_by_perplexity_and_greedy_agreement(tiny_model_dir, tmp_path):
    text = tmp_path / "held-out.txt"
    text.write_text(TEXT)
    out = tmp_path / "kv.json"
    rc = main(["eval", "perplexity", "--model", str(tiny_model_dir("llama")), "--dataset-path",
               str(text), "--context-len", "64", "--num-windows", "2", "--skip-hf",
               "--kv-cache-dtype", "int8", "--max-num-batched-tokens", "16", "--greedy-tokens", "8",
               "--kv-compression", '{"method": "streamingllm", "budget": 24}', "--result-file", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    assert result["prefill_chunk"] == 16 and result["greedy_tokens"] == 8
    r = result["results"]
    ref, kv = r["reference (no quantization)"], r["kv_cache_dtype=int8, kv_compression=streamingllm/24"]
    assert ref["greedy_agreement_with_reference"] == 1.0 and ref["kv_evicted_tokens"] == 0
    assert 0.0 <= kv["greedy_agreement_with_reference"] <= 1.0
    assert kv["kv_evicted_tokens"] > 0
    assert kv["kv_bytes_per_token"] < ref["kv_bytes_per_token"] / 3  # float32 -> int8 + scales
    assert kv["perplexity_vs_reference"] != 1.0
    assert kv["perplexity_past_budget"] > 0 and kv["reference_perplexity_past_budget"] > 0
