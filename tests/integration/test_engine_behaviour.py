"""Engine behaviour beyond greedy parity: stops, n > 1, seeds, chat, errors, aborts, metrics."""

from __future__ import annotations

import pytest

from servelm import SamplingParams


@pytest.fixture
def llm(tiny_model_dir, make_llm):
    return make_llm(tiny_model_dir("llama"), block_size=4, num_kv_blocks=64, max_num_batched_tokens=32)


def greedy(**kw) -> SamplingParams:
    return SamplingParams(temperature=0, ignore_eos=True, **kw)


def test_stop_token_ids_end_generation(llm):
    base = llm.generate("Hello there", greedy(max_tokens=12), use_tqdm=False)[0].outputs[0]
    stop_at = base.token_ids[4]
    out = llm.generate("Hello there", greedy(max_tokens=12, stop_token_ids=[stop_at]), use_tqdm=False)[0]
    comp = out.outputs[0]
    first = base.token_ids.index(stop_at)
    assert comp.token_ids == base.token_ids[: first + 1]
    assert comp.finish_reason == "stop" and comp.stop_reason == stop_at


def test_stop_string_truncates_text(llm):
    base = llm.generate("Once upon", greedy(max_tokens=16), use_tqdm=False)[0].outputs[0]
    assert len(base.text) > 6
    stop = base.text[3:6]
    comp = llm.generate("Once upon", greedy(max_tokens=16, stop=[stop]), use_tqdm=False)[0].outputs[0]
    assert comp.text == base.text[: base.text.index(stop)]
    assert comp.finish_reason == "stop" and comp.stop_reason == stop
    kept = llm.generate("Once upon", greedy(max_tokens=16, stop=[stop], include_stop_str_in_output=True),
                        use_tqdm=False)[0].outputs[0]
    assert kept.text == base.text[: base.text.index(stop) + len(stop)]


def test_length_finish_and_outputs_in_input_order(llm):
    prompts = ["a", "bb bb", "ccc ccc ccc", "d"]
    outs = llm.generate(prompts, [greedy(max_tokens=n) for n in (3, 1, 7, 2)], use_tqdm=False)
    assert [o.prompt for o in outs] == prompts
    assert [len(o.outputs[0].token_ids) for o in outs] == [3, 1, 7, 2]
    assert all(o.outputs[0].finish_reason == "length" for o in outs)
    m = outs[0].metrics
    assert m.arrival_time <= m.first_token_time <= m.finished_time


def test_min_tokens_delays_stop_tokens(llm):
    base = llm.generate("Hello there", greedy(max_tokens=12), use_tqdm=False)[0].outputs[0]
    stop_at = base.token_ids[1]
    comp = llm.generate("Hello there", greedy(max_tokens=12, stop_token_ids=[stop_at], min_tokens=6),
                        use_tqdm=False)[0].outputs[0]
    assert stop_at not in comp.token_ids[:6]
    assert comp.token_ids[:1] == base.token_ids[:1]
    assert len(comp.token_ids) >= 6


def test_eos_ends_generation_unless_ignored(tiny_model_dir, make_llm):
    llm = make_llm(tiny_model_dir("llama"))
    base = llm.generate("Hello there", greedy(max_tokens=12), use_tqdm=False)[0].outputs[0]
    # Declare the token greedy decoding produces second to be the model's EOS.
    eos = base.token_ids[1]
    llm.engine.eos_token_ids = (eos,)
    stopped = llm.generate("Hello there", SamplingParams(temperature=0, max_tokens=12),
                           use_tqdm=False)[0].outputs[0]
    assert stopped.token_ids == base.token_ids[: base.token_ids.index(eos) + 1]
    assert stopped.finish_reason == "stop" and stopped.stop_reason == eos
    # The stop token's own text never reaches the output, even with special tokens kept.
    raw = llm.generate("Hello there", SamplingParams(temperature=0, max_tokens=12, skip_special_tokens=False),
                       use_tqdm=False)[0].outputs[0]
    tok = llm.get_tokenizer()
    assert raw.text == tok.decode(raw.token_ids[:-1], skip_special_tokens=False)
    ignored = llm.generate("Hello there", greedy(max_tokens=12), use_tqdm=False)[0].outputs[0]
    assert ignored.token_ids == base.token_ids


def test_seeded_sampling_is_independent_of_batch(llm):
    params = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=16, seed=1234)
    alone = llm.generate("The cat", params, use_tqdm=False)[0].outputs[0].token_ids
    others = [SamplingParams(temperature=1.0, max_tokens=10)] * 3 + [params]
    batched = llm.generate(["x y", "hello", "zzz", "The cat"], others, use_tqdm=False)
    assert batched[3].outputs[0].token_ids == alone
    different = llm.generate("The cat", params.clone(seed=99), use_tqdm=False)[0].outputs[0].token_ids
    assert different != alone


