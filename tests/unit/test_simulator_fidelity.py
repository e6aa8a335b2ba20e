"""The simulator against the real serving loop on small traces, at three loads.

The engine's "device" is the tiny model plus a sleep per step, as a GPU would take it (a
fixed cost, per prefill token, per decode), so step times are what the test says and not
what a loaded CI machine makes them; the engine thread, the event loop, the streams that
consume outputs as `servelm serve` does, and the scheduler are the real ones. As a user
would: the engine records its steps while it serves (--step-trace), `simulate profile`
fits the step-time model on them and calibrates the front-end delay on the served runs, and the simulated runs of the same
arrivals and lengths must come within 10% of what the streams measured: mean and p90 TTFT,
mean TPOT, output throughput, and preemptions in the overloaded run.

The out-of-sample check against `servelm serve` on this machine's CPU (another seed,
repeated runs) is in docs/benchmarks.md.
"""

from __future__ import annotations

import asyncio
import gc
import json
import math
import time

import pytest

from servelm.bench.serve_metrics import RequestRecord, compute_metrics
from servelm.config import EngineConfig
from servelm.engine.async_engine import AsyncLLM
from servelm.executor.in_process import InProcessExecutor
from servelm.sampling_params import SamplingParams
from servelm.simulate.profile import calibrate_frontend_delay, fit_step_trace, sim_config
from servelm.simulate.replica import ReplicaSpec
from servelm.simulate.simulator import simulate
from servelm.simulate.step_model import step_features
from servelm.simulate.workload import TraceRequest, from_file, synthetic

BOUND = 0.10
VOCAB = 256  # within the tiny model's
KEYS = ("mean_ttft_ms", "p90_ttft_ms", "mean_tpot_ms", "output_throughput")


def serve(llm: AsyncLLM, trace: list[TraceRequest]) -> dict:
    """Send each request at its arrival time; bench serve's metrics from the streams."""
    async def one(i: int, req: TraceRequest, t0: float) -> RequestRecord:
        await asyncio.sleep(max(0.0, t0 + req.arrival_s - time.perf_counter()))
        sent = time.perf_counter()
        params = SamplingParams(max_tokens=req.output_len, ignore_eos=True, temperature=0.0)
        times, n = [], 0
        ids = [t % VOCAB for t in req.prompt_ids]
        async for out in llm.generate(f"r{i}-{sent}", {"prompt_token_ids": ids}, params):
            times.append(time.perf_counter())
            n = len(out.outputs[0].token_ids)
        itl = [b - a for a, b in zip(times, times[1:])]
        return RequestRecord(True, req.prompt_len, n, times[0] - sent, itl, times[-1] - sent, sent - t0)

    async def run() -> list[RequestRecord]:
        t0 = time.perf_counter()
        return await asyncio.gather(*(one(i, r, t0) for i, r in enumerate(trace)))

    before = llm.engine.scheduler.num_preemptions
    records = asyncio.run(run())
    duration = max(r.start + r.latency for r in records) - min(r.start for r in records)
    return {**compute_metrics(records, duration, [90.0]),
            "num_preemptions": llm.engine.scheduler.num_preemptions - before,
            "requests": [{"start_s": r.start, "prompt_len": r.prompt_len, "output_len": r.output_len,
                          "success": True} for r in records]}


def on_the_device(monkeypatch) -> None:
    """Every step takes what this made-up GPU takes, plus the tiny model's CPU time."""
    run = InProcessExecutor.execute_model

    def execute_model(self, step):
        features = step_features(step)
        time.sleep(0.03 + 3e-4 * features[1] + 2e-3 * features[2])
        return run(self, step)

    monkeypatch.setattr(InProcessExecutor, "execute_model", execute_model)


@pytest.mark.multiprocess  # the slow kind: a minute of real serving
def test_simulated_latencies_are_within_ten_percent_of_the_served_ones(tiny_model_dir, tmp_path,
                                                                       monkeypatch):
    on_the_device(monkeypatch)
    steps = tmp_path / "steps.jsonl"
    model = tiny_model_dir("llama", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=1)
    config = EngineConfig(model=str(model), dtype="float32", num_threads=1, block_size=16,
                          num_kv_blocks=40, max_num_batched_tokens=512, max_model_len=512,
                          step_trace=str(steps))
    rates = (3.5, 7.0, math.inf)  # about 30% and 60% of what it serves at once, and overloaded
    sizes = (96, 96, 192)  # the overloaded run long enough to preempt a score of times
    traces = [synthetic("random", n, 64, 16, 0.5, rate, 1.0, seed)
              for seed, (n, rate) in enumerate(zip(sizes, rates))]
    # The objects of every test before this one stay out of the collector's passes, which
    # would stall the serving loop mid-run (a suspect for one CI run whose 30%-load part
    # preempted and whose 60%-load TTFT came out 13.7% off; alone it passes at 3.8%).
    gc.collect()
    gc.freeze()
    llm = AsyncLLM(config)
    try:
        serve(llm, traces[0][:4])  # warm-up, not compared
        real = [serve(llm, trace) for trace in traces]
        engine = sim_config(llm.engine)
    finally:
        llm.shutdown()
        gc.unfreeze()
    measured_runs = tmp_path / "measured.json"  # as bench serve --save-detailed writes them
    measured_runs.write_text(json.dumps({"runs": [
        {**run, "request_rate": "inf" if math.isinf(rate) else rate} for rate, run in zip(rates, real)]}))
    step_model = fit_step_trace([str(steps)])
    step_model.frontend_delay_s = calibrate_frontend_delay(step_model, [str(measured_runs)])
    errors, preempted = {}, []
    for rate, measured in zip(rates, real):
        replay = from_file(measured_runs, rate, 1.0, 0)  # the arrivals and lengths as served
        simulated = simulate(replay, [ReplicaSpec(step_model, engine)], percentiles=[90.0])
        for key in KEYS:
            errors[(rate, key)] = simulated[key] / measured[key] - 1
        preempted.append(simulated["num_preemptions"])
    # Preemptions where they are the point, the overloaded run (a score of them); at 60% load
    # a few come and go with where a burst lands, and show in its latencies above.
    measured_preempted = [run["num_preemptions"] for run in real]
    errors[(rates[-1], "num_preemptions")] = (
        (preempted[-1] - measured_preempted[-1]) / max(measured_preempted[-1], 10))
    assert real[-1]["num_preemptions"] > 0  # the overloaded run preempts: the count is compared
    worst = max(errors.items(), key=lambda kv: abs(kv[1]))
    print(f"largest error {worst[1]:+.1%} at {worst[0]}; preemptions simulated {preempted}, "
          f"measured {measured_preempted}")  # shown with pytest -s
    assert abs(worst[1]) <= BOUND, {k: round(v, 3) for k, v in errors.items()}
