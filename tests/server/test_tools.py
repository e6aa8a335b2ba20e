"""Tool calls on chat completions with the official openai client: a required or named call
is always a parseable call of a declared function, streamed as deltas the client
assembles into the same calls; Hermes-style <tool_call> blocks in free text are parsed out;
earlier calls and tool answers are accepted back; bad tools are a 400."""

from __future__ import annotations

import json

import openai
import pytest

from servelm.server import tools

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]}, "celsius": {"type": "boolean"}},
    "required": ["city", "celsius"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
    "additionalProperties": False}}}
MSGS = [{"role": "user", "content": "weather?"}]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def _check_calls(calls, names):
    assert calls
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_") and call.function.name in names
        args = json.loads(call.function.arguments)
        if call.function.name == "get_weather":
            assert args["city"] in ("Paris", "Oslo") and isinstance(args["celsius"], bool)
        else:
            assert args == {"zone": "UTC"} or args == {"zone": "CET"}


@pytest.mark.parametrize("choice,names", [
    ("required", {"get_weather", "get_time"}),
    ({"type": "function", "function": {"name": "get_time"}}, {"get_time"}),
])
def test_required_and_named_calls_streamed_and_not(client, choice, names):
    kw = dict(model="tiny", messages=MSGS, tools=[WEATHER, TIME], tool_choice=choice, max_tokens=120,
              seed=3, temperature=0.7)
    r = client.chat.completions.create(**kw).choices[0]
    assert r.finish_reason == "tool_calls"
    _check_calls(r.message.tool_calls, names)
    assembled: dict[int, dict] = {}
    finish = None
    for chunk in client.chat.completions.create(stream=True, **kw):
        if not chunk.choices:
            continue
        for d in chunk.choices[0].delta.tool_calls or []:
            entry = assembled.setdefault(d.index, {"name": "", "arguments": ""})
            entry["name"] += d.function.name or ""
            entry["arguments"] += d.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls"
    assert [(e["name"], json.loads(e["arguments"])) for _, e in sorted(assembled.items())] == [
        (c.function.name, json.loads(c.function.arguments)) for c in r.message.tool_calls]


def test_tool_results_go_back_in(client):
    history = MSGS + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Oslo", "celsius": true}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "-3"}]
    r = client.chat.completions.create(model="tiny", messages=history, tools=[WEATHER], tool_choice="none",
                                       max_tokens=5)
    assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize("kw,message", [
    ({"tools": [{"type": "function"}]}, "tools[0]"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "not in tools"),
    ({"tool_choice": "required"}, "needs tools"),
    ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice must be"),
])
def test_bad_tools_are_400(client, kw, message):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=4, **kw)
    assert message in str(info.value)


def test_hermes_blocks_in_free_text():
    text = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>\n'
            '<tool_call>{"name": "get_time", "arguments": {"zone": "UTC"}}</tool_call><tool_call>oops</tool_call>')
    content, calls = tools.parse(text, "auto")
    assert content == "Let me check.\n<tool_call>oops</tool_call>"
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("get_weather", {"city": "Oslo"}), ("get_time", {"zone": "UTC"})]
    assert tools.parse("no calls here", "auto") == ("no calls here", [])
    assert tools.held_back("abc <tool") == 5 and tools.held_back("abc <tool_call>{") == 12
    assert tools.held_back("abc") == 0 and tools.held_back("x<") == 1
