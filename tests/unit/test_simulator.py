"""The cluster simulator (issue 20) runs servelm's own scheduler on a virtual clock: the
batches it schedules are the real engine's for the same requests, its times come from the
step-time model exactly, its workloads draw bench serve's lengths, and `simulate run`
writes bench serve's result keys."""

from __future__ import annotations

import dataclasses
import json
import math
import random

import pytest

from servelm.bench.serve_datasets import DatasetOptions, build_conversations
from servelm.cli import main
from servelm.config import EngineConfig
from servelm.engine.engine import LLMEngine
from servelm.model.loader import load_tokenizer
from servelm.sampling_params import SamplingParams
from servelm.simulate.replica import ReplicaSpec, SimEngineConfig
from servelm.simulate.simulator import Simulation, simulate
from servelm.simulate.step_model import FEATURES, StepTimeModel, step_features
from servelm.simulate.workload import TraceRequest, from_file, synthetic

# 10 ms a step, 0.1 ms a prefill token, 1 ms a decode, nothing else
MODEL = StepTimeModel([0.010, 0.0001, 0.001, 0.0, 0.0])


def batches(steps) -> list[list[tuple[str, int, int]]]:
    return [[(s.req_id.split("#")[0], s.num_new_tokens, s.num_computed_tokens) for s in step.scheduled]
            for step in steps if step.scheduled]


def test_it_schedules_what_the_real_engine_schedules(tiny_model_dir):
    """Same requests (token ids, lengths), same options: the same batches, step by step,
    chunked prefill, prefix hits and preemption included."""
    rng = random.Random(3)
    shared = [rng.randrange(10, 390) for _ in range(24)]
    reqs = [(shared + [rng.randrange(10, 390) for _ in range(rng.randint(4, 40))], rng.randint(2, 12))
            for _ in range(10)]
    engine = LLMEngine(EngineConfig(model=str(tiny_model_dir("llama")), dtype="float32", block_size=4,
                                    num_kv_blocks=24, max_num_batched_tokens=32, max_num_seqs=6))
    real, schedule = [], engine.scheduler.schedule
    engine.scheduler.schedule = lambda: real.append(schedule()) or real[-1]
    for i, (ids, out) in enumerate(reqs):
        engine.add_request(f"r{i}", {"prompt_token_ids": ids},
                           SamplingParams(max_tokens=out, ignore_eos=True, temperature=0.0))
    while engine.has_unfinished_requests():
        engine.step()
    config = SimEngineConfig(num_kv_blocks=24, block_size=4, max_num_batched_tokens=32, max_num_seqs=6,
                             max_model_len=engine.max_model_len)
    sim = Simulation([ReplicaSpec(MODEL, config)])
    replica = sim.replicas["sim-0"]
    simulated, start = [], replica.start_step

    def capture():
        seconds = start()
        if replica.step is not None:
            simulated.append(replica.step)
        return seconds

    replica.start_step = capture
    records, stats = sim.run([TraceRequest.of(0.0, ids, out) for ids, out in reqs])
    assert batches(simulated) == batches(real)
    assert stats["num_preemptions"] == engine.scheduler.num_preemptions > 0
    assert sorted(r.output_len for r in records) == sorted(out for _, out in reqs)


def test_times_come_from_the_step_model():
    trace = [TraceRequest.of(0.5, list(range(100, 150)), 4)]
    config = SimEngineConfig(num_kv_blocks=64, block_size=16, max_model_len=512)
    records, stats = Simulation([ReplicaSpec(MODEL, config)]).run(trace)
    (r,) = records
    prefill = 0.010 + 50 * 0.0001  # the whole prompt in one step, then its first token
    assert r.ttft == pytest.approx(prefill) and r.start == 0.5
    assert r.itl == pytest.approx([0.011] * 3)  # one decode per step
    assert stats["simulated_s"] == pytest.approx(0.5 + prefill + 3 * 0.011)


