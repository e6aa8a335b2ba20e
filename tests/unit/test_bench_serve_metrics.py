"""Serving metrics and arrivals, checked against hand computations on synthetic timestamps."""

from __future__ import annotations

import math

import numpy as np
import pytest

from servelm.bench.serve_datasets import send_times
from servelm.bench.serve_metrics import (
    RequestRecord,
    compute_metrics,
    max_concurrency,
    parse_goodput,
    percentile_key,
)


def rec(ttft, itl, out, start=0.0, prompt=10):
    return RequestRecord(success=True, prompt_len=prompt, output_len=out, ttft=ttft, itl=list(itl),
                         latency=ttft + sum(itl), start=start)


def test_metrics_from_synthetic_timestamps():
    records = [
        rec(0.100, [0.010, 0.020, 0.030], 4, start=0.0),  # e2el .16, tpot .02
        rec(0.200, [0.050], 2, start=0.5),  # e2el .25, tpot .05
        rec(0.300, [], 1, start=1.0),  # one token: no tpot, no itl
        RequestRecord(success=False, error="HTTP 503: busy", start=1.0, latency=0.01),
        RequestRecord(success=False, error="HTTP 503: busy", start=1.1, latency=0.01),
    ]
    m = compute_metrics(records, duration_s=2.0, percentiles=[50, 99, 99.9])
    assert m["completed"] == 3 and m["failed"] == 2
    assert m["failed_reasons"] == {"HTTP 503: busy": 2}
    assert m["total_input_tokens"] == 30 and m["total_output_tokens"] == 7
    assert m["request_throughput"] == pytest.approx(1.5)
    assert m["output_throughput"] == pytest.approx(3.5)
    assert m["total_token_throughput"] == pytest.approx(18.5)
    assert m["mean_ttft_ms"] == pytest.approx(200.0)
    assert m["median_ttft_ms"] == pytest.approx(200.0)
    assert m["p99_ttft_ms"] == pytest.approx(np.percentile([100, 200, 300], 99))
    assert m["mean_tpot_ms"] == pytest.approx(35.0)  # (20 + 50) / 2
    assert m["mean_itl_ms"] == pytest.approx(27.5)  # (10 + 20 + 30 + 50) / 4
    assert m["median_itl_ms"] == pytest.approx(25.0)
    assert m["mean_e2el_ms"] == pytest.approx((160 + 250 + 300) / 3)
    assert "p99.9_e2el_ms" in m and "p50_itl_ms" in m
    assert m["duration_s"] == m["duration"] == 2.0
    assert m["request_goodput"] is None


def test_goodput_counts_requests_meeting_every_slo():
    records = [rec(0.1, [0.01] * 9, 10), rec(0.6, [0.01] * 9, 10), rec(0.1, [0.2] * 4, 5),
               rec(0.1, [], 1)]  # one-token request: its tpot counts as 0
    m = compute_metrics(records, 4.0, slos=parse_goodput(["ttft:500", "tpot:50"]))
    assert m["request_goodput"] == pytest.approx(2 / 4.0)  # first and last pass
    assert m["goodput_slos_ms"] == {"ttft": 500.0, "tpot": 50.0}
    m = compute_metrics(records, 4.0, slos={"e2el": 250.0})
    assert m["request_goodput"] == pytest.approx(2 / 4.0)  # e2el .19 and .1 s pass


def test_percentiles_only_for_selected_metrics():
    m = compute_metrics([rec(0.1, [0.01], 2)], 1.0, percentiles=[90], percentile_metrics=["ttft"])
    assert "p90_ttft_ms" in m and "p90_tpot_ms" not in m and "mean_tpot_ms" in m


def test_no_successful_request_reports_zeros_not_crash():
    m = compute_metrics([RequestRecord(success=False, error="boom")], 1.0)
    assert m["completed"] == 0 and m["mean_ttft_ms"] == 0.0 and m["failed_reasons"] == {"boom": 1}


@pytest.mark.parametrize("bad", [["ttft"], ["speed:5"], ["ttft:abc"], ["tpot:0"]])
def test_goodput_parse_errors_name_the_flag(bad):
    with pytest.raises(ValueError, match="--goodput"):
        parse_goodput(bad)


def test_percentile_key_matches_vllm():
    assert percentile_key(99) == "p99" and percentile_key(99.9) == "p99.9"


def test_max_concurrency():
    rs = [RequestRecord(True, start=0, latency=1), RequestRecord(True, start=0.5, latency=1),
          RequestRecord(True, start=1.0, latency=1), RequestRecord(True, start=3, latency=1)]
    assert max_concurrency(rs) == 2  # the first ends exactly as the third starts


def test_poisson_and_gamma_arrivals():
    t = send_times(20000, rate=4.0, burstiness=1.0, seed=1)
    gaps = np.diff(t)
    assert t[0] == 0.0 and np.all(gaps >= 0)
    assert gaps.mean() == pytest.approx(0.25, rel=0.05)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.05)  # exponential: CV = 1
    bursty = np.diff(send_times(20000, 4.0, 0.25, seed=1))
    assert bursty.mean() == pytest.approx(0.25, rel=0.08)
    assert bursty.std() / bursty.mean() == pytest.approx(2.0, rel=0.08)  # CV = 1/sqrt(shape)
    assert send_times(5, math.inf, 1.0, 0) == [0.0] * 5
    assert send_times(5, 2.0, 1.0, 7) == send_times(5, 2.0, 1.0, 7)  # seeded
