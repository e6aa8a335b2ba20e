"""`servelm bench throughput` on a tiny random model, and the workload builders."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from servelm.bench.datasets import (
    MIN_OUTPUT_LEN,
    build_requests,
    encode_prompt,
    load_self_instruct,
    synthetic_requests,
)
from servelm.cli import main


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_self_instruct_lengths_caps_and_cycling(tmp_path, tiny_tokenizer):
    tok = tiny_tokenizer
    long_resp = " ".join(["the cat reads a red book today."] * 20)
    rows = [{"prompt": "Why does the cat read?", "response": "the lazy dog jumps over the box"},
            {"prompt": "Count three apples.", "response": "3"},  # shorter than the minimum
            {"prompt": "Write a long letter.", "response": long_resp}]
    path = _write_jsonl(tmp_path / "d.jsonl", rows)
    reqs = load_self_instruct(path, tok, num_prompts=7, max_output_len=16, seed=1)
    assert len(reqs) == 7
    expected = {}
    for r in rows:
        n = len(tok.encode(r["response"], add_special_tokens=False))
        expected[tuple(encode_prompt(tok, r["prompt"]))] = max(MIN_OUTPUT_LEN, min(n, 16))
    assert sorted(expected.values())[0] == MIN_OUTPUT_LEN and max(expected.values()) == 16
    for r in reqs:  # every request is one of the rows, with that row's clamped length
        assert expected[tuple(r.prompt_token_ids)] == r.output_len
    seen = [tuple(r.prompt_token_ids) for r in reqs]
    assert all(seen.count(k) in (2, 3) for k in expected)  # cycles evenly through the rows
    assert encode_prompt(tok, "hi")[0] == tok.convert_tokens_to_ids("<|im_start|>")  # chat template
    # Overlong prompts are dropped; the same seed gives the same workload.
    short = load_self_instruct(path, tok, 4, 16, seed=1, max_prompt_len=len(encode_prompt(tok, "Count three apples.")))
    assert {tuple(r.prompt_token_ids) for r in short} == {tuple(encode_prompt(tok, "Count three apples."))}
    assert load_self_instruct(path, tok, 7, 16, seed=1) == reqs


def test_dataset_errors_and_synthetic(tmp_path, tiny_tokenizer):
    bad = _write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "x"}])
    with pytest.raises(ValueError, match="response"):
        load_self_instruct(bad, tiny_tokenizer, 2)
    with pytest.raises(FileNotFoundError):
        build_requests("self-instruct", str(tmp_path / "missing.jsonl"), tiny_tokenizer, 2)
    a = synthetic_requests(tiny_tokenizer, 50, max_output_len=32, seed=3, max_prompt_len=100)
    assert a == synthetic_requests(tiny_tokenizer, 50, max_output_len=32, seed=3, max_prompt_len=100)
    assert all(20 <= len(r.prompt_token_ids) <= 100 and 10 <= r.output_len <= 32 for r in a)
    assert len({r.output_len for r in a}) > 5  # a mix, not one length
    special = set(tiny_tokenizer.all_special_ids)
    assert not any(t in special for r in a for t in r.prompt_token_ids)


def _check_rates(r: dict, prompt_tokens: int) -> None:
    """One system's counts and rates recomputed from its output ids and wall time."""
    n_out = sum(map(len, r["samples"]["token_ids"]))
    assert r["output_tokens"] == n_out and r["prompt_tokens"] == prompt_tokens
    assert r["output_tok_s"] == pytest.approx(n_out / r["elapsed_s"])
    assert r["total_tok_s"] == pytest.approx((prompt_tokens + n_out) / r["elapsed_s"])
    assert r["requests_per_s"] == pytest.approx(r["requests"] / r["elapsed_s"])
    # energy is either measured or says why not; never invented
    assert (r["energy_j"] is None) == (r["energy_unavailable_reason"] is not None)
    assert r["energy_per_token_j"] == (None if r["energy_j"] is None
                                       else pytest.approx(r["energy_j"] / n_out))


def _hf_left_padded(model, requests, batch_size: int) -> tuple[list[list[int]], int]:
    """transformers' static batches done here: output ids per request, tokens generated."""
    import torch
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32).eval()
    ids, raw = [], 0
    for i in range(0, len(requests), batch_size):
        batch = requests[i: i + batch_size]
        width, n_new = max(len(r.prompt_token_ids) for r in batch), max(r.output_len for r in batch)
        x = torch.tensor([[0] * (width - len(r.prompt_token_ids)) + r.prompt_token_ids
                          for r in batch])
        mask = torch.tensor([[0] * (width - len(r.prompt_token_ids))
                             + [1] * len(r.prompt_token_ids) for r in batch])
        with torch.inference_mode():
            out = hf.generate(x, attention_mask=mask, max_new_tokens=n_new, min_new_tokens=n_new,
                              do_sample=False, pad_token_id=0)
        ids += [row[width: width + r.output_len] for row, r in zip(out.tolist(), batch)]
        raw += len(batch) * n_new
    return ids, raw


