"""The official `openai` client against a live servelm server on a tiny model."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import openai
import pytest


@pytest.fixture(scope="module")
def client(server):
    url = server.url
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)


def test_models_and_health(client):
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_completion_non_streaming(client):
    r = client.completions.create(model="tiny", prompt="Once upon", max_tokens=8, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 8 and r.usage.total_tokens == r.usage.prompt_tokens + 8


def test_streamed_text_equals_non_streamed(client):
    kw = dict(model="tiny", prompt="The cat sat", max_tokens=12, temperature=0.9, seed=3)
    full = client.completions.create(**kw).choices[0].text
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full
    assert chunks[-1].usage is not None and chunks[-1].choices == []


def test_chat_streaming_and_not(client):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=10, seed=1)
    text = r.choices[0].message.content
    assert r.choices[0].message.role == "assistant" and r.usage.prompt_tokens > 0
    stream = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=10, seed=1,
                                            stream=True)
    parts = list(stream)
    assert parts[0].choices[0].delta.role == "assistant"
    assert "".join(p.choices[0].delta.content or "" for p in parts) == text
    assert parts[-1].choices[0].finish_reason in ("stop", "length")


def test_n_and_seed_reproducible(client):
    kw = dict(model="tiny", prompt="Dogs", max_tokens=8, n=3, temperature=1.0, seed=42)
    a = client.completions.create(**kw)
    b = client.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]


def test_stop_string(client):
    base = client.completions.create(model="tiny", prompt="Birds", max_tokens=16, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    stop = base[4:7]
    r = client.completions.create(model="tiny", prompt="Birds", max_tokens=16, temperature=0,
                                  stop=[stop], extra_body={"ignore_eos": True})
    assert r.choices[0].text == base[: base.index(stop)] and r.choices[0].finish_reason == "stop"


def test_logprobs(client):
    r = client.completions.create(model="tiny", prompt="Fish", max_tokens=4, temperature=0, logprobs=2,
                                  extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert len(lp.token_logprobs) == len(lp.tokens) == 4
    assert all(len(t) == 2 for t in lp.top_logprobs)
    assert all(v <= 0 for v in lp.token_logprobs)
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}],
                                          max_tokens=3, logprobs=True, top_logprobs=2,
                                          extra_body={"ignore_eos": True})
    assert all(len(c.top_logprobs) == 2 for c in chat.choices[0].logprobs.content)


def _post(url: str, body: bytes | dict) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.mark.parametrize("body, status, words", [
    (b"{not json", 400, ""),
    ({"model": "tiny", "prompt": 5}, 400, "prompt"),
    ({"model": "tiny", "prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ({"model": "tiny", "prompt": "x", "temperature": 7}, 400, "temperature"),
    ({"model": "tiny", "prompt": "x", "n": 100000}, 400, "n"),
    ({"model": "tiny", "prompt": [1, 10**7]}, 400, "token ids"),
    ({"model": "tiny", "prompt": "x " * 5000}, 400, "context window"),
    ({"model": "nope", "prompt": "x"}, 404, "nope"),
])
def test_bad_completion_requests(server, body, status, words):
    url = server.url
    code, payload = _post(url + "/v1/completions", body)
    assert code == status
    assert set(payload["error"]) == {"message", "type", "param", "code"}
    assert words in payload["error"]["message"]
    assert _post(url + "/v1/completions", {"prompt": "still up", "max_tokens": 2})[0] == 200


def test_empty_messages_rejected(server):
    url = server.url
    code, payload = _post(url + "/v1/chat/completions", {"model": "tiny", "messages": []})
    assert code == 400 and "messages" in payload["error"]["message"]


def test_echo_and_unknown_fields(server):
    code, payload = _post(server.url + "/v1/completions",
                          {"model": "tiny", "prompt": "Echo me", "max_tokens": 3, "echo": True,
                           "temperature": 0, "some_future_field": {"x": 1}, "user": "u1"})
    assert code == 200
    assert payload["choices"][0]["text"].startswith("Echo me")
    assert payload["usage"]["completion_tokens"] <= 3
