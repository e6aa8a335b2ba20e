"""The real scheduler's CPU cost per token, as the simulator pays it: one simulated replica
serving 4096 requests (prompts of 128-384 tokens, 64-192 tokens out) at up to 256 running.

    python docs/results/simulate/scheduler_cost.py
"""

import random
import time

from servelm.simulate.replica import SimEngineConfig, SimReplica
from servelm.simulate.step_model import StepTimeModel

config = SimEngineConfig(num_kv_blocks=40000, max_num_seqs=256, max_num_batched_tokens=8192,
                         enable_prefix_caching=False, max_model_len=4096)
now = 0.0
replica = SimReplica("r", config, StepTimeModel([0.01, 1e-5, 1e-4]), lambda: now)
rng = random.Random(0)
for i in range(4096):
    prompt = [rng.randrange(60000) for _ in range(rng.randint(128, 384))]
    replica.add(f"r{i}", prompt, rng.randint(64, 192), 0.0)
started, tokens = time.perf_counter(), 0
while (seconds := replica.start_step()) is not None:
    now += seconds
    tokens += len(replica.finish_step())
elapsed = time.perf_counter() - started
print(f"{tokens} tokens in {elapsed:.2f} s: {1e6 * elapsed / tokens:.2f} us of CPU per token")
