"""A client that trickles its body does not hold up the others."""

from __future__ import annotations

import json
import socket
import time
import urllib.parse
import urllib.request


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
