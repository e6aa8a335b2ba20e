"""`servelm bench serve` end to end against a live tiny servelm server."""

from __future__ import annotations

import json

import numpy as np
import pytest

from servelm.bench.serve_client import Target, request_body
from servelm.bench.serve_datasets import DatasetOptions, build_conversations
from servelm.cli import main
from servelm.model.loader import load_tokenizer
from servelm.server.guards import ServerOptions

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def bench(server, tiny_model_dir, out, *extra):
    return main(["bench", "serve", "--base-url", server.url, "--tokenizer",
                 str(tiny_model_dir("llama")), "--result-file", str(out), "--quiet", *extra])


def test_random_completions_run_writes_vllm_keys_and_plot(server, tiny_model_dir, tmp_path):
    out = tmp_path / "r.json"
    rc = bench(server, tiny_model_dir, out, "--dataset-name", "random", "--num-prompts", "6",
               "--random-input-len", "12", "--random-output-len", "5", "--request-rate", "40",
               "--ignore-eos", "--goodput", "ttft:60000", "e2el:60000", "--fluidity", "60000:60000",
               "--metric-percentiles", "90,99", "--save-detailed")
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["model_id"] == "tiny"  # taken from /v1/models
    assert res["completed"] == 6 and res["failed"] == 0
    assert res["total_output_tokens"] == 30  # ignore_eos: exactly max_tokens each
    # The prompts the run sent (same seeded texts), counted by the server's tokenizer.
    tok = load_tokenizer(str(tiny_model_dir("llama")))
    convs = build_conversations(tok, DatasetOptions(num_prompts=6, random_input_len=12,
                                                    random_output_len=5))
    reqs = sorted(res["requests"], key=lambda r: r["session"])
    assert [r["prompt_len"] for r in reqs] == [len(tok.encode(c.user_turns[0])) for c in convs]
    assert res["total_input_tokens"] == sum(r["prompt_len"] for r in reqs)
    assert res["request_throughput"] == pytest.approx(6 / res["duration_s"])
    assert res["request_goodput"] == pytest.approx(res["request_throughput"])  # generous SLOs
    assert res["fluidity_index"] == 1.0 and res["fluidity_targets_ms"] == {"ttft": 60000,
                                                                           "tbt": 60000}
    # Every latency statistic again from the per-request records.
    assert all(r["success"] and r["output_len"] == 5 for r in reqs)
    samples = {"ttft": [r["ttft_s"] for r in reqs], "e2el": [r["latency_s"] for r in reqs],
               "tpot": [(r["latency_s"] - r["ttft_s"]) / 4 for r in reqs],
               "itl": [g for r in reqs for g in r["itl_s"]]}
    for name, seconds in samples.items():
        ms = np.asarray(seconds) * 1e3
        assert res[f"mean_{name}_ms"] == pytest.approx(ms.mean())
        assert res[f"median_{name}_ms"] == pytest.approx(np.median(ms))
        for p in (90, 99):
            assert res[f"p{p}_{name}_ms"] == pytest.approx(np.percentile(ms, p))
    for r in reqs:  # the gaps between chunks fall between the first chunk and the end
        assert 0 < r["ttft_s"] and r["ttft_s"] + sum(r["itl_s"]) <= r["latency_s"]
    # energy is either measured (per output token) or says why not; never invented
    assert (res["energy_j"] is None) == (res["energy_unavailable_reason"] is not None)
    assert res["energy_per_token_j"] == (None if res["energy_j"] is None
                                         else pytest.approx(res["energy_j"] / 30))
    (cdf,) = res["plots"]
    assert open(cdf, "rb").read(8) == PNG_MAGIC


def test_multi_turn_chat_sweep(server, tiny_model_dir, tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"Tell me about cats number {i}.",
                                         "response": "Cats are nice."}) + "\n" for i in range(8)))
    out = tmp_path / "sweep.json"
    rc = bench(server, tiny_model_dir, out, "--endpoint", "/v1/chat/completions",
               "--dataset-name", "multi-turn", "--dataset-path", str(pairs), "--num-prompts", "3",
               "--multi-turn-turns", "2", "--output-len", "4", "--request-rate", "20,inf",
               "--max-concurrency", "2", "--ignore-eos", "--save-detailed")
    assert rc == 0
    res = json.loads(out.read_text())
    assert [r["request_rate"] for r in res["runs"]] == [20, "inf"]
    for run in res["runs"]:
        assert run["failed_reasons"] == {}
        assert run["completed"] == 6 and run["total_output_tokens"] == 24
        assert run["max_concurrent_requests"] <= 2
        reqs = run["requests"]
        for session in range(3):  # turn 2 is sent only after turn 1 finished
            t1, t2 = sorted((r for r in reqs if r["session"] == session), key=lambda r: r["turn"])
            assert t2["start_s"] >= t1["start_s"] + t1["latency_s"] - 1e-6
            assert t2["prompt_len"] > t1["prompt_len"]  # history re-sent with the answer
    assert [open(p, "rb").read(8) for p in res["plots"]] == [PNG_MAGIC, PNG_MAGIC]


