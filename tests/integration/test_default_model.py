"""The real default model (SmolLM2-135M-Instruct, Q4_1 GGUF from PyPI): servelm and
transformers load the same file and must produce the same greedy tokens."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from servelm import SamplingParams
from servelm.model.default_model import default_model_path

PROMPTS = ["Once upon a time", "The capital of France is", "def fibonacci(n):"]
MAX_TOKENS = 16


@pytest.mark.network
def test_default_model_greedy_matches_transformers(make_llm):
    path = Path(default_model_path())
    llm = make_llm(path, max_num_batched_tokens=64)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True, logprobs=0)
    outs = llm.generate(PROMPTS, params, use_tqdm=False)
    chat = llm.chat([{"role": "user", "content": "What is 2+2?"}], params, use_tqdm=False)[0]

    hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    with torch.no_grad():
        for out in [*outs, chat]:
            ids = out.prompt_token_ids
            ref = hf.generate(torch.tensor([ids]), max_new_tokens=MAX_TOKENS, do_sample=False,
                              eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
            assert out.outputs[0].token_ids == ref, out.prompt