def test_fit_recovers_a_linear_step_time_and_round_trips(tmp_path):
    rng = random.Random(0)
    truth = [0.004, 2e-5, 3e-4, 1e-7, 5e-9, 0.03, 2e-3]
    xs = [[1.0, rng.randint(0, 2048), decodes := rng.randint(0, 64), rng.randint(0, 50000),
           rng.randint(0, 10**6), float(rng.random() < 0.1), math.sqrt(decodes)] for _ in range(200)]
    ys = [sum(c * x for c, x in zip(truth, row)) for row in xs]
    fitted = StepTimeModel.fit(xs, ys, {"model": "synthetic"})
    assert fitted.coefficients == pytest.approx(truth, rel=1e-6)
    assert fitted.fit_error["mean_abs_rel"] < 1e-9
    fitted.save(tmp_path / "m.json")
    assert StepTimeModel.load(tmp_path / "m.json").coefficients == fitted.coefficients
    old = {"features": FEATURES[:5], "coefficients": truth[:5]}  # before after_idle
    (tmp_path / "old.json").write_text(json.dumps(old))
    assert StepTimeModel.load(tmp_path / "old.json").coefficients == [*truth[:5], 0.0, 0.0]
    (tmp_path / "bad.json").write_text(json.dumps({"features": ["x"], "coefficients": [1]}))
    with pytest.raises(ValueError, match="profile again"):
        StepTimeModel.load(tmp_path / "bad.json")
    with pytest.raises(ValueError, match=f"at least {len(FEATURES)} timed steps"):
        StepTimeModel.fit(xs[:2], ys[:2])


def test_step_features_split_prefill_from_decode():
    from servelm.step_io import ScheduledRequest, SchedulerOutput

    step = SchedulerOutput([ScheduledRequest("a", 10, 20), *(ScheduledRequest(c, 1, 99) for c in "bcde")])
    assert step_features(step) == [1.0, 10, 4, 400, 10 * 25, 0.0, 2.0]  # ..., sqrt(4 decodes)
    assert step_features(step, after_idle=True)[FEATURES.index("after_idle")] == 1.0


def test_workloads_draw_bench_serves_lengths(tiny_model_dir, tmp_path):
    opt = DatasetOptions(num_prompts=20, random_input_len=30, random_output_len=9,
                         random_range_ratio=0.5, seed=4)
    convs = build_conversations(load_tokenizer(str(tiny_model_dir("llama"))), opt)
    trace = synthetic("random", 20, 30, 9, 0.5, 2.0, 1.0, 4)
    assert [t.output_len for t in trace] == [c.output_lens[0] for c in convs]
    assert all(15 <= len(t.prompt_ids) <= 45 for t in trace)
    shared = synthetic("shared-prefix", 6, 8, 4, 0.0, 2.0, 1.0, 0, prefix_len=32, num_prefixes=2)
    assert shared[0].prompt_ids[:32] == shared[2].prompt_ids[:32] != shared[1].prompt_ids[:32]
    path = tmp_path / "trace.csv"
    path.write_text("arrival_s,prompt_len,output_len,prefix_id,prefix_len\n2.0,40,5,a,16\n1.0,20,3,a,16\n")
    rows = from_file(path, 1.0, 1.0, 0)
    assert len(from_file(path, 1.0, 1.0, 0, num_prompts=1)) == 1  # a timed trace: cut
    lengths = tmp_path / "lengths.jsonl"
    lengths.write_text('{"prompt_len": 20, "output_len": 3}\n{"prompt_len": 40, "output_len": 5}\n')
    drawn = from_file(lengths, 1.0, 1.0, 0, num_prompts=50)  # a prompt set's lengths, at a rate
    assert len(drawn) == 50 and {(r.prompt_len, r.output_len) for r in drawn} == {(20, 3), (40, 5)}
    assert [(r.arrival_s, len(r.prompt_ids), r.output_len) for r in rows] == [(1.0, 20, 3), (2.0, 40, 5)]
    assert rows[0].prompt_ids[:16] == rows[1].prompt_ids[:16]
    assert rows[0].prompt_ids == rows[0].prompt_ids  # drawn when asked, the same each time
    with pytest.raises(ValueError, match="'random' or 'shared-prefix'"):
        synthetic("mt-bench", 1, 1, 1, 0, 1, 1, 0)


