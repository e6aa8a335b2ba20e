"""Each run's served steps against one step model, per request rate: the steps' measured
time over the modelled one (each step weighted by its decodes, as a token sees it), and
the median step that held a single decode.

    python step_drift.py MODEL DIR   # DIR holds steps-NAME.jsonl and real-NAME.json
"""

import json
import sys
from pathlib import Path

from servelm.simulate.step_model import load_step_model, step_features
from servelm.step_io import ScheduledRequest, SchedulerOutput

model, here = load_step_model(sys.argv[1]), Path(sys.argv[2])


def phases(result: Path) -> list[tuple[str, float, float]]:
    """(rate, start, end) of each run, in seconds from the first step (runs follow on)."""
    out, t = [], 0.0
    for run in json.loads(result.read_text())["runs"]:
        out.append((run["request_rate"], t, t + run["duration"] + 0.5))
        t += run["duration"] + 0.5
    return out


for name in ("cal1", "chk", "cal2"):
    lines = [json.loads(line) for line in (here / f"steps-{name}.jsonl").read_text().splitlines()]
    steps = [x for x in lines if "batch" in x]
    t0, row = steps[0]["t"], []
    for rate, lo, hi in phases(here / f"real-{name}.json"):
        real = modelled = 0.0
        single = []
        for before, a, b in zip([{"busy": False}, *steps], steps, steps[1:]):
            if not (lo <= a["t"] - t0 < hi and a["busy"] and b["t"] > a["t"]):
                continue
            step = SchedulerOutput([ScheduledRequest("", n, c, num_draft_tokens=d) for n, c, d in a["batch"]])
            idle = not before["busy"]
            _, prefill, decodes, *_ = step_features(step, idle)
            weight = max(decodes, 1)
            real += (b["t"] - a["t"]) * weight
            modelled += model.seconds(step, idle) * weight
            if decodes == 1 and not prefill and not idle:
                single.append(b["t"] - a["t"])
        single.sort()
        median = f"{1e3 * single[len(single) // 2]:.1f} ms" if single else "-"
        row.append(f"{rate}: measured/modelled {real / modelled:.3f}, one-decode step {median}")
    print(name, " | ".join(row))
