"""`servelm serve` on an emulated device: each step lasts what a step-time model says (the
forward pass, then a sleep for the rest), so the engine runs at that hardware's pace
while everything else (HTTP, the event loop, the engine thread, the scheduler, streaming)
is the real server. Emulating this CPU's own fitted steps (from a served run) gives runs
whose step times do not drift, which separates the simulator's own error from the
machine's drift (docs/benchmarks.md).

    python serve_emulated.py STEP_MODEL.json --model DIR [servelm serve options]
"""

import sys
import time

from servelm.cli import main
from servelm.executor.in_process import InProcessExecutor
from servelm.simulate.step_model import load_step_model

model = load_step_model(sys.argv[1])
forward = InProcessExecutor.execute_model


def execute_model(self, step):
    started = time.perf_counter()
    out = forward(self, step)
    time.sleep(max(0.0, model.seconds(step) - (time.perf_counter() - started)))
    return out


InProcessExecutor.execute_model = execute_model
sys.exit(main(["serve", *sys.argv[2:]]))