def test_n_samples_differ_and_share_the_prompt(llm):
    out = llm.generate("The dog", SamplingParams(n=4, temperature=1.0, max_tokens=12, seed=7),
                       use_tqdm=False)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2, 3]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    again = llm.generate("The dog", SamplingParams(n=4, temperature=1.0, max_tokens=12, seed=7),
                         use_tqdm=False)[0]
    assert [c.token_ids for c in again.outputs] == [c.token_ids for c in out.outputs]


def test_chat_applies_template(llm):
    conv = [{"role": "user", "content": "hi"}]
    ids = llm.apply_chat_template(conv)
    expected = llm.get_tokenizer().apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
    assert llm.get_tokenizer().decode(ids) == expected
    outs = llm.chat([conv, conv + [{"role": "assistant", "content": "yo"}, {"role": "user", "content": "ok"}]],
                    greedy(max_tokens=4), use_tqdm=False)
    assert outs[0].prompt_token_ids == ids and len(outs) == 2


@pytest.mark.parametrize("prompt, message", [
    ({"prompt_token_ids": []}, "at least one token"),
    ({"prompt_token_ids": [1, 10**6]}, "token ids must be integers in [0,"),
    ({"prompt_token_ids": [5] * 600}, "context window"),
])
def test_bad_prompts_rejected_without_leaking(llm, prompt, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[")):
        llm.generate(["fine prompt", prompt], greedy(max_tokens=2), use_tqdm=False)
    assert llm.generate("still works", greedy(max_tokens=2), use_tqdm=False)[0].outputs[0].token_ids


def test_request_that_can_never_fit_is_rejected(tiny_model_dir, make_llm):
    with pytest.raises(ValueError, match="max_model_len"):
        make_llm(tiny_model_dir("llama"), block_size=4, num_kv_blocks=8, max_model_len=64)
    llm = make_llm(tiny_model_dir("llama"), block_size=4, num_kv_blocks=8)
    assert llm.engine.max_model_len == 32  # capped by what the cache holds
    with pytest.raises(ValueError, match="context window is 32"):
        llm.generate({"prompt_token_ids": [5] * 40}, greedy(max_tokens=2), use_tqdm=False)
    out = llm.generate({"prompt_token_ids": [5] * 20}, SamplingParams(max_tokens=None, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 12 and out.finish_reason == "length"


def test_abort_frees_blocks(llm):
    eng = llm.engine
    eng.add_request("keep", "hello world", greedy(max_tokens=8))
    eng.add_request("drop", "goodbye world", greedy(max_tokens=50))
    eng.step()
    eng.step()
    assert eng.scheduler.kv.num_free_blocks < eng.scheduler.kv.num_blocks
    eng.abort_request("drop")
    finished = []
    while eng.has_unfinished_requests():
        finished += eng.step()
    assert [o.request_id for o in finished] == ["keep"]
    assert len(finished[0].outputs[0].token_ids) == 8


def test_metrics_counters(llm):
    before = llm.get_metrics()
    llm.generate(["one", "two two"], greedy(max_tokens=5), use_tqdm=False)
    after = llm.get_metrics()
    for key in ("kv_blocks_total", "kv_blocks_free", "num_preemptions",
                "prompt_tokens_total", "generation_tokens_total"):
        assert key in after
    assert after["generation_tokens_total"] - before["generation_tokens_total"] == 10
    assert after["kv_blocks_free"] == after["kv_blocks_total"]


def test_sliding_window_caps_the_context(tiny_model_dir, make_llm):
    llm = make_llm(tiny_model_dir("mistral", sliding_window=48))
    assert llm.engine.max_model_len == 48
    with pytest.raises(ValueError, match="exceeds the model's context length"):
        make_llm(tiny_model_dir("mistral", sliding_window=48), max_model_len=100)


def test_a_failing_request_does_not_take_others_down(llm):
    eng = llm.engine
    eng.add_request("good", "hello world", greedy(max_tokens=6))
    eng.add_request("bad", "goodbye world", greedy(max_tokens=6))
    bad = eng.outputs.groups["bad"].seqs[0]

    def explode(_tokens):
        raise RuntimeError("detokenizer broke")

    bad.detokenizer.update = explode
    outputs = {}
    while eng.has_unfinished_requests():
        for out in eng.step():
            outputs[out.request_id] = out
    assert outputs["bad"].error == "RuntimeError: detokenizer broke"
    assert outputs["bad"].outputs[0].finish_reason == "error"
    assert outputs["good"].error is None and len(outputs["good"].outputs[0].token_ids) == 6
    assert llm.generate("after", greedy(max_tokens=2), use_tqdm=False)[0].outputs[0].token_ids
