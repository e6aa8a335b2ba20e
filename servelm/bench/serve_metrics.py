"""Serving metrics from per-request timestamps, with vLLM's definitions and key names.

Definitions (all per request, from the client's clock):
- TTFT: request sent -> first chunk carrying generated text.
- ITL: gaps between successive text-carrying chunks (a chunk may hold several tokens).
- TPOT: (E2EL - TTFT) / (output tokens - 1), only for requests with more than one token.
- E2EL: request sent -> stream finished.
Goodput counts requests per second that met every given SLO (TPOT of a one-token request
counts as 0). Keys match `vllm bench serve` result files so tools can read either.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

METRICS = ("ttft", "tpot", "itl", "e2el")
SLO_METRICS = ("ttft", "tpot", "e2el")


@dataclass
class RequestRecord:
    """What one streamed request did. Times in seconds; `start` is relative to the run start."""

    success: bool
    prompt_len: int = 0
    output_len: int = 0
    ttft: float = 0.0
    itl: list[float] = field(default_factory=list)
    latency: float = 0.0
    start: float = 0.0
    error: str = ""
    session: int = 0
    turn: int = 0

    @property
    def tpot(self) -> float | None:
        if self.output_len < 2:
            return None
        return (self.latency - self.ttft) / (self.output_len - 1)


def percentile_key(p: float) -> str:
    """'p99', 'p99.9': vLLM's spelling of a percentile in key names."""
    return f"p{int(p)}" if float(p).is_integer() else f"p{p}"


def parse_goodput(items: list[str] | None) -> dict[str, float]:
    """`["ttft:500", "tpot:50"]` -> {"ttft": 500.0, "tpot": 50.0} (milliseconds)."""
    slos: dict[str, float] = {}
    for item in items or []:
        name, sep, value = item.partition(":")
        if not sep or name not in SLO_METRICS:
            raise ValueError(f"--goodput: expected NAME:MS with NAME one of {SLO_METRICS}, "
                             f"got {item!r}")
        try:
            ms = float(value)
        except ValueError:
            raise ValueError(f"--goodput: {name} needs a number of milliseconds, got {value!r}") from None
        if not ms > 0:
            raise ValueError(f"--goodput: {name} must be > 0 ms, got {value!r}")
        slos[name] = ms
    return slos


def meets_slos(r: RequestRecord, slos: dict[str, float]) -> bool:
    values_ms = {"ttft": r.ttft * 1e3, "tpot": (r.tpot or 0.0) * 1e3, "e2el": r.latency * 1e3}
    return all(values_ms[name] <= limit for name, limit in slos.items())


def _stats(name: str, values_s: list[float], percentiles: list[float],
           with_percentiles: bool) -> dict[str, float]:
    ms = np.asarray(values_s, dtype=np.float64) * 1e3
    if ms.size == 0:
        ms = np.zeros(1)  # vLLM reports 0 for a metric with no samples; so do we
    out = {f"mean_{name}_ms": float(ms.mean()), f"median_{name}_ms": float(np.median(ms)),
           f"std_{name}_ms": float(ms.std())}
    if with_percentiles:
        for p in percentiles:
            out[f"{percentile_key(p)}_{name}_ms"] = float(np.percentile(ms, p))
    return out


def metric_samples(records: list[RequestRecord]) -> dict[str, list[float]]:
    """Seconds per metric over successful requests (ITL flattened over all of them)."""
    ok = [r for r in records if r.success]
    return {
        "ttft": [r.ttft for r in ok],
        "tpot": [t for r in ok if (t := r.tpot) is not None],
        "itl": [g for r in ok for g in r.itl],
        "e2el": [r.latency for r in ok],
    }


def compute_metrics(records: list[RequestRecord], duration_s: float,
                    percentiles: list[float] | None = None,
                    percentile_metrics: list[str] | None = None,
                    slos: dict[str, float] | None = None) -> dict[str, Any]:
    """The result dict of one run. `duration_s` is wall time from first send to last finish."""
    if duration_s <= 0:
        raise ValueError(f"duration_s must be > 0, got {duration_s}")
    percentiles = [99.0] if percentiles is None else percentiles
    percentile_metrics = list(METRICS) if percentile_metrics is None else percentile_metrics
    ok = [r for r in records if r.success]
    failed = [r for r in records if not r.success]
    n_in = sum(r.prompt_len for r in ok)
    n_out = sum(r.output_len for r in ok)
    result: dict[str, Any] = {
        "completed": len(ok), "failed": len(failed),
        "failed_reasons": dict(Counter(r.error[:200] or "unknown" for r in failed).most_common()),
        "duration": duration_s, "duration_s": duration_s,
        "total_input_tokens": n_in, "total_output_tokens": n_out,
        "request_throughput": len(ok) / duration_s,
        "output_throughput": n_out / duration_s,
        "total_token_throughput": (n_in + n_out) / duration_s,
        "request_goodput": None, "goodput_slos_ms": dict(slos or {}),
        "max_concurrent_requests": max_concurrency(records),
    }
    if slos:
        result["request_goodput"] = sum(meets_slos(r, slos) for r in ok) / duration_s
        result["goodput_fraction"] = sum(meets_slos(r, slos) for r in ok) / max(1, len(records))
    samples = metric_samples(records)
    for name in METRICS:
        result.update(_stats(name, samples[name], percentiles, name in percentile_metrics))
    return result


def max_concurrency(records: list[RequestRecord]) -> int:
    """Most requests in flight at once, from their start and end times."""
    events = sorted([(r.start, 1) for r in records] + [(r.start + r.latency, -1) for r in records],
                    key=lambda e: (e[0], e[1]))
    peak = cur = 0
    for _, delta in events:
        cur += delta
        peak = max(peak, cur)
    return peak
