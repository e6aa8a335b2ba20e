"""Every engine feature runs under tensor and pipeline parallelism as in one process:
chunked prefill, prefix caching, preemption by recompute and by swap, the CPU tier,
speculative decoding (n-gram and a draft model, chains and trees, with either; layer skip
with tensor parallelism), 8-bit KV and KV compression. The same work gives the same tokens and
logprobs; nothing leaks. Pipeline runs keep up to P micro-batches in flight, so their
steps are scheduled differently, and an abort lands while a request is in flight."""

from __future__ import annotations

import pytest

from servelm import SamplingParams

pytestmark = pytest.mark.multiprocess

SHARED = [5, 6, 7, 8, 9, 10, 11, 12, 5, 6, 7, 8]
WORK = [
    (SHARED + [20, 21], SamplingParams(max_tokens=14, temperature=0, logprobs=2, ignore_eos=True)),
    (SHARED + [30], SamplingParams(max_tokens=10, temperature=0.9, seed=3, n=2, ignore_eos=True)),
    ([40, 41, 42] * 5, SamplingParams(max_tokens=12, temperature=0, prompt_logprobs=1, ignore_eos=True)),
    ([50, 51, 52, 50, 51], SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)),
]
SMALL = dict(block_size=4, num_kv_blocks=14, max_num_batched_tokens=12)
SETTINGS = {
    "chunks, prefix cache, recompute": (SMALL, [(2, 1), (1, 2), (2, 2)]),
    "swap": ({**SMALL, "preemption_mode": "swap"}, [(2, 1), (1, 2)]),
    "cpu tier": ({**SMALL, "num_kv_blocks": 20, "cpu_offload_gb": 0.01}, [(1, 2)]),
    "ngram": ({"block_size": 4, "speculative_config": {"method": "ngram", "num_speculative_tokens": 3}},
              [(2, 1), (1, 2)]),
    "layer skip tree": ({"block_size": 4, "speculative_config": {
        "method": "layer_skip", "num_layers": 1, "num_speculative_tokens": 2, "tree": [2, 1]}}, [(2, 1)]),
    "int8 kv": ({"block_size": 4, "kv_cache_dtype": "int8"}, [(2, 1), (1, 2)]),
    "h2o": ({"block_size": 4, "kv_compression": {"method": "h2o", "budget": 16}}, [(2, 1), (1, 2)]),
}


def run(llm) -> list:
    prompts = [{"prompt_token_ids": ids} for ids, _ in WORK]
    outs = llm.generate(prompts, [p for _, p in WORK], use_tqdm=False)
    return [[(c.token_ids, [{k: v.logprob for k, v in lp.items()} for lp in c.logprobs or []])
             for c in o.outputs] + [[{k: v.logprob for k, v in lp.items()} for lp in o.prompt_logprobs[1:]]
                                    if o.prompt_logprobs else None]
            for o in outs]


def assert_same(got, want, tol: float = 1e-3) -> None:
    for g, w in zip(got, want):
        for (gt, glp), (wt, wlp) in zip(g[:-1], w[:-1]):
            assert gt == wt
            for a, b in zip(glp, wlp):
                assert a.keys() == b.keys() and all(abs(a[k] - b[k]) < tol for k in a)
        if w[-1] is not None:
            assert all(abs(a[k] - b[k]) < tol for a, b in zip(g[-1], w[-1]) for k in b)


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_features_match_one_process(setting, tiny_model_dir, make_llm):
    options, layouts = SETTINGS[setting]
    path = tiny_model_dir("llama")
    want = run(make_llm(path, dtype="float32", **options))
    for tp, pp in layouts:
        llm = make_llm(path, dtype="float32", tensor_parallel_size=tp, pipeline_parallel_size=pp, **options)
        assert_same(run(llm), want)
        metrics = llm.get_metrics()
        if setting == "ngram" or setting == "layer skip tree":
            assert metrics["spec_proposed_tokens"] > 0
        if setting.endswith("recompute"):
            assert metrics["num_preemptions"] > 0
        if setting == "swap":
            assert metrics["num_swap_out_blocks"] > 0
        if setting == "cpu tier":
            assert metrics["num_offloaded_blocks"] > 0
        if setting == "h2o":
            assert metrics["kv_evicted_tokens"] > 0
        llm.shutdown()


@pytest.mark.parametrize("tp,pp,tree", [(2, 1, None), (1, 2, None), (1, 2, [2, 1, 1])])
def test_draft_model_under_tensor_and_pipeline_parallel(tp, pp, tree, tiny_model_dir, make_llm):
    """The draft runs whole on every rank (small, and identical on each); sampled drafts
    come from a generator verification does not draw on, and a stage before the last
    learns which drafts were accepted (and moves a tree's accepted K/V) from the engine,
    with the next step it sends."""
    path, draft = tiny_model_dir("llama"), tiny_model_dir("llama", num_hidden_layers=1)
    spec = {"method": "draft_model", "model": str(draft), "num_speculative_tokens": 3}
    options = {"block_size": 4, "speculative_config": {**spec, **({"tree": tree} if tree else {})}}
    want = run(make_llm(path, dtype="float32", **options))
    llm = make_llm(path, dtype="float32", tensor_parallel_size=tp, pipeline_parallel_size=pp, **options)
    assert_same(run(llm), want)
    assert llm.get_metrics()["spec_accepted_tokens"] > 0


def test_abort_while_in_flight_leaves_nothing_behind(tiny_model_dir, make_llm):
    """With two micro-batches in flight, an abort frees a request whose step is still
    running; the others finish as they would alone."""
    path = tiny_model_dir("llama")
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    prompts = [[60 + i, 61, 62, 63] for i in range(4)]
    want = [o.outputs[0].token_ids for o in make_llm(path, dtype="float32").generate(
        [{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)]
    engine = make_llm(path, dtype="float32", pipeline_parallel_size=2).engine
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", {"prompt_token_ids": p}, params)
    done = {}
    while engine.has_unfinished_requests():
        if engine.num_steps == 3:
            assert engine.scheduler.in_flight, "a micro-batch is in flight"
            engine.abort_request("r1")
        for out in engine.step():
            done[out.request_id] = out.outputs[0].token_ids
    assert set(done) == {"r0", "r2", "r3"}
    assert [done[f"r{i}"] for i in (0, 2, 3)] == [want[i] for i in (0, 2, 3)]


def test_large_steps_and_outputs_keep_flowing_through_the_pipeline(tiny_model_dir, make_llm):
    """A step larger than a pipe holds goes out to the last stage while that stage writes an
    earlier step's large output back: the engine sends from a thread of its own, so the
    two writes never wait on each other (they did: this hung)."""
    import random
    import threading

    llm = make_llm(tiny_model_dir("llama"), dtype="float32", pipeline_parallel_size=2,
                   max_num_batched_tokens=80_000, max_num_seqs=512, num_kv_blocks=10_000,
                   enable_prefix_caching=False)
    rng = random.Random(0)
    prompts = [{"prompt_token_ids": [rng.randrange(256, 400) for _ in range(500)]} for _ in range(300)]
    params = [SamplingParams(max_tokens=1, prompt_logprobs=5 if i % 2 else None) for i in range(300)]
    done: list = []
    worker = threading.Thread(target=lambda: done.extend(llm.generate(prompts, params, use_tqdm=False)),
                              daemon=True)
    worker.start()
    worker.join(timeout=180)
    if worker.is_alive():
        llm.engine.executor.shutdown()  # unblock nothing, but leave no process behind
        pytest.fail("the pipeline stalled")
    assert len(done) == 300
