"""vidur.main, with the time each part takes printed as JSON on the last line:
building the simulator (which loads or trains the execution-time predictor), the event
loop, and writing the metrics. Same flags as `python -m vidur.main`."""
import json
import time

from vidur.config import SimulationConfig
from vidur.simulator import Simulator
from vidur.utils.random import set_seeds

t0 = time.perf_counter()
config = SimulationConfig.create_from_cli_args()
set_seeds(config.seed)
simulator = Simulator(config)
t1 = time.perf_counter()
simulator._write_output, write = (lambda: None), simulator._write_output
simulator.run()
t2 = time.perf_counter()
write()
t3 = time.perf_counter()
print(json.dumps({"setup_s": t1 - t0, "event_loop_s": t2 - t1, "write_s": t3 - t2}))
