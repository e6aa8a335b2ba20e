"""Structured outputs through the engine: whatever a random tiny model samples under a JSON
schema, a regex, a list of choices or a grammar, the text parses and matches (checked with
Python's json and re, not with xgrammar); invalid specs fail the request alone with a
ValueError naming the field; requests without a spec in the same batch are untouched."""

from __future__ import annotations

import json
import re

import pytest

from servelm import SamplingParams

SCHEMA = {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]},
                                           "count": {"type": "integer", "minimum": 0, "maximum": 99},
                                           "ok": {"type": "boolean"}},
          "required": ["color", "count", "ok"], "additionalProperties": False}


def _texts(llm, spec, n=6, seed=0, max_tokens=64, **extra):
    params = SamplingParams(temperature=1.0, seed=seed, max_tokens=max_tokens, n=n,
                            structured_outputs=spec, **extra)
    out = llm.generate("Answer:", params, use_tqdm=False)[0]
    return [(c.text, c.finish_reason) for c in out.outputs]


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    from servelm import LLM

    engine = LLM(str(tiny_model_dir("llama")), num_kv_blocks=64, block_size=8)
    yield engine
    engine.shutdown()


def test_json_schema_always_parses_and_validates(llm):
    for text, finish in _texts(llm, {"json": SCHEMA}, n=8, max_tokens=96):
        assert finish == "stop", text
        value = json.loads(text)
        assert set(value) == {"color", "count", "ok"} and value["color"] in ("red", "green", "blue")
        assert isinstance(value["count"], int) and 0 <= value["count"] <= 99 and isinstance(value["ok"], bool)


def test_regex_choice_and_grammar(llm):
    for text, finish in _texts(llm, {"regex": r"[0-9]{3}-[a-c]{2}"}):
        assert finish == "stop" and re.fullmatch(r"[0-9]{3}-[a-c]{2}", text), text
    for text, _ in _texts(llm, {"choice": ["yes", "no", "maybe so"]}):
        assert text in ("yes", "no", "maybe so")
    grammar = 'root ::= "(" num ("+" num)* ")"\nnum ::= [1-9] [0-9]?'
    for text, finish in _texts(llm, {"grammar": grammar}, max_tokens=200):
        assert finish == "stop" and re.fullmatch(r"\([1-9][0-9]?(\+[1-9][0-9]?)*\)", text), text


def test_json_object_is_any_json_object(llm):
    for text, finish in _texts(llm, {"json_object": True}, n=4, max_tokens=200):
        if finish == "stop":  # an object can be long: one cut by max_tokens says "length"
            assert isinstance(json.loads(text), dict)
        else:
            assert finish == "length"


def test_batch_mixes_constrained_and_free_requests(llm):
    free = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    alone = llm.generate("Once upon", free, use_tqdm=False)[0].outputs[0].token_ids
    choice = SamplingParams(temperature=0, max_tokens=12, structured_outputs={"choice": ["up", "down"]})
    both = llm.generate(["Once upon", "Go"], [free, choice], use_tqdm=False)
    assert both[0].outputs[0].token_ids == alone
    assert both[1].outputs[0].text in ("up", "down")


@pytest.mark.parametrize("spec,message", [
    ({"json": {"type": "object", "properties": {"a": {"type": "no-such-type"}}}}, "structured_outputs.json"),
    ({"regex": "(unclosed"}, "structured_outputs.regex"),
    ({"grammar": "root ::= undefined_rule"}, "structured_outputs.grammar"),
    ({"json": {}, "regex": "a"}, "exactly one"),
    ({"choice": []}, "structured_outputs.choice"),
    ({"regex": "a" * 100_001}, "the limit is 100000"),
])
def test_bad_specs_are_refused_naming_the_field(llm, spec, message):
    with pytest.raises(ValueError, match=message):
        llm.generate("x", SamplingParams(structured_outputs=spec), use_tqdm=False)
    assert llm.generate("x", SamplingParams(max_tokens=2), use_tqdm=False)[0].outputs[0].token_ids


SPECULATION = {
    "ngram": lambda dirs: {"method": "ngram", "num_speculative_tokens": 3},
    "draft_tree": lambda dirs: {"method": "draft_model", "model": str(dirs("llama")), "tree": [3, 2, 1]},
    "layer_skip_tree": lambda dirs: {"method": "layer_skip", "num_layers": 1, "tree": [2, 2]},
}


