"""Prometheus metrics, named like vLLM's with a `servelm:` prefix.

Engine state (queue sizes, KV usage, token counters) is read at scrape time by a custom
collector, so the engine loop does no metrics work; latency histograms are observed by the
server as each request's stream progresses.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from servelm.outputs import RequestOutput

logger = logging.getLogger("servelm.server")

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24,
                    20.48, 40.96, 81.92)


Snapshots = Callable[[], list[tuple[dict[str, str], dict[str, float]]]]
Rows = Callable[[], list[tuple[str, str, str, dict[str, str], float]]]


class _EngineCollector:
    """Each engine's figures as one series per engine: unlabelled for the one engine of a
    plain server, labelled with `model` and `replica` for replicas on a cluster."""

    def __init__(self, snapshots: Snapshots) -> None:
        self.snapshots = snapshots

    def collect(self):
        snaps = self.snapshots()
        labels = sorted({k for lab, _ in snaps for k in lab})

        def family(kind, name: str, key: str, doc: str):
            fam = kind(name, doc, labels=labels)
            for lab, m in snaps:
                fam.add_metric([lab.get(k, "") for k in labels], m[key])
            return fam

        for name, key, doc in (
            ("servelm:num_requests_running", "num_requests_running", "Sequences in the running batch."),
            ("servelm:num_requests_waiting", "num_requests_waiting", "Sequences waiting to be scheduled."),
            ("servelm:kv_cache_usage_perc", "kv_cache_usage", "Fraction of KV-cache blocks in use (0..1)."),
            ("servelm:spec_decode_acceptance_rate", "spec_acceptance_rate",
             "Accepted / proposed draft tokens since start."),
            ("servelm:spec_decode_mean_accepted_length", "spec_mean_accepted_length",
             "Draft tokens accepted per verification step since start."),
        ):
            yield family(GaugeMetricFamily, name, key, doc)
        for name, key, doc in (
            ("servelm:prompt_tokens", "prompt_tokens_total", "Prompt tokens processed."),
            ("servelm:generation_tokens", "generation_tokens_total", "Tokens generated."),
            ("servelm:num_preemptions", "num_preemptions", "Sequences preempted."),
            ("servelm:prefix_cache_queries", "prefix_cache_query_tokens",
             "Prompt tokens looked up in the prefix cache."),
            ("servelm:prefix_cache_hits", "prefix_cache_hit_tokens",
             "Prompt tokens found in the prefix cache."),
            ("servelm:spec_decode_num_draft_tokens", "spec_proposed_tokens",
             "Draft tokens proposed and verified (speculative decoding)."),
            ("servelm:spec_decode_num_accepted_tokens", "spec_accepted_tokens",
             "Draft tokens accepted by verification."),
            ("servelm:spec_decode_num_drafts", "spec_num_drafts",
             "Verification steps (one per request and step with drafts)."),
            ("servelm:kv_offloaded_blocks", "num_offloaded_blocks",
             "Evicted prefix-cache blocks saved to the CPU tier."),
            ("servelm:kv_restored_blocks", "num_restored_blocks",
             "Prefix-cache blocks restored from the CPU tier instead of recomputed."),
        ):
            yield family(CounterMetricFamily, name, key, doc)


class _RowCollector:
    """Series given as rows (a replica pool's counts), one family per name."""

    def __init__(self, rows: Rows) -> None:
        self.rows = rows

    def collect(self):
        families: dict[str, Any] = {}
        for kind, name, doc, labels, value in self.rows():
            fam = families.get(name)
            if fam is None:
                cls = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
                fam = families[name] = cls(name, doc, labels=sorted(labels))
            fam.add_metric([labels[k] for k in sorted(labels)], value)
        yield from families.values()


class ServerMetrics:
    def __init__(self, snapshots: Snapshots, rows: Rows | None = None) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(snapshots))
        if rows is not None:
            self.registry.register(_RowCollector(rows))

        def hist(name: str, doc: str) -> Histogram:
            return Histogram(name, doc, buckets=_LATENCY_BUCKETS, registry=self.registry)

        self.ttft = hist("servelm:time_to_first_token_seconds", "Time to first token.")
        self.itl = hist("servelm:inter_token_latency_seconds", "Time between streamed outputs.")
        self.e2e = hist("servelm:e2e_request_latency_seconds", "Arrival to finish.")
        self.queue = hist("servelm:request_queue_time_seconds", "Arrival to first scheduled.")

    def render(self) -> bytes:
        return generate_latest(self.registry)

    async def observe(self, stream: AsyncIterator[RequestOutput]) -> AsyncIterator[RequestOutput]:
        """Pass a request's outputs through, recording its latencies and logging one line
        when it finishes."""
        start = time.monotonic()
        last = None
        try:
            async for out in stream:
                now = time.monotonic()
                if last is None:
                    self.ttft.observe(now - start)
                else:
                    self.itl.observe(now - last)
                last = now
                if out.finished:
                    self.e2e.observe(now - start)
                    m = out.metrics
                    if m is not None and m.first_scheduled_time is not None:
                        self.queue.observe(max(0.0, m.first_scheduled_time - m.arrival_time))
                    logger.info("%s prompt=%d generated=%d latency=%.3fs", out.request_id,
                                len(out.prompt_token_ids), sum(len(c.token_ids) for c in out.outputs),
                                now - start)
                yield out
        finally:
            await stream.aclose()  # a client that left aborts its request now, not at GC
