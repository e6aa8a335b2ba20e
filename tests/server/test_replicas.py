"""`servelm serve` with replicas on a local Ray cluster (num_cpus=2, tiny models), as a real
process: one server with three models,
- "tiny": 2 replicas, prefix-aware routing (the default);
- "tiny-rr": 2 replicas of the same weights, round-robin (the hit-rate baseline);
- "scaled": a qwen2 model, 0..1 replicas, each a 2-rank tensor-parallel group.
Requests spread over the replicas; shared-prefix requests find more of their prompt cached
than under round-robin, by the replicas' own counters; chat sessions stick; "scaled" goes to
zero and back; a replica killed under load loses no non-streamed request; a hung one is
replaced; and after SIGTERM every process the server started is gone."""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.multiprocess

STARTUP_S = 180


def http(url: str, body: dict | None = None, timeout: float = 60) -> tuple[int, dict | str]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            text = resp.read().decode()
            status = resp.status
    except urllib.error.HTTPError as e:
        text, status = e.read().decode(), e.code
    try:
        return status, json.loads(text)
    except json.JSONDecodeError:
        return status, text


def metrics(url: str) -> dict[tuple[str, frozenset], float]:
    text = http(url + "/metrics")[1]
    out = {}
    for line in text.splitlines():
        m = re.match(r"^([\w:]+)\{(.*)\} (\S+)$", line)
        if m:
            labels = frozenset(re.findall(r'(\w+)="([^"]*)"', m.group(2)))
            out[(m.group(1), labels)] = float(m.group(3))
    return out


def total(snapshot: dict, name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (n, lab), v in snapshot.items() if n == name and want <= lab)


def per_replica(snapshot: dict, name: str, model: str) -> dict[str, float]:
    return {dict(lab)["replica"]: v for (n, lab), v in snapshot.items()
            if n == name and ("model", model) in lab and "replica" in dict(lab)}


def replicas(url: str, model: str) -> list[dict]:
    return http(url + "/health")[1]["models"][model]["replicas"]


def wait_for(check, within: float, what: str):
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.2)
    raise AssertionError(f"not within {within}s: {what}")