def test_throughput_cli_end_to_end(tmp_path, tiny_model_dir, tiny_tokenizer):
    from servelm.llm import LLM
    from servelm.sampling_params import SamplingParams

    model = tiny_model_dir("llama")
    out = tmp_path / "res" / "r.json"
    rc = main(["bench", "throughput", "--model", str(model), "--num-prompts", "6",
               "--dataset", "synthetic", "--max-output-len", "10", "--max-prompt-len", "40",
               "--hf-batch-sizes", "2,4", "--hf-probe-batches", "1", "--num-kv-blocks", "64",
               "--result-file", str(out), "--quiet", "--save-detailed"])
    assert rc == 0
    res = json.loads(out.read_text())
    for key in ("date", "command", "machine", "config", "workload", "servelm", "transformers",
                "ratio_output_tok_s", "greedy_exact_match_fraction"):
        assert key in res
    for key in ("cpu_model", "cpu_count", "torch", "transformers", "dtype", "torch_threads"):
        assert key in res["machine"]
    # The workload and every system's outputs computed again here, independently.
    requests = synthetic_requests(tiny_tokenizer, 6, max_output_len=10, seed=0, max_prompt_len=40)
    want = sum(r.output_len for r in requests)
    assert res["workload"]["num_requests"] == 6 and res["workload"]["output_tokens"] == want
    llm = LLM(str(model), num_kv_blocks=64)
    ours = [list(o.outputs[0].token_ids) for o in llm.generate(
        [{"prompt_token_ids": r.prompt_token_ids} for r in requests],
        [SamplingParams(max_tokens=r.output_len, temperature=0.0, ignore_eos=True)
         for r in requests], use_tqdm=False)]
    tf = res["transformers"]
    assert tf["batch_size"] in (2, 4) and set(tf["probe_output_tok_s"]) == {"2", "4"}
    theirs, raw = _hf_left_padded(model, requests, tf["batch_size"])
    assert res["servelm"]["samples"]["token_ids"] == ours
    assert tf["samples"]["token_ids"] == theirs
    assert tf["raw_generated_tokens"] == raw  # padding waste: each batch runs its longest
    assert tf["raw_output_tok_s"] == pytest.approx(raw / tf["elapsed_s"])
    for system in ("servelm", "transformers"):
        r = res[system]
        assert r["requests"] == 6 and r["output_tokens"] == want
        assert r["per_request_output_tokens_match"] is True
        _check_rates(r, sum(len(q.prompt_token_ids) for q in requests))
    sv = res["servelm"]["samples"]
    assert res["servelm"]["ttft_median_s"] == pytest.approx(statistics.median(sv["ttft_s"]))
    assert res["servelm"]["e2e_median_s"] == pytest.approx(statistics.median(sv["e2e_s"]))
    assert res["servelm"]["e2e_max_s"] == pytest.approx(max(sv["e2e_s"]))
    assert res["ratio_output_tok_s"] == pytest.approx(
        res["servelm"]["output_tok_s"] / tf["output_tok_s"])
    assert res["greedy_exact_match_fraction"] == pytest.approx(
        sum(a == b for a, b in zip(ours, theirs)) / 6)
    # An HF folder: llama.cpp cannot run it (or is not installed); either way a recorded skip.
    assert "skipped" in res["llama.cpp"] and "ratio_output_tok_s_llamacpp" not in res


def _throughput_on(model, out, *extra: str) -> dict:
    rc = main(["bench", "throughput", "--model", str(model), "--num-prompts", "4",
               "--dataset", "synthetic", "--max-output-len", "8", "--max-prompt-len", "30",
               "--num-kv-blocks", "64", "--num-threads", "1", "--skip-hf",
               "--result-file", str(out), "--save-detailed", *extra])
    assert rc == 0
    return json.loads(out.read_text())


def test_throughput_llamacpp_not_installed(tmp_path, tiny_gguf_path, monkeypatch, capsys):
    import sys

    from servelm.bench.llamacpp_peer import SKIP_NOT_INSTALLED

    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # makes `import llama_cpp` fail
    res = _throughput_on(tiny_gguf_path, tmp_path / "r.json")
    assert res["llama.cpp"] == {"skipped": SKIP_NOT_INSTALLED}
    assert SKIP_NOT_INSTALLED in capsys.readouterr().err
    res = _throughput_on(tiny_gguf_path, tmp_path / "r2.json", "--skip-llamacpp", "--quiet")
    assert "llama.cpp" not in res and res["config"]["skip_llamacpp"] is True


def test_throughput_llamacpp_on_tiny_gguf(tmp_path, tiny_gguf_path):
    pytest.importorskip("llama_cpp")
    res = _throughput_on(tiny_gguf_path, tmp_path / "r.json", "--quiet")
    lc = res["llama.cpp"]
    assert "skipped" not in lc, lc
    assert lc["requests"] == 4 and lc["output_tokens"] == res["workload"]["output_tokens"]
    assert lc["per_request_output_tokens_match"] is True
    assert lc["batching"] == "sequential" and lc["n_threads"] == 1
    _check_rates(lc, res["workload"]["prompt_tokens"])
    assert lc["ttft_median_s"] == pytest.approx(statistics.median(lc["samples"]["ttft_s"]))
    assert res["ratio_output_tok_s_llamacpp"] == pytest.approx(
        res["servelm"]["output_tok_s"] / lc["output_tok_s"])
    # llama.cpp computes on the quantized blocks: agreement is reported, not asserted, but it
    # must be the one of the output ids
    sv_ids, lc_ids = res["servelm"]["samples"]["token_ids"], lc["samples"]["token_ids"]
    assert res["greedy_exact_match_fraction_llamacpp"] == pytest.approx(
        sum(a == b for a, b in zip(sv_ids, lc_ids)) / 4)
