"""Disaggregated prefill/decode and live migration through `servelm serve` on a local Ray
cluster (issue 19), as a real process serving two models of the same tiny weights:
- "pd": 1 prefill replica + 2 decode replicas;
- "mig": 2 colocated replicas (automatic balancing off, so only the operator moves requests).
The reference is one engine in this process (servelm.LLM) on the same weights and options:
disaggregated output equals it (greedy and seeded, streamed and not), a request migrated
mid-stream through the admin endpoint streams exactly its text, a decode replica killed
mid-stream is replaced without a gap or a repeat, and every replica's KV blocks come back."""

from __future__ import annotations

import json
import os
import signal
import urllib.request

import pytest
from test_replicas import (
    http,
    metrics,
    per_replica,
    replicas,
    serve_process,
    total,
    wait_for,
)

from servelm.llm import LLM
from servelm.sampling_params import SamplingParams

pytestmark = pytest.mark.multiprocess

ENGINE = {"dtype": "float32", "block_size": 4, "num_kv_blocks": 256, "max_num_batched_tokens": 64}
ADMIN = "s3cret"
PROMPT = "The router sends each prompt to a prefill replica and the decode replica goes on"


@pytest.fixture(scope="module")
def served(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("disagg")
    llama = str(tiny_model_dir("llama"))
    config = tmp / "models.json"
    config.write_text(json.dumps({"models": [
        {"model": llama, "name": "pd", "prefill_replicas": 1, "decode_replicas": 2},
        {"model": llama, "name": "mig", "replicas": 2}]}))
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in ENGINE.items()]
    args = ["--models-config", str(config), "--replica-cpus", "0.3", "--migrate-imbalance", "0",
            "--admin-key", ADMIN, *flags]
    with serve_process(args, tmp / "server.log") as (url, _):
        yield url


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    llm = LLM(str(tiny_model_dir("llama")), **ENGINE)

    def text(**sampling) -> str:
        return llm.generate(PROMPT, SamplingParams(**sampling))[0].outputs[0].text

    return text


def admin(url: str, path: str, body: dict | None = None, key: str | None = ADMIN):
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    req = urllib.request.Request(url + path, data=data, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def stream(url: str, model: str, on_chunk=None, **sampling) -> str:
    """A streamed completion's text; `on_chunk(id, tokens so far)` after each chunk."""
    body = {"model": model, "prompt": PROMPT, "stream": True, **sampling}
    req = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    text, chunks = "", 0
    with urllib.request.urlopen(req, timeout=120) as resp:
        for line in resp:
            line = line.decode().strip()
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            assert "error" not in chunk, chunk
            text += chunk["choices"][0]["text"]
            chunks += 1
            if on_chunk is not None:
                on_chunk(chunk["id"], chunks)
    return text


GREEDY = {"max_tokens": 40, "temperature": 0.0, "ignore_eos": True}
SEEDED = {"max_tokens": 40, "temperature": 0.9, "top_p": 0.95, "seed": 11, "ignore_eos": True}


@pytest.mark.parametrize("sampling", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_disaggregated_output_equals_one_engine(served, reference, sampling):
    want = reference(**sampling)
    status, body = http(served + "/v1/completions", {"model": "pd", "prompt": PROMPT, **sampling})
    assert status == 200 and body["choices"][0]["text"] == want
    assert stream(served, "pd", **sampling) == want
    health = {r["name"]: r for r in replicas(served, "pd")}
    assert sorted(r["role"] for r in health.values()) == ["decode", "decode", "prefill"]
    # the prompt ran on the prefill replica, whose prefix cache served it the second time
    snap = metrics(served)
    hits = per_replica(snap, "servelm:prefix_cache_hits_total", "pd")
    assert hits and max(hits, key=hits.get) in [n for n, r in health.items() if r["role"] == "prefill"]
    assert sum(v for (n, lab), v in snap.items() if n == "servelm:kv_handovers_total"
               and ("model", "pd") in lab) >= 2


def test_operator_migrates_a_stream_mid_decode(served, reference):
    sampling = {**SEEDED, "max_tokens": 300}
    want = reference(**sampling)
    moved: dict = {}

    def on_chunk(request_id: str, chunks: int) -> None:
        if chunks == 20 and not moved:
            assert admin(served, "/admin/migrate", {"request_id": request_id}, key="wrong")[0] == 401
            moved.update(admin(served, "/admin/migrate", {"model": "mig", "request_id": request_id})[1])

    assert stream(served, "mig", on_chunk, **sampling) == want
    assert moved["from"] != moved["to"] and moved["downtime_s"] > 0, moved
    assert moved["blocks_staged"] >= 3 and moved["blocks_at_stop"] <= 2, moved
    status, body = admin(served, "/admin/migrate", {"model": "mig", "request_id": "nope"})
    assert status == 404 and "request_id" == body["error"]["param"]


def test_killed_decode_replica_is_replaced_mid_stream(served, reference):
    sampling = {**SEEDED, "max_tokens": 300}
    want = reference(**sampling)
    killed: list = []
    before = metrics(served)

    def on_chunk(request_id: str, chunks: int) -> None:
        if chunks == 20 and not killed:
            running = admin(served, "/admin/requests")[1]["models"]["pd"]
            name = next(f["replica"] for f in running if f["request_id"] == f"{request_id}-0")
            victim = next(r for r in replicas(served, "pd") if r["name"] == name)
            assert victim["role"] == "decode"
            os.kill(victim["pid"], signal.SIGKILL)
            killed.append(victim)

    assert stream(served, "pd", on_chunk, **sampling) == want
    assert killed
    after = metrics(served)
    for name, grew in (("servelm:router_requests_retried_total", 1), ("servelm:router_requests_failed_total", 0)):
        assert total(after, name, model="pd") - total(before, name, model="pd") == grew
    wait_for(lambda: all(r["state"] == "ready" for r in replicas(served, "pd")), 90,
             "the killed decode replica back")


def test_every_replica_gives_its_blocks_back(served):
    def idle() -> bool:
        usage = per_replica(metrics(served), "servelm:kv_cache_usage_perc", "pd")
        usage |= per_replica(metrics(served), "servelm:kv_cache_usage_perc", "mig")
        return len(usage) == 5 and all(v == 0 for v in usage.values())

    wait_for(idle, 30, "no KV block held on any replica")


def test_admin_endpoints_need_their_key(served):
    assert admin(served, "/admin/requests", key=None)[0] == 401
    status, body = admin(served, "/admin/requests")
    assert status == 200 and set(body["models"]) == {"pd", "mig"}
