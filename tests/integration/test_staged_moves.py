"""Live migration's staged copy and disaggregation's roles, engine by engine (issue 19).

A request keeps decoding at its source while its full blocks are copied to the target in
stages; the final export carries only the blocks written since. The target goes on with
the same tokens and streamed text as one engine alone. An engine of role prefill hands each
request over after its first token; one of role decode refuses prompts. Staged blocks of a
migration that never arrives are freed."""

from __future__ import annotations

import asyncio

import pytest
from leaks import assert_no_leaks
from test_handoff import PROMPT, SEEDED, alone, drain, engine

from servelm.config import EngineConfig
from servelm.engine import handoff as moves
from servelm.engine.async_engine import AsyncLLM, RequestMoved


def decoding_on_one_of_two(tiny_model_dir):
    """Two engines, request "r" four steps into its run on the first; its streamed text."""
    a, b = engine(tiny_model_dir), engine(tiny_model_dir)
    a.add_request("r", PROMPT, SEEDED, stream=True)
    texts: list[str] = []
    for _ in range(4):
        texts += [o.outputs[0].delta_text for o in a.step()]
    return a, b, texts


@pytest.mark.parametrize("kv", ["auto", "int8"])
def test_staged_copy_then_a_short_stop(tiny_model_dir, kv):
    ref_tokens, ref_text = alone(tiny_model_dir, SEEDED, kv_cache_dtype=kv)
    a, b = engine(tiny_model_dir, kv_cache_dtype=kv), engine(tiny_model_dir, kv_cache_dtype=kv)
    a.add_request("r", PROMPT, SEEDED, stream=True)
    texts: list[str] = []
    staged, stages = 0, 0
    while True:  # copy what is full after each step, while it keeps running
        outs = a.step()
        texts += [o.outputs[0].delta_text for o in outs]
        payloads, n = moves.read_kv(a, "r", staged)
        if n:
            staged = moves.stage_kv(b, "r", staged, payloads)
            stages += 1
        if len(outs[-1].outputs[0].token_ids) >= 9:
            break
    assert stages >= 2 and staged >= 3  # the prompt's blocks, then those decoding filled
    handoff = a.export_request("r", first_block=staged)
    assert handoff.kv_first_block == staged and handoff.kv[0].num_blocks <= 2
    assert_no_leaks(a)
    assert b.import_request(handoff)
    out = drain(b, texts)
    assert out.outputs[0].token_ids == ref_tokens and "".join(texts) == ref_text
    assert_no_leaks(b)


def test_staged_blocks_that_do_not_join_up_are_recomputed_or_dropped(tiny_model_dir):
    ref_tokens, ref_text = alone(tiny_model_dir, SEEDED)
    a, b, texts = decoding_on_one_of_two(tiny_model_dir)
    payloads, n = moves.read_kv(a, "r", 0)
    with pytest.raises(ValueError, match="0 blocks staged, got blocks from 1"):
        moves.stage_kv(b, "r", 1, payloads)
    moves.stage_kv(b, "r", 0, payloads)
    handoff = a.export_request("r")  # all its blocks again: does not join the staged ones
    assert not b.import_request(handoff)  # recomputed, staged blocks freed
    out = drain(b, texts)
    assert out.outputs[0].token_ids == ref_tokens and "".join(texts) == ref_text
    assert_no_leaks(b)
    moves.stage_kv(b, "gone", 0, payloads)  # a migration that never arrives
    assert b.scheduler.kv.num_free_blocks < b.scheduler.kv.num_blocks
    moves.drop_staged(b, "gone")
    assert_no_leaks(b)


def test_prefill_role_hands_over_after_the_first_token(tiny_model_dir):
    ref_tokens, ref_text = alone(tiny_model_dir, SEEDED)
    base = dict(model=str(tiny_model_dir("llama")), dtype="float32", block_size=4, num_kv_blocks=64)
    prefill = AsyncLLM(EngineConfig(**base, role="prefill"))
    decode = AsyncLLM(EngineConfig(**base, role="decode"))

    async def scenario():
        with pytest.raises(ValueError, match="role is decode"):
            decode.generate("x", PROMPT, SEEDED)
        texts, firsts = [], []
        try:
            async for out in prefill.generate("r", PROMPT, SEEDED):
                texts.append(out.outputs[0].delta_text)
                firsts.append(len(out.outputs[0].token_ids))
        except RequestMoved as exc:
            handoff = exc.handoff
        assert firsts == [1] and len(handoff.output_token_ids) == 1
        async for out in decode.import_request(handoff):
            texts.append(out.outputs[0].delta_text)
        # a request done at its first token finishes on the prefill engine
        last = [o async for o in prefill.generate("one", PROMPT, SEEDED.__class__(max_tokens=1))][-1]
        assert last.finished
        return out.outputs[0].token_ids, "".join(texts)

    try:
        tokens, text = asyncio.run(scenario())
        assert tokens == ref_tokens and text == ref_text
    finally:
        prefill.shutdown(), decode.shutdown()
    assert_no_leaks(prefill.engine), assert_no_leaks(decode.engine)


def test_a_transfer_that_fails_is_recomputed(tiny_model_dir):
    """The shared-memory segment is gone before the receiver reads it: the receiver gets
    the handoff without K/V and the reason, recomputes, and the output is the same."""
    from servelm.cluster.kv_transport import SharedMemoryTransport, receive_handoff, send_handoff

    ref_tokens, ref_text = alone(tiny_model_dir, SEEDED)
    a, b, texts = decoding_on_one_of_two(tiny_model_dir)
    handover = send_handoff(a.export_request("r"), "shm")
    SharedMemoryTransport().discard(handover.handoff.kv[0])
    handoff, failure = receive_handoff(handover)
    assert handoff.kv is None and "FileNotFoundError" in failure
    assert not b.import_request(handoff)
    out = drain(b, texts)
    assert out.outputs[0].token_ids == ref_tokens and "".join(texts) == ref_text
    assert_no_leaks(a), assert_no_leaks(b)
