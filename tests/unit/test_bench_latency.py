"""`servelm bench latency` on tiny random models: result keys, token counts, the peers."""

from __future__ import annotations

import json
import sys

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
               "--num-kv-blocks", "64", "--num-threads", "1", "--result-file", str(out), *extra])
    assert rc == 0
    return json.loads(out.read_text())


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
    assert 3.0 < d["p90"] < d["p99"] <= 4.0
    assert describe([]) is None
    with pytest.raises(ValueError, match="output_len"):
        LatencyConfig(output_len=0)
    with pytest.raises(ValueError, match="num_iters_warmup"):
        LatencyConfig(num_iters_warmup=-1)


def test_latency_cli_servelm_and_transformers(tmp_path, tiny_model_dir, capsys):
    res = _run(tmp_path, tiny_model_dir("llama"), "--batch-size", "2")
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
            assert set(r[metric]) == STATS and r[metric]["min"] > 0
        assert r["ttft_s"]["n"] == 4 and r["tpot_s"]["n"] == 4 and r["e2e_s"]["n"] == 2
        assert r["ttft_s"]["max"] <= r["e2e_s"]["max"]
        # energy is either measured or says why not; never invented
        assert (r["energy_j"] is None) == (r["energy_unavailable_reason"] is not None)
    rat = res["ratios"]["transformers"]
    assert rat["ttft_s_median"] == pytest.approx(
        res["transformers"]["ttft_s"]["median"] / res["servelm"]["ttft_s"]["median"])
    assert res["greedy_exact_match_fraction"]["transformers"] >= 0.5  # float32, same weights
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
    for metric in ("ttft_s", "tpot_s", "e2e_s"):
        assert lc[metric]["min"] > 0
    assert set(res["ratios"]["llama.cpp"]) >= {"ttft_s_median", "tpot_s_median", "e2e_s_median"}
    # llama.cpp computes on the quantized blocks: agreement is reported, not asserted
    assert 0.0 <= res["greedy_exact_match_fraction"]["llama.cpp"] <= 1.0
