"""The server over tensor-parallel workers: a worker killed mid-request fails that request
with a 500 and a message, /health turns 503 within seconds and new requests get a 503;
SIGTERM to `servelm serve` leaves no worker process behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest
from test_serve_cli import wait_until_up

pytestmark = pytest.mark.multiprocess


def post(url: str, body: dict, timeout: float = 60) -> tuple[int, dict]:
    req = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def health(url: str) -> int:
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as resp:
            return resp.status
    except urllib.error.HTTPError as e:
        return e.code


def test_dead_worker_fails_requests_and_health(make_server):
    live = make_server(tensor_parallel_size=2, dtype="float32")
    assert post(live.url, {"model": "tiny", "prompt": "hi", "max_tokens": 3})[0] == 200
    result = {}
    slow = threading.Thread(target=lambda: result.update(r=post(live.url, {
        "model": "tiny", "prompt": "hi", "max_tokens": 400, "ignore_eos": True})))
    slow.start()
    engine = live.llm.engine
    deadline = time.monotonic() + 30
    while not engine.scheduler.running and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(engine.executor.pids[1], signal.SIGKILL)
    slow.join(timeout=10)
    status, body = result["r"]
    assert status == 500 and "worker rank 1" in body["error"]["message"]
    deadline = time.monotonic() + 3
    while health(live.url) != 503 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert health(live.url) == 503
    status, body = post(live.url, {"model": "tiny", "prompt": "hi", "max_tokens": 3})
    assert status == 503 and "worker rank 1" in body["error"]["message"]


def workers_of(pid: int) -> list[int]:
    """Worker processes the server started (from its engine thread: any task's children)."""
    found = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            for child in f.read().split():
                with open(f"/proc/{child}/cmdline", "rb") as cmd:
                    if b"spawn_main" in cmd.read():
                        found.append(int(child))
    return found


def test_sigterm_leaves_no_worker(tiny_model_dir, port):
    proc = subprocess.Popen([sys.executable, "-m", "servelm.cli", "serve", str(tiny_model_dir("llama")),
                             "--port", str(port), "--dtype", "float32", "--tensor-parallel-size", "2",
                             "--shutdown-timeout", "2"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_up(url, 90)
        workers = workers_of(proc.pid)
        assert len(workers) == 2
        assert post(url, {"prompt": "hi", "max_tokens": 3})[0] == 200
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 0, proc.stderr.read()
    deadline = time.monotonic() + 5
    while any(os.path.exists(f"/proc/{w}") for w in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(os.path.exists(f"/proc/{w}") for w in workers)
