"""The newer OpenAI parameters over HTTP with the official openai client: structured outputs
(response_format json_object and json_schema, vLLM's guided_* fields; a bad schema or two
constraints at once is a 400 naming the field), logit_bias, suffix refused, logprobs in
streamed chunks, and the error statuses in the published OpenAPI schema."""

from __future__ import annotations

import json
import urllib.request

import openai
import pytest

SCHEMA = {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]},
                                           "days": {"type": "integer", "minimum": 1, "maximum": 9}},
          "required": ["city", "days"], "additionalProperties": False}


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def test_chat_json_schema_streamed_and_not(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "trip", "schema": SCHEMA, "strict": True}}
    kw = dict(model="tiny", messages=[{"role": "user", "content": "plan"}], max_tokens=64, seed=4,
              response_format=fmt)
    full = client.chat.completions.create(**kw).choices[0]
    assert full.finish_reason == "stop"
    value = json.loads(full.message.content)
    assert value["city"] in ("Paris", "Oslo") and 1 <= value["days"] <= 9
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kw)
                       if c.choices)
    assert streamed == full.message.content


def test_chat_json_object(client):
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "json"}],
                                       max_tokens=128, seed=1, response_format={"type": "json_object"})
    choice = r.choices[0]
    if choice.finish_reason == "stop":
        assert isinstance(json.loads(choice.message.content), dict)


def test_completions_guided_fields(client):
    r = client.completions.create(model="tiny", prompt="pick", max_tokens=16, n=3, seed=2,
                                  extra_body={"guided_choice": ["alpha", "beta"]})
    assert {c.text for c in r.choices} <= {"alpha", "beta"}
    r = client.completions.create(model="tiny", prompt="code", max_tokens=16, seed=2,
                                  extra_body={"guided_regex": "[A-Z]{2}[0-9]{2}"})
    assert len(r.choices[0].text) == 4 and r.choices[0].text[:2].isupper()


@pytest.mark.parametrize("extra,field", [
    ({"guided_json": {"type": "object", "properties": {"a": {"type": "bogus"}}}}, "structured_outputs.json"),
    ({"guided_regex": "a", "guided_choice": ["b"]}, "give one of"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
])
def test_bad_constraints_are_400(client, extra, field):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="tiny", prompt="x", max_tokens=4, extra_body=extra)
    assert field in str(info.value)


def test_logit_bias_and_suffix(client, server):
    r = client.completions.create(model="tiny", prompt="a", max_tokens=4, temperature=0,
                                  logit_bias={"42": 100}, extra_body={"ignore_eos": True})
    body = json.dumps({"tokens": [42] * 4}).encode()
    req = urllib.request.Request(server.url + "/detokenize", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert r.choices[0].text == json.loads(resp.read())["prompt"]
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="tiny", prompt="def f(", suffix="return x", max_tokens=4)
    assert "suffix is not supported" in str(info.value)


def test_openapi_documents_the_error_statuses(server):
    with urllib.request.urlopen(server.url + "/openapi.json", timeout=10) as resp:
        schema = json.loads(resp.read())
    for path in ("/v1/completions", "/v1/chat/completions"):
        responses = schema["paths"][path]["post"]["responses"]
        assert {"200", "400", "401", "404", "413", "503"} <= set(responses) and "422" not in responses
        ref = responses["400"]["content"]["application/json"]["schema"]["$ref"]
        assert ref.endswith("/ErrorResponse")
    assert set(schema["components"]["schemas"]["ErrorDetail"]["properties"]) == {"message", "type", "param", "code"}


def test_streamed_logprobs_add_up_to_the_unstreamed(client):
    kw = dict(model="tiny", prompt="Once", max_tokens=10, temperature=0, logprobs=2, n=2,
              extra_body={"ignore_eos": True})
    full = client.completions.create(**kw).choices[0].logprobs
    chunks = [c for c in client.completions.create(stream=True, **kw) if c.choices and c.choices[0].index == 0]
    # (batches of other shapes: float noise)
    assert sum((c.choices[0].logprobs.token_logprobs for c in chunks), []) == pytest.approx(full.token_logprobs, abs=1e-4)
    assert sum((c.choices[0].logprobs.tokens for c in chunks), []) == full.tokens
    msgs = [{"role": "user", "content": "hi"}]
    ckw = dict(model="tiny", messages=msgs, max_tokens=8, temperature=0, logprobs=True, top_logprobs=2)
    whole = client.chat.completions.create(**ckw).choices[0].logprobs.content
    parts = [item for c in client.chat.completions.create(stream=True, **ckw)
             if c.choices and c.choices[0].logprobs for item in c.choices[0].logprobs.content]
    assert [p.token for p in parts] == [w.token for w in whole]
    assert [p.logprob for p in parts] == pytest.approx([w.logprob for w in whole], abs=1e-4)


def test_n_streamed_assembles_to_the_unstreamed_choices(client):
    """n > 1 with stream: the chunks of each index put together give that choice's text
    and finish reason as the unstreamed call returns them (same seed)."""
    kw = dict(model="tiny", max_tokens=12, n=3, temperature=1.0, seed=5)
    whole = client.completions.create(prompt="Cats", **kw).choices
    texts, finish = {}, {}
    for c in client.completions.create(prompt="Cats", stream=True, **kw):
        for ch in c.choices:
            texts[ch.index] = texts.get(ch.index, "") + ch.text
            finish[ch.index] = ch.finish_reason or finish.get(ch.index)
    assert [texts[i] for i in range(3)] == [c.text for c in whole]
    assert [finish[i] for i in range(3)] == [c.finish_reason for c in whole]

    msgs = [{"role": "user", "content": "hi"}]
    whole = client.chat.completions.create(messages=msgs, **kw).choices
    texts = {}
    for c in client.chat.completions.create(messages=msgs, stream=True, **kw):
        for ch in c.choices:
            texts[ch.index] = texts.get(ch.index, "") + (ch.delta.content or "")
    assert [texts[i] for i in range(3)] == [c.message.content for c in whole]
