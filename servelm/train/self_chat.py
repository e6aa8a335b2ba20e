"""Chat prompts the target writes itself, for training drafts without a network.

The offline prompt sets hold few chat turns (MT-Bench's 80 questions, less the quarter kept
back), too few for a draft to learn how the target answers chat in general. A chat model
asked to continue its template right where a user turn begins writes a plausible user
message; sampled at temperature 1 with a seed each, hundreds of them cost seconds, and the
target's answers to them are the training data (Medusa-2's self-distillation).
"""

from __future__ import annotations

from typing import Any

from servelm.bench.datasets import encode_prompt
from servelm.llm import LLM
from servelm.sampling_params import SamplingParams

SENTINEL = "\x00user message\x00"
MIN_CHARS = 12


def user_turn_opening(tokenizer: Any) -> list[int]:
    """The chat template's tokens up to where a user's message starts."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("prompt source self-chat needs a chat model (a tokenizer with a chat template)")
    text = tokenizer.apply_chat_template([{"role": "user", "content": SENTINEL}], tokenize=False)
    return list(tokenizer.encode(text[: text.index(SENTINEL)], add_special_tokens=False))


def self_chat_prompts(llm: LLM, count: int, seed: int = 0, max_tokens: int = 96,
                      progress: bool = True) -> list[list[int]]:
    """Up to `count` chat prompts (token ids, template applied) whose user messages the
    target wrote (cut at `max_tokens`); repeated ones and those under MIN_CHARS are dropped."""
    tokenizer = llm.get_tokenizer()
    opening = {"prompt_token_ids": user_turn_opening(tokenizer)}
    params = [SamplingParams(temperature=1.0, top_p=0.95, max_tokens=max_tokens, seed=seed + i)
              for i in range(count)]
    outs = llm.generate([opening] * count, params, use_tqdm=progress)
    texts = {o.outputs[0].text.strip() for o in outs}
    return [encode_prompt(tokenizer, t) for t in sorted(texts) if len(t) >= MIN_CHARS]