@pytest.mark.parametrize("options", [
    dict(),
    dict(max_num_batched_tokens=24, num_kv_blocks=16, block_size=4),  # chunked, preempted
], ids=["batch", "recompute"])
@pytest.mark.parametrize("method", SPECULATION)
def test_drafts_are_checked_against_the_grammar(tiny_model_dir, make_llm, method, options):
    """Constrained requests speculate: the worker masks every draft node's logits with the
    grammar, so greedy output is exactly the unspeculated constrained output, sampled
    output stays valid, and drafts the grammar allows are accepted."""
    path = tiny_model_dir("llama")
    spec = make_llm(path, speculative_config=SPECULATION[method](tiny_model_dir), **options)
    plain = make_llm(path, **options)
    prompts = ["abababab", "Answer:", "x y z", "ababab", "Once upon a time"]
    constraints = [{"regex": "(ab){1,20}"}, {"json": SCHEMA}, {"regex": "[a-c ]{4,40}"},
                   {"choice": ["abab", "ababab", "ba"]}, {"regex": "[^#]{1,400}"}]
    greedy = [SamplingParams(temperature=0, max_tokens=40, structured_outputs=c) for c in constraints]

    def run(llm, params):
        return [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]

    assert [c.token_ids for c in run(spec, greedy)] == [c.token_ids for c in run(plain, greedy)]
    sampled = [p.clone(temperature=1.0, seed=3) for p in greedy]
    outs = run(spec, sampled)
    assert re.fullmatch("(ab){1,20}", outs[0].text) or outs[0].finish_reason == "length"
    if outs[1].finish_reason == "stop":
        assert set(json.loads(outs[1].text)) == {"color", "count", "ok"}
    assert re.fullmatch("[a-c ]{4,40}", outs[2].text) or outs[2].finish_reason == "length"
    assert outs[3].text in ("abab", "ababab", "ba")
    assert "#" not in outs[4].text  # (most of what the model says: its drafts are accepted)
    m = spec.get_metrics()
    assert m["spec_proposed_tokens"] > 0 and m["spec_accepted_tokens"] > 0
    if options:
        assert m["num_preemptions"] > 0


def test_compiling_a_grammar_does_not_stall_running_streams(tiny_model_dir, monkeypatch):
    """AsyncLLM compiles a spec off the engine's loop: while a slow compile runs (1.5 s here),
    a request already streaming keeps getting tokens; the compile happens once."""
    import asyncio
    import time

    from servelm.config import EngineConfig
    from servelm.engine.async_engine import AsyncLLM
    from servelm.engine.structured import StructuredOutputs

    compiled, real = [], StructuredOutputs._compile_spec

    def slow_compile(self, spec):
        if not compiled:
            time.sleep(1.5)
        compiled.append(spec)
        return real(self, spec)

    monkeypatch.setattr(StructuredOutputs, "_compile_spec", slow_compile)
    llm = AsyncLLM(EngineConfig(model=str(tiny_model_dir("llama")), num_kv_blocks=128, block_size=8))

    async def run():
        free = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)
        stamps = []

        async def stream():
            async for _ in llm.generate("free", "Once upon a time", free):
                stamps.append(time.monotonic())

        task = asyncio.ensure_future(stream())
        while len(stamps) < 3:
            await asyncio.sleep(0.01)
        asked = time.monotonic()
        constrained = SamplingParams(max_tokens=8, structured_outputs={"regex": "[ab]{8}"})
        outs = [o async for o in llm.generate("constrained", "x", constrained)]
        await task
        return asked, stamps, outs[-1]

    try:
        asked, stamps, out = asyncio.run(run())
    finally:
        llm.shutdown()
    assert re.fullmatch("[ab]{8}", out.outputs[0].text)
    gaps = [b - a for a, b in zip(stamps, stamps[1:]) if b > asked and a < asked + 1.5]
    assert max(gaps) < 0.5, f"the running stream paused for {max(gaps):.2f} s"
    assert len(compiled) == 2  # on its own thread, then the engine's cache hit (no second sleep)
