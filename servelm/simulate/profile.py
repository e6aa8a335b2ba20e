"""`servelm simulate profile`: time the real engine's steps and fit the step-time model.

The engine runs as `servelm serve` runs it (an AsyncLLM, every request's outputs consumed
by a stream on the event loop), and a step's time is the period from its start to the next
step's start while work is left: the forward pass and everything the serving loop adds
(handing outputs to the streams, detokenizing, draining the inbox). It runs a grid: single
prompts of growing length (prefill), then B requests of context C decoding together, for
each B and C that fits half the KV cache (decode steps, and the mixed steps while their
prompts are prefilled). Every step is timed with its features (step_model.py); a short
warm-up is not kept.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
import time
from pathlib import Path
from typing import Any

from servelm.config import EngineConfig
from servelm.engine.async_engine import AsyncLLM
from servelm.engine.engine import LLMEngine
from servelm.sampling_params import SamplingParams
from servelm.simulate.replica import SimEngineConfig
from servelm.simulate.step_model import StepTimeModel, step_features
from servelm.step_io import ScheduledRequest, SchedulerOutput

PREFILL_LENS = (16, 64, 256, 512, 1024, 2048)
DECODE_BATCHES = (1, 2, 4, 8, 16, 32, 64, 128)
DECODE_CONTEXTS = (64, 256, 1024)


def _timed_steps(llm: AsyncLLM, batch: list[tuple[list[int], SamplingParams]],
                 samples: list[tuple[list[float], float]]) -> None:
    """Serve `batch` at once; record each step's features and its period."""
    engine = llm.engine
    schedule, step = engine.scheduler.schedule, engine.step
    starts: list[tuple[float, list[float] | None, bool]] = []  # (start, features, work left after)
    scheduled: list = []

    def timed_step():
        scheduled.clear()
        start = time.perf_counter()
        out = step()
        steps = [s for s in scheduled if s.scheduled]
        after_idle = not starts or not starts[-1][2]  # each batch starts an idle engine
        starts.append((start, step_features(steps[0], after_idle) if len(steps) == 1 else None,
                       engine.has_unfinished_requests()))
        return out

    engine.scheduler.schedule = lambda: scheduled.append(schedule()) or scheduled[-1]
    engine.step = timed_step

    async def consume(i: int, ids: list[int], params: SamplingParams) -> None:
        async for _ in llm.generate(f"p{i}-{time.perf_counter()}", {"prompt_token_ids": ids}, params):
            pass

    async def serve() -> None:
        await asyncio.gather(*(consume(i, ids, params) for i, (ids, params) in enumerate(batch)))

    try:
        asyncio.run(serve())
    finally:
        engine.scheduler.schedule, engine.step = schedule, step
    for (start, features, busy), (nxt, _, _) in zip(starts, starts[1:]):
        if features is not None and busy:
            samples.append((features, nxt - start))


def _batch(engine, n: int, prompt_len: int, max_tokens: int,
           rng: random.Random) -> list[tuple[list[int], SamplingParams]]:
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0.0)
    top = min(30000, engine.arch.vocab_size)
    return [([rng.randrange(100, top) for _ in range(prompt_len)], params) for _ in range(n)]


def profile(config: EngineConfig, repeats: int = 2, say=lambda *_: None) -> StepTimeModel:
    llm = AsyncLLM(config)
    engine = llm.engine
    rng = random.Random(0)
    limit = engine.max_model_len - 32
    # batches that fit half the KV cache: a profile times steps, not preemptions
    room = engine.worker_info.num_kv_blocks * config.block_size // 2
    _timed_steps(llm, _batch(engine, 4, 64, 4, rng), [])  # warm-up, not kept
    samples: list[tuple[list[float], float]] = []
    for round_ in range(1, repeats + 1):
        for n in PREFILL_LENS:
            if n <= min(limit, config.max_num_batched_tokens):
                _timed_steps(llm, _batch(engine, 1, n, 2, rng), samples)
        for c in DECODE_CONTEXTS:
            for b in DECODE_BATCHES:
                if c <= limit and b <= config.max_num_seqs and b * (c + 16) <= room:
                    _timed_steps(llm, _batch(engine, b, c, 16, rng), samples)
        say(f"round {round_}/{repeats}: {len(samples)} steps timed")
    features, seconds = [f for f, _ in samples], [s for _, s in samples]
    model = StepTimeModel.fit(features, seconds, source={
        "engine": sim_config(engine).__dict__, "model": engine.model_source,
        "num_threads": config.num_threads, "steps": len(samples)})
    llm.shutdown()
    return model


