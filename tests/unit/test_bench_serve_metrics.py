"""Serving metrics and arrivals, checked against hand computations on synthetic timestamps."""

from __future__ import annotations

import math

import numpy as np
import pytest

from servelm.bench.serve_datasets import send_times
from servelm.bench.serve_metrics import (
    RequestRecord,
    chunk_tokens,
    compute_metrics,
    deadline_misses,
    fluidity_index,
    max_concurrency,
    parse_fluidity,
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


# Fluidity-index (Etalon): targets TTFT 100 ms, TBT 50 ms unless said; gaps kept off exact
# multiples of 50 ms so float rounding cannot move a floor.
def test_fluidity_all_on_time_with_slack_carried():
    # first token 50 ms early: that slack lets a later 90 ms gap (> 50) still make its deadline
    records = [rec(0.05, [0.04, 0.09, 0.03], 4), rec(0.08, [0.05, 0.05], 3), rec(0.1, [], 1)]
    assert fluidity_index(records, 100, 50) == 1.0
    m = compute_metrics(records, 1.0, fluidity=(100, 50))
    assert m["fluidity_index"] == 1.0 and m["fluidity_targets_ms"] == {"ttft": 100, "tbt": 50}


def test_fluidity_stall_resets_later_deadlines():
    # first on time (slack 0), next 10 ms early (slack 10 ms); a 200 ms stall overruns its
    # 60 ms allowance by 140 ms: floor(140 / 50) + 1 = 3 missed deadlines. The last token,
    # 40 ms after the stalled one, is on time against the reset schedule (without the reset
    # it would be due at 250 ms but came at 380 ms).
    assert deadline_misses(0.1, [0.04, 0.2, 0.04], [1] * 4, 0.1, 0.05) == (3, 6)
    assert fluidity_index([rec(0.1, [0.04, 0.2, 0.04], 4)], 100, 50) == pytest.approx(3 / 6)
    # a short stall costs one deadline
    assert deadline_misses(0.1, [0.07], [1, 1], 0.1, 0.05) == (1, 2)


def test_fluidity_missed_first_token():
    # 230 ms against 100: 130 ms over -> floor(130 / 50) + 1 = 3 misses; then two on time
    assert deadline_misses(0.23, [0.05, 0.04], [1, 1, 1], 0.1, 0.05) == (3, 5)
    m = compute_metrics([rec(0.23, [0.05, 0.04], 3), rec(0.09, [0.04], 2)], 1.0, fluidity=(100, 50))
    assert m["fluidity_index"] == pytest.approx(1 - 3 / 7)  # pooled: 3 missed of 5 + 2


def test_fluidity_chunk_of_several_tokens():
    # a chunk of k tokens delivers them together: the first is judged, k-1 bank 50 ms each
    assert deadline_misses(0.1, [0.12], [3, 1], 0.1, 0.05) == (0, 4)  # 100 ms slack covers 120
    assert deadline_misses(0.1, [0.12], [1, 3], 0.1, 0.05) == (2, 5)  # no slack yet: 2 misses
    # only the total known: an even share per chunk, the remainder on the last chunks
    assert chunk_tokens(5, 3) == [1, 2, 2] and chunk_tokens(6, 3) == [2, 2, 2]
    assert chunk_tokens(2, 3) == [1, 1, 1]  # never below a token per chunk
    # 80 ms (slack 20), then 110 > 70: 1 miss, its chunk-mate banks 50; 40 ms on time, +1 mate
    assert fluidity_index([rec(0.08, [0.11, 0.04], 5)], 100, 50) == pytest.approx(4 / 5)
    assert fluidity_index([rec(0.08, [0.11, 0.04], 3)], 100, 50) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="tokens_per_chunk"):
        deadline_misses(0.1, [0.05], [1], 0.1, 0.05)


def test_fluidity_none_without_per_chunk_times():
    # the simulator's --no-itl keeps first and last token times only: no number, not a wrong one
    no_itl = [rec(0.1, [0.04], 2), rec(0.1, [], 5)]
    assert fluidity_index(no_itl, 100, 50) is None
    assert compute_metrics(no_itl, 1.0, fluidity=(100, 50))["fluidity_index"] is None
    assert fluidity_index([RequestRecord(success=False, error="boom")], 100, 50) is None
    # failed requests are left out, as from the other latency metrics
    mixed = [rec(0.1, [0.04], 2), RequestRecord(success=False, error="HTTP 503", ttft=9.0)]
    assert fluidity_index(mixed, 100, 50) == 1.0


def test_fluidity_ttft_target_may_follow_prompt_length():
    # the paper's prefill deadline: predicted prefill time for the prompt plus slack
    # 140 ms is on time for 1,000 prompt tokens (due 150) but 89 ms late for 10 (due 51): 2 misses
    records = [rec(0.14, [0.04], 2, prompt=1000), rec(0.14, [0.04], 2, prompt=10)]
    assert fluidity_index(records, lambda p: 50 + 0.1 * p, 50) == pytest.approx(1 - 2 / 5)


def test_fluidity_off_by_default_and_not_derived_from_goodput():
    records = [rec(0.1, [0.04], 2)]
    m = compute_metrics(records, 1.0, slos=parse_goodput(["ttft:500", "tpot:50"]))
    assert m["fluidity_index"] is None and m["fluidity_targets_ms"] is None


def test_fluidity_flag_parses_and_is_explicit():
    import argparse

    from servelm.bench.serve import ServeConfig, validate
    from servelm.bench.serve_cli import add_serve_parser
    from servelm.bench.serve_report import rate_table

    parser = argparse.ArgumentParser()
    add_serve_parser(parser.add_subparsers())
    args = parser.parse_args(["serve", "--goodput", "ttft:500", "tpot:50"])
    assert parse_fluidity(args.fluidity) is None  # goodput's targets are not reused
    args = parser.parse_args(["serve", "--fluidity", "2000:100"])
    assert parse_fluidity(args.fluidity) == (2000.0, 100.0)
    with pytest.raises(ValueError, match="--fluidity"):
        validate(ServeConfig(fluidity=(100.0, 0.0)))
    run = {"request_rate": 1.0, **compute_metrics([rec(0.08, [0.11, 0.04], 5)], 1.0,
                                                  fluidity=(100, 50))}
    table = rate_table("t", [run], "p99", goodput=False, fluidity=True)
    assert table.rows[0][table.cols.index("fluidity")] == "0.800"
    assert "fluidity" not in rate_table("t", [run], "p99", goodput=False).cols


@pytest.mark.parametrize("bad", ["2000", "", "a:100", "2000:b", "0:100", "2000:-5",
                                 "2000:100:3", "inf:100", "nan:100"])
def test_fluidity_parse_errors_name_the_flag(bad):
    with pytest.raises(ValueError, match="--fluidity"):
        parse_fluidity(bad)
