"""The trace both simulators replay: N requests, prompt lengths uniform in [256, 2048] and
output lengths uniform in [32, 512] (seed 0), Poisson arrivals (seed 1) whose unit-rate gaps
are scaled to each rate, so every rate has the same requests in the same order. One CSV per
rate, with servelm's columns (arrival_s, prompt_len, output_len) and those of Vidur's
trace_replay generator (Date, Time, PromptTokenCount, CompletionTokenCount) on the same rows.

python make_trace.py OUT_DIR N RATE [RATE ...]"""
import csv
import random
import sys
from pathlib import Path

out, n, rates = Path(sys.argv[1]), int(sys.argv[2]), [float(r) for r in sys.argv[3:]]
lengths = random.Random(0)
reqs = [(lengths.randint(256, 2048), lengths.randint(32, 512)) for _ in range(n)]
gaps = random.Random(1)
unit, t = [], 0.0
for _ in range(n):
    unit.append(t)
    t += gaps.expovariate(1.0)
out.mkdir(parents=True, exist_ok=True)
for rate in rates:
    path = out / f"trace-{rate:g}rps.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["arrival_s", "prompt_len", "output_len",
                    "Date", "Time", "PromptTokenCount", "CompletionTokenCount"])
        for u, (p, o) in zip(unit, reqs):
            a = f"{u / rate:.6f}"
            w.writerow([a, p, o, "2023-08-21", a, p, o])
    print(path)
