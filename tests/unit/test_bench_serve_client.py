"""Request bodies and token counting of the serving load generator's client."""

from __future__ import annotations

from servelm.bench.serve_client import Target, _output_tokens, request_body


def test_body_for_completions_and_chat():
    t = Target("http://h", "/v1/completions", "m")
    body = request_body(t, "hi", 7)
    assert body["prompt"] == "hi" and body["max_tokens"] == 7 and body["stream"] is True
    assert body["stream_options"] == {"include_usage": True} and "ignore_eos" not in body
    chat = Target("http://h", "/v1/chat/completions", "m")
    assert chat.chat and request_body(chat, [{"role": "user", "content": "x"}], 3)["messages"]


def test_ignore_eos_also_bans_special_tokens_via_logit_bias():
    t = Target("http://h", "/v1/completions", "m", ignore_eos=True, banned_token_ids=(0, 2))
    body = request_body(t, "hi", 5)
    assert body["ignore_eos"] is True and body["logit_bias"] == {"0": -100, "2": -100}


def test_output_token_count_prefers_server_usage_then_length_stop():
    def count(text):
        return len(text.split())

    assert _output_tokens({"completion_tokens": 9}, "length", 5, 3, "a b", count) == 9
    assert _output_tokens(None, "length", 5, 3, "a b", count) == 5
    assert _output_tokens(None, "stop", 5, 3, "a b", count) == 3  # never below the chunk count
    assert _output_tokens(None, "stop", 5, 1, "a b c d", count) == 4
