"""Scheduling policies decide order, never content: each orders requests as documented,
gives the same greedy outputs as FCFS, and lets a disfavoured request finish while better
ones keep arriving (bounded starvation)."""

from __future__ import annotations

import pytest

from servelm import SamplingParams
from servelm.config import EngineConfig
from servelm.engine.engine import LLMEngine


def engine(tiny_model_dir, policy: str, **options) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(tiny_model_dir("llama")), block_size=4,
                                  num_kv_blocks=256, max_num_seqs=1, scheduling_policy=policy,
                                  **options))


def params(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)


def finish_order(eng: LLMEngine, max_steps: int = 2000) -> list[str]:
    done = []
    for _ in range(max_steps):
        if not eng.has_unfinished_requests():
            break
        done += [o.request_id for o in eng.step() if o.finished]
    return done


def test_priority_runs_lower_values_first(tiny_model_dir):
    eng = engine(tiny_model_dir, "priority")
    for rid, prio in (("p3", 3), ("p1", 1), ("p2", 2)):
        eng.add_request(rid, [5, 6, 7], params(4), priority=prio)
    assert finish_order(eng) == ["p1", "p2", "p3"]
    with pytest.raises(ValueError, match="priority"):
        eng.add_request("bad", [5], params(1), priority="high")


def test_sjf_runs_shortest_first(tiny_model_dir):
    eng = engine(tiny_model_dir, "sjf")
    for rid, n in (("long", 30), ("short", 5), ("mid", 10)):
        eng.add_request(rid, [5, 6, 7], params(n))
    assert finish_order(eng) == ["short", "mid", "long"]


def test_mlfq_preempts_a_long_job_for_a_new_short_one(tiny_model_dir):
    eng = engine(tiny_model_dir, "mlfq", enable_prefix_caching=True)
    eng.add_request("long", [5, 6, 7], params(120))
    for _ in range(40):  # "long" uses up its first quanta and sinks
        eng.step()
    eng.add_request("short", [8, 9], params(4))
    order = finish_order(eng)
    assert order == ["short", "long"]
    assert eng.get_metrics()["num_policy_preemptions"] >= 1


def test_mlfq_swaps_the_preempted_job_out_and_back(tiny_model_dir):
    """With preemption_mode="swap" a policy preemption keeps the victim's KV (FastServe's
    proactive swapping): nothing is recomputed and its tokens are unchanged."""
    def run(policy: str, **options) -> tuple[dict[str, list[int]], dict]:
        eng = engine(tiny_model_dir, policy, **options)
        eng.add_request("long", [5, 6, 7], params(120))
        for _ in range(40):
            eng.step()
        eng.add_request("short", [8, 9], params(4))
        outs = {}
        while eng.has_unfinished_requests():
            outs.update({o.request_id: o.outputs[0].token_ids for o in eng.step() if o.finished})
        eng.scheduler.kv.check_invariants()
        return outs, eng.get_metrics()

    swapped, m = run("mlfq", preemption_mode="swap")
    # All of "long"'s ~43 tokens (11 blocks of 4) went to swap space, not to be recomputed.
    assert m["num_policy_preemptions"] >= 1 and m["num_swap_out_blocks"] >= 11
    assert swapped == run("fcfs")[0]


@pytest.mark.parametrize("policy", ["priority", "sjf", "mlfq"])
@pytest.mark.parametrize("preemption_mode", ["recompute", "swap"])
def test_same_outputs_as_fcfs(tiny_model_dir, policy, preemption_mode):
    prompts = [[5 + i, 6, 7 + 2 * i] for i in range(5)]
    outs = {}
    for name in ("fcfs", policy):
        eng = engine(tiny_model_dir, name, max_num_batched_tokens=8,
                     preemption_mode=preemption_mode)
        for i, p in enumerate(prompts):
            eng.add_request(f"r{i}", p, params(6 + 7 * (i % 3)), priority=i % 2)
        got = {}
        while eng.has_unfinished_requests():
            for o in eng.step():
                if o.finished:
                    got[o.request_id] = o.outputs[0].token_ids
        outs[name] = got
        assert eng.scheduler.kv.num_free_blocks == eng.scheduler.kv.num_blocks
    assert outs[policy] == outs["fcfs"]


