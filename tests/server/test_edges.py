"""Auth, body limits, admission control, tokenize/detokenize."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import openai
import pytest

from servelm.server.guards import ServerOptions


def post(url: str, body: dict | bytes, headers: dict[str, str] | None = None) -> tuple[int, dict, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read()), {k.lower(): v for k, v in resp.headers.items()}
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), {k.lower(): v for k, v in e.headers.items()}


def test_api_key(make_server):
    live = make_server(ServerOptions(api_key="s3cret"))
    good = openai.OpenAI(base_url=live.url + "/v1", api_key="s3cret", max_retries=0)
    assert good.completions.create(model="tiny", prompt="hi", max_tokens=2).choices
    bad = openai.OpenAI(base_url=live.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model="tiny", prompt="hi", max_tokens=2)
    code, payload, _ = post(live.url + "/v1/completions", {"prompt": "hi"})
    assert code == 401 and payload["error"]["type"] == "authentication_error"


def test_oversize_body_and_overload(make_server):
    live = make_server(ServerOptions(max_body_bytes=2000, max_num_waiting=0))
    code, payload, _ = post(live.url + "/v1/completions", {"prompt": "x" * 5000})
    assert code == 413 and "2000" in payload["error"]["message"]
    code, payload, headers = post(live.url + "/v1/completions", {"prompt": "hi"})
    assert code == 503 and headers.get("retry-after") == "1"


def test_tokenize_roundtrip(server):
    code, payload, _ = post(server.url + "/tokenize", {"prompt": "hello world"})
    assert code == 200 and payload["count"] == len(payload["tokens"]) > 0
    code, back, _ = post(server.url + "/detokenize", {"tokens": payload["tokens"]})
    assert code == 200 and back["prompt"] == "hello world"
    code, chat, _ = post(server.url + "/tokenize", {"messages": [{"role": "user", "content": "hi"}]})
    assert code == 200 and chat["count"] > payload["count"] - 2
    code, err, _ = post(server.url + "/detokenize", {"tokens": [10**9]})
    assert code == 400 and "tokens" in err["error"]["message"]


def test_prometheus_metrics(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    long_prompt = "count me please " * 8  # several full blocks, so the repeat hits the cache
    first, again = (client.completions.create(model="tiny", prompt=long_prompt, max_tokens=3,
                                              extra_body={"ignore_eos": True}) for _ in range(2))
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert 0 < again.usage.prompt_tokens_details.cached_tokens < again.usage.prompt_tokens
    with urllib.request.urlopen(server.url + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
              if line and not line.startswith("#")}
    for name in ("servelm:num_requests_running", "servelm:num_requests_waiting",
                 "servelm:kv_cache_usage_perc", "servelm:prompt_tokens_total",
                 "servelm:generation_tokens_total", "servelm:num_preemptions_total",
                 "servelm:time_to_first_token_seconds_count", "servelm:inter_token_latency_seconds_count",
                 "servelm:e2e_request_latency_seconds_count", "servelm:request_queue_time_seconds_count",
                 "servelm:prefix_cache_queries_total", "servelm:prefix_cache_hits_total",
                 "servelm:kv_offloaded_blocks_total", "servelm:kv_restored_blocks_total",
                 "servelm:spec_decode_num_draft_tokens_total",
                 "servelm:spec_decode_num_accepted_tokens_total",
                 "servelm:spec_decode_num_drafts_total", "servelm:spec_decode_acceptance_rate"):
        assert name in values, name
    assert 0 < values["servelm:prefix_cache_hits_total"] < values["servelm:prefix_cache_queries_total"]
    assert values["servelm:generation_tokens_total"] >= 3
    assert 0 <= values["servelm:kv_cache_usage_perc"] <= 1
    assert values["servelm:e2e_request_latency_seconds_count"] >= 1


def test_priority_field_is_accepted_and_validated(server):
    code, payload, _ = post(server.url + "/v1/completions",
                            {"prompt": "hi", "max_tokens": 2, "priority": -3})
    assert code == 200 and payload["choices"]
    code, payload, _ = post(server.url + "/v1/completions",
                            {"prompt": "hi", "max_tokens": 2, "priority": "urgent"})
    assert code == 400 and "priority" in payload["error"]["message"]
