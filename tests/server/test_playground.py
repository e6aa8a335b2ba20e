"""The web playground in a real headless browser (Debian's chromium, driven by playwright):
the chat page streams an answer with its TTFT and tokens/s, the metrics page draws live
charts, and screenshots of both are saved as test artifacts (test-artifacts/, or
$SERVELM_TEST_ARTIFACTS)."""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(os.environ.get("SERVELM_TEST_ARTIFACTS",
                                Path(__file__).resolve().parents[2] / "test-artifacts"))

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(),
                                reason="needs chromium (make test installs Debian's package as root)")


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        # --no-sandbox: CI runs as root; the network flags keep chromium off the closed internet
        b = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"])
        yield b
        b.close()


@pytest.fixture
def page(browser):
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    exceptions: list[str] = []
    page.console_errors = []  # a refused request shows here too ("Failed to load resource")
    page.on("pageerror", lambda exc: exceptions.append(str(exc)))
    page.on("console", lambda msg: page.console_errors.append(msg.text) if msg.type == "error" else None)
    yield page
    page.close()
    assert not exceptions, f"the page's scripts failed: {exceptions}"


def test_chat_streams_an_answer_with_its_speed(server, page):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.goto(server.url + "/")
    page.wait_for_function("document.getElementById('model').options.length > 0")
    assert page.locator("#model").input_value() == server.model
    page.fill("#system", "You are terse.")
    page.fill("#max_tokens", "48")
    page.fill("#temperature", "0")
    page.fill("#seed", "7")
    # Record the answer's length each time the page changes it: a streamed answer grows.
    page.evaluate("""() => {
        window.lengths = [];
        new MutationObserver(() => {
            const answer = document.querySelector('.msg.assistant .text');
            if (answer) window.lengths.push(answer.textContent.length);
        }).observe(document.getElementById('messages'),
                   {subtree: true, childList: true, characterData: true});
    }""")
    page.fill("#prompt", "Tell me a story about a cat.")
    page.click("#send")

    answer = page.locator(".msg.assistant").first
    page.wait_for_function("document.querySelector('.msg.assistant')?.dataset.state === 'done'",
                           timeout=60_000)
    text = answer.locator(".text").inner_text()
    stats = answer.locator(".stats").inner_text()
    lengths = page.evaluate("window.lengths")
    page.screenshot(path=str(ARTIFACTS / "playground-chat.png"), full_page=True)

    assert text.strip()
    grown = sorted(set(n for n in lengths if n > 0))
    assert len(grown) >= 3, f"the answer did not arrive in pieces: lengths seen {lengths}"
    match = re.fullmatch(r"TTFT (\d+) ms · ([\d.]+) tok/s · (\d+) tokens · (length|stop)", stats)
    assert match, stats
    assert int(match[3]) >= 2 and float(match[2]) > 0
    assert page.locator(".msg.user .text").inner_text() == "Tell me a story about a cat."
    assert not page.console_errors


def test_a_refused_request_shows_the_servers_message(server, page):
    page.goto(server.url + "/")
    page.wait_for_function("document.getElementById('model').options.length > 0")
    page.fill("#temperature", "5")  # the server allows [0, 2]
    page.fill("#prompt", "hello")
    page.click("#send")
    page.wait_for_function("document.querySelector('.msg.assistant')?.dataset.state === 'error'")
    assert "temperature must be in [0, 2]" in page.locator(".msg.assistant .text").inner_text()
    page.fill("#temperature", "0")  # the page still works after an error
    page.fill("#max_tokens", "8")
    page.fill("#prompt", "hello again")
    page.click("#send")
    page.wait_for_function(
        "document.querySelectorAll('.msg.assistant')[1]?.dataset.state === 'done'", timeout=60_000)


def test_metrics_page_draws_live_charts(server, page):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.goto(server.url + "/dashboard")
    for chart in ("requests", "kv", "throughput", "latency"):
        page.wait_for_function(
            f"Number(document.getElementById('chart-{chart}').dataset.samples) >= 2")
    # Load while the page watches, until the charts have seen requests running and tokens
    # flowing (a tiny model's burst can fall between two polls, so the load goes on).
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            _complete(server.url, 200)

    with ThreadPoolExecutor(4) as pool:
        workers = [pool.submit(load) for _ in range(4)]
        try:
            page.wait_for_function(_shows("running", "requests"), timeout=60_000)
            page.wait_for_function(_shows("generated", "throughput"), timeout=60_000)
            page.wait_for_function(_shows("blocks used", "kv"), timeout=60_000)
        finally:
            stop.set()
        for w in workers:
            w.result()
    page.wait_for_function(_shows("end to end", "latency"), timeout=30_000)
    assert page.locator("#status").inner_text().startswith("updated")
    page.screenshot(path=str(ARTIFACTS / "playground-metrics.png"), full_page=True)
    assert not page.console_errors


def _shows(label: str, chart: str) -> str:
    """JS that is true once the chart's `label` series has drawn a value above zero."""
    return f"""() => {{
        const now = document.getElementById('chart-{chart}').parentElement.querySelector('.now');
        const m = now.textContent.match(/{label} ([\\d.]+)/);
        return m !== null && Number(m[1]) > 0;
    }}"""


def _complete(url: str, max_tokens: int) -> None:
    body = json.dumps({"prompt": "Once upon a time", "max_tokens": max_tokens,
                       "ignore_eos": True}).encode()
    req = urllib.request.Request(url + "/v1/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as resp:
        assert resp.status == 200
