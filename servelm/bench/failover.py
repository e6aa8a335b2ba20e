"""`bench serve --kill-replica-at S`: SIGKILL one replica of a replicas server S seconds into
each measured run, to show what a lost replica costs the clients.

The victim is the ready replica serving the most requests, read from /health at that moment:
the worst case, since every request it holds must be retried or, for a stream already under
way, fails. The server runs on this machine, so the replica's pid from /health is killed
directly. Before each run the bench waits for every replica to be ready again (Ray restarts
the killed one), so every rate starts from the full set.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import urllib.error
import urllib.request
from typing import Any

FLAG = "--kill-replica-at"


def fetch_health(base_url: str, timeout_s: float = 10.0) -> dict[str, Any] | None:
    """/health's JSON body, also when it answers 503 (a replica down); None without one."""
    url = base_url.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            body = resp.read()
    except urllib.error.HTTPError as e:
        body = e.read()
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None
    try:
        health = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return health if isinstance(health, dict) else None


def replicas_of(health: dict[str, Any] | None) -> list[dict[str, Any]] | None:
    """Every replica /health lists (of every model), or None when it lists none at all."""
    if not health:
        return None
    if isinstance(health.get("replicas"), list):
        return health["replicas"]
    models = health.get("models")
    if isinstance(models, dict) and any(isinstance(m.get("replicas"), list) for m in models.values()):
        return [r for m in models.values() for r in m.get("replicas") or []]
    return None


def pick_victim(replicas: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The ready replica with the most requests in flight (the first listed on a tie)."""
    ready = [r for r in replicas if r.get("state") == "ready" and r.get("pid")]
    return max(ready, key=lambda r: r.get("in_flight") or 0, default=None)


def require_replicas(base_url: str) -> None:
    if replicas_of(fetch_health(base_url)) is None:
        raise ValueError(f"{FLAG} kills a replica of a server started with `servelm serve "
                         f"--replicas N`; {base_url}/health lists no replicas")


def wait_all_ready(base_url: str, timeout_s: float = 300.0) -> None:
    """Until every replica /health lists is ready (the one killed last run is back)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        replicas = replicas_of(fetch_health(base_url)) or []
        if replicas and all(r.get("state") == "ready" for r in replicas):
            return
        time.sleep(0.5)
    raise RuntimeError(f"{FLAG}: replicas at {base_url} not all ready again after {timeout_s:.0f}s")


class ReplicaKiller:
    """Kills the victim `at_s` seconds after start() on its own thread, so the load
    generator's event loop is never held up; finish() says what it did."""

    def __init__(self, base_url: str, at_s: float) -> None:
        self.base_url, self.at_s = base_url, at_s
        self.record: dict[str, Any] = {}
        self._timer = threading.Timer(at_s, self._kill)
        self._start = 0.0

    def start(self) -> None:
        self._start = time.perf_counter()
        self._timer.start()

    def _kill(self) -> None:
        victim = pick_victim(replicas_of(fetch_health(self.base_url)) or [])
        at = time.perf_counter() - self._start
        if victim is None:
            self.record = {"at_s": at, "error": "no ready replica to kill"}
            return
        try:
            os.kill(int(victim["pid"]), signal.SIGKILL)
        except OSError as e:  # gone already, or not on this machine
            self.record = {"at_s": at, "replica": victim["name"], "pid": victim["pid"],
                           "error": f"{type(e).__name__}: {e}"}
            return
        self.record = {"at_s": at, "replica": victim["name"], "pid": victim["pid"],
                       "in_flight": victim.get("in_flight")}

    def finish(self) -> dict[str, Any]:
        self._timer.cancel()
        self._timer.join()
        return self.record or {"error": f"not killed: the run ended before {self.at_s:g}s"}


def kill_note(where: str, record: dict[str, Any]) -> str:
    if "replica" not in record:
        return f"{where}: {FLAG}: {record['error']}"
    if "error" in record:
        return (f"{where}: {FLAG}: could not kill replica {record['replica']} "
                f"(pid {record['pid']}): {record['error']}")
    return (f"{where}: killed replica {record['replica']} (pid {record['pid']}, "
            f"{record['in_flight']} in flight) at {record['at_s']:.1f}s")
