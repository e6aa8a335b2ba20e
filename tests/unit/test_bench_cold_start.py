"""`bench cold-start`: its flags, and the summary and table of hand-made repeats (no servers)."""

from __future__ import annotations

import pytest

from servelm.bench.cold_start import ColdStartConfig, cold_start_table, summarize, validate
from servelm.cli import build_parser

COLD = [{"ttft_s": 12.0, "e2e_s": 12.5, "replica_ready_s": 10.0, "server_cold_start_s": 11.9},
        {"ttft_s": 9.0, "e2e_s": 9.4, "replica_ready_s": 8.0},
        {"ttft_s": 10.0, "e2e_s": 10.3, "replica_ready_s": None}]
WARM = [{"ttft_s": 0.05, "e2e_s": 0.2}, {"ttft_s": 0.04, "e2e_s": 0.3}, {"ttft_s": 0.06, "e2e_s": 0.1}]
SINGLE = {"ready_s": 7.5, "first_token_s": 7.7, "end_s": 7.9}


def test_flags_reach_the_config():
    args = build_parser().parse_args(["bench", "cold-start", "--model", "/m", "--repeats", "1",
                                      "--downscale-delay-s", "2", "--threads", "1"])
    cfg = ColdStartConfig(**{k: v for k, v in vars(args).items()
                             if k in ColdStartConfig.__dataclass_fields__})
    assert (cfg.model, cfg.repeats, cfg.downscale_delay_s, cfg.threads) == ("/m", 1, 2.0, 1)
    assert cfg.max_tokens == 8 and cfg.result_file is None


def test_bad_values_name_their_flag():
    with pytest.raises(ValueError, match="--repeats"):
        validate(ColdStartConfig(repeats=0))
    with pytest.raises(ValueError, match="--downscale-delay-s"):
        validate(ColdStartConfig(downscale_delay_s=0))


def test_summary_takes_medians_of_the_repeats():
    s = summarize(COLD, WARM, SINGLE)
    assert s["cold_ttft_s"] == 10.0 and s["cold_e2e_s"] == 10.3
    assert s["replica_ready_s"] == 9.0  # the repeat without a figure is left out
    assert s["server_cold_start_s"] == 11.9
    assert s["warm_ttft_s"] == 0.05 and s["warm_e2e_s"] == 0.2
    assert s["cold_over_warm_ttft"] == pytest.approx(200.0)
    assert s["single_engine_first_token_s"] == 7.7 and s["single_engine_ready_s"] == 7.5
    assert summarize([], [], {})["cold_over_warm_ttft"] is None


def test_table_has_a_row_per_repeat_then_medians_and_the_single_engine():
    result = {"model_id": "llama-30m", "config": vars(ColdStartConfig(repeats=3)),
              "cold_starts": COLD, "warm": WARM, "single_engine": SINGLE,
              "summary": summarize(COLD, WARM, SINGLE)}
    lines = str(cold_start_table(result)).splitlines()
    assert lines[0].startswith("cold start: llama-30m, one replica stopped after 3s idle")
    rows = [line.split() for line in lines[3:]]
    assert rows[0] == ["cold", "start", "1", "12.00", "12.50", "10.00"]
    assert rows[2][-1] == "-"
    assert rows[3] == ["cold", "start,", "median", "10.00", "10.30", "9.00"]
    assert rows[4] == ["warm", "replica,", "median", "0.05", "0.20", "-"]
    assert rows[5][-3:] == ["7.70", "7.90", "7.50"]
