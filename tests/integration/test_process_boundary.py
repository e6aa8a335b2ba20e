"""The engine/worker boundary carries plain data only: every step's input and output of a
real run pickles, unpickles without any class but the plain message types, and replayed
into a second, fresh worker gives the same tokens step by step."""

from __future__ import annotations

import io
import pickle

import pytest
from leaks import assert_no_leaks

from servelm import SamplingParams
from servelm.config import EngineConfig
from servelm.engine.engine import LLMEngine
from servelm.executor.in_process import InProcessExecutor
from servelm.worker.worker import Worker

# Everything a step may carry: the message types, sampling settings, logprobs, builtins, and
# numpy arrays (structured outputs' token bitmasks).
PLAIN_MODULES = {"servelm.step_io", "servelm.sampling_params", "servelm.outputs", "builtins",
                 "numpy", "numpy._core.multiarray"}


class PlainUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if module not in PLAIN_MODULES:
            raise pickle.UnpicklingError(f"{module}.{name} crossed the engine/worker boundary")
        return super().find_class(module, name)


def plain_load(data: bytes):
    return PlainUnpickler(io.BytesIO(data)).load()


class RecordingExecutor(InProcessExecutor):
    """The in-process executor, keeping every step's pickled input and output."""

    def __init__(self, config: EngineConfig) -> None:
        super().__init__(config)
        self.steps: list[tuple[bytes, bytes]] = []

    def execute_model(self, step):
        out = super().execute_model(step)
        self.steps.append((pickle.dumps(step), pickle.dumps(out)))
        return out


SETTINGS = {
    "swap and chunks": dict(num_kv_blocks=12, preemption_mode="swap", max_num_batched_tokens=12),
    "recompute and prefix cache": dict(num_kv_blocks=12, max_num_batched_tokens=12),
    "ngram speculation": dict(num_kv_blocks=64, speculative_config={"method": "ngram",
                                                                    "num_speculative_tokens": 3}),
    "h2o compression": dict(num_kv_blocks=64, kv_compression={"method": "h2o", "budget": 16}),
}


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_a_pickled_step_stream_replays_on_a_fresh_worker(tiny_model_dir, setting):
    config = EngineConfig(model=str(tiny_model_dir("llama")), block_size=4, **SETTINGS[setting])
    engine = LLMEngine(config, executor=RecordingExecutor(config))
    shared = [5, 6, 7, 8, 9, 10, 11, 12, 5, 6, 7, 8]
    work = [
        (shared + [20, 21], SamplingParams(max_tokens=14, temperature=0, logprobs=2)),
        (shared + [30], SamplingParams(max_tokens=10, temperature=0.9, seed=3, n=2)),
        ([40, 41, 42] * 5, SamplingParams(max_tokens=12, temperature=0, prompt_logprobs=1)),
        ([50, 51], SamplingParams(max_tokens=16, temperature=0.8, top_p=0.9)),  # unseeded
        # a grammar: with speculation its compiled form (and xgrammar's vocabulary) cross too
        ([60, 61, 60, 61], SamplingParams(max_tokens=12, temperature=0,
                                          structured_outputs={"regex": "[ab]{3,12}"})),
    ]
    for i, (ids, params) in enumerate(work):
        engine.add_request(f"r{i}", {"prompt_token_ids": ids}, params)
    finished = {}
    while engine.has_unfinished_requests():
        if engine.num_steps == 4:
            engine.abort_request("r3")  # the worker must forget it too
        for out in engine.step():
            finished[out.request_id] = [c.token_ids for c in out.outputs]
    assert_no_leaks(engine)
    steps = engine.executor.steps
    assert len(steps) > 5 and set(finished) == {"r0", "r1", "r2", "r4"}

    replay = Worker(config)
    sampled: dict[str, list[int]] = {}
    for step_bytes, out_bytes in steps:
        expected = plain_load(out_bytes)
        got = replay.execute_model(plain_load(step_bytes))
        assert got.req_ids == expected.req_ids
        assert got.sampled_token_ids == expected.sampled_token_ids
        assert got.num_accepted_tokens == expected.num_accepted_tokens
        assert got.num_evicted_tokens == expected.num_evicted_tokens
        assert got.logprobs == expected.logprobs and got.prompt_logprobs == expected.prompt_logprobs
        for req_id, tokens in zip(got.req_ids, got.sampled_token_ids):
            sampled.setdefault(req_id, []).extend(tokens)
    # What the engine returned is what the replayed worker sampled (up to each stop).
    for group, outputs in finished.items():
        for i, tokens in enumerate(outputs):
            assert tokens and sampled[f"{group}#{i}"][:len(tokens)] == tokens
    if setting == "ngram speculation":
        assert any(sum(plain_load(o).num_draft_tokens) for _, o in steps)
        assert sum(plain_load(s).grammar_tokenizer_info is not None for s, _ in steps) == 1
    if setting == "h2o compression":
        assert any(sum(plain_load(o).num_evicted_tokens) for _, o in steps)
    if setting == "swap and chunks":
        assert any(plain_load(s).swap_out for s, _ in steps)
    if setting == "recompute and prefix cache":
        m = engine.get_metrics()
        assert m["num_preemptions"] > 0 and m["prefix_cache_hit_tokens"] > 0


def test_a_shut_down_executor_refuses_steps(tiny_model_dir):
    config = EngineConfig(model=str(tiny_model_dir("llama")), num_kv_blocks=16)
    engine = LLMEngine(config)
    engine.executor.check_health()  # a live worker
    engine.shutdown()
    with pytest.raises(RuntimeError, match="shut down"):
        engine.executor.check_health()
    engine.add_request("late", [5, 6, 7], SamplingParams(max_tokens=2))
    with pytest.raises(RuntimeError, match="shut down"):
        engine.step()
