"""`servelm simulate profile`: time the real engine's steps and fit the step-time model.

The engine (in this process, as `servelm serve` builds it) runs a grid of batches: single
prompts of growing length (prefill), then B requests of context C decoding together, for
each B and C (decode steps, and the mixed steps while their prompts are prefilled). Every
step is timed with its features (step_model.py); a warm-up round is not kept.
"""

from __future__ import annotations

import random
import time
from typing import Any

from servelm.config import EngineConfig
from servelm.engine.engine import LLMEngine
from servelm.sampling_params import SamplingParams
from servelm.simulate.replica import SimEngineConfig
from servelm.simulate.step_model import StepTimeModel, step_features

PREFILL_LENS = (16, 64, 256, 512, 1024, 2048)
DECODE_BATCHES = (1, 2, 4, 8, 16, 32)
DECODE_CONTEXTS = (64, 512, 1536)


def _timed_steps(engine: LLMEngine, samples: list[tuple[list[float], float]]) -> None:
    """Run `engine` until idle, recording each step's features and seconds."""
    schedule = engine.scheduler.schedule
    seen: list = []

    def capture():
        step = schedule()
        seen.append(step)
        return step

    engine.scheduler.schedule = capture
    try:
        while engine.has_unfinished_requests():
            seen.clear()
            start = time.perf_counter()
            engine.step()
            seconds = time.perf_counter() - start
            steps = [s for s in seen if s.scheduled]
            if len(steps) == 1:
                samples.append((step_features(steps[0]), seconds))
    finally:
        engine.scheduler.schedule = schedule


def _requests(engine: LLMEngine, n: int, prompt_len: int, max_tokens: int, rng: random.Random) -> None:
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0.0)
    for _ in range(n):
        ids = [rng.randrange(100, min(30000, engine.arch.vocab_size)) for _ in range(prompt_len)]
        engine.add_request(f"p{rng.random()}", {"prompt_token_ids": ids}, params)


def profile(config: EngineConfig, repeats: int = 2, say=lambda *_: None) -> StepTimeModel:
    engine = LLMEngine(config)
    rng = random.Random(0)
    limit = engine.max_model_len - 32
    samples: list[tuple[list[float], float]] = []
    for round_ in range(repeats + 1):  # round 0 warms up
        kept = samples if round_ else []
        for n in PREFILL_LENS:
            if n <= min(limit, config.max_num_batched_tokens):
                _requests(engine, 1, n, 1, rng)
                _timed_steps(engine, kept)
        for c in DECODE_CONTEXTS:
            for b in DECODE_BATCHES:
                if c <= limit and b <= config.max_num_seqs:
                    _requests(engine, b, c, 16, rng)
                    _timed_steps(engine, kept)
        say(f"round {round_}/{repeats}: {len(samples)} steps timed")
    features, seconds = [f for f, _ in samples], [s for _, s in samples]
    model = StepTimeModel.fit(features, seconds, source={
        "engine": sim_config(engine).__dict__, "model": engine.model_source,
        "num_threads": config.num_threads, "steps": len(samples)})
    engine.shutdown()
    return model


def sim_config(engine: LLMEngine) -> SimEngineConfig:
    c = engine.config
    return SimEngineConfig(num_kv_blocks=engine.worker_info.num_kv_blocks, block_size=c.block_size,
                           max_num_batched_tokens=c.max_num_batched_tokens, max_num_seqs=c.max_num_seqs,
                           max_model_len=engine.max_model_len, enable_prefix_caching=c.enable_prefix_caching,
                           preemption_mode=c.preemption_mode, num_swap_blocks=engine.worker_info.num_swap_blocks,
                           scheduling_policy=c.scheduling_policy)


def describe(model: StepTimeModel) -> dict[str, Any]:
    return {"coefficients": model.coefficients, "fit_error": model.fit_error, **model.source}
