"""The llama-bench peer (bench/llamacpp_bench.py): the two runs it asks for and the figures
it derives, against a stand-in binary that answers as llama-bench's JSON output does."""

from __future__ import annotations

import json
import stat
import sys

import pytest

from servelm.bench import llamacpp_bench

FAKE = """#!{python}
import json, sys
args = sys.argv[1:]
opt = {{args[i]: args[i + 1] for i in range(0, len(args) - 1, 2) if args[i].startswith("-")}}
with open({log!r}, "a") as f:
    f.write(json.dumps(args) + "\\n")
n_gen = int(opt["-n"])
print(json.dumps([{{"n_prompt": int(opt["-p"]), "n_gen": n_gen, "n_depth": int(opt.get("-d", 0)),
                   "avg_ts": 100.0 if n_gen else 800.0, "stddev_ts": 1.5, "build_commit": "abc"}}]))
"""


@pytest.fixture
def fake_llama_bench(tmp_path):
    log = tmp_path / "calls.jsonl"
    path = tmp_path / "llama-bench"
    path.write_text(FAKE.format(python=sys.executable, log=str(log)))
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path, log


def test_runs_prefill_and_decode_at_the_prompt_depth(fake_llama_bench):
    path, log = fake_llama_bench
    r = llamacpp_bench.run(str(path), "m.gguf", 2, input_len=64, output_len=32, reps=3)
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert calls[0][-4:] == ["-p", "64", "-n", "0"]
    assert calls[1][-6:] == ["-p", "0", "-n", "32", "-d", "64"]
    assert all(c[:8] == ["-m", "m.gguf", "-t", "2", "-r", "3", "-o", "json"] for c in calls)
    assert r["decode_tok_s"] == 100.0 and r["tpot_s"]["median"] == pytest.approx(0.01)
    assert r["ttft_s_estimate"] == pytest.approx(64 / 800 + 0.01)


def test_binary_lookup_and_skip(monkeypatch, fake_llama_bench, tmp_path):
    path, _ = fake_llama_bench
    monkeypatch.delenv("SERVELM_LLAMA_BENCH", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert llamacpp_bench.find_binary(None) is None
    assert llamacpp_bench.find_binary(str(tmp_path / "missing")) is None
    assert llamacpp_bench.find_binary(str(path)) == str(path)
    monkeypatch.setenv("SERVELM_LLAMA_BENCH", str(path))
    assert llamacpp_bench.find_binary(None) == str(path)


def test_a_failing_binary_is_reported(tmp_path):
    bad = tmp_path / "llama-bench"
    bad.write_text("#!/bin/sh\necho 'error: failed to load model' >&2\nexit 1\n")
    bad.chmod(0o755)
    with pytest.raises(RuntimeError, match="failed to load model"):
        llamacpp_bench.run(str(bad), "m.gguf", 2, 8, 8, 1)
