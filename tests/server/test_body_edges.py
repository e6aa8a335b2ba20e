"""Bodies at the edges: a chunked body (no Content-Length) over the limit is cut off with a
413 in OpenAI's error shape while one under it is served, and a client that trickles its
body does not hold up the others."""

from __future__ import annotations

import http.client
import json
import socket
import time
import urllib.parse
import urllib.request

from servelm.server.guards import ServerOptions

LIMIT = 10_000


def _post_chunked(url: str, total: int) -> tuple[int, dict]:
    u = urllib.parse.urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    conn.putrequest("POST", "/v1/completions")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Transfer-Encoding", "chunked")
    conn.endheaders()
    body = json.dumps({"prompt": "x" * total, "max_tokens": 1}).encode()
    try:
        for i in range(0, len(body), 4096):
            part = body[i:i + 4096]
            conn.send(f"{len(part):x}\r\n".encode() + part + b"\r\n")
        conn.send(b"0\r\n\r\n")
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server may answer and close before the rest is sent
    resp = conn.getresponse()
    return resp.status, json.loads(resp.read())


def test_chunked_body_over_the_limit_is_413(make_server):
    server = make_server(ServerOptions(max_body_bytes=LIMIT))
    status, body = _post_chunked(server.url, 50_000)
    assert status == 413 and "exceeds the limit of 10000 bytes" in body["error"]["message"]
    status, body = _post_chunked(server.url, 100)  # under the limit, chunked: served
    assert status == 200 and body["choices"][0]["finish_reason"] in ("stop", "length")


def test_trickling_client_does_not_block_others(make_server):
    server = make_server()
    u = urllib.parse.urlparse(server.url)
    slow = socket.create_connection((u.hostname, u.port), timeout=10)
    slow.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 1000\r\n\r\n{\"prompt\": ")  # and then nothing for a while
    try:
        start = time.monotonic()
        req = urllib.request.Request(server.url + "/v1/completions",
                                     json.dumps({"prompt": "hi", "max_tokens": 2}).encode(),
                                     {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=20) as resp:
            assert resp.status == 200
        assert time.monotonic() - start < 10
    finally:
        slow.close()