def test_a_bench_serve_result_replays_the_run_at_each_rate(tmp_path):
    def run(rate, starts):
        return {"request_rate": rate, "common_prefix_tokens": 20, "requests": [
            {"start_s": t, "prompt_len": 30, "output_len": 4, "success": True} for t in starts]}
    path = tmp_path / "real.json"
    path.write_text(json.dumps({"systems": {"servelm": {"runs": [run(2.0, [0.0, 0.5]),
                                                                  run("inf", [0.0, 0.0, 0.0])]}}}))
    rows = from_file(path, 2.0, 1.0, 0)
    assert [r.arrival_s for r in rows] == [0.0, 0.5]
    assert rows[0].prompt_ids[:20] == rows[1].prompt_ids[:20]  # the template they open with
    assert rows[0].prompt_ids[20:] != rows[1].prompt_ids[20:]
    assert len(from_file(path, math.inf, 1.0, 0)) == 3
    with pytest.raises(ValueError, match="no run at --request-rate 6.0"):
        from_file(path, 6.0, 1.0, 0)


def test_the_front_end_delay_is_calibrated_on_one_or_several_served_runs(tmp_path):
    """Runs "served" with a known delay before the scheduler (here: simulated with it) give
    that delay back; runs before and after a drift give the delay between theirs."""
    from servelm.simulate.profile import calibrate_frontend_delay

    trace = synthetic("random", 40, 64, 16, 0.5, 20.0, 1.0, 0)

    def served(delay_ms: int) -> str:
        model = dataclasses.replace(MODEL, frontend_delay_s=delay_ms / 1e3)
        run = simulate(trace, [ReplicaSpec(model, SimEngineConfig())])
        path = tmp_path / f"served-{delay_ms}.json"
        path.write_text(json.dumps({"runs": [{**run, "request_rate": 20.0, "requests": [
            {"start_s": r.arrival_s, "prompt_len": r.prompt_len, "output_len": r.output_len,
             "success": True} for r in trace]}]}))
        return str(path)

    assert calibrate_frontend_delay(MODEL, [served(20)]) == pytest.approx(0.020)
    assert calibrate_frontend_delay(MODEL, [served(12), served(28)]) == pytest.approx(0.020, abs=0.0021)


def test_simulate_run_writes_bench_serve_keys(tmp_path):
    profile = tmp_path / "p.json"
    StepTimeModel(MODEL.coefficients, {"engine": {"num_kv_blocks": 128, "block_size": 16,
                                                  "max_model_len": 1024}}).save(profile)
    out = tmp_path / "r.json"
    rc = main(["simulate", "run", "--profile", str(profile), "--num-prompts", "40",
               "--random-input-len", "64", "--random-output-len", "16", "--request-rate", "5,inf",
               "--replicas", "2", "--router", "least-loaded", "--goodput", "ttft:500",
               "--result-file", str(out), "--quiet"])
    assert rc == 0
    res = json.loads(out.read_text())
    assert [r["request_rate"] for r in res["runs"]] == [5.0, "inf"]
    for run in res["runs"]:
        assert run["completed"] == 40 and run["failed"] == 0
        for key in ("mean_ttft_ms", "p90_ttft_ms", "mean_tpot_ms", "output_throughput",
                    "request_goodput", "num_preemptions", "events_per_s"):
            assert key in run
    assert res["runs"][1]["mean_ttft_ms"] > res["runs"][0]["mean_ttft_ms"]  # all at once queue
    assert [(r["count"], r["engine"]["num_kv_blocks"]) for r in res["replicas"]] == [(2, 128)]


