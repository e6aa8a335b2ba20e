"""Serving metrics from per-request timestamps, with vLLM's definitions and key names.

Definitions (all per request, from the client's clock):
- TTFT: request sent -> first chunk carrying generated text.
- ITL: gaps between successive text-carrying chunks (a chunk may hold several tokens).
- TPOT: (E2EL - TTFT) / (output tokens - 1), only for requests with more than one token.
- E2EL: request sent -> stream finished.
Goodput counts requests per second that met every given SLO (TPOT of a one-token request
counts as 0). Keys match `vllm bench serve` result files so tools can read either.
The fluidity-index (Etalon, Agrawal et al. 2024) is the share of token deadlines met; see
fluidity_index.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

METRICS = ("ttft", "tpot", "itl", "e2el")
SLO_METRICS = ("ttft", "tpot", "e2el")


@dataclass(slots=True)
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


def parse_fluidity(text: str | None) -> tuple[float, float] | None:
    """`"2000:100"` -> (2000.0, 100.0): TTFT and TBT targets in ms; None when the flag is absent."""
    if text is None:
        return None
    ttft, sep, tbt = text.partition(":")
    try:
        targets = (float(ttft), float(tbt)) if sep else None
    except ValueError:
        targets = None
    if targets is None:
        raise ValueError(f"--fluidity: expected TTFT_MS:TBT_MS in milliseconds, e.g. 2000:100, "
                         f"got {text!r}")
    if not all(math.isfinite(v) and v > 0 for v in targets):
        raise ValueError(f"--fluidity: both targets must be finite and > 0 ms, got {text!r}")
    return targets


def chunk_tokens(output_len: int, chunks: int) -> list[int]:
    """Tokens per text chunk when only the total is known (the stream does not say).

    An even share each, at least one per chunk, the remainder on the last chunks: a chunk's
    extra tokens bank slack for the tokens after them, so the guess gives no early credit.
    """
    if chunks < 1:
        raise ValueError(f"chunks must be >= 1, got {chunks}")
    base, extra = divmod(max(output_len, chunks), chunks)
    return [base + (i >= chunks - extra) for i in range(chunks)]


def deadline_misses(ttft_s: float, itl_s: Sequence[float], tokens_per_chunk: Sequence[int],
                    ttft_target_s: float, tbt_target_s: float) -> tuple[int, int]:
    """(missed, total) token deadlines of one request: Algorithm 1 of Etalon.

    The first token is due ttft_target_s after sending, each next one tbt_target_s after the
    previous deadline, so time saved early (slack) carries forward. A token late by L counts
    1 + floor(L / TBT) misses (a long stall costs more than a short one) and restarts the
    schedule from when it came, so one stall does not fail every later token. A chunk's k
    tokens arrive together: its first is judged, the other k-1 are on time and bank slack.
    """
    if len(tokens_per_chunk) != len(itl_s) + 1 or min(tokens_per_chunk) < 1:
        raise ValueError(f"tokens_per_chunk needs one count >= 1 per chunk ({len(itl_s) + 1}), "
                         f"got {list(tokens_per_chunk)}")
    if not (ttft_target_s > 0 and tbt_target_s > 0):
        raise ValueError(f"deadline targets must be > 0, got {ttft_target_s}, {tbt_target_s}")
    missed = total = 0
    slack = 0.0
    for i, (gap, k) in enumerate(zip([ttft_s, *itl_s], tokens_per_chunk)):
        due = ttft_target_s if i == 0 else tbt_target_s
        if gap <= due + slack:
            slack += due - gap
            total += 1
        else:
            misses = int((gap - slack - due) // tbt_target_s) + 1
            missed += misses
            total += misses
            slack = 0.0
        slack += (k - 1) * tbt_target_s
        total += k - 1
    return missed, total


def fluidity_index(records: list[RequestRecord], ttft_ms: float | Callable[[int], float],
                   tbt_ms: float) -> float | None:
    """Etalon's fluidity-index: the share of token deadlines met, pooled over successful requests
    (failures are counted apart, as for the other latencies).

    `ttft_ms` may be a function of the prompt length (the paper's predicted prefill time plus
    slack); bench serve passes a fixed target. None when no token came, or when a record of
    several tokens has no chunk gaps (the simulator's --no-itl): a whole answer in one chunk
    looks the same, and refusing beats a wrong number.
    """
    ok = [r for r in records if r.success]
    if any(r.output_len > 1 and not r.itl for r in ok):
        return None
    missed = total = 0
    for r in ok:
        ttft_target = ttft_ms(r.prompt_len) if callable(ttft_ms) else ttft_ms
        m, t = deadline_misses(r.ttft, r.itl, chunk_tokens(r.output_len, len(r.itl) + 1),
                               ttft_target / 1e3, tbt_ms / 1e3)
        missed += m
        total += t
    return 1.0 - missed / total if total else None


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
                    slos: dict[str, float] | None = None,
                    fluidity: tuple[float, float] | None = None) -> dict[str, Any]:
    """The result dict of one run. `duration_s` is wall time from first send to last finish;
    `fluidity` is (TTFT, TBT) targets in ms for the fluidity-index, never derived from `slos`."""
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
        "fluidity_index": fluidity_index(records, *fluidity) if fluidity else None,
        "fluidity_targets_ms": {"ttft": fluidity[0], "tbt": fluidity[1]} if fluidity else None,
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