def test_rejected_requests_are_counted_with_reasons(make_server, tiny_model_dir, tmp_path):
    """Prompts over the server's body limit get 413s: counted as failed, with the reason."""
    tok = load_tokenizer(str(tiny_model_dir("llama")))
    opt = DatasetOptions(num_prompts=12, random_input_len=40, random_range_ratio=0.9,
                         random_output_len=3)  # the run's options: same seeded texts
    target = Target("http://x", "/v1/completions", "tiny", ignore_eos=True,
                    banned_token_ids=tuple(tok.all_special_ids))
    sizes = [len(json.dumps(request_body(target, c.user_turns[0], c.output_lens[0])))
             for c in build_conversations(tok, opt)]
    limit = sizes[0]  # the first prompt is also the test request, so it must pass
    assert limit < max(sizes)
    live = make_server(ServerOptions(max_body_bytes=limit))
    out = tmp_path / "busy.json"
    rc = bench(live, tiny_model_dir, out, "--num-prompts", "12", "--random-input-len", "40",
               "--random-range-ratio", "0.9", "--random-output-len", "3", "--ignore-eos",
               "--no-plots")
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["failed"] == sum(n > limit for n in sizes)
    assert res["completed"] == 12 - res["failed"]
    assert all(r.startswith("HTTP 413: request body of") for r in res["failed_reasons"])
    assert sum(res["failed_reasons"].values()) == res["failed"]
    assert "plots" not in res


def test_unreachable_server_or_wrong_model_fail_clearly(server, tiny_model_dir, tmp_path, port,
                                                       capsys):
    rc = main(["bench", "serve", "--base-url", f"http://127.0.0.1:{port}", "--quiet",
               "--tokenizer", str(tiny_model_dir("llama")), "--num-prompts", "1"])
    assert rc == 1 and "/v1/models" in capsys.readouterr().err
    rc = bench(server, tiny_model_dir, tmp_path / "x.json", "--model", "nope", "--num-prompts", "1",
               "--random-input-len", "4")
    assert rc == 1 and "HTTP 404" in capsys.readouterr().err
    rc = bench(server, tiny_model_dir, tmp_path / "x.json", "--goodput", "ttft=5")
    assert rc == 2 and "--goodput" in capsys.readouterr().err


def test_launch_servelm_and_llamacpp_side_by_side(tiny_model_dir, tiny_gguf_path, tmp_path):
    """`--launch` starts each server in turn on the same GGUF and writes one comparison."""
    systems = "servelm"
    try:
        import llama_cpp  # noqa: F401

        systems += ",llama.cpp"
    except ImportError:  # optional extra (pip install 'servelm[peers]')
        pass
    out = tmp_path / "peers.json"
    rc = main(["bench", "serve", "--launch", systems, "--launch-model", str(tiny_gguf_path),
               "--launch-threads", "1", "--launch-max-model-len", "256", "--num-prompts", "3",
               "--random-input-len", "8", "--random-output-len", "4", "--request-rate", "inf",
               "--ignore-eos", "--result-file", str(out), "--quiet"])
    assert rc == 0
    res = json.loads(out.read_text())
    assert list(res["systems"]) == systems.split(",")
    for system in res["systems"].values():
        (run,) = system["runs"]
        assert run["completed"] == 3 and run["total_output_tokens"] == 12
    assert open(res["plots"][-1], "rb").read(8) == PNG_MAGIC  # comparison plot
    assert (tmp_path / "logs" / "servelm-server.log").is_file()


def test_random_sweep_draws_new_prompts_at_each_rate(server, tiny_model_dir, tmp_path):
    """A rate after the first would find the last rate's prompts in the prefix cache."""
    out = tmp_path / "sweep.json"
    rc = bench(server, tiny_model_dir, out, "--dataset-name", "random", "--num-prompts", "4",
               "--random-input-len", "24", "--random-range-ratio", "0.5", "--random-output-len", "2",
               "--request-rate", "40,inf", "--ignore-eos", "--save-detailed")
    assert rc == 0
    tok = load_tokenizer(str(tiny_model_dir("llama")))
    sent = []
    for i, run in enumerate(json.loads(out.read_text())["runs"]):
        convs = build_conversations(tok, DatasetOptions(num_prompts=4, random_input_len=24,
                                                        random_range_ratio=0.5, random_output_len=2,
                                                        seed=i))
        sent.append([r["prompt_len"] for r in sorted(run["requests"], key=lambda r: r["session"])])
        assert sent[-1] == [len(tok.encode(c.user_turns[0])) for c in convs]
    assert sent[0] != sent[1]


def test_extra_body_reaches_every_request(server, tiny_model_dir, tmp_path, capsys):
    """--extra-body: a constraint for every request (here one of two words, so each answer
    ends after a token or two); a bad one stops the run before its traffic, with the
    server's reason."""
    out = tmp_path / "c.json"
    rc = bench(server, tiny_model_dir, out, "--dataset-name", "random", "--num-prompts", "4",
               "--random-input-len", "8", "--random-output-len", "32", "--request-rate", "inf",
               "--extra-body", '{"guided_choice": ["yes", "no"]}')
    res = json.loads(out.read_text())
    assert rc == 0 and res["completed"] == 4 and res["extra_body"] == {"guided_choice": ["yes", "no"]}
    assert res["total_output_tokens"] <= 4 * 3
    rc = bench(server, tiny_model_dir, out, "--dataset-name", "random", "--num-prompts", "2",
               "--random-input-len", "8", "--random-output-len", "4", "--extra-body",
               '{"temperature": 9}')
    assert rc != 0 and "temperature must be in [0, 2]" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench(server, tiny_model_dir, out, "--extra-body", "[1, 2]")