def test_simulate_sums_up_a_run():
    trace = synthetic("random", 30, 32, 8, 0.0, 10.0, 1.0, 1)
    res = simulate(trace, [ReplicaSpec(MODEL, SimEngineConfig(num_kv_blocks=256, max_model_len=512), 3)],
                   "least-loaded")
    assert res["completed"] == 30 and res["total_output_tokens"] == 240


def test_a_speed_aware_router_gives_faster_replicas_more_of_the_work():
    """Two replicas 4x as fast as the third: speed-aware routing sends them more, and the
    cluster answers sooner than when the slow one takes its equal share."""
    config = SimEngineConfig(num_kv_blocks=512, max_model_len=512)
    slow = StepTimeModel([c * 4 for c in MODEL.coefficients])
    specs = [ReplicaSpec(MODEL, config, 2, "fast"), ReplicaSpec(slow, config, 1, "slow")]
    assert specs[0].decode_rate == pytest.approx(4 * specs[1].decode_rate)
    trace = synthetic("random", 120, 64, 16, 0.5, 40.0, 1.0, 3)
    rr, fast = (simulate(trace, specs, router) for router in ("round-robin", "speed-aware"))
    assert rr["requests_by_kind"] == {"fast": 80, "slow": 40}
    assert fast["requests_by_kind"]["fast"] > 90
    assert fast["mean_e2el_ms"] < rr["mean_e2el_ms"]


def test_profile_times_the_real_engine_and_keeps_its_options(tiny_model_dir, monkeypatch):
    from servelm.simulate import profile as prof

    monkeypatch.setattr(prof, "PREFILL_LENS", (16, 64, 128))
    monkeypatch.setattr(prof, "DECODE_BATCHES", (1, 4))
    monkeypatch.setattr(prof, "DECODE_CONTEXTS", (32, 96))
    config = EngineConfig(model=str(tiny_model_dir("llama")), dtype="float32", block_size=4,
                          num_kv_blocks=256, max_num_batched_tokens=64, max_num_seqs=8)
    model = prof.profile(config, repeats=1)
    assert all(c >= 0 for c in model.coefficients) and model.coefficients[0] > 0
    assert model.source["steps"] >= 2 * 16  # every decode step of every batch, and the prefills
    engine = model.source["engine"]
    assert (engine["num_kv_blocks"], engine["block_size"], engine["max_num_batched_tokens"],
            engine["max_num_seqs"]) == (256, 4, 64, 8)


def test_a_served_step_trace_fits_a_model(tiny_model_dir, tmp_path):
    import asyncio

    from servelm.engine.async_engine import AsyncLLM
    from servelm.simulate.profile import fit_step_trace

    trace = tmp_path / "steps.jsonl"
    llm = AsyncLLM(EngineConfig(model=str(tiny_model_dir("llama")), dtype="float32", block_size=4,
                                num_kv_blocks=128, max_num_batched_tokens=16, step_trace=str(trace)))

    async def serve():
        params = SamplingParams(max_tokens=6, ignore_eos=True)

        async def one(i):
            async for _ in llm.generate(f"r{i}", {"prompt_token_ids": list(range(10 + 50 * i, 10 + 50 * i + 8 * (i + 1)))}, params):
                pass

        await asyncio.gather(*(one(i) for i in range(5)))

    try:
        asyncio.run(serve())
    finally:
        llm.shutdown()
    lines = [json.loads(line) for line in trace.read_text().splitlines()]
    assert lines[0]["engine"]["num_kv_blocks"] == 128
    steps = lines[1:]
    assert sum(n for s in steps for n, _, _ in s["batch"]) == sum(8 * (i + 1) + 5 for i in range(5))
    model = fit_step_trace([str(trace)])
    assert model.source["engine"]["max_num_batched_tokens"] == 16 and model.source["steps"] >= 5
    with pytest.raises(ValueError, match="no engine header"):
        (tmp_path / "empty.jsonl").write_text("")
        fit_step_trace([str(tmp_path / "empty.jsonl")])


