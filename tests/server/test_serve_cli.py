"""`servelm serve` as a real process: banner, a request, clean exit 0 on SIGTERM."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.request


def wait_until_up(url: str, within: float) -> None:
    """Poll /health until the server answers (a started process takes seconds)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/health", timeout=1):
                return
        except OSError:
            time.sleep(0.2)


def test_serve_and_sigterm(tiny_model_dir, port):
    proc = subprocess.Popen([sys.executable, "-m", "servelm.cli", "serve", str(tiny_model_dir("llama")),
                             "--port", str(port), "--served-model-name", "tiny", "--shutdown-timeout", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_up(url, 60)
        req = urllib.request.Request(url + "/v1/completions", data=json.dumps(
            {"model": "tiny", "prompt": "hi", "max_tokens": 3}).encode(),
            headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            assert json.loads(resp.read())["usage"]["completion_tokens"] >= 1
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    stderr = proc.stderr.read()
    assert code == 0, stderr
    assert f"http://127.0.0.1:{port}/v1" in stderr  # startup banner
    assert "prompt=" in stderr and "latency=" in stderr  # one log line per request
