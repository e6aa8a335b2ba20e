"""train-draft's self-chat prompt source: user messages the target writes itself, sampled
from the point of its chat template where a user turn starts, then sent back through the
template as prompts."""

from __future__ import annotations

import pytest

from servelm.bench.datasets import encode_prompt
from servelm.train.self_chat import self_chat_prompts, user_turn_opening


def test_prompts_are_the_target_s_own_user_messages(tiny_model_dir, make_llm):
    llm = make_llm(tiny_model_dir("llama"))
    tok = llm.get_tokenizer()
    opening = user_turn_opening(tok)
    assert tok.decode(opening) == "<|im_start|>user\n"
    prompts = self_chat_prompts(llm, 12, seed=5, max_tokens=16, progress=False)
    assert 0 < len(prompts) <= 12 and len({tuple(p) for p in prompts}) == len(prompts)
    for p in prompts:
        text = tok.decode(p)
        assert text.startswith("<|im_start|>user\n") and text.endswith("<|im_start|>assistant\n")
        message = text.removeprefix("<|im_start|>user\n").removesuffix("<|im_end|>\n<|im_start|>assistant\n")
        assert encode_prompt(tok, message) == p
    assert self_chat_prompts(llm, 12, seed=5, max_tokens=16, progress=False) == prompts  # seeded


def test_needs_a_chat_template(tiny_model_dir, make_llm):
    tok = make_llm(tiny_model_dir("llama")).get_tokenizer()
    tok.chat_template = None
    with pytest.raises(ValueError, match="self-chat needs a chat model"):
        user_turn_opening(tok)
