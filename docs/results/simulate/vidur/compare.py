"""The comparison table: servelm-<rate>rps.json (servelm simulate run) against
vidur-<rate>rps.json (vidur_summary.py), each figure as servelm / Vidur.

python compare.py RATE [RATE ...]  (run in this folder)"""
import json
import sys

KEYS = [("mean_ttft_ms", "mean TTFT ms"), ("p90_ttft_ms", "p90 TTFT ms"),
        ("mean_tpot_ms", "mean TPOT ms"), ("output_throughput", "output tok/s"),
        ("mean_e2el_ms", "mean E2E ms")]
print("| req/s | " + " | ".join(f"{name} servelm / Vidur (ratio)" for _, name in KEYS)
      + " | preemptions servelm / Vidur |")
print("|---" * (len(KEYS) + 2) + "|")
for rate in sys.argv[1:]:
    s = json.load(open(f"servelm-{rate}rps.json"))
    v = json.load(open(f"vidur-{rate}rps.json"))
    cells = []
    for key, _ in KEYS:
        a, b = s[key], v[key]
        cells.append(f"{a:.4g} / {b:.4g} ({a / b:.2f}x)")
    print(f"| {rate} | " + " | ".join(cells) + f" | {s['num_preemptions']} / {v['num_restarts']} |")