def fit_step_trace(paths: list[str]) -> StepTimeModel:
    """Fit on the steps a server recorded with --step-trace while serving real traffic: a
    step's time is the gap to the next step's start, where work was left after it."""
    samples: list[tuple[list[float], float]] = []
    header: dict[str, Any] = {}
    for path in paths:
        try:
            lines = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"--from-step-trace: cannot read {path}: {exc}") from exc
        steps = [x for x in lines if "batch" in x]
        header = next((x for x in lines if "engine" in x), header)
        for before, a, b in zip([{"busy": False}, *steps], steps, steps[1:]):
            if a["busy"] and b["t"] > a["t"]:
                step = SchedulerOutput([ScheduledRequest("", n, c, num_draft_tokens=d) for n, c, d in a["batch"]])
                samples.append((step_features(step, not before["busy"]), b["t"] - a["t"]))
    if not header:
        raise ValueError(f"--from-step-trace: {paths} hold no engine header (written by servelm serve --step-trace)")
    return StepTimeModel.fit([f for f, _ in samples], [s for _, s in samples], source={
        **header, "steps": len(samples), "step_trace": [str(p) for p in paths]})


def calibrate_frontend_delay(model: StepTimeModel, result_paths: list[str],
                             candidates_ms: range = range(-30, 101, 2)) -> float:
    """The front-end delay (StepTimeModel.frontend_delay_s) that brings the simulated mean
    TTFT closest to measured bench serve runs', summing the relative error over the request
    rates (each run is replayed: its arrivals and lengths; several runs at one rate count
    as their mean, so runs before and after a drift meet in between). Steps time only the
    engine; what a request spends before it reaches the scheduler shows only at the client."""
    from servelm.simulate.replica import ReplicaSpec
    from servelm.simulate.simulator import simulate
    from servelm.simulate.workload import TraceRequest, bench_rates, from_file

    config = SimEngineConfig(**{k: v for k, v in model.source.get("engine", {}).items()
                                if k in SimEngineConfig.__dataclass_fields__})
    runs: dict[float, list[tuple[list[TraceRequest], float]]] = {}  # rate -> (replay, TTFT)
    for path in result_paths:
        for rate, ttft in bench_rates(path):
            runs.setdefault(rate, []).append((from_file(path, rate, 1.0, 0), ttft))

    def error(delay_ms: int) -> float:
        trial = dataclasses.replace(model, frontend_delay_s=delay_ms / 1e3)
        total = 0.0
        for measured in runs.values():
            sim = sum(simulate(trace, [ReplicaSpec(trial, config)])["mean_ttft_ms"] for trace, _ in measured)
            total += abs(sim / sum(ttft for _, ttft in measured) - 1)
        return total

    return min(candidates_ms, key=error) / 1e3


def sim_config(engine: LLMEngine) -> SimEngineConfig:
    c, spec = engine.config, engine.scheduler.spec
    return SimEngineConfig(num_kv_blocks=engine.worker_info.num_kv_blocks, block_size=c.block_size,
                           max_num_batched_tokens=c.max_num_batched_tokens, max_num_seqs=c.max_num_seqs,
                           max_model_len=engine.max_model_len, enable_prefix_caching=c.enable_prefix_caching,
                           preemption_mode=c.preemption_mode, num_swap_blocks=engine.worker_info.num_swap_blocks,
                           scheduling_policy=c.scheduling_policy,
                           num_speculative_tokens=spec.num_speculative_tokens if spec else 0)


def describe(model: StepTimeModel) -> dict[str, Any]:
    return {"coefficients": model.coefficients, "frontend_delay_s": model.frontend_delay_s,
            "fit_error": model.fit_error, **model.source}
