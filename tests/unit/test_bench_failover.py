"""`bench serve --kill-replica-at`: which replica it kills, and that it really kills it
(a stand-in /health on a local port, pointing at a `sleep` process)."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from servelm.bench.failover import (
    ReplicaKiller,
    fetch_health,
    kill_note,
    pick_victim,
    replicas_of,
    require_replicas,
)


def replica(name, state="ready", in_flight=0, pid=100):
    return {"name": name, "state": state, "pid": pid, "node": "n", "restarts": 0,
            "in_flight": in_flight, "worker_pids": [], "kv_cache_usage": 0.1, "ready_s": 11.0}


def test_the_busiest_ready_replica_is_the_victim():
    reps = [replica("m-0", in_flight=3), replica("m-1", in_flight=5, state="down"),
            replica("m-2", in_flight=4, pid=102), replica("m-3", in_flight=4, pid=103)]
    assert pick_victim(reps)["name"] == "m-2"  # m-1 is busier but already down; tie: first
    assert pick_victim([replica("m-0", state="starting")]) is None
    assert pick_victim([replica("m-0", pid=None)]) is None and pick_victim([]) is None


def test_replicas_of_one_model_or_several_and_none_for_a_single_engine():
    one = {"status": "ok", "router": "prefix-aware", "replicas": [replica("a-0")]}
    assert [r["name"] for r in replicas_of(one)] == ["a-0"]
    several = {"status": "ok", "models": {"a": one, "b": {**one, "replicas": [replica("b-0")]}}}
    assert [r["name"] for r in replicas_of(several)] == ["a-0", "b-0"]
    assert replicas_of({"status": "ok", "replicas": []}) == []  # scaled to zero
    assert replicas_of({"status": "ok"}) is None and replicas_of(None) is None


@pytest.fixture
def health_server():
    """A /health that answers `state["body"]` with `state["code"]`."""
    state = {"code": 200, "body": {"status": "ok"}}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            data = json.dumps(state["body"]).encode()
            self.send_response(state["code"] if self.path == "/health" else 404)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}", state
    srv.shutdown()


def test_the_flag_is_refused_for_a_server_without_replicas(health_server):
    url, state = health_server
    with pytest.raises(ValueError, match="--kill-replica-at .*lists no replicas"):
        require_replicas(url)
    state["code"], state["body"] = 503, {"status": "unhealthy", "replicas": [replica("m-0")]}
    assert fetch_health(url)["status"] == "unhealthy"  # a 503 still has the list
    require_replicas(url)


def test_the_killer_sigkills_the_victim_at_the_given_time(health_server):
    url, state = health_server
    victim = subprocess.Popen(["sleep", "60"])
    try:
        state["body"] = {"status": "ok", "replicas": [replica("m-0", in_flight=1, pid=1),
                                                      replica("m-1", in_flight=2, pid=victim.pid)]}
        killer = ReplicaKiller(url, 0.2)
        killer.start()
        assert victim.wait(timeout=10) == -9
        record = killer.finish()
    finally:
        victim.kill()
    assert record["replica"] == "m-1" and record["pid"] == victim.pid and record["in_flight"] == 2
    assert record["at_s"] >= 0.2
    assert kill_note("x rate inf", record).startswith("x rate inf: killed replica m-1 (pid ")


def test_a_run_that_ends_first_kills_nothing(health_server):
    url, _ = health_server
    killer = ReplicaKiller(url, 30.0)
    killer.start()
    time.sleep(0.01)
    record = killer.finish()
    assert record == {"error": "not killed: the run ended before 30s"}
    assert kill_note("x", record) == "x: --kill-replica-at: not killed: the run ended before 30s"


def test_the_flag_needs_replica_systems_when_launching():
    from servelm.bench.serve import ServeConfig, validate

    validate(ServeConfig(launch=["servelm-replicas-round-robin"], kill_replica_at=2.0))
    with pytest.raises(ValueError, match="--kill-replica-at kills a replica; --launch servelm has"):
        validate(ServeConfig(launch=["servelm", "servelm-replicas"], kill_replica_at=2.0))
    with pytest.raises(ValueError, match="--kill-replica-at must be > 0"):
        validate(ServeConfig(kill_replica_at=0.0))
