"""A live servelm HTTP server on a tiny model, on a free 127.0.0.1 port, per test module."""

from __future__ import annotations

import socket
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

import pytest
import uvicorn
from leaks import assert_no_leaks

from servelm.config import EngineConfig
from servelm.engine.async_engine import AsyncLLM
from servelm.server.app import build_app
from servelm.server.guards import ServerOptions


@dataclass
class LiveServer:
    url: str
    llm: AsyncLLM
    model: str = "tiny"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(llm: AsyncLLM, options: ServerOptions | None = None) -> tuple[LiveServer, uvicorn.Server, threading.Thread]:
    port = free_port()
    config = uvicorn.Config(build_app(llm, LiveServer.model, options), host="127.0.0.1", port=port,
                            log_level="warning")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/health", timeout=1) as resp:
                if resp.status == 200:
                    break
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.1)
    return LiveServer(url, llm), srv, thread


@pytest.fixture(scope="module")
def make_server(tiny_model_dir):
    """Factory: `make_server(ServerOptions(...), **engine_options)` -> LiveServer; all stopped
    and checked after."""
    running = []

    def make(options: ServerOptions | None = None, **engine) -> LiveServer:
        llm = AsyncLLM(EngineConfig(model=str(tiny_model_dir("llama")), block_size=4,
                                    num_kv_blocks=256, max_num_batched_tokens=64, **engine))
        live, srv, thread = start_server(llm, options)
        running.append((live, srv, thread))
        return live

    yield make
    for live, srv, thread in running:
        srv.should_exit = True
        thread.join(timeout=10)
        live.llm.shutdown()
        assert_no_leaks(live.llm.engine)


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def server(make_server) -> LiveServer:
    return make_server()
