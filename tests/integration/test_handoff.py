"""A request moved from one engine to another mid-decode (issue 19: the prefill engine's
handoff, live migration) goes on exactly as if it had stayed: the same tokens and the same
streamed text as one engine alone, greedy and seeded, with float and int8 K/V. Without its
K/V (a failed transfer, another cache layout) the receiver recomputes it, same output. Both
engines end with every block back and no request left."""

from __future__ import annotations

import pytest
from leaks import assert_no_leaks

from servelm.config import EngineConfig
from servelm.engine.engine import LLMEngine
from servelm.sampling_params import SamplingParams

PROMPT = "The cache holds the keys and values of every token"
GREEDY = SamplingParams(max_tokens=14, temperature=0.0, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=14, temperature=0.9, top_p=0.95, seed=5, ignore_eos=True)


def engine(tiny_model_dir, **kw) -> LLMEngine:
    base = {"model": str(tiny_model_dir("llama")), "dtype": "float32", "block_size": 4,
            "num_kv_blocks": 64}
    return LLMEngine(EngineConfig(**{**base, **kw}))


def drain(eng: LLMEngine, texts: list[str]):
    """Step until nothing is left; the last output, with every streamed delta in `texts`."""
    final = None
    while eng.has_unfinished_requests():
        for out in eng.step():
            texts.append(out.outputs[0].delta_text)
            final = out
    return final


def alone(tiny_model_dir, params: SamplingParams, **kw) -> tuple[list[int], str]:
    eng = engine(tiny_model_dir, **kw)
    eng.add_request("r", PROMPT, params, stream=True)
    texts: list[str] = []
    out = drain(eng, texts)
    return out.outputs[0].token_ids, "".join(texts)


def moved(tiny_model_dir, params: SamplingParams, after: int, drop_kv: bool = False,
          receiver: dict | None = None, **kw) -> tuple[list[int], str, bool]:
    a, b = engine(tiny_model_dir, **kw), engine(tiny_model_dir, **{**kw, **(receiver or {})})
    a.add_request("r", PROMPT, params, stream=True)
    texts: list[str] = []
    while True:
        outs = a.step()
        texts += [o.outputs[0].delta_text for o in outs]
        if outs and len(outs[-1].outputs[0].token_ids) >= after:
            break
    handoff = a.export_request("r")
    assert len(handoff.output_token_ids) == after
    assert_no_leaks(a)  # gone from the sender, its blocks free (the prompt's still findable)
    if drop_kv:
        handoff.kv = None
    took_kv = b.import_request(handoff)
    out = drain(b, texts)
    assert_no_leaks(b)
    return out.outputs[0].token_ids, "".join(texts), took_kv


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
@pytest.mark.parametrize("kv", ["auto", "int8"])
def test_moved_request_goes_on_exactly(tiny_model_dir, params, kv):
    ref_tokens, ref_text = alone(tiny_model_dir, params, kv_cache_dtype=kv)
    for after in (1, 5):  # right after the prefill's first token (disaggregation), mid-decode
        tokens, text, took_kv = moved(tiny_model_dir, params, after, kv_cache_dtype=kv)
        assert took_kv and tokens == ref_tokens and text == ref_text


@pytest.mark.parametrize("how", ["lost", "layout"])
def test_without_its_kv_the_receiver_recomputes(tiny_model_dir, how):
    ref_tokens, ref_text = alone(tiny_model_dir, SEEDED)
    tokens, text, took_kv = moved(tiny_model_dir, SEEDED, 3, drop_kv=how == "lost",
                                  receiver={"block_size": 8} if how == "layout" else None)
    assert not took_kv and tokens == ref_tokens and text == ref_text


def test_only_a_decoding_single_sample_request_moves(tiny_model_dir):
    eng = engine(tiny_model_dir)
    with pytest.raises(ValueError, match="not running here"):
        eng.export_request("nope")
    eng.add_request("pair", PROMPT, SamplingParams(n=2, max_tokens=4))
    eng.add_request("new", PROMPT, SamplingParams(max_tokens=4))
    with pytest.raises(ValueError, match="n=2 samples"):
        eng.export_request("pair")
    with pytest.raises(ValueError, match="not between two decode steps"):
        eng.export_request("new")  # not prefilled yet
    drain(eng, [])
    assert_no_leaks(eng)