@pytest.mark.parametrize("policy, victim, stream", [
    ("priority", {"priority": 3, "max_tokens": 3}, {"priority": 0, "max_tokens": 6}),
    ("sjf", {"priority": 0, "max_tokens": 40}, {"priority": 0, "max_tokens": 6}),
    ("mlfq", {"priority": 0, "max_tokens": 60}, {"priority": 0, "max_tokens": 3}),
])
def test_starvation_is_bounded(tiny_model_dir, policy, victim, stream):
    """One disfavoured request while a better one arrives every step: aging lets it finish."""
    def run(aging_steps: int) -> bool:
        eng = engine(tiny_model_dir, policy)
        eng.scheduler.policy.aging_steps = eng.scheduler.policy.sjf_max_wait_steps = aging_steps
        eng.scheduler.policy.sjf_wait_weight = 1.0 if aging_steps < 10**9 else 0.0
        eng.add_request("victim", [5, 6, 7], params(victim["max_tokens"]),
                        priority=victim["priority"])
        for i in range(600):
            eng.add_request(f"s{i}", [8, 9], params(stream["max_tokens"]),
                            priority=stream["priority"])
            for o in eng.step():
                if o.request_id == "victim" and o.finished:
                    return True
        return False

    assert run(aging_steps=10)
    assert not run(aging_steps=10**9)  # without aging the stream really does starve it


def test_preempted_mid_prefill_keeps_prompt_logprobs_whole(tiny_model_dir):
    """A request collecting prompt logprobs that is preempted between prefill chunks and
    recomputed reports each prompt position once, with the values of an undisturbed run."""
    prompt = [5 + (7 * i) % 300 for i in range(30)]
    want = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, prompt_logprobs=1)

    def run(disturb: bool):
        eng = engine(tiny_model_dir, "sjf", max_num_batched_tokens=8)
        eng.add_request("a", prompt, want)
        eng.step()  # first 8-token chunk of "a"
        if disturb:  # shorter job: sjf preempts "a" mid-prefill
            eng.add_request("b", [8, 9], params(2))
        outs = {}
        while eng.has_unfinished_requests():
            outs.update({o.request_id: o for o in eng.step() if o.finished})
        assert not disturb or eng.get_metrics()["num_policy_preemptions"] >= 1
        return outs["a"].prompt_logprobs

    calm, disturbed = run(False), run(True)
    assert len(disturbed) == len(prompt) == len(calm)
    for a, b in zip(calm[1:], disturbed[1:]):
        assert a.keys() == b.keys()
        assert all(abs(a[t].logprob - b[t].logprob) < 1e-5 for t in a)


def test_sjf_ranks_by_a_learned_predictor(tiny_model_dir, tmp_path):
    """Every request asks for the same max_tokens, so only a learned predictor can tell
    them apart: prompts with token 11 were long in the training log, with 12 short."""
    from servelm.engine.length_predictor import LengthPredictor

    vocab = len(engine(tiny_model_dir, "fcfs").tokenizer)
    prompts = [[t, 20 + i, 30 + i] for i in range(20) for t in (11, 12)]
    lens = [200 if p[0] == 11 else 5 for p in prompts]
    path = tmp_path / "lengths.npz"
    LengthPredictor.fit(prompts, lens, vocab_size=vocab).save(path)

    def order(**options) -> list[str]:
        eng = engine(tiny_model_dir, "sjf", **options)
        eng.add_request("looks-long", [11, 25, 35], params(6))
        eng.add_request("looks-short", [12, 26, 36], params(6))
        return finish_order(eng)

    assert order() == ["looks-long", "looks-short"]  # max_tokens tie: arrival order
    assert order(length_predictor=str(path)) == ["looks-short", "looks-long"]

    LengthPredictor.fit(prompts, lens, vocab_size=vocab + 1).save(path)
    with pytest.raises(ValueError, match=f"tokenizer with {vocab + 1} tokens"):
        engine(tiny_model_dir, "sjf", length_predictor=str(path))
    with pytest.raises(ValueError, match="length_predictor is used only by"):
        engine(tiny_model_dir, "fcfs", length_predictor=str(path))
