"""The comparison table of docs/benchmarks.md: servelm-<rate>rps.json (servelm simulate run)
against vidur-<rate>rps.json (vidur_summary.py), each cell servelm / Vidur (ratio).

python compare.py RATE [RATE ...]  (run in this folder)"""
import json
import sys

KEYS = [("mean_ttft_ms", "mean TTFT ms", "{:.0f}"), ("p90_ttft_ms", "p90 TTFT ms", "{:.0f}"),
        ("mean_tpot_ms", "mean TPOT ms", "{:.1f}"), ("p90_tpot_ms", "p90 TPOT ms", "{:.1f}"),
        ("output_throughput", "output tok/s", "{:.0f}"), ("mean_e2el_ms", "mean E2E ms", "{:.0f}")]
print("| req/s | " + " | ".join(name for _, name, _ in KEYS) + " | preemptions |")
print("|---" * (len(KEYS) + 2) + "|")
for rate in sys.argv[1:]:
    s = json.load(open(f"servelm-{rate}rps.json"))
    v = json.load(open(f"vidur-{rate}rps.json"))
    cells = [f"{fmt.format(s[k])} / {fmt.format(v[k])} ({s[k] / v[k]:.2f}x)" for k, _, fmt in KEYS]
    print(f"| {rate} | " + " | ".join(cells) + f" | {s['num_preemptions']} / {v['num_restarts']} |")
