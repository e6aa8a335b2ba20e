"""logit_bias (OpenAI's): a large bias makes greedy pick the token, a -100 one bans it, on
its row only; bad biases are refused naming the field."""

from __future__ import annotations

import pytest

from servelm import SamplingParams


def test_bias_steers_its_own_row_only(tiny_model_dir, make_llm):
    llm = make_llm(tiny_model_dir("llama"))
    free = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    plain = llm.generate("Once upon", free, use_tqdm=False)[0].outputs[0].token_ids
    banned = plain[0]
    pushed = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logit_bias={"77": 100})
    ban = SamplingParams(temperature=0.8, seed=1, max_tokens=30, ignore_eos=True, logit_bias={banned: -100})
    outs = llm.generate(["Once upon", "Once upon", "Once upon"], [pushed, ban, free], use_tqdm=False)
    assert outs[0].outputs[0].token_ids == [77] * 8
    assert banned not in outs[1].outputs[0].token_ids
    assert outs[2].outputs[0].token_ids == plain


@pytest.mark.parametrize("bias,message", [
    ({5: 101}, r"logit_bias\[5\] must be in"),
    ({-1: 1.0}, "logit_bias keys must be token ids"),
    ({"x": 1.0}, "logit_bias keys must be token ids"),
    ({i: 1.0 for i in range(1025)}, "the limit is 1024"),
])
def test_bad_biases_are_refused(bias, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(logit_bias=bias)


def test_out_of_vocabulary_id_is_refused(tiny_model_dir, make_llm):
    llm = make_llm(tiny_model_dir("llama"))
    with pytest.raises(ValueError, match="out of the vocabulary"):
        llm.generate("x", SamplingParams(logit_bias={10**6: 1.0}), use_tqdm=False)
