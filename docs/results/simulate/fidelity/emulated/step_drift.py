"""Each emulated-device run's served steps, per request rate: their time over what the step
model fitted on cal says, and the share of it spent outside the emulated device (the
engine's own Python work, on the CPU), each step weighted by its decodes.

    python docs/results/simulate/fidelity/emulated/step_drift.py
"""

import gzip
import json
from pathlib import Path

from servelm.simulate.step_model import load_step_model, step_features
from servelm.step_io import ScheduledRequest, SchedulerOutput

here = Path(__file__).parent
fitted = load_step_model(here / "model-cal.json")
device = load_step_model(here / "../interleaved/model-cal1.json")  # what serve_emulated.py sleeps

for name in ("cal", "chk1", "chk2", "cal2"):
    lines = [json.loads(line) for line in gzip.open(here / f"steps-{name}.jsonl.gz", "rt")]
    steps = [x for x in lines if "batch" in x]
    t0, start, row = steps[0]["t"], 0.0, []
    for run in json.loads((here / f"real-{name}.json").read_text())["runs"]:
        end = start + run["duration"] + 0.5  # the rates' runs follow one another
        served = modelled = on_device = 0.0
        for before, a, b in zip([{"busy": False}, *steps], steps, steps[1:]):
            if not (start <= a["t"] - t0 < end and a["busy"] and b["t"] > a["t"]):
                continue
            step = SchedulerOutput([ScheduledRequest("", n, c, num_draft_tokens=d) for n, c, d in a["batch"]])
            weight = max(step_features(step)[2], 1)
            served += (b["t"] - a["t"]) * weight
            modelled += fitted.seconds(step, not before["busy"]) * weight
            on_device += device.seconds(step) * weight
        row.append(f"{run['request_rate']}: served/modelled {served / modelled:.3f}, "
                   f"outside the device {1 - on_device / served:.2f}")
        start = end
    print(name, " | ".join(row))
