"""`servelm bench latency` on tiny random models: result keys, token counts, the peers."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from servelm.bench import llamacpp_peer
from servelm.bench.harness import describe
from servelm.bench.latency import LatencyConfig, random_prompts
from servelm.cli import main

STATS = {"mean", "median", "p90", "p99", "min", "max", "n"}


def _run(tmp_path, model, *extra: str) -> dict:
    out = tmp_path / "lat.json"
    rc = main(["bench", "latency", "--model", str(model), "--input-len", "12",
               "--output-len", "5", "--num-iters", "2", "--num-iters-warmup", "1",
               "--num-kv-blocks", "64", "--num-threads", "1", "--result-file", str(out),
               "--save-detailed", *extra])
    assert rc == 0
    return json.loads(out.read_text())


def _check_against_samples(r: dict, batch_size: int, output_len: int = 5) -> None:
    """Every figure of one system recomputed from the raw samples the result also stores."""
    s = r["samples"]
    assert len(s["ttft"]) == len(s["decode"]) == len(s["token_ids"]) == 2 * batch_size
    assert len(s["e2e"]) == 2
    tpot = [d / (len(ids) - 1) for d, ids in zip(s["decode"], s["token_ids"])]
    for metric, values in (("ttft", s["ttft"]), ("tpot", tpot), ("e2e", s["e2e"])):
        v = np.asarray(values)
        assert r[metric + "_s"] == pytest.approx({
            "mean": v.mean(), "median": np.median(v), "p90": np.percentile(v, 90),
            "p99": np.percentile(v, 99), "min": v.min(), "max": v.max(), "n": len(v)})
    assert r["output_tok_s"] == pytest.approx(batch_size * output_len / np.mean(s["e2e"]))
    assert r["output_tokens"] == sum(map(len, s["token_ids"])) == 2 * batch_size * output_len
    for i, (ttft, decode) in enumerate(zip(s["ttft"], s["decode"])):
        # first token, then the rest, all within the request's iteration
        assert 0 < ttft < ttft + decode <= s["e2e"][i // batch_size]


def test_random_prompts_describe_and_config(tiny_tokenizer):
    sets = random_prompts(tiny_tokenizer, input_len=20, batch_size=3, num_sets=4, seed=5)
    assert sets == random_prompts(tiny_tokenizer, 20, 3, 4, seed=5)
    assert len(sets) == 4 and all(len(b) == 3 and all(len(p) == 20 for p in b) for b in sets)
    flat = [tuple(p) for b in sets for p in b]
    assert len(set(flat)) == len(flat)  # every prompt differs: no prefix cache can help
    special = set(tiny_tokenizer.all_special_ids)
    assert not any(t in special for p in flat for t in p)
    d = describe([1.0, 2.0, 3.0, 4.0])
    assert d["mean"] == 2.5 and d["median"] == 2.5 and d["max"] == 4.0 and d["n"] == 4
    # linear interpolation: rank 0.9 * 3 = 2.7 -> 3 + 0.7, rank 0.99 * 3 = 2.97 -> 3 + 0.97
    assert d["p90"] == pytest.approx(3.7) and d["p99"] == pytest.approx(3.97)
    assert describe([]) is None
    with pytest.raises(ValueError, match="output_len"):
        LatencyConfig(output_len=0)
    with pytest.raises(ValueError, match="num_iters_warmup"):
        LatencyConfig(num_iters_warmup=-1)


def test_latency_cli_servelm_and_transformers(tmp_path, tiny_model_dir, tiny_tokenizer, capsys):
    import torch
    from transformers import AutoModelForCausalLM

    from servelm.llm import LLM
    from servelm.sampling_params import SamplingParams

    model = tiny_model_dir("llama")
    res = _run(tmp_path, model, "--batch-size", "2")
    for key in ("date", "command", "machine", "config", "servelm", "transformers", "ratios",
                "greedy_exact_match_fraction", "servelm_revision"):
        assert key in res
    assert res["benchmark"] == "latency" and res["machine"]["torch_threads"] == 1
    assert res["config"]["input_len"] == 12 and res["config"]["batch_size"] == 2
    for system in ("servelm", "transformers"):
        r = res[system]
        assert r["output_tokens_match"] is True
        assert r["output_tokens"] == 2 * 2 * 5  # iterations x batch x output_len
        for metric in ("ttft_s", "tpot_s", "e2e_s"):
            assert set(r[metric]) == STATS
        _check_against_samples(r, batch_size=2)
        # energy is either measured or says why not; never invented
        assert (r["energy_j"] is None) == (r["energy_unavailable_reason"] is not None)
    rat = res["ratios"]["transformers"]
    assert rat["ttft_s_median"] == pytest.approx(
        res["transformers"]["ttft_s"]["median"] / res["servelm"]["ttft_s"]["median"])
    # The output ids, and from them the agreement, computed again here: the measured
    # iterations' prompts (after the warm-up one) through servelm and transformers.
    batches = random_prompts(tiny_tokenizer, 12, 2, 3, seed=0)[1:]
    llm = LLM(str(model), num_kv_blocks=64, num_threads=1)
    params = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
    ours = [list(o.outputs[0].token_ids) for b in batches
            for o in llm.generate([{"prompt_token_ids": p} for p in b], params, use_tqdm=False)]
    hf = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32).eval()
    theirs = []
    for b in batches:
        ids = torch.tensor(b)
        with torch.inference_mode():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5,
                              min_new_tokens=5, do_sample=False, pad_token_id=0)
        theirs += out[:, 12:].tolist()
    assert res["servelm"]["samples"]["token_ids"] == ours
    assert res["transformers"]["samples"]["token_ids"] == theirs
    assert res["greedy_exact_match_fraction"]["transformers"] == pytest.approx(
        sum(a == b for a, b in zip(ours, theirs)) / 4)
    # An HF folder: llama.cpp cannot run it (or is not installed); either way a recorded skip.
    assert "skipped" in res["llama.cpp"] and "llama.cpp" not in res["ratios"]
    assert "llama.cpp" in capsys.readouterr().err


def test_latency_llamacpp_not_installed(tmp_path, tiny_gguf_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # makes `import llama_cpp` fail
    res = _run(tmp_path, tiny_gguf_path, "--skip-hf", "--output-len", "3")
    assert res["llama.cpp"] == {"skipped": llamacpp_peer.SKIP_NOT_INSTALLED}
    assert "transformers" not in res and res["servelm"]["output_tokens_match"] is True
    assert llamacpp_peer.SKIP_NOT_INSTALLED in capsys.readouterr().err


def test_latency_llamacpp_on_tiny_gguf(tmp_path, tiny_gguf_path):
    pytest.importorskip("llama_cpp")
    res = _run(tmp_path, tiny_gguf_path, "--skip-hf", "--quiet")
    lc = res["llama.cpp"]
    assert "skipped" not in lc, lc
    assert lc["output_tokens_match"] is True and lc["output_tokens"] == 2 * 5
    assert lc["batching"] == "sequential" and lc["n_threads"] == 1
    assert lc["n_ctx"] >= 12 + 5
    _check_against_samples(lc, batch_size=1)
    assert res["ratios"]["llama.cpp"]["ttft_s_median"] == pytest.approx(
        lc["ttft_s"]["median"] / res["servelm"]["ttft_s"]["median"])
    # llama.cpp computes on the quantized blocks: agreement is reported, not asserted, but it
    # must be the one of the output ids
    sv_ids, lc_ids = res["servelm"]["samples"]["token_ids"], lc["samples"]["token_ids"]
    assert res["greedy_exact_match_fraction"]["llama.cpp"] == pytest.approx(
        sum(a == b for a, b in zip(sv_ids, lc_ids)) / 2)
