"""Vidur's per-request results (request_metrics.csv in its output folder) summed up as
servelm's `bench serve` keys define them: TTFT = arrival to first token (Vidur's
prefill_e2e_time; the prefill's last chunk yields the first token), TPOT = (e2e - TTFT) /
(output tokens - 1) over requests with more than one output token, output throughput =
output tokens / (last completion - first arrival). Also Vidur's own scheduling delay and
restarts (preemptions).

python vidur_summary.py VIDUR_OUTPUT_DIR TRACE.csv"""
import csv
import json
import sys
from pathlib import Path

import numpy as np

out, trace = Path(sys.argv[1]), sys.argv[2]
rows = list(csv.DictReader(open(next(out.rglob("request_metrics.csv")))))
arrivals = [float(r["arrival_s"]) for r in csv.DictReader(open(trace))]
ttft = np.array([float(r["prefill_e2e_time"]) for r in rows])
e2e = np.array([float(r["request_e2e_time"]) for r in rows])
n_out = np.array([int(float(r["request_num_decode_tokens"])) for r in rows])
ids = [int(float(r["Request Id"])) for r in rows]
end = max(arrivals[i] + e for i, e in zip(ids, e2e))
duration = end - min(arrivals)
multi = n_out > 1
tpot = (e2e[multi] - ttft[multi]) / (n_out[multi] - 1)
print(json.dumps({
    "completed": len(rows),
    "mean_ttft_ms": 1e3 * ttft.mean(), "p50_ttft_ms": 1e3 * np.percentile(ttft, 50),
    "p90_ttft_ms": 1e3 * np.percentile(ttft, 90), "p99_ttft_ms": 1e3 * np.percentile(ttft, 99),
    "mean_tpot_ms": 1e3 * tpot.mean(), "p90_tpot_ms": 1e3 * np.percentile(tpot, 90),
    "mean_e2el_ms": 1e3 * e2e.mean(),
    "output_throughput": n_out.sum() / duration, "request_throughput": len(rows) / duration,
    "duration_s": duration,
    "mean_scheduling_delay_ms": 1e3 * np.mean([float(r["request_scheduling_delay"]) for r in rows]),
    "num_restarts": int(sum(int(float(r["request_num_restarts"])) for r in rows)),
}, indent=1))