def test_async_engines_hand_a_stream_over(tiny_model_dir):
    """Through AsyncLLM, as replicas will: the sender's stream yields every output made
    before the export, then raises RequestMoved; the receiver's stream goes on from there."""
    import asyncio

    from servelm.engine.async_engine import AsyncLLM, RequestMoved

    ref_tokens, ref_text = alone(tiny_model_dir, SEEDED)
    config = EngineConfig(model=str(tiny_model_dir("llama")), dtype="float32", block_size=4,
                          num_kv_blocks=64)
    a, b = AsyncLLM(config), AsyncLLM(config)

    async def scenario() -> tuple[list[int], str]:
        texts, moved = [], None
        with pytest.raises(ValueError, match="not running here"):
            await a.export_request("nope")
        try:
            async for out in a.generate("r", PROMPT, SEEDED):
                texts.append(out.outputs[0].delta_text)
                if len(out.outputs[0].token_ids) == 3 and moved is None:
                    moved = asyncio.ensure_future(a.export_request("r"))
        except RequestMoved as exc:
            handoff = exc.handoff
        assert (await moved) is handoff
        async for out in b.import_request(handoff):
            texts.append(out.outputs[0].delta_text)
        return out.outputs[0].token_ids, "".join(texts)

    try:
        tokens, text = asyncio.run(scenario())
        assert tokens == ref_tokens and text == ref_text
    finally:
        a.shutdown(), b.shutdown()
    assert_no_leaks(a.engine), assert_no_leaks(b.engine)


@pytest.mark.multiprocess
def test_tensor_parallel_engines_move_each_ranks_share(tiny_model_dir, no_workers_left):
    """T=2 to T=2: each rank sends its own heads' K/V; T=2 to one process: recomputed."""
    ref_tokens, ref_text = alone(tiny_model_dir, SEEDED)
    engines = []
    try:
        for receiver in ({}, {"tensor_parallel_size": 1}):
            a = engine(tiny_model_dir, tensor_parallel_size=2)
            b = engine(tiny_model_dir, **{"tensor_parallel_size": 2, **receiver})
            engines += [a, b]
            a.add_request("r", PROMPT, SEEDED, stream=True)
            texts: list[str] = []
            while not (outs := a.step()) or len(outs[-1].outputs[0].token_ids) < 4:
                texts += [o.outputs[0].delta_text for o in outs]
            texts += [o.outputs[0].delta_text for o in outs]
            handoff = a.export_request("r")
            assert len(handoff.kv) == 2  # one payload per rank
            took_kv = b.import_request(handoff)
            out = drain(b, texts)
            assert took_kv == (receiver == {})
            assert out.outputs[0].token_ids == ref_tokens and "".join(texts) == ref_text
            assert_no_leaks(a), assert_no_leaks(b)
    finally:
        for e in engines:
            e.shutdown()


def test_a_constrained_request_moves_into_an_engine_that_speculates(tiny_model_dir):
    """Its grammar's state is rebuilt on the receiver from the output so far, and the
    receiver's worker checks its drafts against it: the same text as one engine alone."""
    params = SamplingParams(max_tokens=14, temperature=0.0, structured_outputs={"regex": "[a-z ]{10,40}"})
    ref_tokens, ref_text = alone(tiny_model_dir, params)
    a = engine(tiny_model_dir)
    b = engine(tiny_model_dir, speculative_config={"method": "ngram", "num_speculative_tokens": 3,
                                                   "prompt_lookup_min": 1})
    a.add_request("r", PROMPT, params, stream=True)
    texts: list[str] = []
    while not texts or len(a.outputs.groups["r"].seqs[0].output_token_ids) < 4:
        texts += [o.outputs[0].delta_text for o in a.step()]
    assert b.import_request(a.export_request("r"))
    out = drain(b, texts)
    assert out.outputs[0].token_ids == ref_tokens and "".join(texts) == ref_text
    assert b.get_metrics()["spec_proposed_tokens"] > 0
    assert_no_leaks(a)
    assert_no_leaks(b)
