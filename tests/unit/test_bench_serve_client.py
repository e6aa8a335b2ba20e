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


def test_an_error_event_in_the_stream_fails_the_request_with_its_message():
    """What a replicas server sends when the replica serving a stream is lost part-way."""
    import asyncio
    import socket

    import aiohttp
    from aiohttp import web

    from servelm.bench.serve_client import stream_request

    async def handler(request):
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b'data: {"choices": [{"index": 0, "text": "Hel"}]}\n\n')
        await resp.write(b'data: {"error": {"message": "replica m-0 was lost after part of '
                         b'the output was streamed", "type": "server_error"}}\n\n')
        await resp.write(b"data: [DONE]\n\n")
        return resp

    async def run():
        app = web.Application()
        app.router.add_post("/v1/completions", handler)
        runner = web.AppRunner(app)
        await runner.setup()
        sock = socket.create_server(("127.0.0.1", 0))
        await web.SockSite(runner, sock).start()
        port = sock.getsockname()[1]
        try:
            async with aiohttp.ClientSession() as session:
                return await stream_request(session, Target(f"http://127.0.0.1:{port}",
                                                            "/v1/completions", "m"),
                                            "hi", 4, 0.0, lambda: 1, len)
        finally:
            await runner.cleanup()

    rec, text = asyncio.run(run())
    assert not rec.success and text == "Hel" and rec.ttft > 0
    assert rec.error == ("error in stream: replica m-0 was lost after part of the output was "
                         "streamed")


def test_extra_body_fields_go_into_every_body():
    fmt = {"type": "json_object"}
    t = Target("http://h", "/v1/chat/completions", "m",
               extra_body=(("response_format", fmt), ("temperature", 0.5)))
    body = request_body(t, [{"role": "user", "content": "x"}], 4)
    assert body["response_format"] == fmt and body["temperature"] == 0.5 and body["stream"] is True
