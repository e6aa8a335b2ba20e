"""The server's own counters around a measured run: prefix-cache hit rate, requests per
replica, retries and failures, handovers and live migrations, preemptions, read from its
Prometheus /metrics before and after.

The client cannot see where a request went or what the cache found; the server counts both.
Deltas are per series and summed, so several replicas add up, and a series that went down
(a replica restarted after a kill, its engine counters from zero) counts from zero, as
Prometheus' rate() does. The hits a killed replica made before dying are lost with it.
Servers without these series (llama-server) give no figures, not zeros.
"""

from __future__ import annotations

import re
import urllib.error
import urllib.request
from typing import Any

Labels = tuple[tuple[str, str], ...]
Samples = dict[tuple[str, Labels], float]

HITS = "servelm:prefix_cache_hits_total"
QUERIES = "servelm:prefix_cache_queries_total"
ROUTED = "servelm:router_requests_routed_total"
RETRIED = "servelm:router_requests_retried_total"
FAILED = "servelm:router_requests_failed_total"
HANDOVERS = "servelm:kv_handovers_total"
MIGRATIONS = "servelm:migrations_total"
PREEMPTIONS = "servelm:num_preemptions_total"

_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_metrics(text: str) -> Samples:
    """Prometheus text exposition -> {(name, sorted labels): value}."""
    samples: Samples = {}
    for line in text.splitlines():
        m = _LINE.match(line.strip())
        if m is None:  # comments (# HELP, # TYPE) and blank lines
            continue
        name, labels, value = m.groups()
        try:
            samples[(name, tuple(sorted(_LABEL.findall(labels or ""))))] = float(value)
        except ValueError:
            continue
    return samples


def scrape(base_url: str, timeout_s: float = 10.0) -> Samples | None:
    """The server's /metrics, or None when it has none (or does not answer)."""
    try:
        with urllib.request.urlopen(base_url.rstrip("/") + "/metrics", timeout=timeout_s) as resp:
            return parse_metrics(resp.read().decode("utf-8", "replace"))
    except (urllib.error.URLError, ConnectionError, TimeoutError, ValueError):
        return None


def _delta(before: Samples, after: Samples, name: str) -> dict[Labels, float] | None:
    """Per series of `name`: after - before, counting from zero a series that went down."""
    series = {lab: v for (n, lab), v in after.items() if n == name}
    if not series:
        return None
    out = {}
    for lab, v in series.items():
        old = before.get((name, lab), 0.0)
        out[lab] = v - old if v >= old else v
    return out


def counter_deltas(before: Samples | None, after: Samples | None) -> dict[str, Any]:
    """What the server counted during the run; {} when it exposes none of these series."""
    if before is None or after is None:
        return {}
    out: dict[str, Any] = {}
    hits, queries = _delta(before, after, HITS), _delta(before, after, QUERIES)
    if hits is not None and queries is not None:
        h, q = sum(hits.values()), sum(queries.values())
        out.update(prefix_cache_hit_tokens=int(h), prefix_cache_query_tokens=int(q),
                   prefix_cache_hit_rate=h / q if q else None)
    routed = _delta(before, after, ROUTED)
    if routed is not None:
        several = len({dict(lab).get("model") for lab in routed}) > 1
        names = {lab: (f"{dict(lab).get('model')}/" if several else "") + dict(lab).get("replica", "?")
                 for lab in routed}
        out["requests_per_replica"] = {names[lab]: int(v) for lab, v in
                                       sorted(routed.items(), key=lambda kv: names[kv[0]])}
    for key, name in (("requests_retried", RETRIED), ("requests_failed", FAILED),
                      ("kv_handovers", HANDOVERS), ("migrations", MIGRATIONS),
                      ("num_preemptions", PREEMPTIONS)):
        d = _delta(before, after, name)
        if d is not None:
            out[key] = int(sum(d.values()))
    return out


def counter_notes(where: str, counters: dict[str, Any]) -> list[str]:
    """One report line per figure the server gave."""
    notes = []
    if "prefix_cache_hit_rate" in counters:
        rate = counters["prefix_cache_hit_rate"]
        notes.append(f"{where}: prefix-cache hit rate "
                     f"{'-' if rate is None else f'{rate:.1%}'} "
                     f"({counters['prefix_cache_hit_tokens']} of "
                     f"{counters['prefix_cache_query_tokens']} prompt tokens, server counters)")
    if counters.get("requests_per_replica"):
        notes.append(f"{where}: requests per replica " + ", ".join(
            f"{name} {n}" for name, n in counters["requests_per_replica"].items()))
    if "requests_retried" in counters or "requests_failed" in counters:
        notes.append(f"{where}: router retried {counters.get('requests_retried', 0)}, "
                     f"failed {counters.get('requests_failed', 0)} (server counters)")
    if counters.get("kv_handovers") or counters.get("migrations"):
        notes.append(f"{where}: prefill->decode handovers {counters.get('kv_handovers', 0)}, "
                     f"live migrations {counters.get('migrations', 0)} (server counters)")
    return notes