@pytest.fixture(scope="module")
def cluster(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("replicas")
    config = tmp / "models.json"
    llama, qwen = str(tiny_model_dir("llama")), str(tiny_model_dir("qwen2"))
    config.write_text(json.dumps({"models": [
        {"model": llama, "name": "tiny", "replicas": 2},
        {"model": llama, "name": "tiny-rr", "replicas": 2, "router": "round-robin"},
        {"model": qwen, "name": "scaled", "replicas": 1, "min_replicas": 0, "max_replicas": 1,
         "engine": {"tensor_parallel_size": 2}}]}))
    args = ["--models-config", str(config), "--replica-cpus", "0.3", "--downscale-delay-s", "2",
            "--dtype", "float32", "--block-size", "4", "--num-kv-blocks", "256",
            "--max-num-batched-tokens", "64"]
    with serve_process(args, tmp / "server.log") as (url, proc):
        yield url
        started = psutil.Process(proc.pid).children(recursive=True)
        assert any("raylet" in p.name() for p in started)
    deadline = time.monotonic() + 20
    while (left := [p for p in started if _alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, f"processes left after shutdown: {[p.name() for p in left]}"


@contextlib.contextmanager
def serve_process(args: list[str], log: Path) -> Iterator[tuple[str, subprocess.Popen]]:
    """`servelm serve ARGS` on a free port until it answers /health; SIGTERM at the end
    must stop it cleanly (exit 0)."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "servelm.cli", "serve", "--port", str(port),
                             "--shutdown-timeout", "2", *args],
                            stdout=subprocess.DEVNULL, stderr=open(log, "w"))
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _up(url) or proc.poll() is not None, STARTUP_S, "the server answers")
        assert proc.poll() is None, log.read_text()[-3000:]
        yield url, proc
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _up(url: str) -> bool:
    try:
        return http(url + "/health", timeout=2)[0] == 200
    except OSError:
        return False


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(["cache", "replica", "token", "router", "prefix", "model", "tree",
                                "block", "query", "serve"]) for _ in range(n))


def complete(url: str, model: str, prompt: str, **kw) -> dict:
    status, body = http(url + "/v1/completions", {"model": model, "prompt": prompt,
                                                 "max_tokens": 1, **kw})
    assert status == 200, body
    return body


def test_models_listed_and_routed_by_model_field(cluster):
    status, body = http(cluster + "/v1/models")
    assert status == 200 and [m["id"] for m in body["data"]] == ["tiny", "tiny-rr", "scaled"]
    assert complete(cluster, "scaled", "hello", max_tokens=3)["model"] == "scaled"
    status, body = http(cluster + "/v1/completions", {"model": "nope", "prompt": "hi"})
    assert status == 404 and "'tiny', 'tiny-rr', 'scaled'" in body["error"]["message"]
    status, body = http(cluster + "/v1/completions", {"model": "tiny", "prompt": "hi",
                                                      "temperature": -1})
    assert status == 400 and "temperature" in body["error"]["message"]
    health = http(cluster + "/health")[1]
    scaled = health["models"]["scaled"]["replicas"][0]
    assert len(scaled["worker_pids"]) == 2  # its two tensor-parallel ranks


def test_shared_prefixes_hit_more_with_prefix_aware_routing(cluster):
    """Five system prompts, four questions each, sent one after another in the same order to
    "tiny" (prefix-aware) and "tiny-rr" (round-robin): each replica counts its own prefix-cache
    hits; prefix-aware finds more of the prompts cached, and both replicas serve."""
    rng = random.Random(0)
    prefixes = [words(rng, 30) for _ in range(5)]
    prompts = [f"{p} question {words(rng, 3)}" for p in prefixes for _ in range(4)]
    before = metrics(cluster)
    for model in ("tiny", "tiny-rr"):
        for prompt in prompts:
            complete(cluster, model, prompt)
    after = metrics(cluster)

    def hit_rate(model: str) -> float:
        hits = (total(after, "servelm:prefix_cache_hits_total", model=model)
                - total(before, "servelm:prefix_cache_hits_total", model=model))
        queries = (total(after, "servelm:prefix_cache_queries_total", model=model)
                   - total(before, "servelm:prefix_cache_queries_total", model=model))
        return hits / queries

    aware, rr = hit_rate("tiny"), hit_rate("tiny-rr")
    assert aware > rr + 0.15, (aware, rr)
    for model in ("tiny", "tiny-rr"):
        served = per_replica(after, "servelm:prompt_tokens_total", model)
        assert len(served) == 2 and all(v > 0 for v in served.values()), served


def test_chat_session_sticks_to_one_replica(cluster):
    rng = random.Random(1)
    before = per_replica(metrics(cluster), "servelm:router_requests_routed_total", "tiny-rr")
    for _ in range(4):
        status, body = http(cluster + "/v1/chat/completions", {
            "model": "tiny-rr", "user": "alice", "max_tokens": 2,
            "messages": [{"role": "user", "content": words(rng, 8)}]})
        assert status == 200, body
    after = per_replica(metrics(cluster), "servelm:router_requests_routed_total", "tiny-rr")
    assert sorted(after[r] - before.get(r, 0) for r in after) == [0, 4]  # round-robin, yet stuck


def test_streaming_through_the_openai_client(cluster):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=cluster + "/v1", api_key="unused")
    chunks = list(client.completions.create(model="tiny", prompt="stream me", max_tokens=5,
                                            stream=True, extra_body={"ignore_eos": True}))
    assert chunks[-1].choices[0].finish_reason == "length"
    assert sum(bool(c.choices[0].text) for c in chunks) >= 1


def test_scales_to_zero_and_back(cluster):
    wait_for(lambda: not replicas(cluster, "scaled"), 30, "'scaled' scaled to zero")
    assert http(cluster + "/health")[0] == 200  # zero replicas of a model that may have none
    start = time.monotonic()
    complete(cluster, "scaled", "wake up", max_tokens=2)
    cold = time.monotonic() - start
    snap = metrics(cluster)
    assert total(snap, "servelm:cold_starts_total", model="scaled") == 1
    assert 0 < total(snap, "servelm:last_cold_start_seconds", model="scaled") <= cold
    wait_for(lambda: not replicas(cluster, "scaled"), 30, "'scaled' back to zero")


def test_killed_replica_loses_no_non_streamed_request(cluster):
    results: dict[int, tuple[int, dict | str]] = {}
    streams: dict[int, list[dict]] = {}
    rng = random.Random(2)
    prompts = [words(rng, 6) for _ in range(24)]

    def post(i: int) -> None:
        results[i] = http(cluster + "/v1/completions", {
            "model": "tiny", "prompt": prompts[i], "max_tokens": 48, "ignore_eos": True}, timeout=120)

    def stream(i: int) -> None:
        req = urllib.request.Request(cluster + "/v1/completions", data=json.dumps({
            "model": "tiny", "prompt": prompts[i], "max_tokens": 48, "ignore_eos": True,
            "stream": True}).encode(), headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as resp:
            streams[i] = [json.loads(line[6:]) for line in resp.read().decode().splitlines()
                          if line.startswith("data: {")]

    before = metrics(cluster)
    threads = [threading.Thread(target=post, args=(i,)) for i in range(20)]
    threads += [threading.Thread(target=stream, args=(i,)) for i in range(20, 24)]
    for t in threads:
        t.start()
    victim = wait_for(lambda: next((r for r in replicas(cluster, "tiny") if r["in_flight"] >= 2), None),
                      30, "a replica of 'tiny' busy")
    os.kill(victim["pid"], signal.SIGKILL)
    for t in threads:
        t.join(timeout=120)
    assert len(results) == 20 and len(streams) == 4
    for status, body in results.values():  # every non-streamed request completed
        assert status == 200, body
        assert body["usage"]["completion_tokens"] == 48
    cut = [s for s in streams.values() if "error" in s[-1]]
    for s in cut:
        assert "output is incomplete" in s[-1]["error"]["message"]
    for s in streams.values():
        assert s in cut or s[-1]["choices"][0]["finish_reason"] == "length"
    after = metrics(cluster)
    retried = (total(after, "servelm:router_requests_retried_total", model="tiny")
               - total(before, "servelm:router_requests_retried_total", model="tiny"))
    failed = (total(after, "servelm:router_requests_failed_total", model="tiny")
              - total(before, "servelm:router_requests_failed_total", model="tiny"))
    assert failed == len(cut) and retried + failed >= 1
    back = wait_for(lambda: next((r for r in replicas(cluster, "tiny") if r["name"] == victim["name"]
                                  and r["state"] == "ready" and r["restarts"] == 1), None),
                    90, "the killed replica restarted by Ray and back in rotation")
    assert back["pid"] != victim["pid"]


def test_hung_replica_is_replaced(cluster):
    victim = replicas(cluster, "tiny-rr")[0]
    os.kill(victim["pid"], signal.SIGSTOP)
    try:
        wait_for(lambda: any(r["name"] == victim["name"] and r["state"] == "down"
                             for r in replicas(cluster, "tiny-rr")), 15, "the hung replica taken out")
        for _ in range(3):  # served meanwhile by the other replica
            complete(cluster, "tiny-rr", "still here?")
        wait_for(lambda: any(r["name"] == victim["name"] and r["state"] == "ready"
                             and r["pid"] != victim["pid"] for r in replicas(cluster, "tiny-rr")),
                 90, "a fresh process for the hung replica")
        assert not psutil.pid_exists(victim["pid"]) or not _alive(psutil.Process(victim["pid"]))
    finally:
        try:
            os.kill(victim["pid"], signal.SIGCONT)
        except ProcessLookupError:
            pass