def test_the_balancer_moves_decoding_requests_from_the_busiest_replica():
    """Round-robin gives one replica every long request: with --migrate-imbalance the pool's
    balancer (cluster/migration.py's pick) moves some to the idle one, which finishes the
    run sooner; every request still gets all its tokens and no block is left held."""
    config = SimEngineConfig(num_kv_blocks=1024, max_model_len=1024, max_num_seqs=8)
    trace = [TraceRequest.of(0.0, list(range(1000 + 40 * i, 1032 + 40 * i)), 200 if i % 2 == 0 else 4)
             for i in range(24)]

    def run(imbalance):
        sim = Simulation([ReplicaSpec(MODEL, config, 2)], "round-robin", migrate_imbalance=imbalance)
        records, stats = sim.run(trace)
        for r in sim.replicas.values():
            r.scheduler.kv.pool.check_invariants()
            assert r.scheduler.kv.num_free_blocks == 1024 and not r.scheduler.requests
        return records, stats

    still, _ = run(0)
    moved, stats = run(4)
    assert stats["num_migrations"] > 0
    assert sorted(r.output_len for r in moved) == sorted(r.output_len for r in still)
    assert max(r.start + r.latency for r in moved) < max(r.start + r.latency for r in still)
    with pytest.raises(ValueError, match="--migrate-imbalance must be >= 0"):
        Simulation([ReplicaSpec(MODEL, config)], migrate_imbalance=-1)


def test_speculative_decoding_accepts_drafts_at_the_given_rate():
    """Drafts ride along decodes as the real scheduler plans them; all accepted, a request
    needs about a quarter of the steps, none accepted as many as without drafts; every
    request gets exactly its tokens either way."""
    trace = [TraceRequest.of(0.0, list(range(100 + 50 * i, 132 + 50 * i)), 40) for i in range(6)]

    def run(k, rate):
        config = SimEngineConfig(num_kv_blocks=256, max_model_len=512, num_speculative_tokens=k,
                                 spec_acceptance_rate=rate)
        sim = Simulation([ReplicaSpec(MODEL, config)])
        records, stats = sim.run(trace)
        assert [r.output_len for r in records] == [40] * 6
        sim.replicas["sim-0"].scheduler.kv.pool.check_invariants()
        return stats["steps"], sim.replicas["sim-0"].scheduler.counters

    plain, _ = run(0, 0.0)
    ideal, counters = run(3, 1.0)
    assert ideal < plain / 3 and counters["spec_accepted_tokens"] == counters["spec_proposed_tokens"] > 0
    rejected, counters = run(3, 0.0)
    assert rejected == plain and counters["spec_accepted_tokens"] == 0
    with pytest.raises(ValueError, match="--spec-acceptance-rate"):
        SimEngineConfig(num_speculative_tokens=2, spec_acceptance_rate=1.5)


def test_compare_sets_a_simulated_run_beside_the_mean_of_measured_ones(tmp_path):
    from servelm.simulate.fidelity import compare

    def result(path, ttft, preempted=None, counters=False):
        run = {"request_rate": 2.0, "mean_ttft_ms": ttft}
        if counters:
            run["server_counters"] = {"num_preemptions": preempted}
        else:
            run["num_preemptions"] = preempted
        path.write_text(json.dumps({"runs": [run]}))
        return str(path)

    real = [result(tmp_path / "a.json", 90.0, 8, True), result(tmp_path / "b.json", 110.0, 12, True)]
    rows = {r["metric"]: r for r in compare(real, result(tmp_path / "s.json", 105.0, 11))["rows"]}
    assert rows["mean_ttft_ms"]["measured_mean"] == 100.0
    assert rows["mean_ttft_ms"]["error"] == pytest.approx(0.05)
    assert rows["mean_ttft_ms"]["spread"] == pytest.approx(0.2)
    assert rows["num_preemptions"]["measured"] == [8, 12]  # from the servers' own counters
    (tmp_path / "other.json").write_text(json.dumps({"runs": [{"request_rate": "inf"}]}))
    with pytest.raises(ValueError, match="share no request rate"):
        compare(real, str(tmp_path / "other.json"))
